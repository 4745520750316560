"""``coinfer bench latency`` without Ray: the summary (agreement with the data models'
own answers, task accuracy only with labels and with its scoring named), the
reference top-1 computed from a saved bundle, and the command end to end against
the HTTP frontend over a stub runtime that runs the bundle's data models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coinfer import Bundle, Code, build_model, encode
from coinfer.errors import CoinferError, UntrustedCodeError
from coinfer.serving.commands import parse_tasks
from coinfer.serving.config import ServeConfig
from coinfer.serving.loadgen import LoadResult, reference_top1, summarize
from coinfer.serving.metrics import Metrics

ARCH = {"name": "mlp", "kwargs": {"in_features": 4, "hidden": [8], "num_classes": 3}}


def _result(top1, rec, labels=None, latency=None) -> LoadResult:
    top1, rec = np.asarray(top1), np.asarray(rec, dtype=bool)
    n = len(top1)
    lat = np.full(n, 0.01) if latency is None else np.asarray(latency, dtype=float)
    has = labels is not None
    lab = np.asarray(labels) if has else np.full(n, -1)
    return LoadResult(
        latency_s=lat,
        status=np.where(np.isnan(lat), 504, 200),
        reconstructed=rec.any(1),
        correct=(top1 == lab[:, None]) & has,
        reconstructed_outputs=rec,
        labels=lab,
        has_label=has,
        top1=top1,
        index=np.arange(n),
        duration_s=1.0,
        errors={},
        config={},
    )


def test_summary_reports_agreement_overall_and_on_reconstructed_outputs_without_labels():
    # 4 answered requests of k = 2 and one timeout; output 1 reconstructed in requests 1 and 3
    top1 = [[0, 2], [1, 0], [2, 2], [0, 1], [-1, -1]]
    rec = [[False, False], [False, True], [False, False], [False, True], [False, False]]
    reference = np.array([[0, 2], [1, 2], [2, 2], [0, 1], [1, 1]])  # request 1's output 1 disagrees
    s = summarize(_result(top1, rec, latency=[0.01] * 4 + [np.nan]), reference=reference)
    assert s["answered"] == 4 and s["reconstructed_outputs"] == 2
    assert s["agreement"] == 7 / 8 and s["agreement_outputs"] == 8
    assert s["agreement_received"] == 1.0 and s["agreement_reconstructed"] == 0.5
    assert s["agreement_reconstructed_outputs"] == 2 and s["agreement_per_model"] == [1.0, 0.75]
    assert not any(key.startswith(("accuracy", "task_", "data_model")) for key in s)  # no labels
    assert "agreement" not in summarize(_result(top1, rec))  # no reference


def test_summary_scores_labels_as_it_says_and_beside_the_data_models_own_accuracy():
    # a class-split k = 2 bundle: output 0 knows classes 0-1, output 1 classes 2-3
    labels = [0, 3, 1, 2]
    top1 = [[0, 2], [1, 3], [1, 0], [3, 2]]
    rec = [[False, False], [False, True], [True, False], [False, False]]
    reference = np.array([[0, 2], [1, 3], [0, 0], [3, 2]])
    s = summarize(_result(top1, rec, labels), reference=reference)
    # every output against every label: half the outputs are another model's classes
    assert s["accuracy"] == 4 / 8 and s["accuracy_scoring"] == "every output against the label of its input"
    assert s["data_model_accuracy"] == 3 / 8 and "task_accuracy" not in s
    t = summarize(_result(top1, rec, labels), reference=reference, tasks=[[0, 1], [2, 3]])
    assert t["task_scoring"] == [[0, 1], [2, 3]]
    # own-class outputs: (0, m0) right, (3, m1) right rec, (1, m0) right rec, (2, m1) right
    assert t["task_accuracy"] == 1.0 and t["task_accuracy_reconstructed"] == 1.0
    assert t["task_accuracy_per_model"] == [1.0, 1.0]
    assert t["data_model_task_accuracy"] == 0.75  # the data model 0 itself says 0 for the input of class 1
    # agreement on the same own-class outputs: the reconstructed (1, m0) is right where its model is wrong
    assert t["agreement"] == 0.75 and t["agreement_reconstructed"] == 0.5 and t["agreement_outputs"] == 4


def test_tasks_option_parses_or_names_the_problem():
    assert parse_tasks("all", 2, 10) is None
    assert parse_tasks("classes", 2, 10) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert parse_tasks(" 0-2,9 ; 3-8 ", 2, 10) == [[0, 1, 2, 9], [3, 4, 5, 6, 7, 8]]
    for text, words in [
        ("0-4", "gives 1 groups of classes; the server serves k = 2"),
        ("0-4;x", "'all', 'classes' or 2 groups"),
        ("0-4;5-12", "names classes [10, 11, 12]"),
    ]:
        with pytest.raises(CoinferError, match=words.replace("[", r"\[").replace("]", r"\]")):
            parse_tasks(text, 2, 10)
    with pytest.raises(CoinferError, match="reports no class_names"):
        parse_tasks("classes", 2, None)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    models = [build_model(ARCH) for _ in range(2)]
    code = Code(2, 1)
    coded = encode(models, code, torch.randn(32, 4), method="average")
    path = tmp_path_factory.mktemp("bench") / "bundle"
    Bundle(ARCH, code, models, list(coded), (4,), ["a", "b", "c"], coded.info).save(path)
    return path


def _code_bundle(bundle_dir: Path, tmp_path: Path) -> Path:
    """A copy of the bundle whose architecture is code (this module's factory)."""
    import shutil

    path = tmp_path / "code-bundle"
    shutil.copytree(bundle_dir, path)
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    m["architecture"] = {"name": "tests.test_bench_latency:factory", "kwargs": ARCH["kwargs"]}
    mf.write_text(json.dumps(m))
    return path


def factory(**kwargs):
    """A user's own architecture factory, referenced as tests.test_bench_latency:factory."""
    return build_model({"name": "mlp", "kwargs": kwargs})


def test_reference_top1_is_each_data_models_own_answer(bundle_dir, tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    b = Bundle.load(bundle_dir)
    with torch.no_grad():
        want = np.stack([m.eval()(torch.from_numpy(x)).argmax(-1).numpy() for m in b.data_models], 1)
    served = {"k": 2, "r": 1, "weights": [[0.5, 0.5]], "architecture": ARCH, "input_shape": [4]}
    np.testing.assert_array_equal(reference_top1(bundle_dir, x, 2, batch=7, served=served), want)
    with pytest.raises(CoinferError, match="does not exist"):
        reference_top1(tmp_path / "nowhere", x, 2)
    with pytest.raises(CoinferError, match="has k = 2 data models, the server serves k = 3"):
        reference_top1(bundle_dir, x, 3)
    with pytest.raises(CoinferError, match="takes inputs of shape"):
        reference_top1(bundle_dir, np.zeros((2, 5), np.float32), 2)
    with pytest.raises(CoinferError, match="not the one the server serves: its weights differ"):
        reference_top1(bundle_dir, x, 2, served={**served, "weights": [[0.3, 0.7]]})
    code = _code_bundle(bundle_dir, tmp_path)
    with pytest.raises(UntrustedCodeError):
        reference_top1(code, x, 2)
    np.testing.assert_array_equal(reference_top1(code, x, 2, trust_code=True), want)


class BundleRuntime:
    """What the HTTP app reads from a Runtime; predict runs the bundle's data models here.
    Every other request reports output 1 as reconstructed, with a wrong answer (its
    probabilities rolled by one class), so the agreement on reconstructed outputs is 0."""

    def __init__(self, served: Path, path: Path | None = None):
        self.bundle = Bundle.load(path or served, trust_code=True)
        self.config = ServeConfig(served)
        self.input_shape = self.bundle.input_shape
        self.mode = "coded"
        self.class_names = self.bundle.class_names
        self.code = self.bundle.code
        self.manifest = self.bundle.manifest
        self.metrics = Metrics()
        self.calls = 0

    async def predict(self, x: np.ndarray, mode: str):
        from types import SimpleNamespace

        self.calls += 1
        with torch.no_grad():
            out = torch.stack(
                [torch.softmax(m.eval()(torch.from_numpy(x)), -1) for m in self.bundle.data_models]
            )
        rec = [False, self.calls % 2 == 0]
        if rec[1]:
            out[1] = out[1].roll(1, -1)
        return SimpleNamespace(outputs=out, reconstructed=rec, used={0: 0, 1: 1}, failed={}, late=[])

    def state(self) -> dict:
        return {"mode": self.mode, "workers": [], "down": []}

    def health_report(self) -> dict:
        return {"status": "ok", "mode": self.mode, "down": [], "failing": [], "unavailable": {}}


def _bench(monkeypatch, capsys, url: str, out: Path, *extra) -> tuple[int, str, str]:
    from coinfer.cli import main

    args = ["coinfer", "bench", "latency", "--url", url, "--rate", "400", "--requests", "40"]
    monkeypatch.setattr(sys, "argv", [*args, "--out", str(out), *map(str, extra)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, " ".join(captured.out.split()), captured.err


@pytest.fixture
def serve(bundle_dir):
    from coinfer.serving.server import Server

    servers = []

    def start(served: Path, path: Path | None = None):
        srv = Server(BundleRuntime(served, path), port=0).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def test_bench_latency_reports_agreement_and_names_what_the_labels_score(
    bundle_dir, tmp_path, serve, monkeypatch, capsys
):
    srv = serve(bundle_dir)
    rng = np.random.default_rng(1)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((30, 4)).astype(np.float32), y=rng.integers(0, 3, 30))
    code, out, err = _bench(monkeypatch, capsys, srv.url, tmp_path / "a.json", "--data", data)
    assert code == 0, err
    assert "answered 40/40" in out and "(20 outputs)" in out
    assert (
        "agreement with the data models' own top-1 (the uncoded answer, computed here): 0.7500 of 80 outputs;"
        in out
    )
    assert "0.0000 of 20 reconstructed" in out
    assert f"task accuracy vs the labels of {data}, every output scored against the label of its input" in out
    assert "the data models themselves" in out
    s = json.loads((tmp_path / "a.json").read_text())
    assert s["agreement"] == 0.75 and s["agreement_reconstructed"] == 0.0
    assert s["accuracy_scoring"] == "every output against the label of its input"
    # explicit tasks: each output on its own labels, and said so
    code, out, err = _bench(
        monkeypatch, capsys, srv.url, tmp_path / "b.json", "--data", data, "--tasks", "0;1-2"
    )
    assert code == 0, err
    assert "output 0 scored on inputs labelled 0, output 1 scored on inputs labelled 1-2" in out
    assert "on inputs of each output's own classes" in out
    # without labels: agreement only, no accuracy at all
    code, out, err = _bench(monkeypatch, capsys, srv.url, tmp_path / "c.json")
    assert code == 0, err
    assert "agreement with the data models" in out and "accuracy" not in out
    code, out, err = _bench(monkeypatch, capsys, srv.url, tmp_path / "d.json", "--tasks", "classes")
    assert code == 1 and "scores labels, but there are none" in err


def test_bench_latency_says_why_agreement_is_not_computed_and_how_to_fix_it(
    bundle_dir, tmp_path, serve, monkeypatch, capsys
):
    code_bundle = _code_bundle(bundle_dir, tmp_path)
    srv = serve(code_bundle)
    code, out, err = _bench(monkeypatch, capsys, srv.url, tmp_path / "a.json")
    assert code == 0, err
    assert out.count("agreement not computed:") == 1
    assert (
        "architecture 'tests.test_bench_latency:factory', which is code" in out and "pass --trust-code" in out
    )
    assert "--trust-code" in json.loads((tmp_path / "a.json").read_text())["agreement_not_computed"]
    code, out, err = _bench(monkeypatch, capsys, srv.url, tmp_path / "b.json", "--trust-code")
    assert code == 0, err
    assert "agreement not computed" not in out and "0.7500 of 80 outputs" in out
    # a path the server reports that is not readable here: say so, and how to point at it
    moved = serve(tmp_path / "elsewhere", bundle_dir)
    code, out, err = _bench(monkeypatch, capsys, moved.url, tmp_path / "c.json")
    assert code == 0, err
    assert (
        "agreement not computed: bundle directory" in out
        and "(the path the server reports in /v1/models)" in out
    )
    assert "pass --bundle" in out
    code, out, err = _bench(monkeypatch, capsys, moved.url, tmp_path / "d.json", "--bundle", bundle_dir)
    assert code == 0 and "0.7500 of 80 outputs" in out, err
