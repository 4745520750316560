"""The demo's training/encoding/evaluation job on the bundled digits."""

from coinfer import Bundle
from coinfer.experiments.demo import run_demo


def test_demo_trains_encodes_and_measures_every_erasure(tmp_path):
    res = run_demo(tmp_path / "demo", seed=0, progress=False)
    assert [m["classes"] for m in res["models"]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for m in res["models"]:
        assert m["task_acc"] > 0.9  # each model learned its own half of the digits
    for rows in (res["methods"][name]["rows"] for name in ("coin", "average")):
        assert sorted(r["erased"] for r in rows) == [0, 1]
        for r in rows:
            assert 0.0 <= r["reconstruction_acc"] <= 1.0
            assert r["decoded_task_acc"] > 0.5
    b = Bundle.load(res["bundle"])
    assert b.encoder["method"] == "coin" and (b.code.k, b.code.r) == (2, 1)
