"""Heads parities with several trunks: each group of models shares one merged
trunk (fewer models per merge), at one more trunk's compute per group."""

from __future__ import annotations

import json

import pytest
import torch

from coinfer import Bundle, Code, encode
from coinfer.errors import BundleError, OptionError, SplitError
from coinfer.heads import partition
from coinfer.parity import HeadsParity
from coinfer.split import split_model

from .conftest import perturbed_family

MLP = {"name": "mlp", "kwargs": {"in_features": 10, "hidden": [32, 16], "num_classes": 5}}
#: a trunk-heavy MLP: its last layer is a small share of the FLOPs, so one-trunk splits fit 1.25
WIDE = {"name": "mlp", "kwargs": {"in_features": 64, "hidden": [128, 64], "num_classes": 5}}


def _family(k: int, seed: int = 0, spread: float = 0.3, spec=MLP):
    return perturbed_family(spec, k, seed, spread)


def _mixture(models, row, x):
    with torch.no_grad():
        return sum(w * torch.softmax(m(x), -1) for w, m in zip(row, models, strict=True))


def test_partition_splits_positions_in_order_into_balanced_groups():
    assert partition([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert partition([0, 2, 3], 2) == [[0, 1], [2]]
    assert partition([5, 6, 7, 8, 9], 3) == [[0, 1], [2, 3], [4]]
    assert partition([0, 1], 1) == [[0, 1]]
    with pytest.raises(SplitError, match="cannot split 2 heads into 3"):
        partition([0, 1], 3)


def test_a_two_trunk_parity_mixes_each_head_on_its_own_groups_trunk():
    models = _family(4)
    x = torch.randn(9, 10)
    trunks, heads = [], []
    for m in models:
        t, h = split_model(m, "net.2")
        trunks.append(t)
        heads.append(h)
    w = [0.1, 0.2, 0.3, 0.4]
    par = HeadsParity([trunks[0], trunks[3]], heads, w, [0, 1, 2, 3], "net.2", groups=[[0, 1, 2], [3]])
    with torch.no_grad():
        got = torch.softmax(par(x), -1)
        want = sum(
            wi * torch.softmax(h(trunks[0 if i < 3 else 3](x)), -1)
            for i, (wi, h) in enumerate(zip(w, heads, strict=True))
        )
    torch.testing.assert_close(got, want)
    assert par.num_trunks == 2 and par.structure()["groups"] == [[0, 1, 2], [3]]


@pytest.mark.parametrize(
    "groups,words",
    [
        ([[0, 1], [1]], "exactly one"),
        ([[0], []], "exactly one non-empty"),
        ([[0], [1], [2]], "3 groups need"),
    ],
)
def test_bad_groups_are_refused_naming_them(groups, words):
    models = _family(2)
    t, h = split_model(models[0], "net.2")
    trunks = [t, t]
    with pytest.raises(SplitError, match=words):
        HeadsParity(trunks, [h, h], [0.5, 0.5], [0, 1], "net.2", groups=groups)


def test_one_trunk_per_model_at_any_split_is_the_exact_mixture():
    # a "merge" of one model is that model: with k groups the parity is the mixture itself
    models = _family(3, spread=1.0)
    x = torch.randn(200, 10)
    code = Code(3, 1)
    coded = encode(models, code, x, method="heads", split="net.4", trunk_groups=3)
    assert coded.info["trunk_groups"] == [3]
    xt = torch.randn(50, 10)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.softmax(coded[0](xt), -1), _mixture(models, code.weights[0], xt), atol=1e-4, rtol=0
        )
    assert coded.info["heldout_recon"] == 1.0


def test_two_trunks_are_built_saved_and_loaded(tmp_path):
    models = _family(4, spread=0.5)
    x = torch.randn(300, 10)
    code = Code(4, 1)
    coded = encode(models, code, x, method="heads", split="net.2", trunk_groups=2)
    par = coded[0]
    assert isinstance(par, HeadsParity) and par.num_trunks == 2 and coded.info["trunk_groups"] == [2]
    # two trunks of two models each: the cost is one more trunk
    one = encode(models, code, x, method="heads", split="net.2", trunk_groups=1)
    assert coded.info["parity_cost"] > one.info["parity_cost"]
    path = Bundle(MLP, code, models, list(coded), (10,), None, coded.info).save(tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["parities"][0]["groups"] == [[0, 1], [2, 3]]
    b = Bundle.load(path)
    xt = torch.randn(7, 10)
    with torch.no_grad():
        torch.testing.assert_close(b.coded_models[0](xt), par(xt))
    # a tampered groups field is refused by name
    bad = json.loads(json.dumps(manifest))
    bad["parities"][0]["groups"] = [[0, 1, 2, 3, 4]]
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="groups"):
        Bundle.load(path)


def test_auto_trunk_groups_tries_more_trunks_only_within_the_budget():
    models = _family(4, spread=0.5, spec=WIDE)
    x = torch.randn(200, 64)
    cheap = encode(models, Code(4, 1), x, method="heads", split="auto", max_parity_cost=1.25)
    assert all(t["parity_cost"] <= 1.25 + 1e-9 for t in cheap.info["tried"])
    wide = encode(models, Code(4, 1), x, method="heads", split="auto", max_parity_cost=3.5)
    assert {t["trunk_groups"] for t in wide.info["tried"]} >= {1, 2, 3}
    assert all(t["parity_cost"] <= 3.5 + 1e-9 for t in wide.info["tried"])
    assert wide.info["heldout_recon"] >= cheap.info["heldout_recon"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_a_bad_trunk_groups_is_an_option_error(bad):
    models = _family(2)
    with pytest.raises(OptionError, match="heads option 'trunk_groups' must be an integer >= 1 or 'auto'"):
        encode(models, Code(2, 1), torch.randn(20, 10), method="heads", trunk_groups=bad)
