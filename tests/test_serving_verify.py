"""The collector's corrupt-output check (``verify``), without Ray: it waits for
k + 2 rows within the slack, locates a corrupt worker, answers from the rest,
and answers unverified when too few rows can arrive."""

from __future__ import annotations

import asyncio

import torch

from coinfer import Code
from coinfer.serving.collector import Plan, collect

from .test_serving_collector import Scripted, _outputs


def _wrong(p: torch.Tensor) -> torch.Tensor:
    """A well-formed wrong answer: all mass on the class the right answer finds least likely."""
    return torch.nn.functional.one_hot(p.argmin(-1), p.shape[-1]).float()


async def _collect(code, outs, order, slack=1.0, verify=0.05, silent=()):
    s = Scripted(outs)
    row_of = {i: i for i in range(code.n)}
    task = asyncio.ensure_future(
        collect(
            code, row_of, lambda w: s.call(w, w), Plan(tuple(range(code.n))), 5.0, slack=slack, verify=verify
        )
    )
    await s.release([w for w in order if w not in silent])
    return await task


def test_a_corrupt_data_worker_is_located_and_its_answer_decoded_from_the_others():
    code = Code(2, 2)
    clean = _outputs(code)
    for bad in range(code.n):
        outs = clean.clone()
        outs[bad] = _wrong(clean[bad])
        res = asyncio.run(_collect(code, outs, list(range(code.n))))
        assert res.verified is True and res.corrupt == {bad: clean.shape[1]}
        torch.testing.assert_close(res.outputs, clean[: code.k], atol=1e-5, rtol=0)
        assert res.reconstructed == [j == bad for j in range(code.k)]


def test_clean_answers_are_verified_and_nothing_is_named():
    code = Code(2, 2)
    outs = _outputs(code)
    res = asyncio.run(_collect(code, outs, [3, 0, 2, 1]))
    assert res.verified is True and res.corrupt == {} and res.reconstructed == [False, False]
    torch.testing.assert_close(res.outputs, outs[:2])


def test_with_verify_the_collector_waits_for_k_plus_2_rows_not_only_the_data_rows():
    code = Code(2, 3)  # n = 5: k + 2 = 4 rows suffice, the fifth is not waited for
    outs = _outputs(code)
    res = asyncio.run(_collect(code, outs, [0, 1, 2, 3], silent=(4,), slack=5.0))
    assert res.verified is True and set(res.used) == {0, 1, 2, 3} and res.late == [4]


def test_too_few_rows_within_the_slack_answer_unverified():
    code = Code(2, 2)
    outs = _outputs(code)
    res = asyncio.run(_collect(code, outs, [0, 1, 2], silent=(3,), slack=0.05))
    assert res.verified is False and res.corrupt == {}
    torch.testing.assert_close(res.outputs, outs[:2])


def test_without_verify_nothing_changes():
    code = Code(2, 2)
    outs = _outputs(code)
    outs[0] = _wrong(outs[0])
    res = asyncio.run(_collect(code, outs, [0, 1, 2, 3], verify=None))
    assert res.verified is None and res.corrupt == {}
    assert set(res.used) == {0, 1}  # decodable at once: the parities were not even read


# --------------------------------------------------------------------------- the runtime, without Ray
def _runtime_k2r2(tmp_path, **config):
    import numpy as np  # noqa: F401

    from coinfer.serving.runtime import Runtime, ServeConfig

    manifest = {
        "code": Code(2, 2).to_dict(),
        "input_shape": [4],
        "class_names": ["a", "b", "c"],
        "architecture": {"name": "mlp", "kwargs": {}},
        "files": {
            n: "0" * 64
            for n in (
                "data_0.safetensors",
                "data_1.safetensors",
                "coded_0.safetensors",
                "coded_1.safetensors",
            )
        },
    }
    return Runtime(ServeConfig(tmp_path, **config), manifest)


class _FakeChannel:
    """Answers row ``row``'s exact output for every input, at once."""

    def __init__(self, outs, row):
        self.outs, self.row = outs, row

    def submit(self, x, fail=False, delay_s=0.0):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self.outs[self.row][: len(x)].numpy().astype("float32"))
        return fut


