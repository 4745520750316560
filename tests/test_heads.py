"""The heads parity: fx splitting, FLOP counting, the closed-form refit, the
encoder's options, bundles, and what it buys on class-split specialists."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from coinfer import Bundle, Code, build_model, encode
from coinfer.errors import BundleError, SplitError
from coinfer.heads import HeadsParity
from coinfer.refit import (
    HeadRefit,
    as_graph,
    check_refittable,
    layer_stats,
    node_values,
    plan_refit,
    refit_layer,
)
from coinfer.split import count_flops, split_candidates, split_model

from .conftest import SmallBN

LENET = {"name": "lenet5", "kwargs": {}}
MLP = {"name": "mlp", "kwargs": {"in_features": 10, "hidden": [20], "num_classes": 5}}


def _refit_stats(name, head, h_merged, h_own):
    """Ridge statistics of one head layer: its input on the merged features,
    its output on the model's own features."""
    layer = dict(head.named_modules())[name]
    check_refittable(name, layer)
    a_merged, _ = _layer_io(name, head, h_merged)
    _, t_own = _layer_io(name, head, h_own)
    return layer_stats(layer, a_merged, t_own)


def _layer_io(name, head, h):
    """The input and output of head layer ``name`` when the head runs on ``h``."""
    (p,) = [p for p in plan_refit(head) if p.name == name]
    v = node_values(as_graph(head), h, [p.input, p.output])
    return v[p.input], v[p.output]


def _models(spec, k, seed=0):
    torch.manual_seed(seed)
    return [build_model(spec).eval() for _ in range(k)]


def _mixture(models, row, x):
    with torch.no_grad():
        return sum(w * torch.softmax(m(x), -1) for w, m in zip(row, models, strict=True))


# --------------------------------------------------------------------------- splitting
@pytest.mark.parametrize(
    "spec,shape,split",
    [
        (LENET, (3, 1, 28, 28), "fc1"),
        (LENET, (3, 1, 28, 28), "conv2"),
        ({"name": "resnet20", "kwargs": {}}, (3, 3, 32, 32), "layers.6"),
        ({"name": "resnet20", "kwargs": {}}, (3, 3, 32, 32), "fc"),
        ({"name": "tests.conftest:small_cnn", "kwargs": {"num_classes": 5}}, (3, 1, 6, 6), "fc"),
    ],
)
def test_split_head_of_trunk_is_the_model(spec, shape, split):
    model = build_model(spec).eval()
    x = torch.randn(*shape)
    trunk, head = split_model(model, split)
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(trunk.eval()(x)), model(x))
    # the head owns the split module's weights under their own names, the trunk does not
    assert f"{split}.weight" in head.state_dict() or any(k.startswith(split + ".") for k in head.state_dict())
    assert not any(k == split or k.startswith(split + ".") for k in trunk.state_dict())


def test_split_of_a_plain_sequential_needs_no_tracing():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    trunk, head = split_model(model, "2")
    assert isinstance(trunk, nn.Sequential) and isinstance(head, nn.Sequential)
    x = torch.randn(5, 4)
    torch.testing.assert_close(head(trunk(x)), model(x))
    assert split_candidates(model) == ["input", "2"]


def test_split_candidates_of_lenet_and_resnet_are_single_value_cuts():
    assert split_candidates(build_model(LENET)) == ["input", "conv2", "fc1", "fc2", "fc3"]
    cands = split_candidates(build_model("resnet20"))
    assert cands[0] == "input" and cands[-1] == "fc"
    assert {"layers.3", "layers.6"} <= set(cands)
    # a cut inside a residual block is never offered
    assert not any(c.endswith(("conv2", "bn2", "bn1")) and c.startswith("layers.") for c in cands)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x)
        return -self.fc(x)


def test_an_untraceable_model_gives_a_named_error():
    with pytest.raises(SplitError, match="torch.fx could not trace"):
        split_model(_Branchy(), "fc")


def test_a_cut_inside_a_residual_block_is_refused_naming_the_crossing_values():
    with pytest.raises(SplitError, match="2 values cross the cut"):
        split_model(build_model("resnet20"), "layers.1.conv2")


def test_unknown_split_name_lists_the_modules():
    with pytest.raises(SplitError, match="'fc9' is not a module of LeNet5.*'fc1'"):
        split_model(build_model(LENET), "fc9")


