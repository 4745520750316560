"""Experiment harness: configs, every method's coded model, caching, CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coinfer.code import Code
from coinfer.errors import CoinferError
from coinfer.experiments.config import ExperimentConfig, TrainConfig, config_from_dict, load_config
from coinfer.experiments.presets import DEFAULT_METHODS, PRESETS, BuildContext, build_variants
from coinfer.experiments.run import run_seed

SHARED = Path(__file__).parents[2] / "shared" / "data"
REPO = Path(__file__).parents[1]


def _tiny(tmp_path, **kw) -> ExperimentConfig:
    base = dict(
        name="tiny",
        dataset="digits",
        base=TrainConfig(epochs=3, lr=3e-3),
        finetune=TrainConfig(epochs=3, lr=3e-3),
        calibration_sizes=[64, 128],
        distill_epochs=[1],
        coin_distill_epochs=[1],
        out_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        threads=1,
    )
    base.update(kw)
    return ExperimentConfig(**base)


def test_toml_config_loads_and_refuses_unknown_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        'dataset = "digits"\nk = 3\nseeds = [1, 2]\n[base]\nepochs = 2\n[finetune]\noptimizer = "sgd"\n'
    )
    cfg = load_config(p, scenario="iid")
    assert cfg.k == 3 and cfg.seeds == [1, 2] and cfg.scenario == "iid"
    assert cfg.base.epochs == 2 and cfg.finetune.optimizer == "sgd"
    p.write_text("datset = 'digits'\n")
    with pytest.raises(CoinferError, match="datset"):
        load_config(p)
    p.write_text("[base]\nepoch = 2\n")
    with pytest.raises(CoinferError, match="epoch"):
        load_config(p)
    p.write_text("k = [\n")
    with pytest.raises(CoinferError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(CoinferError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"scenario": "weird"}, "scenario"),
        ({"k": 1}, "k must be"),
        ({"r": 3}, "r must be"),
        ({"methods": ["coin-magic"]}, "coin-magic"),
        ({"calibration_sizes": [0]}, "calibration_sizes"),
        ({"fisher_backend": "gpu"}, "fisher_backend must be one of"),
        ({"code_weights": [[0.7, 0.7]]}, "row 0 sums to 1.4"),
    ],
)
def test_bad_config_values_are_refused(bad, match):
    with pytest.raises(CoinferError, match=match):
        config_from_dict(bad)


def test_shipped_configs_are_valid():
    files = sorted((REPO / "experiments").glob("*.toml"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert set(cfg.methods) <= set(PRESETS)


def _small_models(spec, x, y, k=2, r=1):
    from coinfer.architectures import build_model
    from coinfer.experiments.train import fit

    torch.manual_seed(0)
    base = build_model(spec)
    fit(base, x, y, epochs=1, progress=False)
    models = []
    for i in range(k):
        m = build_model(spec)
        m.load_state_dict(base.state_dict())
        mask = (y % k) == i
        fit(m, x[mask], y[mask], epochs=1, seed=i, progress=False)
        models.append(m)
    return base, models, Code(k, r)


def _rebuild(spec):
    from coinfer import build_model

    return build_model(spec)


def _check_every_method_builds_same_architecture(spec, x, y, r=1, methods=None):
    base, models, code = _small_models(spec, x, y, r=r)
    methods = list(PRESETS) if methods is None else methods
    cfg = ExperimentConfig(
        methods=methods, calibration_sizes=[32], distill_epochs=[1], coin_distill_epochs=[1]
    )
    variants = build_variants(
        BuildContext(cfg, models, base, code, x[:32], y[:32], x[:64], seed=0, progress=False)
    )
    assert {v.family for v in variants} == set(methods)
    ref = models[0].state_dict()
    for v in variants:
        if v.kind == "estimates":
            assert v.family in ("substitute", "default") and v.build is None and v.estimates is not None
            continue
        coded, info = v.build()
        assert len(coded) == code.r, v.label
        for c in coded:
            sd = c.state_dict()
            assert all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())
            with torch.no_grad():
                assert c(x[:3]).shape == models[0](x[:3]).shape, v.label
            if (
                PRESETS[v.family].method == "heads"
            ):  # a merged trunk + per-model heads, rebuilt from its structure
                from coinfer.heads import HeadsParity, build_parity

                assert isinstance(c, HeadsParity) and info["parity_cost"] >= 1.0
                build_parity(_rebuild(spec), c.structure()).load_state_dict(sd)
                continue
            assert type(c) is type(models[0])
            assert sd.keys() == ref.keys()
            assert all(sd[n].shape == ref[n].shape for n in ref)
        assert "seconds" in info and "forward_passes" in info


def test_every_method_builds_a_coded_model_of_the_right_architecture_mlp():
    from coinfer.experiments.data import load_digits

    ds = load_digits()
    spec = {"name": "mlp", "kwargs": {"in_features": 64, "hidden": [16], "num_classes": 10}}
    _check_every_method_builds_same_architecture(spec, ds.x_train[:200], ds.y_train[:200], r=2)


def test_every_method_builds_a_coded_resnet_with_batchnorm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    spec = {"name": "resnet20", "kwargs": {"num_classes": 4, "width": 4}}
    # the presets that only widen the cost budget beyond 1.5 search every ResNet-20 split at
    # every refit depth (about a minute each here); the MLP test above builds them
    methods = [n for n, p in PRESETS.items() if p.options.get("max_parity_cost", 0) <= 1.5]
    assert len(methods) < len(PRESETS)
    _check_every_method_builds_same_architecture(spec, x, y, methods=methods)


@pytest.mark.skipif(not (SHARED / "mnist.npz").exists(), reason="shared data not present")
def test_run_on_a_real_mnist_slice_with_lenet5(tmp_path):
    cfg = _tiny(
        tmp_path,
        dataset="mnist",
        data_dir=str(SHARED),
        train_limit=1500,
        test_limit=500,
        val_size=300,
        methods=["coin-exact", "average", "base", "substitute"],
        base=TrainConfig(epochs=1),
        finetune=TrainConfig(epochs=1),
    )
    res = run_seed(cfg, 0, progress=False)
    assert res["arch"]["name"] == "lenet5" and res["splits"]["test"] == 500
    assert {m["family"] for m in res["methods"]} == {"coin-exact", "average", "base", "substitute"}
    assert res["splits"] == {"val": 300, "base": 400, "pool": 800, "test": 500}
    acc = {m["family"]: m["test"]["reconstruction_acc"] for m in res["methods"] if m["chosen"]}
    # measured on seed 0: coin-exact 0.75, average 0.89, base 0.50, substitute 0.0
    assert min(acc["coin-exact"], acc["average"]) > acc["base"] + 0.1 > acc["substitute"] + 0.1


def test_run_seed_writes_results_chooses_on_validation_and_caches(tmp_path):
    cfg = _tiny(tmp_path, methods=DEFAULT_METHODS)
    res = run_seed(cfg, 0, progress=False)
    run_dir = Path(res["run_dir"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["seed"] == 0 and len(saved["models"]) == 2
    lines = (run_dir / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + len(saved["methods"])
    fams = {m["family"] for m in saved["methods"]}
    assert fams == set(DEFAULT_METHODS)
    for fam in fams:
        cands = [m for m in saved["methods"] if m["family"] == fam]
        chosen = [m for m in cands if m["chosen"]]
        assert len(chosen) == 1
        assert chosen[0]["val"]["reconstruction_acc"] == max(m["val"]["reconstruction_acc"] for m in cands)
    # coin has one variant per calibration size, and reports the Fisher totals
    coin = [m for m in saved["methods"] if m["family"] == "coin-exact"]
    assert {m["params"]["calibration"] for m in coin} == {64, 128}
    assert all(len(m["fisher_totals"]) == 2 for m in coin)
    # zero-cost controls cost nothing; the ideal mixture is not reached by the base control
    base = next(m for m in saved["methods"] if m["family"] == "base")
    assert base["seconds"] == 0.0 and base["coded_tv"][0] > 0
    assert not any(m["cached"] for m in saved["models"])
    again = run_seed(cfg, 0, progress=False)
    assert all(m["cached"] for m in again["models"]) and again["base_model"]["cached"]
    assert [m["task_test_acc"] for m in again["models"]] == [m["task_test_acc"] for m in saved["models"]]
    # a different fine-tune budget is a different cache entry
    other = run_seed(_tiny(tmp_path, finetune=TrainConfig(epochs=1, lr=3e-3), methods=["base"]), 0, False)
    assert other["base_model"]["cached"] and not any(m["cached"] for m in other["models"])


def test_cli_experiment_then_report(tmp_path):
    from typer.testing import CliRunner

    from coinfer.cli import app

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        'name = "e2e"\ndataset = "digits"\nscenario = "dirichlet"\nseeds = [0, 1]\n'
        'methods = ["coin-exact", "average", "distill-calib", "base", "substitute", "default"]\n'
        "calibration_sizes = [64]\ndistill_epochs = [1]\nthreads = 1\n"
        "[base]\nepochs = 2\nlr = 0.003\n[finetune]\nepochs = 2\nlr = 0.003\n"
    )
    runner = CliRunner()
    out = tmp_path / "runs"
    res = runner.invoke(
        app,
        ["experiment", str(cfg), "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    assert "recon acc" in res.output and "coin-exact" in res.output
    assert (out / "e2e" / "seed0" / "results.json").exists() and (
        out / "e2e" / "seed1" / "results.csv"
    ).exists()
    rep = tmp_path / "report"
    res = runner.invoke(app, ["report", str(out / "e2e"), "--out", str(rep)])
    assert res.exit_code == 0, res.output
    md = (rep / "report.md").read_text()
    assert "| coin-exact |" in md and "seeds [0, 1]" in md and "±" in md
    assert "Accuracy/cost frontier" in md and "| parity cost |" in md
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in md.splitlines()
        if line.startswith("| ")
    }
    cost_col = rows["method"].index("parity cost")
    assert rows["substitute"][cost_col] == "0.00" and rows["coin-exact"][cost_col] == "1.00"
    from coinfer.experiments.report import aggregate, frontier, load_results

    front = frontier(aggregate(load_results([out / "e2e"]))[0])
    assert all(a[1] <= b[1] and a[2] < b[2] for a, b in zip(front, front[1:], strict=False))
    assert {c for *_, c in front} <= {0.0, 1.0}
    pngs = list(rep.glob("*.png"))
    assert (rep / "accuracy.png") in pngs and any(p.name.startswith("frontier_") for p in pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (rep / "summary.csv").read_text().count("\n") == 1 + 6


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "coinfer.cli", "report", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 1
        and r.stderr.strip() == f"error: run directory {tmp_path / 'nowhere'} does not exist"
    )
    r = subprocess.run(
        [sys.executable, "-m", "coinfer.cli", "experiment", "--dataset", "mnist"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "--data-dir" in r.stderr


def test_arch_accepts_an_inline_table_as_well_as_a_name(tmp_path):
    from coinfer.architectures import build_model
    from coinfer.experiments.data import load_digits

    ds = load_digits()
    p = tmp_path / "c.toml"
    p.write_text('arch = {name = "mlp", kwargs = {hidden = [8]}}\n')
    cfg = load_config(p)
    spec = cfg.arch_spec(ds)
    assert spec == {"name": "mlp", "kwargs": {"hidden": [8], "in_features": 64, "num_classes": 10}}
    assert build_model(spec)(ds.x_test[:3]).shape == (3, 10)
    # the same spec as the string form with arch_kwargs, so the same cache entries
    p.write_text('arch = "mlp"\narch_kwargs = {hidden = [8]}\n')
    assert load_config(p).arch_spec(ds) == spec
    p.write_text('arch = {name = "mlp"}\n')
    assert load_config(p).arch_spec(ds)["kwargs"] == {"in_features": 64, "num_classes": 10}
    for text, match in [
        ("arch = {kwargs = {hidden = [8]}}\n", "arch: architecture spec must be a name or"),
        ('arch = {name = "mlp", width = 8}\n', r"arch table has unknown key\(s\) \['width'\]"),
        ('arch = {name = "mlp", kwargs = {hidden = [8]}}\narch_kwargs = {hidden = [4]}\n', "not both"),
        ("arch = 3\n", "arch must be a name or a table"),
    ]:
        p.write_text(text)
        with pytest.raises(CoinferError, match=match):
            load_config(p)


def test_a_run_with_an_inline_arch_table_trains_that_architecture(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        'name = "inline"\narch = {name = "mlp", kwargs = {hidden = [8]}}\nmethods = ["substitute"]\n'
        "calibration_sizes = [16]\nthreads = 1\n[base]\nepochs = 1\n[finetune]\nepochs = 1\n"
    )
    cfg = load_config(p, out_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    res = run_seed(cfg, 0, progress=False)
    assert res["arch"] == {"name": "mlp", "kwargs": {"hidden": [8], "in_features": 64, "num_classes": 10}}


def test_reports_of_results_written_before_parity_cost_was_recorded():
    from coinfer.experiments.report import aggregate, load_results, markdown_table, parity_cost_of

    results = load_results([REPO / "experiments" / "results" / "mnist_class-split_k2r1"])
    assert results and not any("parity_cost" in m for res in results for m in res["methods"])
    (group,) = aggregate(results)
    cost = {r["family"]: r["parity_cost"][0] for r in group["methods"]}
    assert cost["substitute"] == cost["default"] == 0.0
    assert cost["coin-exact"] == cost["base"] == cost["distill-common"] == 1.0
    assert parity_cost_of({"family": "x", "parity_cost": 2.5}) == 2.5
    assert "| parity cost |" in markdown_table(group)
