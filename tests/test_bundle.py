"""Bundles: round trip, hash verification, architecture checks."""

import json
import time

import pytest
import torch

from coinfer import ArchitectureError, Bundle, BundleError, Code, build_model, encode
from coinfer.bundle import load_model

SPEC = {"name": "tests.conftest:small_cnn", "kwargs": {"num_classes": 5}}


@pytest.fixture
def bundle_dir(tmp_path, images):
    torch.manual_seed(0)
    models = [build_model(SPEC) for _ in range(3)]
    code = Code(3, 2)
    coded = encode(models, code, images, method="average")
    b = Bundle(SPEC, code, models, list(coded), (1, 6, 6), list("abcde"), coded.info)
    return b.save(tmp_path / "b")


def test_round_trip_gives_the_same_models_and_code(bundle_dir, images):
    b = Bundle.load(bundle_dir, trust_code=True)
    assert b.code == Code(3, 2)
    assert b.input_shape == (1, 6, 6) and b.class_names == list("abcde")
    assert b.encoder["method"] == "average"
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert set(manifest["files"]) == {
        "data_0.safetensors",
        "data_1.safetensors",
        "data_2.safetensors",
        "coded_0.safetensors",
        "coded_1.safetensors",
    }
    b2 = Bundle.load(bundle_dir, trust_code=True)
    for i in range(b.n):
        torch.testing.assert_close(b.model(i)(images), b2.model(i)(images))
    outs = b.predict(images)
    assert sorted(outs) == list(range(5)) and outs[0].shape == (len(images), 5)


def test_models_survive_the_round_trip_exactly(tmp_path, images):
    torch.manual_seed(0)
    models = [build_model(SPEC) for _ in range(2)]
    code = Code(2, 1)
    coded = encode(models, code, images, method="coin")
    Bundle(SPEC, code, models, list(coded), (1, 6, 6)).save(tmp_path / "c")
    b = Bundle.load(tmp_path / "c", trust_code=True)
    for orig, loaded in zip(models + list(coded), b.all_models, strict=True):
        for (n, p), q in zip(orig.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("name", ["data_1.safetensors", "coded_0.safetensors"])
def test_a_flipped_byte_is_refused_naming_the_file(bundle_dir, name):
    f = bundle_dir / name
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=f"{name} is corrupted"):
        Bundle.load(bundle_dir, trust_code=True)
    assert Bundle.verify(bundle_dir)[name] is False


def test_a_missing_file_is_refused(bundle_dir):
    (bundle_dir / "coded_1.safetensors").unlink()
    with pytest.raises(BundleError, match="coded_1.safetensors is missing"):
        Bundle.load(bundle_dir, trust_code=True)
    (bundle_dir / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.load(bundle_dir, trust_code=True)


def test_a_wrong_architecture_is_refused(bundle_dir):
    with pytest.raises(BundleError, match="was built for architecture"):
        Bundle.load(bundle_dir, architecture="lenet5", trust_code=True)
    # a manifest edited to another architecture no longer fits the weights
    mf = bundle_dir / "manifest.json"
    m = json.loads(mf.read_text())
    m["architecture"] = {"name": "tests.conftest:small_cnn", "kwargs": {"num_classes": 7}}
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="do not match architecture"):
        Bundle.load(bundle_dir, trust_code=True)


def test_a_bad_manifest_is_refused(bundle_dir, tmp_path):
    mf = bundle_dir / "manifest.json"
    mf.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(bundle_dir, trust_code=True)
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.load(tmp_path / "nowhere", trust_code=True)


def test_unknown_architectures_are_named():
    with pytest.raises(ArchitectureError, match="unknown architecture 'vgg'"):
        build_model("vgg")
    with pytest.raises(ArchitectureError, match="cannot import module"):
        build_model("no_such_pkg.mod:f")
    with pytest.raises(ArchitectureError, match="rejected kwargs"):
        build_model({"name": "lenet5", "kwargs": {"depth": 3}})


