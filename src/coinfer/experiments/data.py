"""Datasets as tensors: loaders, per-dataset normalisation, augmentation.

The package never assumes where data lives: file paths come from the user.
The bundled default is scikit-learn's digits (8x8 images, 10 classes), which
needs no file at all. Real image data is read from

* ``.npz`` files holding ``x_train, y_train, x_test, y_test`` (uint8 pixels),
* the original IDX files of MNIST / Fashion-MNIST (raw or ``.gz``),
* CIFAR-10's python batches (``data_batch_1..5``, ``test_batch``).

Every malformed input raises :class:`~coinfer.errors.DataError` naming the file,
the array and what was expected.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coinfer.errors import DataError

__all__ = [
    "Dataset",
    "load_digits",
    "class_split",
    "load_npz",
    "read_idx",
    "load_idx_dataset",
    "load_cifar10_batches",
    "load_dataset",
    "from_arrays",
    "NORMALIZATION",
    "CLASS_NAMES",
    "random_crop_flip",
    "DATASET_FILES",
]

#: Per-channel (mean, std) of the training pixels in [0, 1] (see data README).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

CLASS_NAMES: dict[str, list[str]] = {
    "mnist": [str(c) for c in range(10)],
    "fashion_mnist": [
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle-boot",
    ],
    "cifar10": [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ],
}

#: File names looked up under a data directory for a dataset name.
DATASET_FILES: dict[str, str] = {
    "mnist": "mnist.npz",
    "fashion_mnist": "fashion_mnist.npz",
    "cifar10": "cifar10.npz",
}

_ALIASES = {"fashion-mnist": "fashion_mnist", "fashion": "fashion_mnist", "cifar-10": "cifar10"}
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass
class Dataset:
    """Normalised float tensors of a train/test split, images as ``(N, C, H, W)``
    (or ``(N, D)`` for flat data), labels as ``int64``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """A short hash of the data (shapes, labels, a slice of pixels), for cache keys."""
        h = hashlib.sha256(self.name.encode())
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(tuple(t.shape)).encode())
        h.update(self.y_train.numpy().tobytes())
        h.update(self.y_test.numpy().tobytes())
        h.update(self.x_train[:64].numpy().tobytes())
        return h.hexdigest()[:16]


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits (1797 8x8 images), flattened to 64 features
    in ``[0, 1]``, split with a stratified shuffle."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.from_numpy(d.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    mask = np.zeros(len(y), dtype=bool)
    mask[test_idx] = True
    tr, te = torch.from_numpy(~mask), torch.from_numpy(mask)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], [str(c) for c in range(10)])


def class_split(num_classes: int, k: int) -> list[list[int]]:
    """Disjoint, complete class subsets for k models: contiguous, as equal as possible."""
    if not 1 <= k <= num_classes:
        raise DataError(f"class-split needs 1 <= k <= num_classes = {num_classes}, got k = {k}")
    return [a.tolist() for a in np.array_split(np.arange(num_classes), k)]


# --------------------------------------------------------------------------- validation
def _check_images(x: np.ndarray, where: str) -> None:
    if x.ndim not in (3, 4):
        raise DataError(
            f"{where}: expected images of shape (N, H, W) or (N, H, W, C), got shape {tuple(x.shape)}"
        )
    if x.ndim == 4 and x.shape[-1] not in (1, 3):
        raise DataError(f"{where}: expected 1 or 3 channels last (N, H, W, C), got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise DataError(f"{where}: holds no images")
    if x.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 pixels 0..255, got dtype {x.dtype}")


def _check_labels(y: np.ndarray, n: int, num_classes: int, where: str) -> None:
    if y.ndim != 1:
        raise DataError(f"{where}: expected labels of shape (N,), got shape {tuple(y.shape)}")
    if len(y) != n:
        raise DataError(f"{where}: has {len(y)} labels but the images number {n}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: expected integer class labels, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{where}: labels out of range: found {int(y.min())}..{int(y.max())}, expected 0..{num_classes - 1}"
        )


def from_arrays(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    source: str = "arrays",
) -> Dataset:
    """Validate uint8 image arrays and turn them into a normalised :class:`Dataset`.

    Images are ``(N, H, W)`` or ``(N, H, W, C)``; they become float ``(N, C, H, W)``
    scaled to [0, 1] and standardised with :data:`NORMALIZATION` for a known
    ``name`` (else with the training set's own per-channel mean and std)."""
    if class_names is None:
        class_names = CLASS_NAMES.get(name) or [str(c) for c in range(num_classes or 10)]
    nc = num_classes or len(class_names)
    _check_images(x_train, f"{source} x_train")
    _check_images(x_test, f"{source} x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{source}: x_train images have shape {tuple(x_train.shape[1:])} but x_test {tuple(x_test.shape[1:])}"
        )
    _check_labels(y_train, len(x_train), nc, f"{source} y_train")
    _check_labels(y_test, len(x_test), nc, f"{source} y_test")

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
        if t.ndim == 3:
            return t.unsqueeze(1)
        return t.permute(0, 3, 1, 2).contiguous()

    xtr, xte = to_tensor(x_train), to_tensor(x_test)
    if name in NORMALIZATION and len(NORMALIZATION[name][0]) == xtr.shape[1]:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[name])
    else:
        mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
        std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    xtr.sub_(mean).div_(std)
    xte.sub_(mean).div_(std)
    return Dataset(
        name,
        xtr,
        torch.from_numpy(y_train.astype(np.int64)),
        xte,
        torch.from_numpy(y_test.astype(np.int64)),
        list(class_names),
    )


