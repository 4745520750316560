"""Metrics on hand-made outputs where the answer is known."""

from __future__ import annotations

import pytest
import torch

from coinfer import Code
from coinfer.experiments.evaluate import (
    default_estimates,
    evaluate_estimates,
    evaluate_patterns,
    negative_mass,
    substitute_estimates,
    summarize,
    target_mixture_tv,
    total_variation,
)


def _onehot(idx, c=4):
    return torch.nn.functional.one_hot(torch.tensor(idx), c).float()


def test_total_variation_and_negative_mass_known_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    assert total_variation(p, q).tolist() == [1.0, 0.0]
    assert negative_mass(torch.tensor([[1.2, -0.2, 0.0], [0.5, 0.5, 0.0]])).tolist() == pytest.approx(
        [0.2, 0.0]
    )


def test_ideal_parity_reconstructs_exactly():
    code = Code(3, 2)
    data = torch.softmax(torch.randn(3, 50, 5, generator=torch.Generator().manual_seed(0)), -1)
    outputs = code.encode_outputs(data)
    rows = evaluate_patterns(code, outputs)
    assert rows and all(r["reconstruction_acc"] == 1.0 for r in rows)
    assert max(r["tv"] for r in rows) < 1e-6 and max(r["negative_mass"] for r in rows) < 1e-6
    assert target_mixture_tv(code, outputs) == pytest.approx([0.0, 0.0], abs=1e-6)
    # every single and double erasure that touches a data model: 3 + 3 + 2*3 pairs
    assert len({tuple(r["pattern"]) for r in rows}) == len(code.erasure_patterns())


def test_parity_with_one_wrong_sample_gives_known_accuracies():
    code = Code(2, 1)  # parity = (p0 + p1) / 2
    p0 = _onehot([0, 1, 0, 1])
    p1 = _onehot([2, 3, 3, 2])
    parity = (p0 + p1) / 2
    parity[3] = _onehot(0)  # one wrong parity answer: decoded p0 = 2*e0 - p1 on sample 3
    outputs = torch.stack([p0, p1, parity])
    labels = torch.tensor([0, 1, 3, 2])
    masks = [torch.tensor([True, True, False, False]), torch.tensor([False, False, True, True])]
    rows = {r["erased"]: r for r in evaluate_patterns(code, outputs, labels, masks)}
    # erase 0: decoded = 2*parity - p1; sample 3 -> 2*e0 - e2, argmax 0 but p0 says 1
    assert rows[0]["reconstruction_acc"] == 0.75
    assert rows[0]["reconstruction_acc_task"] == 1.0  # samples 0, 1 are right
    assert rows[0]["decoded_task_acc"] == 1.0 and rows[0]["own_task_acc"] == 1.0
    assert rows[0]["negative_mass"] == pytest.approx(1.0 / 4)  # -1 on one of 4 samples
    # erase 1: decoded = 2*parity - p0; sample 3 -> 2*e0 - e1: argmax 0, p1 says 2
    assert rows[1]["reconstruction_acc"] == 0.75
    assert rows[1]["reconstruction_acc_task"] == 0.5
    assert rows[1]["decoded_task_acc"] == 0.5 and rows[1]["own_task_acc"] == 1.0


def test_substitute_uses_survivors_mean():
    data = torch.stack([_onehot([0, 1, 2]), _onehot([0, 2, 2]), _onehot([3, 3, 3])])
    est = substitute_estimates(data, [(0,), (0, 1)])
    torch.testing.assert_close(est[(0,)][0], (data[1] + data[2]) / 2)
    torch.testing.assert_close(est[(0, 1)][1], data[2])
    torch.testing.assert_close(est[(0,)][1], data[1])  # survivors untouched
    k2 = data[:2]
    rows = evaluate_estimates(k2, substitute_estimates(k2, [(0,), (1,)]))
    assert [r["reconstruction_acc"] for r in rows] == pytest.approx([2 / 3, 2 / 3])


def test_default_is_a_constant_uniform_answer():
    data = torch.stack([_onehot([0, 0, 1, 2]), _onehot([3, 3, 3, 3])])
    est = default_estimates(data, [(0,), (1,)])
    assert torch.all(est[(0,)][0] == 0.25)
    rows = evaluate_estimates(data, est)
    assert rows[0]["reconstruction_acc"] == 0.5  # argmax of uniform is class 0
    assert rows[1]["reconstruction_acc"] == 0.0
    assert rows[1]["tv"] == pytest.approx(0.75)


def test_summarize_means_and_missing_metrics():
    s = summarize([{"reconstruction_acc": 1.0, "tv": 0.2}, {"reconstruction_acc": 0.5, "tv": 0.4}])
    assert s["reconstruction_acc"] == 0.75 and s["tv"] == pytest.approx(0.3)
    assert s["decoded_task_acc"] != s["decoded_task_acc"]  # NaN when absent


def test_wrong_number_of_workers_is_refused():
    with pytest.raises(ValueError, match="n = 3"):
        evaluate_patterns(Code(2, 1), torch.rand(2, 4, 3))