def test_reference_architectures_build_and_run():
    assert build_model("lenet5")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert build_model({"name": "lenet5", "kwargs": {"in_channels": 3, "image_size": 32}})(
        torch.zeros(2, 3, 32, 32)
    ).shape == (2, 10)
    r = build_model("resnet20")
    assert r(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert 260_000 < sum(p.numel() for p in r.parameters()) < 280_000
    assert build_model("mlp")(torch.zeros(2, 64)).shape == (2, 10)


# --------------------------------------------------------------------------- trust model
def make_marker(path: str) -> torch.nn.Module:
    """A factory with a visible side effect: it creates ``path``."""
    from pathlib import Path

    Path(path).write_text("ran")
    return torch.nn.Linear(2, 2)


def _edit_manifest(bundle_dir, **fields):
    mf = bundle_dir / "manifest.json"
    m = json.loads(mf.read_text())
    m.update(fields)
    mf.write_text(json.dumps(m))
    return m


@pytest.mark.parametrize(
    "name,kwargs",
    [("os:system", {"command": "touch {marker}"}), ("tests.test_bundle:make_marker", {"path": "{marker}"})],
)
def test_code_in_a_manifest_is_refused_without_opt_in_and_nothing_runs(bundle_dir, tmp_path, name, kwargs):
    from coinfer.errors import UntrustedCodeError

    marker = tmp_path / "marker"
    kwargs = {k: v.format(marker=marker) for k, v in kwargs.items()}
    _edit_manifest(bundle_dir, architecture={"name": name, "kwargs": kwargs})
    with pytest.raises(UntrustedCodeError, match=f"architecture '{name}'.*trust_code=True.*--trust-code"):
        Bundle.load(bundle_dir)
    assert not marker.exists()
    # a worker's loader refuses it the same way, before reading the file
    with pytest.raises(BundleError, match="refusing to run it"):
        load_model({"name": name, "kwargs": kwargs}, bundle_dir / "data_0.safetensors")
    assert not marker.exists()


def test_trusted_code_loads_and_registered_architectures_need_no_opt_in(bundle_dir, tmp_path, images):
    b = Bundle.load(bundle_dir, trust_code=True)  # tests.conftest:small_cnn, a harmless factory
    assert b.model(0)(images).shape == (len(images), 5)
    torch.manual_seed(0)
    spec = {"name": "mlp", "kwargs": {"in_features": 36, "hidden": [4], "num_classes": 3}}
    models = [build_model(spec) for _ in range(2)]
    coded = encode(models, Code(2, 1), images.flatten(1), method="average")
    Bundle(spec, Code(2, 1), models, list(coded), (36,)).save(tmp_path / "mlp")
    assert Bundle.load(tmp_path / "mlp").n == 3


@pytest.mark.parametrize(
    "code,needle",
    [
        ({"k": 2.9, "r": 2}, "k must be an integer, got 2.9"),
        ({"k": True, "r": 2}, "k must be an integer, got True"),
        ({"k": 3, "r": "2"}, "r must be an integer"),
        ({"k": 3, "r": 40}, "r must be in 1..8, got 40"),
        ({"k": 3, "r": 2, "weights": [[0.5, 0.5], [0.5, 0.5]]}, "shape (r, k) = (2, 3)"),
        ({"k": 3, "r": 2, "weights": [[float("nan"), 0.5, 0.5], [0.2, 0.3, 0.5]]}, "NaN"),
        ({"k": 3, "r": 2, "weights": [[1 - 1e-9, 1e-9, 0.0], [0.2, 0.3, 0.5]]}, "condition number"),
        ({"k": 3, "r": 2, "weights": [[True, False, False], [0.2, 0.3, 0.5]]}, "must be a number"),
        ({"k": 3, "r": 2, "max_condition": 1e300}, "recorded max_condition must be in"),
    ],
)
def test_a_bad_code_in_a_manifest_is_refused_before_any_file_is_read(bundle_dir, monkeypatch, code, needle):
    import coinfer.bundle as bundle_mod

    _edit_manifest(bundle_dir, code=code)
    read, real = [], bundle_mod.read_regular_file

    def spy(path, *args):
        if not str(path).endswith("manifest.json"):
            read.append(path)
        return real(path, *args)

    monkeypatch.setattr(bundle_mod, "read_regular_file", spy)
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda *a, **k: read.append(a) or "")
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match="invalid code") as ei:
        Bundle.load(bundle_dir, trust_code=True)
    assert needle in str(ei.value) and time.perf_counter() - t0 < 1.0
    with pytest.raises(BundleError, match="invalid code"):
        Bundle.verify(bundle_dir)
    assert read == []


