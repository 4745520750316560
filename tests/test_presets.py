"""The presets table: every line well formed, the variants it expands to, a new line in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import coinfer.experiments.presets as presets
from coinfer.code import Code
from coinfer.encoders import METHODS, Method, weighted_average
from coinfer.errors import CoinferError
from coinfer.experiments.config import ExperimentConfig, TrainConfig, config_from_dict
from coinfer.experiments.presets import (
    CONTROLS,
    PRESETS,
    BuildContext,
    Preset,
    build_variants,
    check_presets,
)


def _ctx(cfg: ExperimentConfig, bn: bool = False, n: int = 40) -> BuildContext:
    torch.manual_seed(0)

    def mk():
        if bn:
            return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 3))
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 3))

    x = torch.randn(n, 1, 6, 6)
    return BuildContext(
        cfg, [mk(), mk()], mk(), Code(2, 1), x, torch.randint(0, 3, (n,)), torch.randn(50, 1, 6, 6), seed=7
    )


def test_every_preset_names_a_registered_encoder_or_control_with_declared_options():
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    for name, p in PRESETS.items():
        if p.control:
            assert p.method in CONTROLS and not p.options and not p.axes, name
            continue
        declared = {f.name for f in dataclasses.fields(METHODS[p.method].options)}
        assert set(p.options) <= declared, name
        assert set(p.axes) <= declared | {"calibration"}, name
        assert all(src in fields or src in presets._DERIVED for src in p.axes.values()), name
        assert p.description, name
    check_presets(ExperimentConfig(methods=list(PRESETS)))


def test_variants_labels_params_and_order_are_those_of_the_committed_results():
    cfg = ExperimentConfig(
        methods=list(PRESETS), calibration_sizes=[10, 20], distill_epochs=[1, 3], coin_distill_epochs=[1]
    )
    vs = build_variants(_ctx(cfg))
    coin = [f"{m} n={n}" for m in list(PRESETS)[:6] for n in (10, 20)]
    assert [v.label for v in vs] == [
        *coin,
        "average",
        "distill-common E=1",
        "distill-common E=3",
        "distill-random E=1",
        "distill-random E=3",
        "distill-calib n=10 E=1",
        "distill-calib n=10 E=3",
        "distill-calib n=20 E=1",
        "distill-calib n=20 E=3",
        "coin+distill-calib n=20 E=1",
        "coin+distill-train n=20 E=1",
        "heads split=auto n=10",
        "heads split=auto n=20",
        "heads-coin split=auto n=10",
        "heads-coin split=auto n=20",
        "heads-copy split=auto n=10",
        "heads-copy split=auto n=20",
        "heads-1.5 n=10",
        "heads-1.5 n=20",
        "heads-2.0 n=10",
        "heads-2.0 n=20",
        "heads-3.0 n=10",
        "heads-3.0 n=20",
        "heads-2.0-1trunk n=10",
        "heads-2.0-1trunk n=20",
        "heads-2.0-polish n=10",
        "heads-2.0-polish n=20",
        "heads-regmean split=auto n=10",
        "heads-regmean split=auto n=20",
        "heads-polish split=auto n=10",
        "heads-polish split=auto n=20",
        "base",
        "substitute",
        "default",
    ]
    by = {v.label: v for v in vs}
    assert by["heads split=auto n=20"].params == {"split": "auto", "calibration": 20}
    assert by["coin-exact n=10"].params == {"calibration": 10, "eps": 1e-12}
    assert by["average"].params == {} and by["distill-common E=3"].params == {"epochs": 3}
    assert by["coin+distill-train n=20 E=1"].params == {"calibration": 20, "epochs": 1}
    assert [v.kind for v in vs[-3:]] == ["parity", "estimates", "estimates"]
    assert all(v.control == (v.family in ("base", "substitute", "default")) for v in vs)
    # with BatchNorm, averaging recomputes the statistics on the largest calibration sample
    avg_bn = next(v for v in build_variants(_ctx(cfg, bn=True)) if v.family == "average")
    assert avg_bn.label == "average n=20" and avg_bn.params == {"calibration": 20}
    # eps shows in the label once it is a grid
    two_eps = dataclasses.replace(cfg, methods=["coin-exact"], coin_eps=[1e-12, 1e-6])
    assert [v.label for v in build_variants(_ctx(two_eps))][:2] == [
        "coin-exact n=10 eps=1e-12",
        "coin-exact n=10 eps=1e-06",
    ]


def test_variants_pass_the_presets_options_and_the_runs_context(monkeypatch):
    calls = []

    def fake_encode(models, code, calibration, method, **opts):
        calls.append((method, len(calibration[0]), opts))
        res = type("R", (list,), {})([])
        res.info = {}
        return res

    monkeypatch.setattr(presets, "encode", fake_encode)
    cfg = ExperimentConfig(
        methods=["coin-empirical-norm", "distill-common", "coin+distill-train"],
        calibration_sizes=[10, 20],
        distill_epochs=[2],
        fisher_backend="vmap",
        distill_lr=0.01,
        distill_batch_size=7,
    )
    ctx = _ctx(cfg)
    for v in build_variants(ctx):
        v.build()
    (m1, n1, o1), _, (m2, n2, o2), (m3, n3, o3) = calls
    assert (m1, n1) == ("coin", 10)
    assert o1 == {
        "seed": 7,
        "progress": None,
        "backend": "vmap",
        "estimator": "empirical",
        "normalize": True,
        "eps": 1e-12,
    }
    assert (m2, n2) == ("distill", 20) and o2["init"] is ctx.base and o2["train_inputs"] is ctx.pool_x
    assert (o2["lr"], o2["batch_size"], o2["epochs"], o2["seed"]) == (0.01, 7, 2, 7)
    assert (m3, n3, o3["init"], o3["epochs"]) == ("distill", 20, "coin", 1)
    assert o3["coin"] == {"estimator": "exact", "seed": 7, "backend": "vmap", "progress": None}


# --------------------------------------------------------------------------- a new encoder is one line
@dataclass
class _HeadsOptions:
    """Stand-in for the options of a ``heads`` encoder (a split point plus COIN's options)."""

    split: str = "auto"
    trunk: str = "coin"
    refit: bool = False
    max_parity_cost: float = 2.0
    num_samples: int | None = None
    seed: int = 0
    backend: str = "auto"
    progress: bool | None = None

    def validate(self) -> None:
        if self.trunk not in ("coin", "average"):
            raise ValueError(f"heads option 'trunk' must be 'coin' or 'average', got {self.trunk!r}")


def _fake_heads(models, code, x, y, opts):
    """A parity that reports its own inference cost."""
    return [weighted_average(models, row) for row in code.weights], {"parity_cost": 1.5, "split": opts.split}


@pytest.fixture
def heads_registered(monkeypatch):
    monkeypatch.setitem(
        METHODS, "heads", Method("heads", options=_HeadsOptions, fn=_fake_heads, doc="fake heads")
    )
    line = Preset(
        "heads",
        {"trunk": "coin", "refit": True},
        axes={"split": "heads_splits", "num_samples": "calibration_sizes"},
        description="heads on a COIN trunk",
    )
    monkeypatch.setitem(PRESETS, "heads-coin", line)


def test_a_new_encoder_variant_is_one_table_line(heads_registered, monkeypatch):
    seen = []
    real = presets.encode
    monkeypatch.setattr(presets, "encode", lambda *a, **k: seen.append(k) or real(*a, **k))
    cfg = ExperimentConfig(
        methods=["heads-coin"], heads_splits=["auto", "layer3"], calibration_sizes=[10, 20]
    )
    vs = build_variants(_ctx(cfg))
    assert [v.label for v in vs] == [
        "heads-coin split=auto n=10",
        "heads-coin split=auto n=20",
        "heads-coin split=layer3 n=10",
        "heads-coin split=layer3 n=20",
    ]
    assert vs[2].params == {"split": "layer3", "num_samples": 10}
    coded, info = vs[2].build()
    assert len(coded) == 1 and info["parity_cost"] == 1.5 and info["options"]["split"] == "layer3"
    assert {k: seen[0][k] for k in ("trunk", "refit", "split", "num_samples", "seed", "backend")} == {
        "trunk": "coin",
        "refit": True,
        "split": "layer3",
        "num_samples": 10,
        "seed": 7,
        "backend": "auto",
    }


def test_presets_are_checked_against_the_config_before_any_work(heads_registered, monkeypatch):
    with pytest.raises(CoinferError, match="heads_splits must not be empty"):
        config_from_dict({"methods": ["heads-coin"], "heads_splits": []})
    with pytest.raises(CoinferError, match="distill option 'batch_size' must be an integer >= 1, got 0"):
        config_from_dict({"methods": ["distill-calib"], "distill_batch_size": 0})
    with pytest.raises(CoinferError, match="coin option 'eps' must be a finite number >= 0, got -1"):
        config_from_dict({"methods": ["coin-exact"], "coin_eps": [1e-12, -1]})
    with pytest.raises(CoinferError, match="backend"):
        config_from_dict({"methods": ["coin+distill-calib"], "fisher_backend": "gpu"})
    monkeypatch.setitem(PRESETS, "heads-bad", Preset("heads", {"trunk": "mlp"}))
    with pytest.raises(CoinferError, match="'heads-bad'.*trunk"):
        config_from_dict({"methods": ["heads-bad"]})
    monkeypatch.setitem(PRESETS, "heads-typo", Preset("heads", {"trunc": "coin"}))
    with pytest.raises(CoinferError, match=r"encoder 'heads' has no option\(s\) \['trunc'\]"):
        config_from_dict({"methods": ["heads-typo"]})
    monkeypatch.setitem(PRESETS, "heads-axis", Preset("heads", axes={"split": "head_splits"}))
    with pytest.raises(CoinferError, match="config field 'head_splits', which does not exist"):
        config_from_dict({"methods": ["heads-axis"]})


def test_a_run_records_the_parity_cost_the_encoder_reports(heads_registered, tmp_path):
    from coinfer.experiments.run import run_seed

    cfg = ExperimentConfig(
        name="heads",
        methods=["heads-coin", "average", "base", "substitute", "default"],
        calibration_sizes=[64],
        base=TrainConfig(epochs=1, lr=3e-3),
        finetune=TrainConfig(epochs=1, lr=3e-3),
        out_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        threads=1,
    )
    res = run_seed(cfg, 0, progress=False)
    cost = {m["family"]: m["parity_cost"] for m in res["methods"]}
    assert cost == {"heads-coin": 1.5, "average": 1.0, "base": 1.0, "substitute": 0.0, "default": 0.0}
    csv_text = (tmp_path / "runs" / "heads" / "seed0" / "results.csv").read_text().splitlines()
    col = csv_text[0].split(",").index("parity_cost")
    assert [line.split(",")[col] for line in csv_text[1:]] == ["1.5", "1", "1", "0", "0"]


def test_the_heads_encoder_is_one_line_of_the_table(monkeypatch):
    line = Preset(
        "heads",
        {"trunk": "coin", "refit": True},
        axes={"split": "heads_splits", "num_samples": "calibration_sizes"},
        description="merged COIN trunk + each model's head",
    )
    monkeypatch.setitem(PRESETS, "heads-coin", line)
    cfg = config_from_dict(
        {"methods": ["heads-coin"], "heads_splits": ["auto", "input"], "calibration_sizes": [20]}
    )
    ctx = _ctx(cfg)
    vs = build_variants(ctx)
    assert [v.label for v in vs] == ["heads-coin split=auto n=20", "heads-coin split=input n=20"]
    coded, info = vs[1].build()  # split at the input: the exact mixture, k times one model's compute
    assert info["options"]["trunk"] == "coin" and info["options"]["num_samples"] == 20
    assert info["parity_cost"] == pytest.approx(2.0, rel=0.05)
    x = ctx.calib_x[:8]
    mix = sum(w * torch.softmax(m(x), -1) for w, m in zip(ctx.code.weights[0], ctx.models, strict=True))
    torch.testing.assert_close(torch.softmax(coded[0](x), -1), mix, rtol=1e-4, atol=1e-5)
    monkeypatch.setitem(PRESETS, "heads-bad", Preset("heads", {"trunk": "mlp"}))
    with pytest.raises(CoinferError, match="'heads-bad'.*trunk"):
        config_from_dict({"methods": ["heads-bad"]})