def test_parity_cost_matches_a_hand_count():
    # MLP 10 -> 20 -> 5: 2*(10*20) + 2*(20*5) = 600 FLOPs; heads from net.3 (the 20 -> 5 layer), k = 2:
    # trunk 400 + 2 heads * 200 = 800 -> parity_cost 800 / 600
    models = _models(MLP, 2)
    assert count_flops(models[0], torch.randn(1, 10)) == 600
    coded = encode(models, Code(2, 1), torch.randn(40, 10), method="heads", split="net.3", refit=False)
    assert coded.info["parity_cost"] == pytest.approx(800 / 600)
    assert coded.info["split"] == ["net.3"]


# --------------------------------------------------------------------------- what the parity is
def test_split_at_the_input_is_the_exact_mixture_and_decodes_exactly():
    models = _models(LENET, 2)
    code = Code(2, 1)
    x = torch.randn(30, 1, 28, 28)
    coded = encode(models, code, x, method="heads", split="input", trunk="average")
    assert coded.info["parity_cost"] == pytest.approx(2.0)
    xt = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        pc = torch.softmax(coded[0](xt), -1)
        torch.testing.assert_close(pc, _mixture(models, code.weights[0], xt), atol=1e-6, rtol=0)
        p = {0: torch.softmax(models[0](xt), -1), 2: pc}
        dec = code.decode(p, project=False)
        torch.testing.assert_close(dec[1], torch.softmax(models[1](xt), -1), atol=1e-5, rtol=0)


