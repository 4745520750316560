"""Diagonal Fisher: vectorised estimators against a slow per-sample reference."""

import pytest
import torch
from torch import nn

import coinfer.fisher as fisher_mod
import coinfer.fisher_layers as fl
from coinfer import CalibrationError, diagonal_fisher
from coinfer.fisher import ESTIMATORS, fisher_total
from tests.conftest import SmallBN, SmallCNN


def reference_fisher(model, x, estimator, labels=None):
    """Independent per-sample loop: plain autograd, one class at a time."""
    model.eval()
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    acc = [torch.zeros_like(p) for p in params]
    for b in range(len(x)):
        logp = torch.log_softmax(model(x[b : b + 1]), -1)[0]
        p = logp.exp().detach()
        if estimator == "exact":
            terms = [(c, float(p[c])) for c in range(len(p))]
        else:
            terms = [(int(labels[b]), 1.0)]
        for c, w in terms:
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            for a, g in zip(acc, grads, strict=True):
                a += w * g**2
    return {n: a / len(x) for n, a in zip(names, acc, strict=True)}


def assert_rel_close(got, want, rel=1e-4):
    assert got.keys() == want.keys()
    for n in want:
        scale = want[n].abs().max().clamp(min=1e-12)
        err = (got[n] - want[n]).abs().max() / scale
        assert err < rel, f"{n}: relative error {float(err):.2e}"


@pytest.fixture(params=["cnn", "bn"])
def model(request):
    torch.manual_seed(3)
    m = SmallCNN() if request.param == "cnn" else SmallBN()
    if request.param == "bn":  # give BatchNorm non-trivial running statistics
        m.train()
        with torch.no_grad():
            m(torch.randn(32, 1, 6, 6) * 2 + 1)
        m.eval()
    return m.double()


@pytest.mark.parametrize("backend", ["layers", "vmap"])
def test_exact_matches_the_per_sample_loop(model, images, backend):
    x = images.double()
    got = diagonal_fisher(model, x, "exact", batch_size=7, backend=backend)
    assert_rel_close(got, reference_fisher(model, x, "exact"))


@pytest.mark.parametrize("backend", ["layers", "vmap"])
def test_empirical_matches_the_per_sample_loop(model, images, backend):
    x = images.double()
    y = torch.arange(len(x)) % 4
    got = diagonal_fisher(model, x, "empirical", labels=y, batch_size=5, backend=backend)
    assert_rel_close(got, reference_fisher(model, x, "empirical", y))


class Awkward(nn.Module):
    """Layers the layer-wise backend must get right: a strided, dilated conv with
    many input channels (the per-offset path), in-place ReLU on a conv output,
    BatchNorm1d, and a Linear on a (B, T, I) input."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 9, 3, padding=1)
        self.c2 = nn.Conv2d(9, 5, 3, stride=2, padding=2, dilation=2)
        self.relu = nn.ReLU(inplace=True)
        self.tok = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.c2(self.relu(self.c1(x))))  # (B, 5, 3, 3)
        h = self.tok(h.flatten(2)[:, :, :3])  # (B, 5, 4): Linear over the last dim
        return self.head(self.bn(h.mean(1)))


class Tied(nn.Module):
    """The head reuses the first layer's weight through a functional call."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(36, 36)
        self.b = nn.Linear(36, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x.flatten(1)))
        return self.b(torch.nn.functional.linear(h, self.a.weight))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(36, 36)
        self.b = nn.Linear(36, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x.flatten(1))))))


class Scaled(nn.Module):
    """A bare parameter outside any supported layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(36, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.scale


class Regrouped(nn.Module):
    """Reshapes the batch before a Linear: dim 0 of the layer is not the sample dim."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(45, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x.reshape(-1, 4)))  # (B * 9, 5)
        return self.b(h.reshape(len(x), 45))


