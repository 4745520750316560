"""Reference networks and architecture specs.

An architecture spec is a JSON-able dict ``{"name": ..., "kwargs": {...}}``
where ``name`` is a registered architecture (``mlp``, ``lenet5``, ``resnet20``, ``vit``)
or a ``"package.module:factory"`` path to a user's own factory returning an
``nn.Module`` classifier that outputs logits.

A ``package.module:factory`` spec is code: building it imports the module and
calls the factory with the spec's kwargs (``os:system`` would run a shell
command). :func:`build_model` builds whatever spec its caller wrote; specs read
from a bundle manifest go through :func:`check_trusted` first (see the "Trust
model" section of ``docs/serving.md``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coinfer.errors import ArchitectureError, UntrustedCodeError

__all__ = [
    "MLP",
    "LeNet5",
    "ResNet20",
    "ViT",
    "ARCHITECTURES",
    "build_model",
    "normalize_spec",
    "is_registered",
    "check_trusted",
]


MAX_MLP_LAYERS = 64


class MLP(nn.Module):
    """A plain multi-layer perceptron; flattens its input."""

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (64,), num_classes: int = 10):
        super().__init__()
        if len(hidden) > MAX_MLP_LAYERS:
            # a manifest's kwargs must not make building the model itself the attack
            raise ValueError(f"an mlp has at most {MAX_MLP_LAYERS} hidden layers, got {len(hidden)}")
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 for ``(in_channels, 28, 28)`` or ``(in_channels, 32, 32)`` images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        pad = 2 if image_size == 28 else 0
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016), with BatchNorm; ``width`` scales channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        blocks: list[nn.Module] = []
        cin = w
        for i, cout in enumerate((w, 2 * w, 4 * w)):
            for j in range(3):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class _Attention(nn.Module):
    """Multi-head self-attention with its projections as plain ``nn.Linear`` layers."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _PreNormBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``. With ``cls_only`` the
    block keeps only the class token after attention: the MLP and everything
    after it are per-token, so a ViT that reads only the class token gives the
    same logits while its last MLP runs on one token instead of all."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, cls_only: bool = False):
        super().__init__()
        self.cls_only = cls_only
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.cls_only:
            x = x[:, 0]
        return x + self.mlp(self.norm2(x))


MAX_VIT_DEPTH = 64


class ViT(nn.Module):
    """A small pre-norm Vision Transformer (Dosovitskiy et al. 2021): patch
    embedding, a class token, learned position embeddings, ``depth`` pre-norm
    blocks (LayerNorm before attention and before the MLP), a final LayerNorm
    and a linear head on the class token. The last block runs its MLP on the
    class token only (exact: see :class:`_PreNormBlock`)."""

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 7,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_dim: int = 128,
    ):
        super().__init__()
        if not 1 <= depth <= MAX_VIT_DEPTH:
            raise ValueError(f"a vit has 1..{MAX_VIT_DEPTH} blocks, got depth={depth}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(
            *[_PreNormBlock(dim, num_heads, mlp_dim, cls_only=i == depth - 1) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x)))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet20": ResNet20,
    "vit": ViT,
}


def normalize_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """Turn ``"lenet5"`` or ``{"name": ..., "kwargs": ...}`` into the dict form."""
    if isinstance(spec, str):
        return {"name": spec, "kwargs": {}}
    if isinstance(spec, Mapping) and "name" in spec:
        if not isinstance(spec["name"], str):
            raise ArchitectureError(f"architecture name must be a string, got {spec['name']!r}")
        kwargs = spec.get("kwargs") or {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
            raise ArchitectureError(f"architecture kwargs must be a mapping with string keys, got {kwargs!r}")
        return {"name": spec["name"], "kwargs": dict(kwargs)}
    raise ArchitectureError(
        f"architecture spec must be a name or {{'name': ..., 'kwargs': {{...}}}}, got {spec!r}"
    )


def is_registered(spec: str | Mapping[str, Any]) -> bool:
    """Whether ``spec`` names a registered architecture (:data:`ARCHITECTURES`),
    i.e. building it runs only coinfer's own code."""
    return normalize_spec(spec)["name"] in ARCHITECTURES


def check_trusted(spec: str | Mapping[str, Any], trust_code: bool, source: str = "bundle") -> dict[str, Any]:
    """Normalise ``spec`` (read from ``source``) and refuse it, before anything is
    imported, when it is code (not a registered architecture) and ``trust_code``
    is False.

    Raises:
        UntrustedCodeError: naming the architecture and the opt-in.
    """
    spec = normalize_spec(spec)
    if spec["name"] in ARCHITECTURES or trust_code:
        return spec
    raise UntrustedCodeError(
        f"{source}: architecture {spec['name']!r} is not one of the registered architectures "
        f"{sorted(ARCHITECTURES)} but code that loading would import and call with kwargs "
        f"{spec['kwargs']}; refusing to run it. If you trust whoever made this bundle, opt in "
        "with trust_code=True (Python) or --trust-code (CLI)"
    )


def _resolve(name: str) -> Callable[..., nn.Module]:
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if ":" not in name:
        raise ArchitectureError(
            f"unknown architecture {name!r}: expected one of {sorted(ARCHITECTURES)} "
            "or 'package.module:factory'"
        )
    mod_name, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ArchitectureError(
            f"cannot import module {mod_name!r} of architecture {name!r}: {exc}. The module must be "
            "importable: install its package, or put the folder holding it on PYTHONPATH "
            f"(PYTHONPATH=/path/to/folder coinfer ...), or run from that folder"
        ) from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise ArchitectureError(f"module {mod_name!r} has no callable {attr!r} (architecture {name!r})")
    return factory


def build_model(spec: str | Mapping[str, Any]) -> nn.Module:
    """Instantiate a fresh model from an architecture spec the caller wrote.

    A ``package.module:factory`` spec imports and calls that factory: never pass
    a spec read from a file you do not trust (bundles go through
    :func:`check_trusted`)."""
    spec = normalize_spec(spec)
    factory = _resolve(spec["name"])
    try:
        model = factory(**spec["kwargs"])
    except TypeError as exc:
        raise ArchitectureError(
            f"architecture {spec['name']!r} rejected kwargs {spec['kwargs']}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"architecture {spec['name']!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model