def test_split_at_the_input_is_exact_for_every_parity_row_of_r2():
    models = _models(MLP, 3)
    code = Code(3, 2)
    x = torch.randn(40, 10)
    coded = encode(models, code, x, method="heads", split="input", trunk="average")
    xt = torch.randn(6, 10)
    outs = {}
    with torch.no_grad():
        for j, row in enumerate(code.weights):
            pc = torch.softmax(coded[j](xt), -1)
            torch.testing.assert_close(pc, _mixture(models, row, xt), atol=1e-6, rtol=0)
            outs[3 + j] = pc
        outs[2] = torch.softmax(models[2](xt), -1)
    dec = code.decode(outs, project=False)  # models 0 and 1 both erased
    for j in (0, 1):
        with torch.no_grad():
            torch.testing.assert_close(dec[j], torch.softmax(models[j](xt), -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("trunk", ["coin", "average"])
def test_identical_models_give_the_model_itself(trunk):
    torch.manual_seed(3)
    m = build_model(LENET).eval()
    models = [m, build_model(LENET)]
    models[1].load_state_dict(m.state_dict())
    models[1].eval()
    x = torch.randn(40, 1, 28, 28)
    coded = encode(models, Code(2, 1), x, method="heads", split="fc1", trunk=trunk, refit=True)
    xt = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.softmax(coded[0](xt), -1), torch.softmax(m(xt), -1), atol=1e-5, rtol=0
        )


def test_parity_is_a_plain_classifier_returning_log_mixture_logits():
    models = _models(LENET, 2, seed=1)
    x = torch.randn(30, 1, 28, 28)
    coded = encode(models, Code(2, 1), x, method="heads", split="fc2", trunk="average", refit=False)
    par = coded[0]
    assert isinstance(par, HeadsParity) and len(par.heads) == 2
    with torch.no_grad():
        out = par(x[:4])
        trunk_h = par.trunk(x[:4])
        want = torch.log(sum(0.5 * torch.softmax(h(trunk_h), -1) for h in par.heads))
    assert out.shape == (4, 10)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def _shift_models(seed=0):
    """Two LeNets that disagree in their first FC layer, so merged features differ from each model's."""
    models = _models(LENET, 2, seed)
    with torch.no_grad():
        for i, m in enumerate(models):
            m.conv2.weight.mul_(1.0 + 0.8 * i)
            m.conv1.weight.add_(0.2 * torch.randn_like(m.conv1.weight))
    return models


def test_refit_reduces_heldout_preactivation_error_versus_copy():
    models = _shift_models()
    code = Code(2, 1)
    x = torch.randn(1400, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x_fit, x_val = x[:1200], x[1200:]
    merged = encode(models, code, x_fit, method="average", buffers="recompute")[0]
    trunk_m, _ = split_model(merged, "fc1")
    errs = {}
    for refit in (False, True):
        err = 0.0
        for i, m in enumerate(models):
            t_i, h_i = split_model(m, "fc1")
            t_i.eval(), h_i.eval()
            if refit:
                with torch.no_grad():
                    st = _refit_stats("fc1", h_i, trunk_m(x_fit), t_i(x_fit))
                refit_layer(h_i.fc1, st, alpha=1e-3)
            with torch.no_grad():
                _, got = _layer_io("fc1", h_i, trunk_m(x_val))
                own_t, own_h = split_model(models[i], "fc1")
                _, want = _layer_io("fc1", own_h.eval(), own_t.eval()(x_val))
            err += float(((got - want) ** 2).mean())
        errs[refit] = err
    assert errs[True] < 0.5 * errs[False], errs


def test_conv_head_refit_runs_on_unfolded_patches():
    models = _shift_models(seed=2)
    x = torch.randn(80, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    coded = encode(
        models, Code(2, 1), x, method="heads", split="conv2", trunk="average", alphas=[1e-2], refit_depth=1
    )
    assert coded.info["refit_layers"] == [["conv2"]] and coded.info["alpha"] == [1e-2]
    assert coded.info["parity_cost"] == pytest.approx(1 + 597840 / 833040, rel=1e-6)


def test_auto_split_respects_max_parity_cost_and_reports_the_candidates():
    models = _models(LENET, 4)
    x = torch.randn(60, 1, 28, 28)
    coded = encode(models, Code(4, 1), x, method="heads", trunk="average", max_parity_cost=1.25, rank=None)
    # LeNet-5, k = 4: whole heads from fc1 cost 1.42, from fc2 1.08, from fc3 1.006
    assert set(coded.info["split_candidates"]) == {"fc2", "fc3"}
    assert coded.info["split"][0] in ("fc2", "fc3")
    assert coded.info["parity_cost"] <= 1.25
    tried = {(t["split"], t["alpha"]) for t in coded.info["tried"]}
    assert ("fc2", None) in tried and ("fc3", 1e-4) in tried


def test_a_head_starting_with_batchnorm_refits_the_layer_after_it():
    models = [SmallBN().eval(), SmallBN().eval()]
    x = torch.randn(20, 1, 6, 6)
    coded = encode(models, Code(2, 1), x, method="heads", split="bn", trunk="average", alphas=[1e-3])
    assert coded.info["split"] == ["bn"] and coded.info["refit_layers"] == [["fc"]]


def test_a_head_starting_with_a_grouped_convolution_cannot_be_refit_and_says_so():
    head = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(SplitError, match="grouped convolution"):
        plan_refit(head)


class _Residual(nn.Module):
    """``x + fc(x)``, then a classifier: the layer writes into a residual stream."""

    def __init__(self, d=6, c=3):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, c)

    def forward(self, x):
        return self.out(x + self.fc(self.norm(x)))


def test_the_plan_reads_norms_and_the_residual_a_layer_writes_into():
    vit = build_model({"name": "vit", "kwargs": {"depth": 2}}).eval()
    _, head = split_model(vit, "blocks.1")
    plan = plan_refit(head)
    names = [p.name for p in plan]
    assert names == ["blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.0", "blocks.1.mlp.2", "head"]
    writes = {p.name: p.add is not None for p in plan}
    assert writes == {n: n.endswith(("proj", "mlp.2")) for n in names}


def test_a_residual_layer_is_refit_so_the_sum_matches_the_models_own():
    """Merged features = own + a constant shift: refitting ``fc`` against the
    residual (own sum minus the running stream) cancels the shift exactly,
    which a target of fc's own output could not."""
    torch.manual_seed(0)
    model = _Residual().eval()
    model.norm = nn.Identity()  # keep the map linear so the compensation is exact
    _, head = split_model(model, "norm")
    own = torch.randn(500, 6)
    shift = torch.randn(1, 6)
    (p,) = [p for p in plan_refit(head) if p.name == "fc"]
    assert p.add is not None
    refit = HeadRefit(head, own, own + shift, plan_refit(head)).fit(1e-9, [1])[1]
    with torch.no_grad():
        got = node_values(as_graph(refit), own + shift, [p.add])[p.add]
        want = node_values(as_graph(head), own, [p.add])[p.add]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_residual_through_batchnorm_is_inverted_on_the_target():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x)) + x).mean(dim=(2, 3)))

    torch.manual_seed(1)
    model = Block().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)
    _, head = split_model(model, "conv")
    own = torch.randn(200, 3, 4, 4)
    shift = torch.randn(1, 3, 1, 1)
    plan = plan_refit(head)
    assert plan[0].name == "conv" and plan[0].bns == ["bn"]
    refit = HeadRefit(head, own, own + shift, plan).fit(1e-9, [1])[1]
    with torch.no_grad():
        got = node_values(as_graph(refit), own + shift, [plan[0].add])[plan[0].add]
        want = node_values(as_graph(head), own, [plan[0].add])[plan[0].add]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "opts,words",
    [
        ({"split": "fc9"}, "not a module of LeNet5"),
        ({"alphas": [-1.0]}, "non-negative ridge strengths"),
        ({"max_parity_cost": 0.5}, "max_parity_cost. must be a number >= 1"),
        ({"trunk": "mean"}, "trunk. must be one of"),
        ({"holdout": 1.5}, "holdout. must be a fraction"),
        ({"estimator": "exakt"}, "estimator. must be one of"),
        ({"split": "conv1", "max_parity_cost": 3, "num_samples": 0}, "num_samples. must be an integer >= 1"),
    ],
)
def test_bad_options_are_refused_before_any_work(monkeypatch, opts, words):
    import coinfer.merge as merge

    def no_work(*a, **kw):
        raise AssertionError("Fisher was computed before the options were checked")

    monkeypatch.setattr(merge, "diagonal_fisher", no_work)
    models = _models(LENET, 2)
    with pytest.raises((ValueError, SplitError), match=words):
        encode(
            models,
            Code(2, 1),
            torch.randn(20, 1, 28, 28),
            method="heads",
            trunk=opts.pop("trunk", "coin"),
            **opts,
        )


