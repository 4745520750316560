"""Shared fixtures: tiny models and the path of the real datasets."""

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class SmallBN(nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


def small_cnn(num_classes: int = 5) -> nn.Module:
    """Factory used as 'package.module:factory' in tests."""
    return SmallCNN(num_classes)


@pytest.fixture
def cnn_pair():
    torch.manual_seed(0)
    return [SmallCNN(), SmallCNN()]


@pytest.fixture
def images():
    return torch.randn(24, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def digits_specialists(k: int = 2, hidden=(64, 32), seed: int = 0):
    """k MLPs fine-tuned on disjoint class groups of scikit-learn's digits from a
    common base (the demo's recipe). Returns (arch spec, models, dataset, calibration inputs)."""
    from coinfer import build_model
    from coinfer.experiments.data import class_split, load_digits
    from coinfer.experiments.train import finetune_copies, fit

    arch = {"name": "mlp", "kwargs": {"in_features": 64, "hidden": list(hidden), "num_classes": 10}}
    ds = load_digits(seed=seed)
    perm = torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(seed))
    nb = len(perm) // 3
    torch.manual_seed(seed)
    base = build_model(arch)
    fit(base, ds.x_train[perm[:nb]], ds.y_train[perm[:nb]], epochs=10, lr=3e-3, seed=seed, progress=False)
    rest = perm[nb:]
    parts = []
    for classes in class_split(10, k):
        m = torch.isin(ds.y_train[rest], torch.tensor(classes))
        parts.append((ds.x_train[rest][m], ds.y_train[rest][m]))
    models = finetune_copies(base, parts, seed=seed, epochs=30, lr=3e-3, progress=False)
    return arch, models, ds, ds.x_train[rest]


def offline_runtime(tmp_path, class_names=("a", "b", "c"), **config):
    """A ``Runtime`` of a k = 2, r = 1 manifest over (4,) inputs, without Ray or worker
    processes (its ``_call`` is for the test to replace): the request path, accounting,
    health and admin logic alone."""
    from coinfer import Code
    from coinfer.serving.runtime import Runtime, ServeConfig

    manifest = {
        "code": Code(2, 1).to_dict(),
        "input_shape": [4],
        "class_names": list(class_names),
        "architecture": {"name": "mlp", "kwargs": {}},
        "files": {n: "0" * 64 for n in ("data_0.safetensors", "data_1.safetensors", "coded_0.safetensors")},
    }
    return Runtime(ServeConfig(tmp_path, **config), manifest)


@contextlib.contextmanager
def local_ray_server(bundle_dir, **config):
    """A local Ray (4 CPUs) and ``serve_bundle`` on free ports; stopped on exit."""
    ray = pytest.importorskip("ray")
    from coinfer.serving.runtime import ServeConfig
    from coinfer.serving.server import serve_bundle

    init_local_ray(4)
    try:
        with serve_bundle(ServeConfig(bundle_dir, **config)) as srv:
            yield srv
    finally:
        ray.shutdown()


def init_local_ray(num_cpus: int) -> None:
    """A fresh local Ray instance. Ray gives its raylet a fixed 30 s to register
    ("The current node timed out during startup"), which a loaded 2-core machine
    can miss once: one retry."""
    import ray

    for attempt in (1, 2):
        if ray.is_initialized():
            ray.shutdown()
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
            return
        except Exception as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise


def perturbed_family(spec, k: int, seed: int = 0, spread: float = 0.3) -> list[nn.Module]:
    """k models "fine-tuned" from one initialisation: copies of one model of ``spec``,
    each parameter perturbed by ``spread`` times its mean magnitude."""
    from coinfer import build_model

    torch.manual_seed(seed)
    base = build_model(spec).eval()
    models = []
    for _ in range(k):
        m = build_model(spec).eval()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(spread * torch.randn_like(p) * p.abs().mean())
        models.append(m)
    return models