# --------------------------------------------------------------------------- loaders
def _canonical(name: str) -> str:
    n = name.lower()
    return _ALIASES.get(n, n)


def load_npz(path: str | Path, name: str | None = None, num_classes: int = 10) -> Dataset:
    """Load a ``.npz`` holding ``x_train, y_train, x_test, y_test`` (uint8 images,
    integer labels). ``name`` picks the normalisation (default: the file stem)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(
                    f"{path} lacks array(s) {missing}: expected {list(_NPZ_KEYS)}, found {sorted(z.files)}"
                )
            arrays = [z[k] for k in _NPZ_KEYS]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from None
    return from_arrays(_canonical(name or path.stem), *arrays, num_classes=num_classes, source=str(path))


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST format), raw or gzip-compressed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: header needs {4 + 4 * ndim} bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise DataError(f"{path}: header says shape {shape} ({expected} bytes), file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    for cand in (directory / stem, directory / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise DataError(f"{directory} has no {stem} (raw or .gz)")


def load_idx_dataset(directory: str | Path, name: str = "mnist") -> Dataset:
    """MNIST-format IDX files in ``directory``: ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"IDX directory {d} does not exist")
    arrays = [
        read_idx(_find(d, s))
        for s in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ]
    return from_arrays(_canonical(name), *arrays, source=str(d))


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: a pickle is a program,
    and a downloaded batch file must not be able to run one (``os.system`` in a
    ``__reduce__``). The official CIFAR-10 batches need nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only arrays and plain containers")


def load_cifar10_batches(directory: str | Path) -> Dataset:
    """CIFAR-10 python batches (``data_batch_1..5`` and ``test_batch`` in ``directory``)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"CIFAR-10 directory {d} does not exist")

    def read(fname: str) -> tuple[np.ndarray, np.ndarray]:
        p = d / fname
        if not p.is_file():
            raise DataError(f"CIFAR-10 batch {p} does not exist")
        try:
            with open(p, "rb") as f:
                batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
        except Exception as exc:
            raise DataError(f"cannot unpickle CIFAR-10 batch {p}: {exc}") from None
        if not isinstance(batch, dict):
            raise DataError(f"{p}: expected a dict with b'data' and b'labels', got {type(batch).__name__}")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        if data is None or labels is None:
            raise DataError(f"{p}: missing 'data' or 'labels' entry, found {list(batch)}")
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{p}: expected data of shape (N, 3072), got {tuple(data.shape)}")
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    xte, yte = read("test_batch")
    xtr = np.concatenate([t[0] for t in train])
    ytr = np.concatenate([t[1] for t in train])
    return from_arrays("cifar10", xtr, ytr, xte, yte, source=str(d))


def load_dataset(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Dataset:
    """Load a dataset by name (``digits``, ``mnist``, ``fashion_mnist``,
    ``cifar10``) from ``data_dir``, or from an explicit path.

    A name is looked up in ``data_dir`` as ``<name>.npz``, then as IDX files
    (MNIST formats, in ``data_dir`` or ``data_dir/<name>``), then as CIFAR-10
    python batches (``data_dir/cifar-10-batches-py``). A path may be an
    ``.npz`` file, an IDX directory or a CIFAR batches directory.
    ``train_limit``/``test_limit`` keep the first samples of each split
    (official order), for quick runs."""
    key = str(name_or_path)
    if _canonical(key) == "digits":
        ds = load_digits()
    else:
        p = Path(key)
        if p.suffix == ".npz" or p.exists():
            ds = _load_path(p, None)
        else:
            name = _canonical(key)
            if name not in DATASET_FILES:
                raise DataError(
                    f"unknown dataset {key!r}: expected digits, {', '.join(DATASET_FILES)} or a path"
                )
            if data_dir is None:
                raise DataError(f"dataset {key!r} needs --data-dir (where {DATASET_FILES[name]} lives)")
            d = Path(data_dir)
            if not d.is_dir():
                raise DataError(f"data directory {d} does not exist")
            ds = _load_path(d / DATASET_FILES[name], name, fallback_dir=d)
    if train_limit is not None:
        ds.x_train, ds.y_train = ds.x_train[:train_limit], ds.y_train[:train_limit]
    if test_limit is not None:
        ds.x_test, ds.y_test = ds.x_test[:test_limit], ds.y_test[:test_limit]
    return ds


def _load_path(p: Path, name: str | None, fallback_dir: Path | None = None) -> Dataset:
    if p.is_file():
        return load_npz(p, name)
    if p.is_dir():
        if (p / "data_batch_1").exists():
            return load_cifar10_batches(p)
        return load_idx_dataset(p, name or p.name)
    if fallback_dir is not None and name is not None:
        for d in (fallback_dir / name, fallback_dir):
            if name == "cifar10" and (d / "cifar-10-batches-py").is_dir():
                return load_cifar10_batches(d / "cifar-10-batches-py")
            if any(d.glob("train-images-idx3-ubyte*")):
                return load_idx_dataset(d, name)
    raise DataError(f"dataset file {p} does not exist")


# --------------------------------------------------------------------------- augmentation
def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip of a batch
    ``(B, C, H, W)``, in torch; the standard CIFAR training augmentation."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w)
    bi = torch.arange(b).view(b, 1, 1, 1)
    ci = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    out = padded[bi, ci, rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