def test_untraceable_model_is_refused_before_the_fisher(monkeypatch):
    import coinfer.merge as merge

    monkeypatch.setattr(
        merge, "diagonal_fisher", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work"))
    )
    with pytest.raises(SplitError, match="could not trace"):
        encode([_Branchy(), _Branchy()], Code(2, 1), torch.randn(10, 4), method="heads", split="fc")


# --------------------------------------------------------------------------- bundles
def test_bundle_round_trip_of_a_heads_parity(tmp_path):
    models = _shift_models(seed=4)
    code = Code(2, 1)
    x = torch.randn(60, 1, 28, 28)
    coded = encode(models, code, x, method="heads", split="fc2", trunk="coin")
    path = Bundle(LENET, code, models, list(coded), (1, 28, 28), None, coded.info).save(tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    st = manifest["parities"][0]
    assert st["kind"] == "heads" and st["split"] == "fc2" and st["members"] == [0, 1]
    assert st["trunk"] == "coin" and st["parity_cost"] == pytest.approx(coded.info["parity_cost"])
    b = Bundle.load(path)
    xt = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(b.coded_models[0](xt), coded[0](xt))
    assert manifest["parities"] == [st] and Bundle.parity_structure(manifest, 0) is None


def test_a_manifest_whose_parity_disagrees_with_the_code_is_refused(tmp_path):
    models = _models(MLP, 2)
    code = Code(2, 1)
    coded = encode(models, code, torch.randn(30, 10), method="heads", split="net.3", trunk="average")
    path = Bundle(MLP, code, models, list(coded), (10,)).save(tmp_path / "b")
    mf = path / "manifest.json"
    good = json.loads(mf.read_text())
    bad = json.loads(json.dumps(good))
    bad["parities"][0]["weights"] = [0.9, 0.1]
    mf.write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="mixture weights"):
        Bundle.load(path)
    bad = json.loads(json.dumps(good))
    bad["parities"][0]["split"] = "net.9"
    mf.write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="cannot rebuild the parity"):
        Bundle.load(path)


# --------------------------------------------------------------------------- review findings
def test_refit_of_a_layer_without_bias_fits_no_intercept():
    torch.manual_seed(0)
    layer_head = nn.Sequential(nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))
    own = torch.randn(2000, 8)
    merged = own + 2.0  # the merged trunk's features are shifted
    st = _refit_stats("0", layer_head, merged, own)
    refit = __import__("copy").deepcopy(layer_head)
    refit_layer(refit[0], st, alpha=1e-6)
    with torch.no_grad():
        want = layer_head[0](own)
        err_refit = float(((refit[0](merged) - want) ** 2).mean())
        err_copy = float(((layer_head[0](merged) - want) ** 2).mean())
        # the best bias-free least-squares fit, solved directly
        sol = torch.linalg.lstsq(merged.double(), want.double()).solution
        err_best = float(((merged.double() @ sol - want.double()) ** 2).mean())
    assert err_refit == pytest.approx(err_best, rel=1e-3)
    assert err_refit < 0.2 * err_copy


