"""Dataset loaders: npz, IDX (raw and gz), CIFAR-10 batches, digits; every bad-file case."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from coinfer.errors import DataError
from coinfer.experiments.data import (
    NORMALIZATION,
    from_arrays,
    load_cifar10_batches,
    load_dataset,
    load_digits,
    load_idx_dataset,
    load_npz,
    random_crop_flip,
    read_idx,
)

SHARED = Path(__file__).parents[2] / "shared" / "data"


def _arrays(n_train=20, n_test=8, shape=(6, 6), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.int64),
    }


def _npz(tmp_path, name="toy.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def test_npz_loads_normalised_nchw_float_and_int64_labels(tmp_path):
    a = _arrays()
    ds = load_npz(_npz(tmp_path, **a))
    assert ds.x_train.shape == (20, 1, 6, 6) and ds.x_test.shape == (8, 1, 6, 6)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.y_test, torch.from_numpy(a["y_test"]))
    # unknown name: standardised with the training set's own statistics
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert abs(float(ds.x_train.std()) - 1) < 0.05
    assert ds.num_classes == 10 and ds.input_shape == (1, 6, 6)


def test_npz_known_name_uses_published_normalisation(tmp_path):
    a = _arrays()
    ds = load_npz(_npz(tmp_path, "mnist.npz", **a))
    mean, std = NORMALIZATION["mnist"]
    expect = (a["x_train"][0, 0, 0] / 255.0 - mean[0]) / std[0]
    assert float(ds.x_train[0, 0, 0, 0]) == pytest.approx(expect, abs=1e-5)


def test_npz_channels_last_rgb_becomes_channels_first(tmp_path):
    a = _arrays(shape=(4, 5, 3))
    ds = load_npz(_npz(tmp_path, "cifar10.npz", **a))
    assert ds.x_train.shape == (20, 3, 4, 5)
    mean, std = NORMALIZATION["cifar10"]
    expect = (a["x_train"][3, 1, 2, 2] / 255.0 - mean[2]) / std[2]
    assert float(ds.x_train[3, 2, 1, 2]) == pytest.approx(expect, abs=1e-5)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")


def test_missing_array_names_the_array(tmp_path):
    a = _arrays()
    del a["x_test"]
    with pytest.raises(DataError, match="x_test"):
        load_npz(_npz(tmp_path, **a))


def test_wrong_array_name_is_refused(tmp_path):
    a = _arrays()
    a["images_train"] = a.pop("x_train")
    with pytest.raises(DataError, match="x_train"):
        load_npz(_npz(tmp_path, **a))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(x_train=a["x_train"].reshape(20, -1)), "shape"),
        (lambda a: a.update(x_train=np.zeros((20, 6, 6, 5), np.uint8)), "channels"),
        (lambda a: a.update(x_test=np.zeros((8, 7, 6), np.uint8)), "x_test images have shape|but x_test"),
        (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "uint8"),
        (lambda a: a.update(y_train=a["y_train"][:-1]), "labels but the images"),
        (lambda a: a.update(y_test=a["y_test"].reshape(-1, 1)), r"shape \(N,\)"),
        (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), "integer"),
        (lambda a: a.update(y_test=np.full(8, 10)), "out of range"),
        (lambda a: a.update(y_train=np.full(20, -1)), "out of range"),
        (
            lambda a: a.update(x_train=np.zeros((0, 6, 6), np.uint8), y_train=np.zeros(0, np.int64)),
            "no images",
        ),
    ],
)
def test_malformed_npz_is_refused(tmp_path, mutate, match):
    a = _arrays()
    mutate(a)
    with pytest.raises(DataError, match=match):
        load_npz(_npz(tmp_path, **a))


def test_corrupt_npz_is_refused(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="cannot read"):
        load_npz(p)


def _write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip_raw_and_gz(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = _write_idx(tmp_path / "a-idx3-ubyte", arr, gz)
    np.testing.assert_array_equal(read_idx(p), arr)


def test_idx_directory_loads_as_dataset(tmp_path):
    a = _arrays(shape=(5, 5))
    a["y_train"] = a["y_train"].astype(np.uint8)
    a["y_test"] = a["y_test"].astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", a["x_train"], gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", a["y_train"], gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", a["x_test"])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", a["y_test"])
    ds = load_idx_dataset(tmp_path, "mnist")
    assert ds.x_train.shape == (20, 1, 5, 5)
    assert torch.equal(ds.y_train, torch.from_numpy(a["y_train"].astype(np.int64)))
    # the same through load_dataset with a path
    assert load_dataset(tmp_path).x_test.shape == (8, 1, 5, 5)


def test_idx_bad_magic_truncated_and_missing(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    arr = np.zeros((4, 4), np.uint8)
    p = _write_idx(tmp_path / "t-idx2-ubyte", arr)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DataError, match="file holds"):
        read_idx(p)
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "none-idx")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_idx_dataset(tmp_path)


def _write_cifar(d: Path, n=4, seed=0, bad=None):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        if bad == "shape" and name == "test_batch":
            batch[b"data"] = batch[b"data"][:, :100]
        if bad == "labels" and name == "data_batch_2":
            batch[b"labels"] = [11] * n
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


def test_cifar_batches_load_as_rgb_nchw(tmp_path):
    d = _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_cifar10_batches(d)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.class_names[0] == "airplane"
    with open(d / "data_batch_1", "rb") as f:
        raw = pickle.load(f)[b"data"]
    mean, std = NORMALIZATION["cifar10"]
    # CIFAR rows are R plane, G plane, B plane: pixel (row 0, col 1) of green is index 1024 + 1
    assert float(ds.x_train[0, 1, 0, 1]) == pytest.approx((raw[0, 1025] / 255 - mean[1]) / std[1], abs=1e-5)
    assert load_dataset("cifar10", tmp_path).x_train.shape == (20, 3, 32, 32)


@pytest.mark.parametrize("bad, match", [("shape", "3072"), ("labels", "out of range")])
def test_cifar_malformed_batches(tmp_path, bad, match):
    d = _write_cifar(tmp_path / "c", bad=bad)
    with pytest.raises(DataError, match=match):
        load_cifar10_batches(d)


def test_cifar_missing_batch_and_not_a_dict(tmp_path):
    d = _write_cifar(tmp_path / "c")
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10_batches(d)
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(DataError, match="expected a dict"):
        load_cifar10_batches(d)
    (d / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot unpickle"):
        load_cifar10_batches(d)


def test_a_cifar_batch_that_is_a_program_is_refused_without_running_it(tmp_path):
    import os

    d = _write_cifar(tmp_path / "c")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(d / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing to load posix.system"):
        load_cifar10_batches(d)
    assert not marker.exists()


def test_load_dataset_names_and_errors(tmp_path):
    assert load_dataset("digits").x_train.shape[1] == 64
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "missing-dir")
    with pytest.raises(DataError, match="mnist.npz does not exist"):
        load_dataset("mnist", tmp_path)
    a = _arrays()
    _npz(tmp_path, "fashion_mnist.npz", **a)
    ds = load_dataset("fashion-mnist", tmp_path, train_limit=5, test_limit=3)
    assert ds.name == "fashion_mnist" and len(ds.x_train) == 5 and len(ds.y_test) == 3
    assert ds.class_names[0] == "t-shirt"


def test_from_arrays_refuses_labels_beyond_num_classes():
    a = _arrays()
    with pytest.raises(DataError, match=r"0\.\.4"):
        from_arrays("toy", *a.values(), num_classes=5)


def test_digits_split_is_stratified_and_seeded():
    a, b = load_digits(seed=3), load_digits(seed=3)
    assert torch.equal(a.y_test, b.y_test)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() > 40 and len(a.x_train) + len(a.x_test) == 1797


def test_random_crop_flip_gives_shifted_or_flipped_crops():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = random_crop_flip(x, g, padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        cands = [padded[b, :, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        cands += [c.flip(-1) for c in cands]
        assert any(torch.equal(out[b], c) for c in cands)
    # with no padding, only flips remain
    out0 = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    for b in range(2):
        assert torch.equal(out0[b], x[b]) or torch.equal(out0[b], x[b].flip(-1))


@pytest.mark.skipif(not (SHARED / "mnist.npz").exists(), reason="shared data not present")
def test_real_mnist_matches_its_readme():
    ds = load_dataset("mnist", SHARED, test_limit=2000)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (2000, 1, 28, 28)
    assert torch.bincount(ds.y_train, minlength=10).tolist()[:3] == [5923, 6742, 5958]
    # normalised with the published statistics: train mean 0, std 1
    assert abs(float(ds.x_train.mean())) < 1e-3 and abs(float(ds.x_train.std()) - 1) < 1e-2


@pytest.mark.skipif(not (SHARED / "fashion_mnist.npz").exists(), reason="shared data not present")
def test_real_fashion_mnist_shapes():
    ds = load_dataset("fashion_mnist", SHARED, train_limit=1000, test_limit=1000)
    assert ds.x_train.shape == (1000, 1, 28, 28) and ds.num_classes == 10