def test_a_recorded_max_condition_can_tighten_but_only_the_loader_can_loosen(bundle_dir):
    w = [[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]]  # valid, worst condition number in the hundreds
    worst = Code(3, 2, w, max_condition=1e12).worst_condition
    _edit_manifest(bundle_dir, code={"k": 3, "r": 2, "weights": w, "max_condition": worst / 2})
    with pytest.raises(BundleError, match="max_condition"):
        Bundle.load(bundle_dir, trust_code=True, max_condition=1e12)  # the recorded limit wins
    _edit_manifest(bundle_dir, code={"k": 3, "r": 2, "weights": w, "max_condition": 1e12})
    with pytest.raises(BundleError, match="max_condition"):
        Bundle.check_manifest(json.loads((bundle_dir / "manifest.json").read_text()), max_condition=worst / 2)
    arch, code = Bundle.check_manifest(json.loads((bundle_dir / "manifest.json").read_text()))
    assert code.max_condition == 1e6  # 1e12 recorded, the default 1e6 applies


@pytest.mark.parametrize(
    "files,needle",
    [
        ("dev", "needs exactly"),
        ("dotdot", "needs exactly"),
        ("extra", "needs exactly"),
        ("missing", "needs exactly"),
        ("badhash", "64 lowercase hex"),
    ],
)
def test_the_file_list_must_be_exactly_the_bundle_names(bundle_dir, files, needle):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    f = dict(m["files"])
    digest = f.pop("data_0.safetensors")
    if files == "dev":
        f["/dev/zero"] = digest
    elif files == "dotdot":
        f["../data_0.safetensors"] = digest
    elif files == "extra":
        f["data_0.safetensors"] = digest
        f["data_9.safetensors"] = digest
    elif files == "badhash":
        f["data_0.safetensors"] = "x" * 64
    _edit_manifest(bundle_dir, files=f)
    t0 = time.perf_counter()
    for call in (lambda: Bundle.load(bundle_dir, trust_code=True), lambda: Bundle.verify(bundle_dir)):
        with pytest.raises(BundleError, match=needle):
            call()
    assert time.perf_counter() - t0 < 2.0


def test_a_bundle_file_that_is_not_a_regular_file_is_refused_without_reading_it(bundle_dir):
    import os

    (bundle_dir / "data_1.safetensors").unlink()
    (bundle_dir / "data_1.safetensors").symlink_to("/dev/zero")
    os.mkfifo(bundle_dir / "coded_0.safetensors.fifo")
    (bundle_dir / "coded_0.safetensors").unlink()
    (bundle_dir / "coded_0.safetensors.fifo").rename(bundle_dir / "coded_0.safetensors")
    with pytest.raises(BundleError, match="data_1.safetensors is not a regular file"):
        Bundle.load(bundle_dir, trust_code=True)
    checks = Bundle.verify(bundle_dir)  # a FIFO would block a plain open(); this returns
    assert checks["data_1.safetensors"] is False and checks["coded_0.safetensors"] is False
    assert checks["data_0.safetensors"] is True


# --------------------------------------------------------------------------- safe saving
def _small_bundle(r: int = 2) -> Bundle:
    torch.manual_seed(0)
    spec = {"name": "mlp", "kwargs": {"in_features": 6, "hidden": [4], "num_classes": 3}}
    models = [build_model(spec) for _ in range(3)]
    coded = encode(models, Code(3, r), torch.randn(8, 6), method="average")
    return Bundle(spec, Code(3, r), models, list(coded), (6,))


def test_save_refuses_an_existing_bundle_and_overwrite_leaves_no_stale_file(tmp_path):
    target = _small_bundle(r=2).save(tmp_path / "b")
    assert (target / "coded_1.safetensors").exists()
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        _small_bundle(r=1).save(target)
    assert Bundle.load(target).code.r == 2
    _small_bundle(r=1).save(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [
        "coded_0.safetensors",
        "data_0.safetensors",
        "data_1.safetensors",
        "data_2.safetensors",
        "manifest.json",
    ]
    assert Bundle.load(target).code.r == 1
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary or old directory left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    with pytest.raises(BundleError, match=r"not a bundle \(it holds \[.x.txt.\]\); refusing to replace it"):
        _small_bundle().save(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "x.txt").read_text() == "mine"
    (tmp_path / "app").mkdir()  # a manifest.json alone does not make a folder a bundle
    (tmp_path / "app" / "manifest.json").write_text("{}")
    (tmp_path / "app" / "precious.js").write_text("mine")
    with pytest.raises(BundleError, match=r"not a bundle \(it holds \['precious.js'\]\)"):
        _small_bundle().save(tmp_path / "app", overwrite=True)
    assert (tmp_path / "app" / "precious.js").read_text() == "mine"


def test_a_weights_file_far_larger_than_its_model_is_refused_before_it_is_read(tmp_path):
    path = _small_bundle().save(tmp_path / "b")
    with open(path / "data_0.safetensors", "r+b") as f:  # sparse: 3 GB that take no disk
        f.truncate(3 * 2**30)
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match="larger than the limit"):
        Bundle.load(path)
    assert time.perf_counter() - t0 < 10  # main read all 3 GB (17 s, 3.4 GB of memory) first


