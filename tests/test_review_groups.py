"""Regressions found reviewing ddf5441 (trunk groups, options/merge/parity restructure).

Each test pins one bug the review found, fixed in the same change."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import coinfer.merge as merge
from coinfer import Bundle, Code, encode
from coinfer.encoders import METHODS, Method, build_coin
from coinfer.errors import BundleError
from coinfer.options import CoinOptions

from .conftest import perturbed_family

MLP = {"name": "mlp", "kwargs": {"in_features": 10, "hidden": [32, 16], "num_classes": 5}}


def _family(k: int, seed: int = 0, spread: float = 0.5):
    return perturbed_family(MLP, k, seed, spread)


def _bn_family(k: int, seed: int = 0):
    """k BatchNorm MLPs whose running statistics are not the calibration inputs'."""
    torch.manual_seed(seed)

    def make():
        return nn.Sequential(
            nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5)
        )

    base, models = make(), []
    for _ in range(k):
        m = make()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5 * torch.randn_like(p) * p.abs().mean())
            m[1].running_mean.copy_(torch.randn(32))
            m[1].running_var.copy_(torch.rand(32) + 0.5)
        models.append(m.eval())
    return models


@pytest.mark.parametrize("groups", [[[0, 2], [1, 3]], [[2, 3], [0, 1]], [[0], [1, 2, 3]]])
def test_a_regrouped_manifest_is_refused_not_loaded_under_the_wrong_trunks(tmp_path, groups):
    models = _family(4)
    code = Code(4, 1)
    coded = encode(models, code, torch.randn(200, 10), method="heads", split="net.2", trunk_groups=2)
    path = Bundle(MLP, code, models, list(coded), (10,), None, coded.info).save(tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["parities"][0]["groups"] == [[0, 1], [2, 3]]
    manifest["parities"][0]["groups"] = groups  # same trunk count: the tensors still fit
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="groups"):
        Bundle.load(path)


def _user_method(monkeypatch, options):
    def fn(models, code, x, y, opts):
        return build_coin(models, code, x, y, CoinOptions())

    monkeypatch.setitem(METHODS, "mine", Method("mine", options, fn, "user method"))


def test_a_user_options_subclass_whose_validate_takes_no_argument_still_works(monkeypatch):
    @dataclass
    class Mine(CoinOptions):
        def validate(self):  # the signature HEAD~1's encode() called
            super().validate()

    _user_method(monkeypatch, Mine)
    encode(_family(2), Code(2, 1), torch.randn(20, 10), method="mine")


def test_a_user_options_subclass_with_an_undeclared_field_is_not_a_bare_keyerror(monkeypatch):
    @dataclass
    class Mine(CoinOptions):
        extra: int = 3

    _user_method(monkeypatch, Mine)
    try:
        encode(_family(2), Code(2, 1), torch.randn(20, 10), method="mine")
    except KeyError as exc:  # pragma: no cover - the bug
        pytest.fail(f"bare KeyError {exc!r} from Options.validate")
    except TypeError as exc:
        assert "extra" in str(exc)


def test_regmean_grams_are_computed_once_per_model_for_every_row_and_group(monkeypatch):
    calls = []
    real = merge._grams
    monkeypatch.setattr(merge, "_grams", lambda *a, **k: calls.append(1) or real(*a, **k))
    encode(
        _family(3),
        Code(3, 2),
        torch.randn(100, 10),
        method="heads",
        trunk="regmean",
        split="net.2",
        trunk_groups=1,
    )
    assert len(calls) == 3


def test_coin_fallback_entries_are_one_per_parity_row():
    res = encode(
        _family(4),
        Code(4, 2),
        torch.randn(200, 10),
        method="heads",
        trunk="coin",
        split="net.2",
        max_parity_cost=3.5,
    )
    assert len(res.info["fallback_entries"]) == 2


def test_one_trunk_per_model_keeps_each_models_batchnorm_statistics():
    models = _bn_family(2)
    code = Code(2, 1)
    res = encode(models, code, torch.randn(200, 10), method="heads", split="5", trunk_groups=2, refit=False)
    assert res.info["trunk_groups"] == [2]
    xt = torch.randn(50, 10)
    with torch.no_grad():
        mix = sum(w * torch.softmax(m(xt), -1) for w, m in zip(code.weights[0], models, strict=True))
        torch.testing.assert_close(torch.softmax(res[0](xt), -1), mix, atol=1e-4, rtol=0)


def test_distill_coin_init_counts_every_rows_fisher_passes():
    models, x = _family(3), torch.randn(60, 10)
    one = encode(models, Code(3, 1), x, method="distill", init="coin", epochs=1)
    two = encode(models, Code(3, 2), x, method="distill", init="coin", epochs=1)
    # COIN's passes (Fisher + BatchNorm recompute) are per row at most; here they were dropped for row 0
    fisher_fwd = 3 * 60 + 60
    assert two.info["forward_passes"] - one.info["forward_passes"] >= 60  # one more distill epoch
    assert two.info["forward_passes"] in (
        one.info["forward_passes"] + 60 + 60,  # Fisher shared across rows, BN per row
        one.info["forward_passes"] + 60 + fisher_fwd,  # Fisher per row
    )
