"""Bundles: what gets deployed.

A bundle is a directory holding ``manifest.json`` and one safetensors file per
model (``data_0.safetensors`` … and ``coded_0.safetensors`` …). The manifest
records the format version, architecture spec, code (k, r, W), encoder and its
settings, input shape, class names and the sha256 of every tensor file.
:meth:`Bundle.load` verifies every hash and the architecture before returning.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from coinfer.architectures import build_model, normalize_spec
from coinfer.code import Code
from coinfer.errors import BundleError, CodeError, CoinferError

__all__ = ["Bundle", "FORMAT_VERSION", "sha256_file", "save_model", "load_model"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: nn.Module, path: str | Path) -> None:
    """Save a model's ``state_dict`` (parameters and buffers) as safetensors."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))


def load_model(
    spec: str | Mapping[str, Any], path: str | Path, parity: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build ``spec`` and load its weights from a safetensors file, strictly.

    ``parity``: a coded model's structure from the manifest (``kind: heads``:
    a :class:`~coinfer.heads.HeadsParity` over ``spec``); None for a model of
    the architecture itself."""
    model = build_model(spec)
    if parity is not None:
        from coinfer.heads import build_parity

        try:
            model = build_parity(model, parity)
        except CoinferError as exc:
            raise BundleError(f"{path}: cannot rebuild the parity's structure: {exc}") from None
    try:
        sd = load_file(str(path))
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
    def parity_structure(manifest: Mapping[str, Any], index: int) -> dict[str, Any] | None:
        """The structure of worker ``index``'s model from a manifest: None for a
        model of the bundle's architecture (every data model, and a coded model
        built by a weight-space method), else a parity's structure (``kind``,
        ``split``, ``members``, ``weights``), checked against the code."""
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
            row = Code.from_dict(manifest["code"]).weights[index - k]
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
        """Write the bundle directory; returns its path."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            if not (path / MANIFEST).exists():
                raise BundleError(f"{path} exists, is not empty and is not a bundle; refusing to overwrite")
        path.mkdir(parents=True, exist_ok=True)
        files = {}
        for i, m in enumerate(self.all_models):
            name = self.filename(i, self.code.k)
            save_model(m, path / name)
            files[name] = sha256_file(path / name)
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
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(path / MANIFEST)
        self.manifest, self.path = manifest, path
        return path

    @classmethod
    def read_manifest(cls, path: str | Path) -> dict[str, Any]:
        """Read and check ``manifest.json`` without loading any tensors."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle directory {path} does not exist")
        mf = path / MANIFEST
        if not mf.exists():
            raise BundleError(f"{mf} is missing: {path} is not a coinfer bundle")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{mf} is not valid JSON: {exc}") from None
        for key in ("format_version", "architecture", "code", "input_shape", "files"):
            if key not in manifest:
                raise BundleError(f"{mf} lacks the field {key!r}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise BundleError(
                f"{mf}: format_version {manifest['format_version']} is not supported (expected {FORMAT_VERSION})"
            )
        return manifest

    @classmethod
    def verify(cls, path: str | Path) -> dict[str, bool]:
        """sha256 check of every tensor file: ``{filename: ok}``; missing files are False."""
        path = Path(path)
        manifest = cls.read_manifest(path)
        return {
            name: (path / name).exists() and sha256_file(path / name) == digest
            for name, digest in manifest["files"].items()
        }

    @classmethod
    def load(cls, path: str | Path, architecture: str | Mapping | None = None) -> Bundle:
        """Load a bundle, verifying every hash and the architecture.

        Args:
            path: the bundle directory.
            architecture: if given, the bundle must have been built for it.
        """
        path = Path(path)
        manifest = cls.read_manifest(path)
        try:
            code = Code.from_dict(manifest["code"])
        except (CodeError, KeyError, TypeError) as exc:
            raise BundleError(f"{path / MANIFEST}: invalid code: {exc}") from None
        arch = normalize_spec(manifest["architecture"])
        if architecture is not None and normalize_spec(architecture) != arch:
            raise BundleError(
                f"bundle {path} was built for architecture {arch}, not {normalize_spec(architecture)}"
            )
        expected = [cls.filename(i, code.k) for i in range(code.n)]
        listed = set(manifest["files"])
        if set(expected) != listed:
            raise BundleError(
                f"{path / MANIFEST} lists files {sorted(listed)} but a (k={code.k}, r={code.r}) bundle needs {expected}"
            )
        for name in expected:
            f = path / name
            if not f.exists():
                raise BundleError(f"bundle file {f} is missing")
            digest = sha256_file(f)
            if digest != manifest["files"][name]:
                raise BundleError(
                    f"bundle file {f} is corrupted: sha256 {digest[:12]}… does not match the manifest's "
                    f"{manifest['files'][name][:12]}…"
                )
        models = [
            load_model(arch, path / name, cls.parity_structure(manifest, i))
            for i, name in enumerate(expected)
        ]
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
