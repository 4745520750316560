"""Open-loop load generator: Poisson arrivals against a coinfer server on loopback.

Arrivals are scheduled in advance (exponential gaps at ``rate`` per second), so a
slow answer never delays the next request (no coordinated omission). Each
request sends one input; the latency is measured at the client, from the
scheduled send time to the reply.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

from coinfer.errors import CoinferError
from coinfer.serving.validation import encode_npy

__all__ = [
    "LoadResult",
    "run_load",
    "summarize",
    "plot_cdf",
    "check_loopback",
    "reference_top1",
    "BurstReply",
    "burst",
]


def check_loopback(url: str) -> None:
    """The load generator only targets servers on this machine."""
    host = urlparse(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise CoinferError(f"the load generator targets loopback servers only, got host {host!r} in {url}")


@dataclass
class LoadResult:
    """Per-request records of one run (latency in seconds; ``nan`` for errors)."""

    latency_s: np.ndarray
    status: np.ndarray
    reconstructed: np.ndarray  # (N,) any output of the request reconstructed
    correct: np.ndarray  # (N, k) top-1 == label (False where no label / error)
    reconstructed_outputs: np.ndarray  # (N, k)
    labels: np.ndarray  # (N,) label of each request's input (-1 without labels)
    has_label: bool
    top1: np.ndarray  # (N, k) served top-1 per data model (-1 for errors)
    index: np.ndarray  # (N,) which input of x each request sent
    duration_s: float
    errors: dict[str, int]
    config: dict[str, Any]


async def _run(
    url: str,
    x: np.ndarray,
    y: np.ndarray | None,
    rate: float,
    requests: int,
    duration_s: float,
    mode: str | None,
    seed: int,
    timeout_s: float,
    k: int,
) -> LoadResult:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=requests)
    times = np.cumsum(gaps) - gaps[0]
    times = times[times <= duration_s]
    n = len(times)
    idx = rng.integers(0, len(x), size=n)
    payloads = []
    for i in idx:
        body: dict[str, Any] = {"npy": encode_npy(x[i : i + 1]), "return_probabilities": False}
        if mode:
            body["mode"] = mode
        payloads.append(json.dumps(body).encode())
    lat = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int32)
    rec = np.zeros(n, dtype=bool)
    rec_out = np.zeros((n, k), dtype=bool)
    correct = np.zeros((n, k), dtype=bool)
    top1 = np.full((n, k), -1, dtype=np.int64)
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        # warm the connection pool a little, outside the measurement
        for _ in range(3):
            await client.get("/healthz")
        start = time.perf_counter()

        async def one(i: int) -> None:
            delay = start + times[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t_sched = start + times[i]
            try:
                resp = await client.post(
                    "/v1/predict", content=payloads[i], headers={"content-type": "application/json"}
                )
            except httpx.HTTPError as exc:
                status[i] = -1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            t_done = time.perf_counter()
            status[i] = resp.status_code
            if resp.status_code != 200:
                try:
                    reason = resp.json().get("error", str(resp.status_code))
                except ValueError:
                    reason = str(resp.status_code)
                key = f"{resp.status_code} {reason}"
                errors[key] = errors.get(key, 0) + 1
                return
            lat[i] = t_done - t_sched
            outs = resp.json()["outputs"]
            for j, o in enumerate(outs):
                rec_out[i, j] = o["reconstructed"]
                top1[i, j] = o["top1"][0]
                if y is not None:
                    correct[i, j] = o["top1"][0] == int(y[idx[i]])
            rec[i] = rec_out[i].any()

        await asyncio.gather(*(one(i) for i in range(n)))
        duration = time.perf_counter() - start
    return LoadResult(
        latency_s=lat,
        status=status,
        reconstructed=rec,
        correct=correct,
        reconstructed_outputs=rec_out,
        labels=np.asarray(y)[idx].astype(np.int64) if y is not None else np.full(n, -1),
        has_label=y is not None,
        top1=top1,
        index=idx,
        duration_s=duration,
        errors=errors,
        config={
            "url": url,
            "rate": rate,
            "requests": n,
            "duration_limit_s": duration_s,
            "mode": mode,
            "seed": seed,
        },
    )


def run_load(
    url: str,
    x: np.ndarray,
    y: np.ndarray | None = None,
    rate: float = 20.0,
    requests: int = 1000,
    duration_s: float = 60.0,
    mode: str | None = None,
    seed: int = 0,
    timeout_s: float = 30.0,
    k: int | None = None,
) -> LoadResult:
    """Send up to ``requests`` single-input requests as a Poisson process of ``rate``/s,
    for at most ``duration_s`` seconds of arrivals; return the per-request records."""
    check_loopback(url)
    if not rate > 0:
        raise CoinferError(f"rate must be > 0 requests/s, got {rate}")
    if requests < 1:
        raise CoinferError(f"requests must be >= 1, got {requests}")
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if k is None:
        k = int(httpx.get(url.rstrip("/") + "/v1/models", timeout=10).json()["k"])
    return asyncio.run(_run(url, x, y, rate, requests, duration_s, mode, seed, timeout_s, k))


@dataclass
class BurstReply:
    """One reply of :func:`burst`: HTTP status (-1: no reply), ``error`` of the JSON
    body ("" for 200), the ``Retry-After`` header ("" if none) and the seconds
    from connecting to the whole reply."""

    status: int
    error: str
    retry_after: str
    seconds: float


async def _post_once(host: str, port: int, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:] if ":" in h)}
        length = headers.get("content-length")
        payload = await (reader.readexactly(int(length)) if length is not None else reader.read())
        return int(head[0].split()[1]), headers, payload
    finally:
        writer.close()


def burst(
    url: str, body: bytes, n: int, timeout_s: float = 60.0, path: str = "/v1/predict"
) -> list[BurstReply]:
    """Send ``n`` POSTs of ``body`` at once, each on its own connection, to a loopback server.

    A minimal HTTP/1.1 client on asyncio streams: httpx's connection pool itself
    takes over a minute for 1000 concurrent requests (measured on 2 cores
    against a server that answers at once; these streams take under 2 s), so it
    would measure the client, not the server."""
    check_loopback(url)
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80

    async def one() -> BurstReply:
        t0 = time.perf_counter()
        try:
            status, headers, payload = await asyncio.wait_for(_post_once(host, port, path, body), timeout_s)
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ) as exc:
            return BurstReply(-1, type(exc).__name__, "", time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        error = ""
        if status != 200:
            try:
                error = str(json.loads(payload).get("error", ""))
            except ValueError:
                error = "not JSON"
        return BurstReply(status, error, headers.get("retry-after", ""), seconds)

    async def main() -> list[BurstReply]:
        return list(await asyncio.gather(*(one() for _ in range(n))))

    return asyncio.run(main())


def reference_top1(
    bundle: str | Path,
    x: np.ndarray,
    k: int,
    batch: int = 512,
    *,
    trust_code: bool = False,
    served: dict[str, Any] | None = None,
) -> np.ndarray:
    """``(N, k)`` top-1 of each of the bundle's data models on every input of ``x``,
    computed here: the uncoded answer each served output should agree with.

    Args:
        bundle: the bundle directory, as seen from this machine.
        x: ``(N, *input_shape)`` inputs.
        k: the number of data models the server serves.
        batch: rows per forward pass.
        trust_code: allow a bundle whose architecture is code (``package.module:factory``).
        served: the server's ``GET /v1/models`` summary; the bundle must match it
            (k, r, parity weights, architecture, input shape, class names).

    Raises:
        UntrustedCodeError: the architecture is code and ``trust_code`` is False.
        CoinferError: the bundle cannot be read here, or is not the served one, naming why.
    """
    import torch

    from coinfer.bundle import Bundle

    try:
        b = Bundle.load(bundle, trust_code=trust_code)
    except OSError as exc:
        raise CoinferError(f"cannot read the bundle {bundle}: {exc}") from None
    if b.code.k != k:
        raise CoinferError(f"the bundle {bundle} has k = {b.code.k} data models, the server serves k = {k}")
    if tuple(b.input_shape) != tuple(x.shape[1:]):
        raise CoinferError(
            f"the bundle {bundle} takes inputs of shape {tuple(b.input_shape)}, not {tuple(x.shape[1:])}"
        )
    if served is not None:
        here = {
            "r": b.code.r,
            "architecture": b.manifest.get("architecture"),
            "input_shape": list(b.input_shape),
            "class_names": b.class_names,
        }
        differ = [key for key, value in here.items() if key in served and served[key] != value]
        weights = served.get("weights")
        if weights is not None and (
            np.shape(weights) != b.code.weights.shape or not np.allclose(weights, b.code.weights)
        ):
            differ.append("weights")
        if differ:
            raise CoinferError(
                f"the bundle {bundle} is not the one the server serves: its {', '.join(differ)} differ"
            )
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = np.empty((len(x), k), dtype=np.int64)
    with torch.inference_mode():
        for j, m in enumerate(b.data_models):
            m.eval()
            for s in range(0, len(x), batch):
                out[s : s + batch, j] = m(xt[s : s + batch]).argmax(-1).numpy()
    return out


def _mean(a: np.ndarray) -> float | None:
    return float(a.mean()) if a.size else None


def summarize(
    res: LoadResult, reference: np.ndarray | None = None, tasks: list[list[int]] | None = None
) -> dict[str, Any]:
    """Percentiles (ms), gap, throughput, reconstructed fraction, agreement, accuracy, errors.

    Args:
        res: the run.
        reference: ``(len(x), k)`` top-1 of each data model on every input (see
            :func:`reference_top1`): adds ``agreement`` (the fraction of served
            outputs whose top-1 equals the data model's own, i.e. the uncoded
            answer), overall, per model (``agreement_per_model``), on received and
            on reconstructed outputs, with the counts scored (``agreement_outputs``,
            ``agreement_reconstructed_outputs``); with ``tasks``: on inputs of each model's
            own classes only. With labels it also adds the data models' own
            accuracy under the same scoring (``data_model_accuracy``,
            ``data_model_task_accuracy``), for comparison with the served one.
        tasks: the classes of each data model (class-split bundles): adds
            ``task_accuracy``, the accuracy of each served output on inputs of
            its model's classes only (also per model, on received / reconstructed
            outputs), and ``task_scoring`` (the classes scored per output).

    With labels (``res.has_label``), ``accuracy`` scores every served output against
    the label of its input (``accuracy_scoring`` says so): meaningful when every data
    model is trained on every class, not for a class-split bundle (use ``tasks``).
    """
    ok = ~np.isnan(res.latency_s)
    lat_ms = res.latency_s[ok] * 1000.0
    out: dict[str, Any] = {**res.config, "sent": int(len(res.status)), "answered": int(ok.sum())}
    out["errors"] = dict(res.errors)
    out["error_fraction"] = float(1 - ok.mean()) if len(ok) else 0.0
    if ok.any():
        p = np.percentile(lat_ms, [50, 90, 99, 99.9])
        out.update(
            {
                "p50_ms": float(p[0]),
                "p90_ms": float(p[1]),
                "p99_ms": float(p[2]),
                "p999_ms": float(p[3]),
                "gap_p999_p50_ms": float(p[3] - p[0]),
                "mean_ms": float(lat_ms.mean()),
                "max_ms": float(lat_ms.max()),
            }
        )
    out["throughput_rps"] = float(ok.sum() / res.duration_s) if res.duration_s > 0 else 0.0
    out["reconstructed_fraction"] = float(res.reconstructed[ok].mean()) if ok.any() else 0.0
    rec = res.reconstructed_outputs[ok]
    out["reconstructed_outputs"] = int(rec.sum())
    k = rec.shape[1]
    lab = res.labels[ok]
    own = (  # (n_ok, k): the outputs whose answer means something for their input
        np.ones_like(rec) if tasks is None else np.stack([np.isin(lab, t) for t in tasks], axis=1)
    )
    ref = reference[res.index[ok]] if reference is not None else None
    if res.has_label and ok.any():
        corr = res.correct[ok]
        out["accuracy"] = float(corr.mean())
        out["accuracy_scoring"] = "every output against the label of its input"
        out["accuracy_per_model"] = [float(c) for c in corr.mean(axis=0)]
        out["accuracy_received"] = float(corr[~rec].mean()) if (~rec).any() else None
        out["accuracy_reconstructed"] = float(corr[rec].mean()) if rec.any() else None
        if ref is not None:
            out["data_model_accuracy"] = float((ref == lab[:, None]).mean())
        if tasks is not None:
            out["task_scoring"] = [list(map(int, t)) for t in tasks]
            out["task_accuracy"] = _mean(corr[own])
            out["task_accuracy_per_model"] = [_mean(corr[own[:, j], j]) for j in range(k)]
            out["task_accuracy_received"] = _mean(corr[own & ~rec])
            out["task_accuracy_reconstructed"] = _mean(corr[own & rec])
            if ref is not None:
                out["data_model_task_accuracy"] = _mean((ref == lab[:, None])[own])
    if ref is not None and ok.any():
        agree = res.top1[ok] == ref
        out["agreement"] = _mean(agree[own])
        out["agreement_per_model"] = [_mean(agree[own[:, j], j]) for j in range(k)]
        out["agreement_received"] = _mean(agree[own & ~rec])
        out["agreement_reconstructed"] = _mean(agree[own & rec])
        out["agreement_outputs"] = int(own.sum())
        out["agreement_reconstructed_outputs"] = int((own & rec).sum())
    return out


def plot_cdf(curves: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Latency CDFs (ms, log x) with a tail-focused y axis; one curve per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, lat in curves.items():
        lat = np.sort(np.asarray(lat)[~np.isnan(lat)])
        if not len(lat):
            continue
        q = np.arange(1, len(lat) + 1) / len(lat)
        axes[0].plot(lat, q, label=label)
        axes[1].plot(lat, 1 - q + 1.0 / len(lat), label=label)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes[0].set(xscale="log", xlabel="latency (ms)", ylabel="CDF", title=title or "latency CDF")
    axes[1].set(xscale="log", yscale="log", xlabel="latency (ms)", ylabel="1 - CDF (tail)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for a in axes:
        # major ticks at 1, 2, 5 x 10^n as plain numbers; minor ticks unlabelled (they collided)
        a.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
        a.xaxis.set_major_formatter(plain)
        a.xaxis.set_minor_formatter(NullFormatter())
        a.grid(alpha=0.3, which="both")
    axes[1].yaxis.set_major_locator(LogLocator(base=10, numticks=8))
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    # the tail axis says which percentile each level is
    axes[1].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"p{100 * (1 - v):g}" if v < 1 else "p0"))
    axes[1].set_ylabel("1 - CDF (tail), labelled by percentile")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
