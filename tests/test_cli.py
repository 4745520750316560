"""The coinfer CLI end to end on tiny models (in-process, through main())."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from coinfer import Bundle, build_model
from coinfer.bundle import save_model
from coinfer.cli import app, main

ARCH_KWARGS = json.dumps({"in_features": 12, "hidden": [8], "num_classes": 4})


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["coinfer", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def checkpoints(tmp_path):
    torch.manual_seed(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        save_model(build_model({"name": "mlp", "kwargs": json.loads(ARCH_KWARGS)}), p)
        paths.append(p)
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.normal(size=(40, 12)).astype(np.float32), y=rng.integers(0, 4, 40))
    return paths, calib


def encode_args(paths, calib, out, *extra):
    args = ["encode", "--arch", "mlp", "--arch-kwargs", ARCH_KWARGS, "--calibration", calib, "--out", out]
    for p in paths:
        args += ["--model", p]
    return args + list(extra)


def test_encode_inspect_predict_end_to_end(monkeypatch, capsys, tmp_path, checkpoints):
    paths, calib = checkpoints
    out = tmp_path / "bundle"
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        *encode_args(
            paths,
            calib,
            out,
            "--r",
            "2",
            "--method",
            "coin",
            "--estimator",
            "empirical",
            "--labels-key",
            "y",
            "--class-names",
            "a,b,c,d",
        ),
    )
    assert code == 0, err
    assert "wrote bundle" in stdout and "Fisher totals" in stdout
    flat = " ".join(stdout.split())
    assert "parity cost 1.000x" in flat and "reconstruction on the calibration inputs" in flat
    b = Bundle.load(out)
    assert (b.code.k, b.code.r) == (3, 2) and b.encoder["options"]["estimator"] == "empirical"

    code, stdout, err = run_cli(monkeypatch, capsys, "inspect", out)
    assert code == 0, err
    assert "condition number" in stdout and "MISMATCH" not in stdout and stdout.count("ok") >= 5

    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32))
    code, stdout, err = run_cli(
        monkeypatch, capsys, "predict", out, "--input", x, "--missing", "0,2", "--json"
    )
    assert code == 0, err
    res = json.loads(stdout)
    assert res["erased"] == [0, 2]
    assert [o["reconstructed"] for o in res["outputs"]] == [True, False, True]
    # the decoded outputs are what Code.decode gives from the surviving workers
    xt = torch.from_numpy(np.load(x))
    want = b.code.decode(b.predict(xt, [1, 3, 4]), project=True)
    for j, o in enumerate(res["outputs"]):
        np.testing.assert_allclose(o["probabilities"], want[j].numpy(), atol=1e-6)
        assert o["labels"][0] in "abcd"

    code, stdout, _ = run_cli(monkeypatch, capsys, "predict", out, "--input", x)
    assert code == 0 and "reconstructed" in stdout


def test_errors_print_one_line_and_exit_nonzero(monkeypatch, capsys, tmp_path, checkpoints):
    paths, calib = checkpoints
    out = tmp_path / "bundle"
    assert run_cli(monkeypatch, capsys, *encode_args(paths, calib, out))[0] == 0
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 12), np.float32))
    cases = [
        (
            ["predict", out, "--input", x, "--missing", "0,1,2"],
            "cannot decode: workers [0, 1, 2] are missing",
        ),
        (["predict", out, "--input", x, "--missing", "9"], "out of range"),
        (["predict", out, "--input", tmp_path / "nope.npy"], "does not exist"),
        (["inspect", tmp_path / "nothing"], "does not exist"),
        (encode_args(paths[:1], calib, tmp_path / "b1"), "k >= 2"),
        (
            encode_args(
                paths, calib, tmp_path / "b2", "--arch-kwargs", '{"in_features": 13, "num_classes": 4}'
            ),
            "do not match architecture",
        ),
    ]
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 7), np.float32))
    cases.append((["predict", out, "--input", bad], "expected (B, 12)"))
    for args, needle in cases:
        code, stdout, err = run_cli(monkeypatch, capsys, *args)
        assert code != 0, args
        assert needle in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_debug_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["coinfer", "--debug", "inspect", str(tmp_path / "none")])
    with pytest.raises(Exception, match="does not exist"):
        main()


def test_every_command_has_help():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"encode", "inspect", "predict", "demo"} <= set(names)
    for name in [*names, None]:
        args = [sys.executable, "-m", "coinfer.cli"] + ([name] if name else []) + ["--help"]
        res = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "Usage" in res.stdout


def test_encode_a_heads_parity_inspect_shows_its_cost_and_predict_decodes_it(
    monkeypatch, capsys, tmp_path, checkpoints
):
    paths, calib = checkpoints
    out = tmp_path / "heads"
    args = encode_args(paths, calib, out, "--method", "heads", "--option", "split=auto")
    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--option", "max_parity_cost=1.5")
    assert code == 0, err
    assert "parity cost" in stdout
    b = Bundle.load(out)
    st = b.manifest["parities"][0]
    assert b.encoder["method"] == "heads" and st["kind"] == "heads"
    code, stdout, err = run_cli(monkeypatch, capsys, "inspect", out)
    assert code == 0, err
    assert f"parity cost {st['parity_cost']:.3f}" in stdout and f"split {st['split']!r}" in stdout
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(2).normal(size=(4, 12)).astype(np.float32))
    code, stdout, err = run_cli(monkeypatch, capsys, "predict", out, "--input", x, "--missing", "1", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    want = b.code.decode(b.predict(torch.from_numpy(np.load(x)), [0, 2, 3]), project=True)
    np.testing.assert_allclose(res["outputs"][1]["probabilities"], want[1].numpy(), atol=1e-6)


# --------------------------------------------------------------------------- trust model
def _retarget(out, **fields):
    mf = out / "manifest.json"
    m = json.loads(mf.read_text())
    m.update(fields)
    mf.write_text(json.dumps(m))


def test_code_in_a_bundle_needs_trust_code_on_the_command_line(monkeypatch, capsys, tmp_path, checkpoints):
    paths, calib = checkpoints
    out = tmp_path / "bundle"
    assert run_cli(monkeypatch, capsys, *encode_args(paths, calib, out))[0] == 0
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 12), np.float32))
    # a registered architecture needs no opt-in
    assert run_cli(monkeypatch, capsys, "predict", out, "--input", x)[0] == 0
    marker = tmp_path / "marker"
    _retarget(out, architecture={"name": "os:system", "kwargs": {"command": f"touch {marker}"}})
    code, stdout, err = run_cli(monkeypatch, capsys, "predict", out, "--input", x)
    assert code == 1 and "architecture 'os:system'" in err and "--trust-code" in err
    assert not marker.exists()
    code, stdout, err = run_cli(monkeypatch, capsys, "inspect", out)  # inspect builds nothing
    assert code == 0 and "loading it needs --trust-code" in stdout and not marker.exists()
    # a harmless factory of the user's own, opted in
    kwargs = json.loads(ARCH_KWARGS)
    _retarget(out, architecture={"name": "tests.test_cli:my_mlp", "kwargs": kwargs})
    assert run_cli(monkeypatch, capsys, "predict", out, "--input", x)[0] == 1
    code, stdout, err = run_cli(monkeypatch, capsys, "predict", out, "--input", x, "--trust-code")
    assert code == 0, err


def my_mlp(**kwargs):
    """A user's factory, referenced as tests.test_cli:my_mlp."""
    return build_model({"name": "mlp", "kwargs": kwargs})