class _DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.nn.functional.dropout(torch.relu(self.fc1(x)), 0.5, training=self.training))


def test_a_model_in_train_mode_is_split_in_eval_mode_and_rebuilds_identically(tmp_path, monkeypatch):
    import coinfer.architectures as archs

    monkeypatch.setitem(archs.ARCHITECTURES, "dropnet", _DropNet)
    models = [_DropNet().train(), _DropNet().train()]
    x = torch.randn(5, 6)
    trunk, head = split_model(models[0], "fc2")
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(x)), models[0].eval()(x))
    models[0].train()
    coded = encode(models, Code(2, 1), torch.randn(40, 6), method="heads", split="fc2")
    path = Bundle("dropnet", Code(2, 1), models, list(coded), (6,)).save(tmp_path / "b")
    loaded = Bundle.load(path).coded_models[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), coded[0](x))
        torch.testing.assert_close(loaded(x), loaded(x))


def test_encoding_leaves_the_callers_models_untouched():
    class BNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.bn(self.fc1(x))))

    models = [BNNet().train(), BNNet().train()]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    encode(models, Code(2, 1), torch.randn(50, 6), method="heads", split="fc2")
    for m, sd in zip(models, before, strict=True):
        assert m.training
        for key, v in m.state_dict().items():
            torch.testing.assert_close(v, sd[key])


def test_refit_targets_are_pre_activations_even_with_an_inplace_relu():
    head = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    own = torch.randn(300, 5)
    st = _refit_stats("0", head, own, own)
    with torch.no_grad():
        pre = head[0](own).double()
        x = torch.cat([own.double(), torch.ones(300, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(st.cross, x.T @ pre)


def test_a_sequential_subclass_with_its_own_forward_is_traced_not_sliced():
    class Scaled(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    model = Scaled(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    trunk, head = split_model(model, "2")
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(x)), model(x))


def test_a_holdout_that_leaves_nothing_to_fit_is_a_named_error():
    from coinfer.errors import CalibrationError

    models = _models(MLP, 2)
    with pytest.raises(CalibrationError, match="holdout=0.8 of 2 calibration inputs"):
        encode(models, Code(2, 1), torch.randn(2, 10), method="heads", split="net.3", holdout=0.8)


def test_a_nan_mixture_weight_in_a_manifest_is_a_bundle_error(tmp_path):
    models = _models(MLP, 2)
    coded = encode(models, Code(2, 1), torch.randn(30, 10), method="heads", split="net.3")
    path = Bundle(MLP, Code(2, 1), models, list(coded), (10,)).save(tmp_path / "b")
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    m["parities"][0]["weights"] = [float("nan"), 0.5]
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="mixture weights"):
        Bundle.load(path)


# --------------------------------------------------------------------------- the low-rank form
def test_split_after_a_layer_ends_the_trunk_with_its_output():
    model = build_model(LENET).eval()
    x = torch.randn(3, 1, 28, 28)
    trunk, rest = split_model(model, "fc1", after=True)
    with torch.no_grad():
        assert trunk(x).shape == (3, 120)
        torch.testing.assert_close(rest(trunk(x)), model(x))
    assert "fc1.weight" in trunk.state_dict() and "fc1.weight" not in rest.state_dict()


def test_lowrank_needs_a_linear_that_alone_reads_the_features():
    from coinfer.heads import lowrank_layer

    lenet = build_model(LENET)
    assert isinstance(lowrank_layer(lenet, "fc1"), nn.Linear)
    assert lowrank_layer(lenet, "conv2") is None and lowrank_layer(lenet, "input") is None

    class Skip(nn.Module):  # fc1's input is also added to the output: not rest(fc1(h))
        def __init__(self):
            super().__init__()
            self.fc0, self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.fc0(x)
            return self.fc2(self.fc1(h) + h)

    assert lowrank_layer(Skip(), "fc1") is None


def test_lowrank_parity_of_identical_models_is_the_model():
    torch.manual_seed(5)
    m = build_model(LENET).eval()
    twin = build_model(LENET)
    twin.load_state_dict(m.state_dict())
    x = torch.randn(60, 1, 28, 28)
    coded = encode([m, twin.eval()], Code(2, 1), x, method="heads", split="fc1", rank=8)
    assert coded.info["rank"] == [8] and coded[0].adapters is not None
    xt = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.softmax(coded[0](xt), -1), torch.softmax(m(xt), -1), atol=1e-5, rtol=0
        )


def test_lowrank_correction_error_falls_with_the_rank():
    models = _shift_models(seed=6)
    x = torch.randn(400, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    merged = encode(models, Code(2, 1), x, method="average")[0]
    from coinfer.heads import _LowRankFitted

    fitted = _LowRankFitted(models, [0, 1], merged, "fc1", x)
    errs = []
    for rank in (2, 8, 32):
        par = fitted.parity(1e-3, rank, [0.5, 0.5], [0, 1], "fc1")
        with torch.no_grad():
            h = par.trunk(x)
            got = par.shared(h) + par.adapters[1](h)
            want = models[1].fc1(split_model(models[1], "fc1")[0](x))
        errs.append(float(((got - want) ** 2).mean()))
    assert errs[0] > errs[1] > errs[2], errs


def test_auto_on_lenet_k4_tries_lowrank_forms_within_the_cost(tmp_path):
    models = _shift_models(seed=7) + _shift_models(seed=8)
    x = torch.randn(80, 1, 28, 28)
    coded = encode(models, Code(4, 1), x, method="heads", max_parity_cost=1.25)
    shapes = {(s["split"], s["rank"]) for s in coded.info["shapes_tried"]}
    # fc1 whole per model costs 1.42; its rank-32 correction fits, rank 64 does not
    assert ("fc1", 32) in shapes and ("fc1", 64) not in shapes and ("fc1", None) not in shapes
    assert all(s["parity_cost"] <= 1.25 for s in coded.info["shapes_tried"])
    assert coded.info["parity_cost"] <= 1.25
    # whichever form won, it survives a bundle round trip
    path = Bundle(LENET, Code(4, 1), models, list(coded), (1, 28, 28)).save(tmp_path / "b")
    loaded = Bundle.load(path).coded_models[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:6]), coded[0](x[:6]))


