"""The demo's training/encoding/evaluation job on the bundled digits."""

import pytest

from coinfer import Bundle
from coinfer.experiments.demo import run_demo

# Figures of seed 0 (torch 2.x on CPU); the tolerance allows a few flipped
# argmaxes from a different thread count or BLAS, not a broken encoder or decoder.
TOL = 0.03


def test_demo_trains_encodes_and_measures_every_erasure(tmp_path):
    res = run_demo(tmp_path / "demo", seed=0, progress=False)
    assert [m["classes"] for m in res["models"]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for m in res["models"]:
        assert m["task_acc"] == pytest.approx(0.965, abs=TOL)  # each model learned its own half
        assert m["test_acc"] < 0.5  # ... and only that half
    rows = {name: {r["erased"]: r for r in res["methods"][name]["rows"]} for name in res["methods"]}
    assert all(sorted(r) == [0, 1] for r in rows.values())
    coin, base = rows["coin"], rows["base (control)"]
    # decoding the erased model from the survivor and the COIN parity recovers its own task
    assert [coin[j]["reconstruction_acc_task"] for j in (0, 1)] == pytest.approx([0.974, 0.974], abs=TOL)
    assert [coin[j]["decoded_task_acc"] for j in (0, 1)] == pytest.approx([0.952, 0.937], abs=TOL)
    assert [coin[j]["reconstruction_acc"] for j in (0, 1)] == pytest.approx([0.607, 0.649], abs=TOL)
    assert [rows["average"][j]["reconstruction_acc_task"] for j in (0, 1)] == pytest.approx(
        [0.978, 0.952], abs=TOL
    )
    # the parities are closer to the target mixture than the common initialisation is,
    # and the zero-cost control decodes model 1's task far worse than COIN does
    assert res["methods"]["coin"]["coded_tv"][0] == pytest.approx(0.314, abs=TOL)
    assert res["methods"]["coin"]["coded_tv"][0] < res["methods"]["base (control)"]["coded_tv"][0] - 0.05
    assert coin[1]["reconstruction_acc_task"] > base[1]["reconstruction_acc_task"] + 0.1
    # the heads parity (merged trunk + each model's refit last layer) reconstructs the erased
    # model's own answer almost always, where every weight-space parity manages about 0.6
    heads = rows["heads"]
    assert [heads[j]["reconstruction_acc"] for j in (0, 1)] == pytest.approx([0.991, 0.996], abs=TOL)
    assert (
        min(heads[j]["reconstruction_acc"] for j in (0, 1))
        > max(coin[j]["reconstruction_acc"] for j in (0, 1)) + 0.25
    )
    assert res["methods"]["heads"]["coded_tv"][0] < 0.05
    assert res["methods"]["heads"]["parity_cost"] == pytest.approx(1280 / 9472 + 1)  # the 64 -> 10 head
    b = Bundle.load(res["bundle"])
    assert b.encoder["method"] == "heads" and (b.code.k, b.code.r) == (2, 1)
    assert b.manifest["parities"][0]["split"] == "net.3"