def test_encode_refuses_an_existing_bundle_unless_overwrite(monkeypatch, capsys, tmp_path, checkpoints):
    paths, calib = checkpoints
    out = tmp_path / "bundle"
    assert run_cli(monkeypatch, capsys, *encode_args(paths, calib, out, "--r", "2"))[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, *encode_args(paths, calib, out))
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert run_cli(monkeypatch, capsys, *encode_args(paths, calib, out, "--overwrite"))[0] == 0
    assert not (out / "coded_1.safetensors").exists() and Bundle.load(out).code.r == 1


def test_inspect_refuses_hostile_manifests_fast(monkeypatch, capsys, tmp_path, checkpoints):
    paths, calib = checkpoints
    out = tmp_path / "bundle"
    assert run_cli(monkeypatch, capsys, *encode_args(paths, calib, out))[0] == 0
    good = json.loads((out / "manifest.json").read_text())
    files = dict(good["files"])
    cases = [
        ({"code": {**good["code"], "r": 40}}, "r must be in 1..8, got 40"),
        ({"code": {**good["code"], "k": 2.9}}, "k must be an integer, got 2.9"),
        ({"encoder": ["not", "an", "object"]}, "encoder must be an object"),
        ({"input_shape": [10**9]}, "input_shape must be a list"),
        ({"files": {**files, "/dev/zero": files["data_0.safetensors"]}}, "needs exactly"),
        (
            {"files": {"../x" if n == "data_0.safetensors" else n: h for n, h in files.items()}},
            "needs exactly",
        ),
    ]
    for fields, needle in cases:
        (out / "manifest.json").write_text(json.dumps({**good, **fields}))
        t0 = time.perf_counter()
        code, _, err = run_cli(monkeypatch, capsys, "inspect", out)
        assert code == 1 and needle in err, err
        assert time.perf_counter() - t0 < 2.0
    huge = {**good, "encoder": {**(good.get("encoder") or {}), "fisher_totals": [10**400]}}
    (out / "manifest.json").write_text(json.dumps(huge))
    code, text, err = run_cli(monkeypatch, capsys, "inspect", out)
    assert code == 0 and "Fisher totals: (too large)" in text, err  # was an OverflowError traceback