def test_a_server_with_verify_answers_clean_outputs_and_counts_the_corrupt_worker(tmp_path):
    import numpy as np

    from coinfer.serving.injection import Injection

    rt = _runtime_k2r2(tmp_path, verify=0.05, decode_slack=200.0)
    code = rt.code
    clean = _outputs(code, batch=3, classes=3)
    rt._channel = lambda w: _FakeChannel(clean, rt.row_of[w])
    rt.set_injection([0], Injection(corrupt="other"))  # worker 0 answers as data worker 1

    async def ask():
        return await rt.predict(np.zeros((3, 4), np.float32))

    res = asyncio.run(ask())
    assert res.corrupt == {0: 3} and res.verified is True
    torch.testing.assert_close(res.outputs, clean[:2], atol=1e-5, rtol=0)
    text = rt.metrics.render()
    assert 'coinfer_byzantine_detected_total{worker="0"} 3.0' in text
    for _ in range(2):
        asyncio.run(ask())
    assert 0 in rt.health.failing()  # marked in health once its recent answers were all located as corrupt


def test_random_corruption_is_well_formed_and_located(tmp_path):
    import numpy as np

    from coinfer.serving.injection import Injection

    rt = _runtime_k2r2(tmp_path, verify=0.05, decode_slack=200.0)
    clean = _outputs(rt.code, batch=3, classes=3)
    rt._channel = lambda w: _FakeChannel(clean, rt.row_of[w])
    rt.set_injection([3], Injection(corrupt="random"))

    async def ask():
        fut = rt._call(3, np.zeros((3, 4), np.float32))
        wrong = await fut
        res = await rt.predict(np.zeros((3, 4), np.float32))
        return wrong, res

    wrong, res = asyncio.run(ask())
    assert wrong.shape == (3, 3) and np.allclose(wrong.sum(-1), 1, atol=1e-5) and (wrong >= 0).all()
    assert not np.allclose(wrong, clean[3].numpy())
    assert res.corrupt == {3: 3}  # the random parity answer is named on every input
    torch.testing.assert_close(res.outputs, clean[:2], atol=1e-5, rtol=0)


def test_a_bad_corrupt_kind_or_verify_value_is_refused_by_name(tmp_path):
    import pytest

    from coinfer.errors import CoinferError
    from coinfer.serving.injection import Injection

    with pytest.raises(CoinferError, match="corrupt must be one of"):
        Injection(corrupt="garbage")
    with pytest.raises(CoinferError, match="unknown injection fields"):
        Injection.from_dict({"corupt": "random"})
    assert Injection.from_dict({"corrupt": "other"}).active
    with pytest.raises(CoinferError, match="verify must be > 0"):
        _runtime_k2r2(tmp_path, verify=0.0)


def test_over_http_an_injected_corrupt_worker_is_located_and_counted(tmp_path):
    import httpx

    from coinfer.serving.app import build_admin_app, build_app

    rt = _runtime_k2r2(tmp_path, verify=0.05, decode_slack=200.0)
    clean = _outputs(rt.code, batch=1, classes=3)
    rt._channel = lambda w: _FakeChannel(clean, rt.row_of[w])
    app, admin = build_app(rt), build_admin_app(rt)

    async def main():
        tr = httpx.ASGITransport(app=admin, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=tr, base_url="http://127.0.0.1") as c:
            r = await c.post("/admin/inject", json={"workers": [1], "corrupt": "random"})
            assert r.status_code == 200, r.text
            bad = await c.post("/admin/inject", json={"workers": [1], "corrupt": "nonsense"})
            assert bad.status_code == 422 and "corrupt must be one of" in bad.text, bad.text
        tr = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=tr, base_url="http://127.0.0.1") as c:
            r = await c.post("/v1/predict", json={"inputs": [1, 2, 3, 4]})
            assert r.status_code == 200, r.text
            metrics = (await c.get("/metrics")).text
        return r.json(), metrics

    body, metrics = asyncio.run(main())
    assert body["workers"]["corrupt"] == {"1": 1} and body["workers"]["verified"] is True
    top1 = [m["top1"] for m in body["outputs"]]
    assert top1 == [[int(clean[j, 0].argmax())] for j in range(2)]  # the clean answers, worker 1's included
    assert 'coinfer_byzantine_detected_total{worker="1"} 1.0' in metrics
