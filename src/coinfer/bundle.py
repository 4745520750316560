"""Bundles: what gets deployed.

A bundle is a directory holding ``manifest.json`` and one safetensors file per
model (``data_0.safetensors`` … and ``coded_0.safetensors`` …). The manifest
records the format version, architecture spec, code (k, r, W), encoder and its
settings, input shape, class names and the sha256 of every tensor file.
:meth:`Bundle.load` verifies every hash and the architecture before returning.

A bundle is data: its manifest is validated (field types, the exact file list,
the code's k, r and W with caps and a condition-number limit, parity
structures) before any tensor is read, and an architecture that is code
(``package.module:factory``) is refused unless the caller opts in with
``trust_code=True`` (see "Trust model" in ``docs/serving.md``).
:meth:`Bundle.save` writes a temporary directory next to the target and
renames it into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from coinfer.architectures import build_model, check_trusted, is_registered, normalize_spec
from coinfer.code import MAX_CONDITION_CEILING, Code
from coinfer.errors import BundleError, CodeError, CoinferError

__all__ = [
    "Bundle",
    "FORMAT_VERSION",
    "sha256_file",
    "read_regular_file",
    "save_model",
    "load_model",
    "check_save_target",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: A larger manifest.json is refused before it is parsed.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
#: Largest number of input dimensions, and largest size of one, in a manifest.
MAX_INPUT_DIMS, MAX_INPUT_SIZE = 8, 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Words in the error of a file whose sha256 is not the expected one (the
#: serving frontend finds them in a refused worker's startup error).
SHA256_MISMATCH = "sha256 mismatch"


def _open_regular(path: str | Path) -> int:
    """Open ``path`` for reading without blocking and return the fd, refusing
    anything but a regular file (``/dev/zero``, a FIFO, a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise BundleError(f"bundle file {path} is missing") from None
    except OSError as exc:
        raise BundleError(f"cannot open bundle file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"bundle file {path} is not a regular file")
    return fd


def read_regular_file(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (refusing devices, FIFOs, directories and,
    with ``max_bytes``, larger files) read once, so that what is hashed is what is used."""
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
            raise BundleError(f"{path} is larger than the limit of {max_bytes} bytes")
        return f.read()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a regular file's bytes (BundleError for anything else)."""
    h = hashlib.sha256()
    with os.fdopen(_open_regular(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: nn.Module, path: str | Path) -> None:
    """Save a model's ``state_dict`` (parameters and buffers) as safetensors."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))


def load_model(
    spec: str | Mapping[str, Any],
    path: str | Path,
    parity: Mapping[str, Any] | None = None,
    *,
    trust_code: bool = False,
    sha256: str | None = None,
) -> nn.Module:
    """Build ``spec`` and load its weights from a safetensors file, strictly.

    Args:
        spec: the architecture. A ``package.module:factory`` spec is code and
            is refused (UntrustedCodeError, before anything is imported) unless
            ``trust_code`` is True; registered architectures need no opt-in.
        path: the safetensors file (a regular file; read once).
        parity: a coded model's structure from the manifest (``kind: heads``:
            a :class:`~coinfer.parity.HeadsParity` over ``spec``); None for a
            model of the architecture itself.
        trust_code: allow a ``package.module:factory`` architecture.
        sha256: if given, the file's bytes must have this hex sha256 (checked on
            the bytes that are then loaded).
    """
    spec = check_trusted(spec, trust_code, source=str(path))
    size = _weights_size(spec, parity, path)
    raw = read_regular_file(path, None if size is None else size[1])
    if sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256:
            raise BundleError(
                f"bundle file {path} is corrupted or was changed ({SHA256_MISMATCH}): its sha256 "
                f"{digest[:12]}… is not the verified {sha256[:12]}…"
            )
    if size is not None and size[0] > 2 * len(raw) + (1 << 20):
        # kwargs describing a model far larger than its file (``hidden: [10**9]``) would
        # exhaust memory before the weights were found not to match
        raise BundleError(
            f"{path}: architecture {spec['name']!r} with kwargs {spec['kwargs']} needs {size[0]} bytes of "
            f"weights but the file holds {len(raw)}; refusing to build it"
        )
    model = build_model(spec)
    if parity is not None:
        from coinfer.parity import build_parity

        try:
            model = build_parity(model, parity)
        except CoinferError as exc:
            raise BundleError(f"{path}: cannot rebuild the parity's structure: {exc}") from None
    try:
        sd = load_safetensors(raw)
    except Exception as exc:
        raise BundleError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise BundleError(
            f"{path}: weights do not match architecture {normalize_spec(spec)['name']!r}: "
            f"{' '.join(s.strip() for s in first[:3])}"
        ) from None
    if parity is not None:
        try:
            model.check_weights(parity["weights"])
        except CoinferError as exc:
            raise BundleError(f"{path}: {exc}") from None
    model.eval()
    return model


@dataclass
class Bundle:
    """Data models, coded models and the code, plus what is needed to serve them.

    ``models(i)`` gives worker ``i`` of ``0..n-1`` (data models first).
    """

    architecture: dict[str, Any]
    code: Code
    data_models: list[nn.Module]
    coded_models: list[nn.Module]
    input_shape: tuple[int, ...]
    class_names: list[str] | None = None
    encoder: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.architecture = normalize_spec(self.architecture)
        self.input_shape = tuple(int(s) for s in self.input_shape)
        if len(self.data_models) != self.code.k:
            raise BundleError(
                f"code has k = {self.code.k} but {len(self.data_models)} data models were given"
            )
        if len(self.coded_models) != self.code.r:
            raise BundleError(
                f"code has r = {self.code.r} but {len(self.coded_models)} coded models were given"
            )

    @property
    def n(self) -> int:
        return self.code.n

    @property
    def all_models(self) -> list[nn.Module]:
        """The ``n`` models in worker order: data models, then coded models."""
        return list(self.data_models) + list(self.coded_models)

    def model(self, index: int) -> nn.Module:
        """Worker ``index`` (``0..n-1``)."""
        if not 0 <= index < self.n:
            raise IndexError(f"model index {index} out of range 0..{self.n - 1}")
        return self.all_models[index]

    @staticmethod
    def parity_structure(
        manifest: Mapping[str, Any], index: int, code: Code | None = None
    ) -> dict[str, Any] | None:
        """The structure of worker ``index``'s model from a manifest: None for a
        model of the bundle's architecture (every data model, and a coded model
        built by a weight-space method), else a parity's structure (``kind``,
        ``split``, ``members``, ``weights``), checked against the code
        (``code``: the manifest's, already validated)."""
        k = int(manifest["code"]["k"])
        parities = manifest.get("parities")
        if index < k or parities is None:
            return None
        r = int(manifest["code"]["r"])
        if not isinstance(parities, list) or len(parities) != r:
            raise BundleError(
                f"manifest field 'parities' must be a list of r = {r} entries, got {parities!r}"
            )
        st = parities[index - k]
        if st is None:
            return None
        if not isinstance(st, Mapping):
            raise BundleError(f"manifest parity {index - k} must be an object or null, got {st!r}")
        try:
            if code is None:
                code = Code.from_dict(manifest["code"], max_condition=MAX_CONDITION_CEILING)
            row = code.weights[index - k]
        except (CodeError, KeyError, TypeError) as exc:
            raise BundleError(f"manifest: invalid code: {exc}") from None
        members, weights = st.get("members"), st.get("weights")
        expect = [i for i in range(k) if row[i] > 0]
        if members != expect or not isinstance(weights, list) or len(weights) != len(expect):
            raise BundleError(
                f"manifest parity {index - k}: members {members!r} do not match the code's row "
                f"{[round(float(v), 6) for v in row]} (expected {expect})"
            )
        bad = [
            (i, w)
            for i, w in zip(members, weights, strict=True)
            if not isinstance(w, int | float)
            or not math.isfinite(float(w))
            or abs(float(w) - float(row[i])) > 1e-6
        ]
        if bad:
            raise BundleError(
                f"manifest parity {index - k}: mixture weights {weights} differ from the code's row"
            )
        return dict(st)

    @staticmethod
    def filename(index: int, k: int) -> str:
        return f"data_{index}.safetensors" if index < k else f"coded_{index - k}.safetensors"

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the bundle directory; returns its path.

        The files are written to a temporary directory next to ``path`` and
        renamed into place once complete, so a crash never leaves a partial
        bundle at ``path``. An existing ``path`` is refused unless it is an
        empty directory or ``overwrite`` is True; with ``overwrite`` an existing
        bundle (a directory holding ``manifest.json``; anything else is refused)
        is replaced as a whole, only after the new one is complete.
        """
        path = Path(path)
        with bundle_lock(path, shared=True):  # not while another save swaps the folders
            check_save_target(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            files = {}
            for i, m in enumerate(self.all_models):
                name = self.filename(i, self.code.k)
                save_model(m, tmp / name)
                files[name] = sha256_file(tmp / name)
            manifest = {
                "format_version": FORMAT_VERSION,
                "architecture": self.architecture,
                "code": self.code.to_dict(),
                "encoder": _jsonable(self.encoder),
                "input_shape": list(self.input_shape),
                "class_names": self.class_names,
                "parities": [_structure(m) for m in self.coded_models],
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            for name in [*files, MANIFEST]:
                _fsync(tmp / name)
            with bundle_lock(path, shared=False):  # one install at a time; none while a load reads
                _install(tmp, path, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.manifest, self.path = manifest, path
        return path

    @classmethod
    def read_manifest(cls, path: str | Path) -> dict[str, Any]:
        """Read ``manifest.json`` (a regular file of at most ``MAX_MANIFEST_BYTES``)
        and check its required fields, without loading any tensors; see
        :meth:`check_manifest` for the full validation."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle directory {path} does not exist")
        mf = path / MANIFEST
        if not mf.exists():
            raise BundleError(f"{mf} is missing: {path} is not a coinfer bundle")
        try:
            manifest = json.loads(read_regular_file(mf, MAX_MANIFEST_BYTES))
        except (ValueError, RecursionError) as exc:  # bad JSON, a 5000-digit integer, deep nesting
            raise BundleError(f"{mf} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{mf} must hold a JSON object, got {type(manifest).__name__}")
        for key in ("format_version", "architecture", "code", "input_shape", "files"):
            if key not in manifest:
                raise BundleError(f"{mf} lacks the field {key!r}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise BundleError(
                f"{mf}: format_version {manifest['format_version']} is not supported (expected {FORMAT_VERSION})"
            )
        return manifest

    @classmethod
    def check_manifest(
        cls, manifest: Mapping[str, Any], where: str | Path = MANIFEST, max_condition: float | None = None
    ) -> tuple[dict[str, Any], Code]:
        """Validate a manifest before any work: the code (integer k, r within
        their caps, W of shape (r, k), finite, a mixture, condition numbers
        within ``max_condition`` — see :meth:`Code.from_dict`), the architecture
        spec's form, the input shape, class names, parity structures and the
        file list, which must be exactly ``data_0..data_{k-1}`` and
        ``coded_0..coded_{r-1}`` (bare names, no paths) with hex sha256 values.
        Imports and builds nothing. Returns ``(architecture spec, code)``."""
        if not isinstance(manifest, Mapping):
            raise BundleError(f"{where}: a manifest must be a JSON object, got {type(manifest).__name__}")
        missing = [key for key in ("code", "architecture", "input_shape", "files") if key not in manifest]
        if missing:
            raise BundleError(f"{where}: the manifest lacks {missing}")
        try:
            code = Code.from_dict(manifest["code"], max_condition=max_condition)
        except (CodeError, KeyError, TypeError) as exc:
            raise BundleError(f"{where}: invalid code: {exc}") from None
        try:
            arch = normalize_spec(manifest["architecture"])
        except CoinferError as exc:
            raise BundleError(f"{where}: {exc}") from None
        shape = manifest["input_shape"]
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= MAX_INPUT_DIMS
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_INPUT_SIZE for d in shape
            )
        ):
            raise BundleError(
                f"{where}: input_shape must be a list of 1..{MAX_INPUT_DIMS} integers in "
                f"1..{MAX_INPUT_SIZE}, got {shape!r}"
            )
        if not isinstance(manifest.get("encoder") or {}, dict):
            raise BundleError(f"{where}: encoder must be an object or null")
        names = manifest.get("class_names")
        if names is not None and (not isinstance(names, list) or not all(isinstance(c, str) for c in names)):
            raise BundleError(f"{where}: class_names must be a list of strings or null")
        files = manifest["files"]
        expected = [cls.filename(i, code.k) for i in range(code.n)]
        if not isinstance(files, dict) or sorted(files) != sorted(expected):
            listed = sorted(files) if isinstance(files, dict) else files
            raise BundleError(
                f"{where} lists files {listed!r} but a (k={code.k}, r={code.r}) bundle needs exactly "
                f"{expected} (names inside the bundle directory, no paths)"
            )
        bad = [
            name
            for name in expected
            if not isinstance(files[name], str) or not _SHA256.fullmatch(files[name])
        ]
        if bad:
            raise BundleError(f"{where}: the sha256 of {bad} must be 64 lowercase hex digits")
        for i in range(code.k, code.n):
            cls.parity_structure(manifest, i, code)
        return arch, code

    @classmethod
    def verify(cls, path: str | Path, max_condition: float | None = None) -> dict[str, bool]:
        """sha256 check of every tensor file named by the (validated) manifest:
        ``{filename: ok}``; missing files and non-regular files are False."""
        path = Path(path)
        manifest = cls.read_manifest(path)
        cls.check_manifest(manifest, path / MANIFEST, max_condition)
        return cls.check_files(path, manifest)

    @staticmethod
    def check_files(path: str | Path, manifest: Mapping[str, Any]) -> dict[str, bool]:
        """sha256 check of the files of a manifest that :meth:`check_manifest`
        accepted: ``{filename: ok}``; missing and non-regular files are False."""
        path = Path(path)
        out = {}
        for name, digest in manifest["files"].items():
            try:
                out[name] = sha256_file(path / name) == digest
            except BundleError:
                out[name] = False
        return out

    @classmethod
    def load(
        cls,
        path: str | Path,
        architecture: str | Mapping | None = None,
        *,
        trust_code: bool = False,
        max_condition: float | None = None,
    ) -> Bundle:
        """Load a bundle, validating its manifest and verifying every hash and the architecture.

        Args:
            path: the bundle directory.
            architecture: if given, the bundle must have been built for it.
            trust_code: allow an architecture that is code
                (``package.module:factory``): loading imports that module and
                calls the factory with the manifest's kwargs. Without it such a
                bundle raises :class:`~coinfer.errors.UntrustedCodeError` before
                anything is imported. Registered architectures need no opt-in.
            max_condition: the largest decoding condition number accepted
                (default 1e6); the manifest's recorded value can only lower it.
        """
        path = Path(path)
        with bundle_lock(path, shared=True):  # a save replacing this bundle waits for the load
            return cls._load(path, architecture, trust_code, max_condition)

    @classmethod
    def _load(cls, path: Path, architecture, trust_code: bool, max_condition) -> Bundle:
        manifest = cls.read_manifest(path)
        arch, code = cls.check_manifest(manifest, path / MANIFEST, max_condition)
        check_trusted(arch, trust_code, source=f"bundle {path}")
        if architecture is not None and normalize_spec(architecture) != arch:
            raise BundleError(
                f"bundle {path} was built for architecture {arch}, not {normalize_spec(architecture)}"
            )
        expected = [cls.filename(i, code.k) for i in range(code.n)]
        models = [
            load_model(
                arch,
                path / name,
                cls.parity_structure(manifest, i, code),
                trust_code=trust_code,
                sha256=manifest["files"][name],
            )
            for i, name in enumerate(expected)
        ]
        check_class_count(models[0], manifest["input_shape"], manifest.get("class_names"), path)
        return cls(
            architecture=arch,
            code=code,
            data_models=models[: code.k],
            coded_models=models[code.k :],
            input_shape=tuple(manifest["input_shape"]),
            class_names=manifest.get("class_names"),
            encoder=manifest.get("encoder") or {},
            manifest=manifest,
            path=path,
        )

    def predict(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Softmax outputs ``{worker: (B, C)}`` of the chosen workers (default all)."""
        idx = range(self.n) if indices is None else indices
        with torch.no_grad():
            return {i: torch.softmax(self.model(i)(x), dim=-1) for i in idx}


def check_class_count(
    model: nn.Module, input_shape: Sequence[int], class_names: Sequence[str] | None, where: str | Path
) -> None:
    """Refuse ``class_names`` whose length is not the number of classes the
    model outputs (one forward pass of a zero input)."""
    if class_names is None:
        return
    try:
        with torch.no_grad():
            p = next(model.parameters(), None)
            x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
            classes = model.eval()(x).shape[-1]
    except Exception as exc:
        raise BundleError(
            f"{where}: the model cannot run an input of shape {list(input_shape)}: {exc}"
        ) from None
    if classes != len(class_names):
        raise BundleError(
            f"{where}: class_names has {len(class_names)} names but the models output {classes} classes"
        )


def _meta_bytes(spec: dict[str, Any], path: str | Path) -> int:
    """Bytes of the weights of a registered architecture, from a build on the
    ``meta`` device (allocates nothing)."""
    try:
        with torch.device("meta"):
            sd = build_model(spec).state_dict()
    except CoinferError:
        raise
    except Exception as exc:
        raise BundleError(
            f"{path}: architecture {spec['name']!r} cannot be built from {spec['kwargs']}: {exc}"
        ) from None
    return sum(t.numel() * t.element_size() for t in sd.values())


def _weights_size(
    spec: dict[str, Any], parity: Mapping[str, Any] | None, path: str | Path
) -> tuple[int, int] | None:
    """``(need, cap)`` for a registered architecture, from one build on ``meta``:
    ``need`` the bytes of the weights its kwargs describe, ``cap`` the largest
    file worth reading (twice the weights plus 1 MiB of header per copy; a heads
    parity holds at most one head per member on top of the trunk), so a huge or
    sparse file is refused from its size before a byte is read. ``None`` for a
    trusted factory, which is not called twice."""
    if not is_registered(spec):
        return None
    need = _meta_bytes(spec, path)
    copies = 1 + (len(parity.get("members") or []) if isinstance(parity, Mapping) else 0)
    return need, copies * (2 * need + (1 << 20))


_BUNDLE_ENTRY = re.compile(r"manifest\.json|(data|coded)_\d+\.safetensors")


def check_save_target(path: Path, overwrite: bool) -> None:
    """Refuse to save over ``path`` unless it is absent, an empty directory, or
    (with ``overwrite``) an existing bundle."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BundleError(f"{path} exists and is not a directory; refusing to write a bundle there")
    if not path.exists() or not any(path.iterdir()):
        return
    if not overwrite:
        raise BundleError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    foreign = sorted(p.name for p in path.iterdir() if not _BUNDLE_ENTRY.fullmatch(p.name))
    if not (path / MANIFEST).is_file() or foreign:
        raise BundleError(
            f"{path} exists, is not empty and is not a bundle"
            + (f" (it holds {foreign[:5]})" if foreign else "")
            + "; refusing to replace it"
        )


@contextmanager
def bundle_lock(path: Path, shared: bool) -> Iterator[None]:
    """Hold an ``flock`` on the folder holding bundle ``path``: exclusive while a
    save installs a bundle there (two renames), shared while a load reads one.
    Two processes saving to one path then replace it one after the other, and a
    load never sees the files of two bundles. No file is created. Where the lock
    cannot be taken (no such folder, a platform without ``fcntl``) the bundle is
    read or written without it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without flock: go on unlocked
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _install(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the complete bundle ``tmp`` to ``path``; an old bundle there is
    moved aside first and deleted only once the new one is in place."""
    check_save_target(path, overwrite)
    if path.exists() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        try:
            tmp.rename(path)
        except OSError as exc:
            raise BundleError(f"cannot move the new bundle into {path}: {exc}") from None
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old.rmdir()
    path.rename(old)
    try:
        tmp.rename(path)
    except OSError as exc:
        old.rename(path)
        raise BundleError(f"cannot move the new bundle into {path}: {exc}") from None
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _structure(model: nn.Module) -> dict[str, Any] | None:
    structure = getattr(model, "structure", None)
    return structure() if callable(structure) else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() < 64:
        return obj.tolist()
    return repr(obj)