def test_inspect_of_a_large_code_examines_a_capped_number_of_patterns(monkeypatch, capsys, tmp_path):
    from coinfer import Code
    from coinfer.bundle import FORMAT_VERSION
    from coinfer.cli import INSPECT_PATTERNS
    from coinfer.code import MAX_PATTERNS_CHECKED

    code = Code(8, 8, max_condition=1e12)
    out = tmp_path / "big"
    out.mkdir()
    files = {}
    for i in range(code.n):
        name = Bundle.filename(i, code.k)
        (out / name).write_bytes(b"x")
        files[name] = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": {"name": "mlp", "kwargs": {}},
        "code": code.to_dict(),
        "input_shape": [64],
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    conds = []
    real = np.linalg.cond
    monkeypatch.setattr(
        np.linalg, "cond", lambda m, *a: conds.append(1 if np.ndim(m) == 2 else len(m)) or real(m)
    )
    code_, stdout, err = run_cli(monkeypatch, capsys, "inspect", out, "--max-condition", "1e12")
    assert code_ == 0, err
    assert f"{MAX_PATTERNS_CHECKED} of 12869 (a seeded sample)" in stdout
    assert f"showing the first {INSPECT_PATTERNS} of 38947 erasure patterns" in stdout
    assert sum(conds) == MAX_PATTERNS_CHECKED + INSPECT_PATTERNS
    # without the loader's --max-condition the manifest's recorded 1e12 does not apply
    code_, _, err = run_cli(monkeypatch, capsys, "inspect", out)
    assert code_ == 1 and "max_condition 1e+06" in err


def test_bundle_loading_commands_document_the_opt_in():
    for name in ("predict", "serve"):
        res = subprocess.run(
            [sys.executable, "-m", "coinfer.cli", name, "--help"], capture_output=True, text=True, timeout=60
        )
        assert "--trust-code" in res.stdout and "--max-condition" in res.stdout, res.stdout


def test_serve_refuses_code_in_a_bundle_before_starting_ray(monkeypatch, capsys, tmp_path, checkpoints):
    ray = pytest.importorskip("ray")
    paths, calib = checkpoints
    out = tmp_path / "bundle"
    assert run_cli(monkeypatch, capsys, *encode_args(paths, calib, out))[0] == 0
    marker = tmp_path / "marker"
    _retarget(out, architecture={"name": "os:system", "kwargs": {"command": f"touch {marker}"}})
    was_up = ray.is_initialized()
    code, _, err = run_cli(monkeypatch, capsys, "serve", out, "--port", "0", "--admin-port", "0")
    assert code == 1 and "architecture 'os:system'" in err and "--trust-code" in err
    assert not marker.exists() and ray.is_initialized() == was_up


def test_serve_passes_max_body_readers_into_its_config(monkeypatch, capsys, tmp_path):
    from coinfer.errors import CoinferError
    from coinfer.serving import server

    seen = []

    def start_runtime(config, sockets):
        seen.append(config)
        raise CoinferError("stopped by the test before Ray")

    monkeypatch.setattr(server, "start_runtime", start_runtime)
    args = ["serve", tmp_path, "--port", "0", "--admin-port", "0", "--max-inflight", "2"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--max-body-readers", "7")
    assert code == 1 and "stopped by the test" in err
    assert seen[0].max_body_readers == 7 and seen[0].body_reader_limit == 7
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and seen[1].max_body_readers is None and seen[1].body_reader_limit == 8  # 4 x 2
    code, _, err = run_cli(monkeypatch, capsys, *args, "--max-body-readers", "0")
    assert code == 1 and "max_body_readers must be an integer >= 1" in err and len(seen) == 2