def test_manifest_faults_are_bundle_errors_not_crashes(tmp_path):
    path = _small_bundle().save(tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    for text in ("[" * 100_000, '{"k": ' + "9" * 5000 + "}"):  # deep nesting; a 5000-digit integer
        (path / "manifest.json").write_text(text)
        with pytest.raises(BundleError, match="not valid JSON"):
            Bundle.load(path)
    ragged = dict(manifest, code=dict(manifest["code"], weights=[[0.5, 0.5], [1.0]]))
    (path / "manifest.json").write_text(json.dumps(ragged))
    with pytest.raises(BundleError, match="ragged"):
        Bundle.load(path)
    few = dict(manifest, class_names=["a"])
    (path / "manifest.json").write_text(json.dumps(few))
    with pytest.raises(BundleError, match="class_names has 1 names but the models output"):
        Bundle.load(path)


def test_an_mlp_spec_with_a_huge_number_of_layers_is_refused_before_building(tmp_path):
    path = _small_bundle().save(tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["architecture"] = {"name": "mlp", "kwargs": {"hidden": [1] * 100_000}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match="at most 64 hidden layers"):
        Bundle.load(path)
    assert time.perf_counter() - t0 < 10  # main built it twice: 57 s, 1 GB


@pytest.mark.parametrize("existing", [False, True])
def test_a_crash_mid_save_leaves_no_half_bundle(tmp_path, monkeypatch, existing):
    import coinfer.bundle as bundle_mod

    target = tmp_path / "b"
    if existing:
        _small_bundle(r=2).save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if existing else None
    real, calls = bundle_mod.save_model, []

    def crash_on_third(model, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real(model, path)

    monkeypatch.setattr(bundle_mod, "save_model", crash_on_third)
    with pytest.raises(OSError, match="simulated"):
        _small_bundle(r=1).save(target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == (["b"] if existing else [])
    if existing:  # the old bundle is intact, byte for byte
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
        assert Bundle.load(target).code.r == 2


def test_registered_kwargs_describing_a_huge_model_are_refused_before_allocating(tmp_path):
    target = _small_bundle(r=1).save(tmp_path / "b")
    m = json.loads((target / "manifest.json").read_text())
    m["architecture"]["kwargs"]["hidden"] = [10**9]  # 40 GB of weights if built
    (target / "manifest.json").write_text(json.dumps(m))
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match="needs 4000000.* bytes of weights but the file holds"):
        Bundle.load(target)
    assert time.perf_counter() - t0 < 2.0


_SAVER = """
import sys, torch
from coinfer import Bundle, Code, build_model
spec = {"name": "mlp", "kwargs": {"in_features": 4, "hidden": [6], "num_classes": 3}}
torch.manual_seed(int(sys.argv[2]))
models = [build_model(spec) for _ in range(3)]
for _ in range(int(sys.argv[3])):
    Bundle(spec, Code(2, 1), models[:2], models[2:], (4,)).save(sys.argv[1], overwrite=True)
print("ok")
"""


def test_concurrent_saves_serialise_and_a_loader_never_sees_a_mixed_bundle(tmp_path):
    """Two processes replacing one bundle while this one loads it: every save
    succeeds, every load gets a whole bundle (no false 'corrupted')."""
    import subprocess
    import sys

    target = tmp_path / "b"
    spec = {"name": "mlp", "kwargs": {"in_features": 4, "hidden": [6], "num_classes": 3}}
    ms = [build_model(spec) for _ in range(3)]
    Bundle(spec, Code(2, 1), ms[:2], ms[2:], (4,)).save(target)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(target), str(seed), "25"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    loads = 0
    while any(p.poll() is None for p in procs):
        Bundle.load(target)  # raises on a mixed or half-replaced bundle
        loads += 1
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert loads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # nothing left beside it
