"""Encoders: COIN's closed form, baselines, buffers, validation, and real-data quality."""

import copy
import re

import pytest
import torch

from coinfer import CalibrationError, Code, ModelMismatchError, OptionError, encode
from coinfer.architectures import MLP
from coinfer.encoders import fisher_weighted_average, recompute_batchnorm, weighted_average
from coinfer.experiments.data import class_split, load_digits
from coinfer.experiments.evaluate import total_variation
from coinfer.experiments.train import finetune_copies, fit
from coinfer.predict import predict_probs
from tests.conftest import SmallBN, SmallCNN


def params_of(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_coin_of_identical_models_gives_back_the_same_model(images):
    torch.manual_seed(0)
    m = SmallCNN()
    coded = encode([m, copy.deepcopy(m), copy.deepcopy(m)], Code(3, 2), images, method="coin")
    assert len(coded) == 2
    for c in coded:
        for n, p in params_of(c).items():
            torch.testing.assert_close(p, params_of(m)[n], rtol=1e-6, atol=1e-7)


def test_with_equal_fisher_coin_equals_averaging(cnn_pair):
    fisher = {n: torch.full_like(p, 0.3) for n, p in cnn_pair[0].named_parameters()}
    coded, fallback = fisher_weighted_average(cnn_pair, [fisher, fisher], [0.25, 0.75])
    avg = weighted_average(cnn_pair, [0.25, 0.75])
    assert fallback == 0
    for n, p in params_of(coded).items():
        torch.testing.assert_close(p, params_of(avg)[n])


def test_a_dominant_fisher_pulls_the_parameter_to_its_model(cnn_pair):
    f0 = {n: torch.full_like(p, 1e-6) for n, p in cnn_pair[0].named_parameters()}
    f1 = {n: torch.full_like(p, 1e-6) for n, p in cnn_pair[0].named_parameters()}
    f0["fc.bias"] = torch.full_like(f0["fc.bias"], 1e3)  # model 0 dominates fc.bias
    coded, _ = fisher_weighted_average(cnn_pair, [f0, f1], [0.5, 0.5])
    c = params_of(coded)
    torch.testing.assert_close(c["fc.bias"], params_of(cnn_pair[0])["fc.bias"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c["fc.weight"], params_of(weighted_average(cnn_pair, [0.5, 0.5]))["fc.weight"])


def test_zero_fisher_falls_back_to_the_weighted_average(cnn_pair):
    zero = {n: torch.zeros_like(p) for n, p in cnn_pair[0].named_parameters()}
    coded, fallback = fisher_weighted_average(cnn_pair, [zero, zero], [0.5, 0.5], eps=1e-12)
    assert fallback == sum(p.numel() for p in cnn_pair[0].parameters())
    for n, p in params_of(coded).items():
        torch.testing.assert_close(p, params_of(weighted_average(cnn_pair, [0.5, 0.5]))[n])


def test_average_uses_each_parity_rows_weights(cnn_pair, images):
    code = Code(2, 2)
    coded = encode(cnn_pair, code, images, method="average")
    for row, c in zip(code.weights, coded, strict=True):
        want = {
            n: row[0] * p0 + row[1] * p1
            for (n, p0), p1 in zip(
                params_of(cnn_pair[0]).items(), params_of(cnn_pair[1]).values(), strict=True
            )
        }
        for n, p in params_of(c).items():
            torch.testing.assert_close(p, want[n].float())


def _bn_models():
    torch.manual_seed(0)
    ms = [SmallBN(), SmallBN()]
    for i, m in enumerate(ms):
        m.train()
        with torch.no_grad():
            m(torch.randn(64, 1, 6, 6) * (i + 1) + i)
        m.eval()
    return ms


def test_buffers_are_averaged_or_recomputed_never_fisher_weighted(images):
    ms = _bn_models()
    avg = encode(ms, Code(2, 1), images, method="coin", buffers="average")[0]
    torch.testing.assert_close(avg.bn.running_mean, 0.5 * (ms[0].bn.running_mean + ms[1].bn.running_mean))
    rec = encode(ms, Code(2, 1), images, method="coin")[0]  # default: recompute
    fresh = copy.deepcopy(rec)
    recompute_batchnorm(fresh, images)
    torch.testing.assert_close(rec.bn.running_mean, fresh.bn.running_mean)
    assert not torch.allclose(rec.bn.running_mean, avg.bn.running_mean)
    # the recomputed statistics are those of the coded model on the calibration inputs
    with torch.no_grad():
        h = rec.conv(images)
    torch.testing.assert_close(rec.bn.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_encode_info_reports_cost_and_fisher_totals(cnn_pair, images):
    res = encode(cnn_pair, Code(2, 1), images, method="coin", estimator="sampled", num_samples=10)
    assert res.info["method"] == "coin"
    assert res.info["calibration_samples"] == 10
    assert len(res.info["fisher_totals"]) == 2 and all(t > 0 for t in res.info["fisher_totals"])
    assert res.info["backward_passes"] == 20 and res.info["seconds"] > 0


def test_normalize_equalises_fisher_influence(cnn_pair, images):
    big = copy.deepcopy(cnn_pair[1])
    with torch.no_grad():  # scaling logits up inflates model 1's Fisher
        big.fc.weight.mul_(5)
        big.fc.bias.mul_(5)
    ms = [cnn_pair[0], big]
    plain = encode(ms, Code(2, 1), images, method="coin")
    t0, t1 = plain.info["fisher_totals"]
    assert t1 != pytest.approx(t0, rel=0.1)
    normed = encode(ms, Code(2, 1), images, method="coin", normalize=True)[0]
    assert not torch.allclose(params_of(normed)["fc.weight"], params_of(plain[0])["fc.weight"])


# ----------------------------------------------------------------------- validation
def test_architecture_mismatch_is_named(images):
    a, b = MLP(36, [8], 5), MLP(36, [9], 5)
    with pytest.raises(
        ModelMismatchError,
        match=r"model 1 parameter 'net.1.weight' has shape \(9, 36\), model 0 has \(8, 36\)",
    ):
        encode([a, b], Code(2, 1), images)


def test_different_layers_are_named(images):
    with pytest.raises(ModelMismatchError, match="model 1 has a different architecture"):
        encode([MLP(36, [8], 5), MLP(36, [8, 8], 5)], Code(2, 1), images)


def test_nan_weights_are_named(cnn_pair, images):
    with torch.no_grad():
        cnn_pair[1].conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelMismatchError, match="model 1 parameter 'conv.weight' has 1 NaN/inf"):
        encode(cnn_pair, Code(2, 1), images)


def test_k_equal_one_is_refused(cnn_pair, images):
    with pytest.raises(ModelMismatchError, match="k >= 2"):
        encode(cnn_pair[:1], Code(1, 1), images)
    with pytest.raises(ModelMismatchError, match="code has k = 3 but 2 models"):
        encode(cnn_pair, Code(3, 1), images)


def test_wrong_calibration_shape_is_named(cnn_pair):
    with pytest.raises(CalibrationError, match=r"per-sample shape \(3, 6, 6\) do not fit model 0"):
        encode(cnn_pair, Code(2, 1), torch.randn(4, 3, 6, 6))
    with pytest.raises(CalibrationError, match=r"expected \(1, 6, 6\)"):
        encode(cnn_pair, Code(2, 1), torch.randn(4, 1, 5, 5), input_shape=(1, 6, 6))
    with pytest.raises(CalibrationError, match="floating point"):
        encode(cnn_pair, Code(2, 1), torch.zeros(4, 1, 6, 6, dtype=torch.long))
    with pytest.raises(CalibrationError, match="needs labelled"):
        encode(cnn_pair, Code(2, 1), torch.randn(4, 1, 6, 6), method="coin", estimator="empirical")


def test_unknown_method_and_options_are_named(cnn_pair, images):
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        encode(cnn_pair, Code(2, 1), images, method="magic")
    with pytest.raises(TypeError, match=r"unknown options \['temperature'\]"):
        encode(cnn_pair, Code(2, 1), images, method="coin", temperature=2)


# ----------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def digits_pair():
    ds = load_digits(seed=0)
    torch.manual_seed(0)
    spec = dict(in_features=64, hidden=[64], num_classes=10)
    base = fit(MLP(**spec), ds.x_train[:400], ds.y_train[:400], epochs=10, lr=3e-3, progress=False)
    rest_x, rest_y = ds.x_train[400:], ds.y_train[400:]
    parts = []
    for classes in class_split(10, 2):
        m = torch.isin(rest_y, torch.tensor(classes))
        parts.append((rest_x[m], rest_y[m]))
    models = finetune_copies(base, parts, epochs=15, lr=3e-3, progress=False)
    return ds, models, spec, rest_x


def test_coded_models_approach_the_target_mixture_on_real_digits(digits_pair):
    ds, models, spec, calib = digits_pair
    code = Code(2, 1)
    x = ds.x_test
    target = code.encode_outputs(torch.stack([predict_probs(m, x) for m in models]))[2]
    torch.manual_seed(123)
    fresh_tv = float(total_variation(predict_probs(MLP(**spec), x), target).mean())
    tvs = {}
    for method in ("coin", "average"):
        coded = encode(models, code, calib, method=method)[0]
        tvs[method] = float(total_variation(predict_probs(coded, x), target).mean())
    print(
        f"\nmean TV to the target mixture: coin {tvs['coin']:.3f}, average {tvs['average']:.3f}, fresh init {fresh_tv:.3f}"
    )
    for method, tv in tvs.items():
        assert tv < 0.6 * fresh_tv, f"{method}: TV {tv:.3f} not well below a fresh model's {fresh_tv:.3f}"


def test_distill_reduces_the_distance_to_the_mixture(digits_pair):
    ds, models, spec, calib = digits_pair
    code = Code(2, 1)
    target = code.encode_outputs(torch.stack([predict_probs(m, ds.x_test) for m in models]))[2]
    start = encode(models, code, calib, method="average")[0]
    trained = encode(models, code, calib, method="distill", init="average", epochs=5, lr=1e-3)
    tv0 = float(total_variation(predict_probs(start, ds.x_test), target).mean())
    tv1 = float(total_variation(predict_probs(trained[0], ds.x_test), target).mean())
    assert tv1 < tv0
    assert trained.info["backward_passes"] == 5 * len(calib)
    # a random init forgets the data models, is seeded, and training moves it toward the mixture
    rand0 = encode(models, code, calib, method="distill", init="random", epochs=0, seed=3)[0]
    rand = encode(models, code, calib, method="distill", init="random", epochs=3, seed=3)[0]
    again = encode(models, code, calib, method="distill", init="random", epochs=3, seed=3)[0]
    w0 = rand0.state_dict()
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in rand.state_dict().items())
    assert not any(torch.equal(t, models[0].state_dict()[n]) for n, t in w0.items())
    tv_rand0 = float(total_variation(predict_probs(rand0, ds.x_test), target).mean())
    tv_rand = float(total_variation(predict_probs(rand, ds.x_test), target).mean())
    assert tv_rand < tv_rand0 - 0.05  # measured: 0.58 -> 0.48


# --------------------------------------------------------------------------- declared option constraints
@pytest.mark.parametrize(
    "method, options, name, expected",
    [
        ("coin", {"estimator": "exat"}, "estimator", "one of ('exact', 'sampled', 'empirical')"),
        ("coin", {"num_samples": 0}, "num_samples", "an integer >= 1 or None"),
        ("coin", {"num_samples": 2.5}, "num_samples", "an integer >= 1 or None"),
        ("coin", {"eps": -1e-3}, "eps", "a finite number >= 0"),
        ("coin", {"eps": float("nan")}, "eps", "a finite number >= 0"),
        ("coin", {"normalize": "yes"}, "normalize", "True or False"),
        ("coin", {"buffers": "recompte"}, "buffers", "one of ('recompute', 'average')"),
        ("coin", {"batch_size": 0}, "batch_size", "an integer >= 1 or None"),
        ("coin", {"backend": "gpu"}, "backend", "one of ('auto', 'layers', 'vmap', 'loop')"),
        ("coin", {"seed": "0"}, "seed", "an integer"),
        ("coin", {"progress": "no"}, "progress", "None, True or False"),
        ("average", {"buffers": "recompte"}, "buffers", "one of ('recompute', 'average')"),
        ("distill", {"init": "zeros"}, "init", "an nn.Module or one of ('random', 'average', 'coin')"),
        ("distill", {"epochs": -1}, "epochs", "an integer >= 0"),
        ("distill", {"epochs": 1.5}, "epochs", "an integer >= 0"),
        ("distill", {"lr": 0.0}, "lr", "a finite number > 0"),
        ("distill", {"lr": float("inf")}, "lr", "a finite number > 0"),
        ("distill", {"weight_decay": -0.1}, "weight_decay", "a finite number >= 0"),
        ("distill", {"batch_size": 0}, "batch_size", "an integer >= 1"),
        ("distill", {"train_inputs": torch.zeros(0, 1, 6, 6)}, "train_inputs", "non-empty floating"),
        (
            "distill",
            {"train_inputs": torch.zeros(4, 1, 6, 6, dtype=torch.long)},
            "train_inputs",
            "non-empty floating",
        ),
        ("distill", {"coin": {"estimatr": "exact"}}, "coin", "unknown ['estimatr']"),
        (
            "distill",
            {"init": "coin", "coin": {"buffers": "recompte"}},
            "buffers",
            "one of ('recompute', 'average')",
        ),
    ],
)
def test_bad_option_values_are_refused_naming_option_value_and_expectation(
    cnn_pair, images, monkeypatch, method, options, name, expected
):
    import coinfer.encoders as enc
    import coinfer.merge as merge

    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(merge, "diagonal_fisher", no_work)
    for fn in ("predict_probs", "check_models", "as_calibration"):
        monkeypatch.setattr(enc, fn, no_work)
    with pytest.raises(OptionError, match=re.escape(expected)) as ei:
        encode(cnn_pair, Code(2, 1), images, method=method, **options)
    msg = str(ei.value)
    assert f"option {name!r}" in msg and method in msg
    value = options.get(name)
    if isinstance(value, str | int | float):
        assert repr(value) in msg


def test_a_misspelt_buffers_option_fails_before_any_fisher_pass(cnn_pair, images, monkeypatch):
    import coinfer.merge as merge

    calls = []
    real = merge.diagonal_fisher
    monkeypatch.setattr(merge, "diagonal_fisher", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(OptionError, match="coin option 'buffers' must be one of .* got 'recompte'"):
        encode(cnn_pair, Code(2, 1), images, method="coin", buffers="recompte")
    assert calls == []
    encode(cnn_pair, Code(2, 1), images, method="coin", buffers="recompute")
    assert len(calls) == 2  # the same call with a good value does run both Fisher passes


def test_distill_batch_size_zero_is_an_option_error_not_a_zero_division(cnn_pair, images):
    with pytest.raises(OptionError, match="distill option 'batch_size' must be an integer >= 1, got 0"):
        encode(cnn_pair, Code(2, 1), images, method="distill", batch_size=0)


def test_every_registered_option_default_is_valid():
    from coinfer.encoders import METHODS

    for spec in METHODS.values():
        opts = spec.options()
        if hasattr(opts, "validate"):
            opts.validate()


def test_models_that_share_no_initialisation_are_warned_about():
    import warnings

    from coinfer import build_model

    spec = {"name": "mlp", "kwargs": {"in_features": 6, "hidden": [16], "num_classes": 3}}
    torch.manual_seed(0)
    a, b = build_model(spec), build_model(spec)
    x = torch.randn(40, 6)
    with pytest.warns(UserWarning, match="do not look fine-tuned from one initialisation"):
        encode([a, b], Code(2, 1), x, method="average")
    c = copy.deepcopy(a)
    with torch.no_grad():
        for p in c.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode([a, c], Code(2, 1), x, method="average")