def test_lowrank_bundle_round_trip_records_the_rank(tmp_path):
    models = _shift_models(seed=9)
    coded = encode(models, Code(2, 1), torch.randn(50, 1, 28, 28), method="heads", split="fc1", rank=16)
    path = Bundle(LENET, Code(2, 1), models, list(coded), (1, 28, 28)).save(tmp_path / "b")
    st = json.loads((path / "manifest.json").read_text())["parities"][0]
    assert st["rank"] == 16 and st["split"] == "fc1"
    loaded = Bundle.load(path).coded_models[0]
    xt = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xt), coded[0](xt))
    m = json.loads((path / "manifest.json").read_text())
    m["parities"][0]["rank"] = 500
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="rank must be an integer in 1..119"):
        Bundle.load(path)


def test_a_bad_rank_is_refused():
    models = _models(LENET, 2)
    with pytest.raises(ValueError, match="rank"):
        encode(models, Code(2, 1), torch.randn(20, 1, 28, 28), method="heads", rank=0)
    with pytest.raises(SplitError, match="rank=4 needs 'conv2'"):
        encode(models, Code(2, 1), torch.randn(20, 1, 28, 28), method="heads", split="conv2", rank=4)


class _PerToken(nn.Module):
    """A Linear applied per token to (N, L, D) features, then averaged: not the 2-D form."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.emb(x))).mean(-2))


def test_a_linear_on_per_token_features_gets_whole_heads_not_the_lowrank_form():
    from coinfer.heads import lowrank_layer

    torch.manual_seed(0)
    models = [_PerToken().eval(), _PerToken().eval()]
    x = torch.randn(40, 5, 3)
    trunk, _ = split_model(models[0], "fc1")
    assert lowrank_layer(models[0], "fc1", trunk(x[:2])) is None
    coded = encode(models, Code(2, 1), x, method="heads", max_parity_cost=3)
    assert None in coded.info["rank"] or coded.info["split"] != ["fc1"]
    assert coded[0](x[:3]).shape == (3, 4)


def test_encoding_does_not_advance_the_callers_rng():
    models = _shift_models(seed=10)
    x = torch.randn(40, 1, 28, 28)
    torch.manual_seed(123)
    want = torch.rand(1)
    torch.manual_seed(123)
    encode(models, Code(2, 1), x, method="heads", split="fc1", rank=4)
    assert torch.equal(torch.rand(1), want)


# --------------------------------------------------------------------------- RegMean, ViT
def test_regmean_solves_the_stacked_regression_of_each_models_own_layer_inputs():
    from coinfer.merge import regmean_merge

    torch.manual_seed(3)
    models = [build_model(MLP).eval() for _ in range(2)]
    x = torch.randn(300, 10)
    (merged,) = regmean_merge(models, [[0.25, 0.75]], x, alpha=1.0)
    # the first layer sees the same inputs in both models: the weighted average
    want0 = 0.25 * models[0].net[1].weight + 0.75 * models[1].net[1].weight
    torch.testing.assert_close(merged.net[1].weight, want0, atol=1e-5, rtol=0)
    # the last layer: least squares over both models' own hidden features, weighted by w
    rows, tgts = [], []
    for w, m in zip([0.25, 0.75], models, strict=True):
        with torch.no_grad():
            h = torch.relu(m.net[1](x)).double()
            h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
            rows.append(w**0.5 * h1)
            tgts.append(w**0.5 * m.net[3](h.float()).double())
    sol = torch.linalg.lstsq(torch.cat(rows), torch.cat(tgts)).solution.T
    torch.testing.assert_close(merged.net[3].weight.double(), sol[:, :-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(merged.net[3].bias.double(), sol[:, -1], atol=1e-4, rtol=0)


def test_regmean_of_identical_models_is_the_model():
    from coinfer.merge import regmean_merge

    m = build_model({"name": "vit", "kwargs": {"depth": 2}}).eval()
    (merged,) = regmean_merge([m, __import__("copy").deepcopy(m)], [[0.5, 0.5]], torch.randn(40, 1, 28, 28))
    for (key, a), b in zip(m.state_dict().items(), merged.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=key)


def test_vit_splits_before_its_norms_and_a_heads_bundle_round_trips(tmp_path):
    spec = {"name": "vit", "kwargs": {"depth": 2, "dim": 32, "mlp_dim": 64}}
    models = _models(spec, 2)
    assert "blocks.1.norm2" in split_candidates(models[0])
    x = torch.randn(120, 1, 28, 28)
    coded = encode(models, Code(2, 1), x, trunk="auto", max_parity_cost=1.3, alphas=[1e-2, math.inf])
    assert coded.info["method"] == "heads"  # the default
    assert {t["trunk"] for t in coded.info["tried"]} == {"average", "regmean"}
    # the splits before a LayerNorm are tried, not dropped as unrefittable
    assert "blocks.1.norm2" in coded.info["split_candidates"]
    path = Bundle(spec, Code(2, 1), models, list(coded), (1, 28, 28)).save(tmp_path / "vit")
    loaded = Bundle.load(path).coded_models[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:5]), coded[0](x[:5]))


# --------------------------------------------------------------------------- review findings (issue 15)
def test_a_too_wide_later_layer_is_left_as_it_is_and_the_rest_refit():
    head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 9000), nn.ReLU(), nn.Linear(9000, 3))
    assert [p.name for p in plan_refit(head)] == ["0", "2"]  # "4" reads 9001 values per output
    wide_first = nn.Sequential(nn.Linear(9000, 3))
    with pytest.raises(SplitError, match="more than 8192 values"):
        plan_refit(wide_first)


class _PosAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.f0 = nn.Linear(4, 4)
        self.f1 = nn.Linear(4, 4)
        self.pos = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.f1(self.f0(x)) + self.pos))


def test_an_add_of_a_parameter_is_not_a_residual_and_any_calibration_size_works():
    models = [_PosAdd().eval(), _PosAdd().eval()]
    _, head = split_model(models[0], "f1")
    (p,) = [p for p in plan_refit(head) if p.name == "f1"]
    assert p.add is None  # x + pos: pos is the same in the model and its copy
    coded = encode(models, Code(2, 1), torch.randn(1200, 4), split="f1", alphas=[1e-2])
    assert coded.info["refit_layers"][0][0] == "f1"


def test_polish_trains_under_a_callers_no_grad():
    models = _models(MLP, 2)
    with torch.no_grad():
        coded = encode(models, Code(2, 1), torch.randn(100, 10), split="net.3", polish_epochs=1)
    assert coded.info["polish_seconds"] > 0
    assert all(p.grad is None for p in coded[0].parameters())
