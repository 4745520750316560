"""Bundles: round trip, hash verification, architecture checks."""

import json

import pytest
import torch

from coinfer import ArchitectureError, Bundle, BundleError, Code, build_model, encode

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