class SeqFirst(nn.Module):
    """Runs a Linear on (T, B, I) with T == B: shapes look per-sample but are not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):  # x: (B, 1, 6, 6); tokens = rows, B == 6 == T
        h = torch.tanh(self.a(x[:, 0].transpose(0, 1)))  # (T, B, 4)
        return self.b(h.mean(0))


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(36, 3)

    def forward(self, x):
        return self.fc(input=x.flatten(1))


def weight_normed():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.Tanh(), nn.utils.weight_norm(nn.Linear(5, 3)))


def test_layers_backend_handles_strides_dilation_inplace_and_3d_linear(images):
    torch.manual_seed(5)
    m = Awkward()
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 1, 6, 6))
    m = m.eval().double()
    x = images.double()
    want = reference_fisher(m, x, "exact")
    assert_rel_close(diagonal_fisher(m, x, "exact", backend="layers", batch_size=9), want)
    y = torch.arange(len(x)) % 3
    got = diagonal_fisher(m, x, "empirical", labels=y, backend="layers")
    assert_rel_close(got, reference_fisher(m, x, "empirical", y))
    assert_rel_close(got, diagonal_fisher(m, x, "empirical", labels=y, backend="loop"))
    got = diagonal_fisher(m, x, "sampled", backend="layers", seed=2, batch_size=10)
    assert_rel_close(got, diagonal_fisher(m, x, "sampled", backend="loop", seed=2, batch_size=10))
    assert_rel_close(got, reference_fisher(m, x, "empirical", sampled_labels(m, x, 2, 10)))


@pytest.mark.parametrize(
    "cls, why",
    [
        (Tied, "disagrees with autograd"),
        (Twice, "more or less than once"),
        (Scaled, "scale"),
        (Regrouped, "not the sample dim"),
        (SeqFirst, "for sample 0 disagrees"),
        (KeywordCall, "without a positional tensor"),
        (weight_normed, "forward hooks|reparametrised"),
    ],
)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_models_outside_the_layers_backend_fall_back_to_vmap(images, cls, why, estimator, monkeypatch):
    torch.manual_seed(6)
    m = cls().double()
    x = images.double()
    y = torch.arange(len(x)) % 3
    bs = 6  # SeqFirst needs chunks of exactly 6 samples to look per-sample
    kw = dict(labels=y, batch_size=bs, seed=4)
    want = diagonal_fisher(m, x, estimator, backend="loop", **kw)
    vmap_calls = spy(monkeypatch, fisher_mod, "_accumulate_vmap")
    assert_rel_close(diagonal_fisher(m, x, estimator, **kw), want)
    assert vmap_calls, "auto did not fall back to vmap"
    with pytest.raises(ValueError, match=why):
        diagonal_fisher(m, x, estimator, backend="layers", **kw)
    if estimator == "exact":  # the loop backend against the independent reference
        assert_rel_close(want, reference_fisher(m, x, "exact"))


def spy(monkeypatch, module, name) -> list:
    """Replace ``module.name`` by a wrapper that records each call; return the record."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def sampled_labels(model, x, seed, chunk):
    """The labels the sampled estimator draws: one multinomial call per chunk."""
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [torch.multinomial(probs[s : s + chunk], 1, generator=g).squeeze(1) for s in range(0, len(x), chunk)]
    )


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_layers_sampled_and_empirical_match_the_loop_across_chunks(model, estimator):
    # 150 samples: several chunks, with each backend's default chunk size
    x = torch.randn(150, 1, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(len(x)) % 4
    kw = dict(labels=y if estimator == "empirical" else None, seed=21)
    got = diagonal_fisher(model, x, estimator, backend="layers", **kw)
    loop = diagonal_fisher(model, x, estimator, backend="loop", **kw)
    assert_rel_close(got, loop)
    assert_rel_close(diagonal_fisher(model, x, estimator, backend="vmap", **kw), loop)
    labels = (
        y if estimator == "empirical" else sampled_labels(model, x, 21, fisher_mod.DEFAULT_CHUNK["sampled"])
    )
    assert_rel_close(got, reference_fisher(model, x, "empirical", labels))
    # torch's CPU multinomial draws row by row: other chunks draw the same labels
    assert_rel_close(diagonal_fisher(model, x, estimator, backend="layers", batch_size=7, **kw), loop)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_auto_uses_layers_for_every_estimator_on_a_supported_model(model, images, estimator, monkeypatch):
    x = images.double()
    kw = dict(labels=torch.arange(len(x)) % 4, seed=5, batch_size=10)
    want = diagonal_fisher(model, x, estimator, backend="loop", **kw)
    layer_calls = spy(monkeypatch, fl, "accumulate")
    vmap_calls = spy(monkeypatch, fisher_mod, "_accumulate_vmap")
    got = diagonal_fisher(model, x, estimator, **kw)
    assert len(layer_calls) == 3 and not vmap_calls  # 24 samples in chunks of 10
    assert_rel_close(got, want)


def test_a_failed_first_chunk_check_keeps_the_drawn_labels(images, monkeypatch):
    """A model the structural checks accept but autograd rejects (tied weights):
    the labels drawn on the layers' forward pass are the ones vmap uses."""
    torch.manual_seed(6)
    m = Tied().double()
    x = images.double()
    want = diagonal_fisher(m, x, "sampled", backend="loop", seed=9, batch_size=8)
    layer_calls = spy(monkeypatch, fl, "accumulate")
    got = diagonal_fisher(m, x, "sampled", seed=9, batch_size=8)
    assert len(layer_calls) == 1  # tried on the first chunk only
    assert_rel_close(got, want)
    assert_rel_close(got, reference_fisher(m, x, "empirical", sampled_labels(m, x, 9, 8)))


@pytest.mark.parametrize(
    "cin, targets, grouped",
    [(2, 1, True), (2, 3, True), (9, 1, True), (9, 20, False), (12, 1, False)],
)
def test_conv_per_sample_gradients_on_both_paths(cin, targets, grouped, monkeypatch):
    """Both conv paths give autograd's per-sample weight gradients with stride,
    dilation, asymmetric padding and windows that leave input rows unused."""
    g = torch.Generator().manual_seed(cin + targets)
    conv = nn.Conv2d(cin, 4, 3, stride=2, padding=(1, 2), dilation=2).double()
    size = (20, 19) if cin != 12 else (9, 8)  # 9x9 / 3x4 output positions
    a = torch.randn(5, cin, *size, generator=g, dtype=torch.float64)
    d = torch.randn(targets, *conv(a).shape, generator=g, dtype=torch.float64)
    grouped_calls = spy(monkeypatch, fl, "_conv_per_sample")
    (got,) = fl._conv_weight(conv, a, d, lambda t: (t,))
    assert bool(grouped_calls) == grouped
    for s in range(targets):
        for b in range(len(a)):
            (want,) = torch.autograd.grad((conv(a[b : b + 1]) * d[s, b : b + 1]).sum(), conv.weight)
            torch.testing.assert_close(got[s, b], want)


def test_sampled_matches_the_loop_with_the_same_labels_and_is_seeded(model, images):
    x = images.double()
    a = diagonal_fisher(model, x, "sampled", seed=11, batch_size=6)
    b = diagonal_fisher(model, x, "sampled", seed=11, batch_size=6)
    c = diagonal_fisher(model, x, "sampled", seed=12, batch_size=6)
    for n in a:
        assert torch.equal(a[n], b[n])
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # the sampled labels come from the model's own distribution: reproduce them
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    g = torch.Generator().manual_seed(11)
    ys = torch.cat(
        [torch.multinomial(probs[s : s + 6], 1, generator=g).squeeze(1) for s in range(0, len(x), 6)]
    )
    assert_rel_close(a, reference_fisher(model, x, "empirical", ys))


def test_loop_path_matches_the_vectorised_path(images):
    torch.manual_seed(0)
    m = SmallCNN().double()
    x = images.double()
    assert_rel_close(diagonal_fisher(m, x, vectorize=False), diagonal_fisher(m, x), rel=1e-8)


def test_fisher_is_keyed_like_named_parameters_and_restores_mode(images):
    m = SmallBN()
    m.train()
    f = diagonal_fisher(m, images)
    assert list(f) == [n for n, _ in m.named_parameters()]
    assert all(f[n].shape == p.shape for n, p in m.named_parameters())
    assert m.training
    assert fisher_total(f) > 0


def test_dataloader_input_gives_the_same_result(images):
    torch.manual_seed(0)
    m = SmallCNN()
    y = torch.arange(len(images)) % 5
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, y), batch_size=10)
    assert_rel_close(
        diagonal_fisher(m, loader, "empirical"), diagonal_fisher(m, images, "empirical", labels=y)
    )
    assert_rel_close(diagonal_fisher(m, loader, max_samples=10), diagonal_fisher(m, images[:10]))


def test_bad_inputs_are_named(images):
    m = SmallCNN()
    with pytest.raises(ValueError, match="estimator must be one of"):
        diagonal_fisher(m, images, "fancy")
    with pytest.raises(ValueError, match="backend must be one of"):
        diagonal_fisher(m, images, backend="gpu")
    with pytest.raises(CalibrationError, match="needs labels"):
        diagonal_fisher(m, images, "empirical")
    with pytest.raises(CalibrationError, match="floating-point"):
        diagonal_fisher(m, images.long())
    with pytest.raises(CalibrationError, match="labels must lie in"):
        diagonal_fisher(m, images, "empirical", labels=torch.full((len(images),), 9))


def test_layers_backend_in_class_groups_matches_the_loop(images, monkeypatch):
    import coinfer.fisher_layers as fl

    torch.manual_seed(8)
    m = SmallCNN(num_classes=7).double()
    x = images.double()
    monkeypatch.setattr(fl, "CLASS_GROUP", 3)  # 7 classes in groups of 3, 3, 1
    assert_rel_close(diagonal_fisher(m, x, "exact", backend="layers"), reference_fisher(m, x, "exact"))
