"""The HTTP API (FastAPI): the public app and the loopback-only admin app."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from coinfer.errors import CoinferError, DecodeError
from coinfer.serving.collector import BadWorkerOutput, CollectError, Collection, CollectTimeout
from coinfer.serving.config import MODES
from coinfer.serving.injection import Injection
from coinfer.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coinfer.serving.runtime import Runtime
from coinfer.serving.validation import RequestError, parse_predict_request, predict_request_schema, read_body

__all__ = ["build_app", "build_admin_app"]


class ModelOutput(BaseModel):
    model: int
    reconstructed: bool = Field(description="Decoded from other workers' outputs, not received.")
    top1: list[int]
    labels: list[str]
    probabilities: list[list[float]] | None = None


class PredictResponse(BaseModel):
    mode: str
    batch: int
    outputs: list[ModelOutput]
    workers: dict[str, Any] = Field(
        description="used (worker: row), failed (worker: reason), late; with --verify also corrupt "
        "(worker: inputs located as corrupt) and verified (whether k + 2 outputs were checked)."
    )
    latency_ms: float


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer of the API."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(description="Short reason code (also the metrics label), e.g. bad_json, too_large.")
    detail: str = Field(description="What was wrong, with the value and what was expected.")


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


def _error(status: int, reason: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail, **extra}, status_code=status)


RETRY_AFTER_S = 1  # the Retry-After of an ``overloaded`` 503


def _json(content: dict[str, Any]) -> Response:
    """Pre-serialized JSON, as FastAPI's ``JSONResponse`` writes it, without the
    ``response_model`` validation and ``jsonable_encoder`` pass (the content is
    built from plain lists, ints, floats and strings already)."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body.encode("utf-8"), media_type="application/json")


def predict_reply(
    res: Collection, mode: str, batch: int, names: list[str] | None, probabilities: bool = True
) -> dict[str, Any]:
    """The :class:`PredictResponse` content of a collection, from plain Python values
    (no ``latency_ms`` yet), ready for ``json.dumps``."""
    out = res.outputs.numpy()
    top = out.argmax(-1).tolist()
    probs = out.tolist() if probabilities else None
    outputs = [
        {
            "model": j,
            "reconstructed": bool(res.reconstructed[j]),
            "top1": top[j],
            "labels": [names[t] for t in top[j]] if names else [str(t) for t in top[j]],
            "probabilities": probs[j] if probs is not None else None,
        }
        for j in range(len(out))
    ]
    return {
        "mode": mode,
        "batch": batch,
        "outputs": outputs,
        "workers": {
            "used": {str(w): r for w, r in res.used.items()},
            "failed": {str(w): r for w, r in res.failed.items()},
            "late": res.late,
            **(
                {"corrupt": {str(w): c for w, c in res.corrupt.items()}, "verified": res.verified}
                if getattr(res, "verified", None) is not None
                else {}
            ),
        },
    }


def build_app(runtime: Runtime) -> FastAPI:
    """The public API: predict, models, health, metrics."""
    app = FastAPI(
        title="coinfer",
        version="0.1.0",
        description="Erasure-coded inference: any k of the k + r workers answer every request.",
    )
    names = runtime.class_names
    cfg = runtime.config
    limit = cfg.inflight_limit
    reader_limit = cfg.body_reader_limit
    inflight = 0  # prediction requests admitted and not yet answered (one event loop: no lock)
    readers = 0  # request bodies being received

    def overloaded(detail: str, **extra: Any) -> JSONResponse:
        runtime.metrics.overloaded()
        resp = _error(503, "overloaded", f"{detail}; retry after {RETRY_AFTER_S}s", **extra)
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
        return resp

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": predict_request_schema(runtime.input_shape, cfg.max_batch, list(MODES))
                    }
                },
            }
        },
        responses={
            400: _err("Malformed body: JSON, nesting too deep, base64, .npy content, or fields."),
            408: _err("The body did not arrive within the server's body timeout."),
            413: _err("Body or batch over the size limit."),
            422: _err("Wrong shape or dtype, NaN/inf, unknown mode."),
            502: _err("A worker returned an output that cannot be decoded."),
            503: _err(
                "`overloaded` (too many requests in flight, or too many request bodies being "
                "received; retry after `Retry-After` seconds) or `no_decodable_set` (too many "
                "workers failed or are down to decode)."
            ),
            504: _err("No decodable set within the request timeout."),
        },
    )
    async def predict(request: Request) -> Any:
        """Run the inputs on the workers; return every data model's output as soon as
        a decodable set has arrived, with ``reconstructed`` per model.

        The body is read first, by one of at most ``max_body_readers`` readers, within
        the body timeout (408 after it); only a request whose body has arrived is
        admitted, so slow senders cannot take the admission slots. With
        ``max_inflight`` requests in flight, or ``max_body_readers`` bodies being
        received, the answer is an immediate 503 ``overloaded`` with a
        ``Retry-After`` header."""
        nonlocal inflight, readers
        t0 = time.perf_counter()
        if readers >= reader_limit:
            return overloaded(
                f"{readers} request bodies are being received, the server's limit (--max-body-readers)",
                body_readers=readers,
                limit=reader_limit,
            )
        readers += 1
        try:
            body = await _read(request)
        except RequestError as exc:
            runtime.metrics.bad_request(exc.reason)
            return _error(exc.status, exc.reason, exc.message)
        finally:
            readers -= 1
        if inflight >= limit:
            return overloaded(
                f"{inflight} requests are in flight, the server's limit (--max-inflight)",
                inflight=inflight,
                limit=limit,
            )
        inflight += 1
        try:
            return await _predict(body, t0)
        finally:
            inflight -= 1

    async def _read(request: Request) -> bytes:
        # bounded: Content-Length checked first, then a counted read of the stream, in a
        # bounded time (a client that stops sending must not hold its reader slot)
        try:
            return await asyncio.wait_for(
                read_body(request.headers.get("content-length"), request.stream(), cfg.max_body_bytes),
                cfg.body_timeout_s,
            )
        except TimeoutError:
            raise RequestError(
                408, "body_timeout", f"the request body did not arrive within {cfg.body_timeout_s:g}s"
            ) from None
        except RequestError:
            raise
        except Exception as exc:  # e.g. the client disconnected: still the body's fault, never a 500
            raise RequestError(
                400, "bad_body", f"request body could not be read: {type(exc).__name__}: {exc}"
            ) from None

    async def _predict(body: bytes, t0: float) -> Response:
        try:
            x, opts = parse_predict_request(body, runtime.input_shape, cfg.max_batch, cfg.max_body_bytes)
            mode = opts.get("mode", runtime.mode)
            if mode not in MODES:
                raise RequestError(422, "bad_mode", f"mode must be one of {list(MODES)}, got {mode!r}")
        except RequestError as exc:
            runtime.metrics.bad_request(exc.reason)
            return _error(exc.status, exc.reason, exc.message)
        except Exception as exc:  # a parsing failure not foreseen above is still the body's fault
            runtime.metrics.bad_request("bad_body")
            return _error(400, "bad_body", f"request body could not be read: {type(exc).__name__}: {exc}")
        try:
            res = await runtime.predict(x, mode)
        except CollectTimeout as exc:
            return _error(504, "timeout", str(exc), failed=exc.failed, pending=exc.pending)
        except BadWorkerOutput as exc:  # workers answered NaN/inf or non-probabilities
            return _error(502, "bad_worker_output", str(exc), failed=exc.failed, pending=exc.pending)
        except CollectError as exc:
            return _error(503, "no_decodable_set", str(exc), failed=exc.failed, pending=exc.pending)
        except DecodeError as exc:  # e.g. a worker answered NaN: the server's fault, not the client's
            return _error(502, "bad_worker_output", str(exc))
        except CoinferError as exc:
            return _error(422, "bad_request", str(exc))
        content = predict_reply(res, mode, len(x), names, opts.get("return_probabilities", True))
        content["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        try:
            return _json(content)
        except ValueError as exc:  # NaN or inf in an output that reached the reply
            return _error(502, "bad_worker_output", f"an output holds NaN or inf: {exc}")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """Summary of the served bundle: code, architecture, shapes, classes, workers."""
        m = runtime.manifest
        enc = m.get("encoder") or {}
        return {
            "bundle": str(cfg.bundle),
            "k": runtime.code.k,
            "r": runtime.code.r,
            "n": runtime.code.n,
            "weights": runtime.code.weights.tolist(),
            "architecture": m["architecture"],
            "input_shape": list(runtime.input_shape),
            "class_names": names,
            "encoder": {"method": enc.get("method"), "options": enc.get("options")},
            "modes": list(MODES),
            "default_mode": runtime.mode,
            "limits": {"max_batch": cfg.max_batch, "max_body_bytes": cfg.max_body_bytes},
            "workers": runtime.state()["workers"],
        }

    @app.get(
        "/healthz",
        responses={
            503: {"description": "The usable workers (not down, not recently failing) cannot decode."}
        },
    )
    async def healthz() -> JSONResponse:
        """``ok`` (200) while the default mode's workers that are neither down nor
        recently failing can still form a decodable set, else ``degraded`` (503);
        ``unavailable`` names each left-out worker and why."""
        report = runtime.health_report()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus metrics: requests, latency, reconstructions, per-worker latency, failures, timeouts."""
        return Response(runtime.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app


class InjectRequest(BaseModel):
    workers: list[int] | None = Field(None, description="Worker indices; null: all workers.")
    kind: str = Field("none", description="none, constant, exponential or heavy.")
    ms: float = 0.0
    p: float = 0.0
    alpha: float = 1.5
    fail_prob: float = 0.0
    corrupt: str = Field(
        "none", description="none, random (random probabilities) or other (another data worker's answer)."
    )


class WorkerRequest(BaseModel):
    worker: int


class ConfigRequest(BaseModel):
    mode: str | None = None
    timeout_s: float | None = None
    hedge_ms: float | None = None
    decode_slack: float | str | None = Field(
        None, description="Decode slack: milliseconds >= 0 or 'auto' (0: decode at the first decodable set)."
    )


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _loopback_host_header(value: str | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost``,
    ``127.0.0.1`` or ``[::1]``, each with an optional ``:port``."""
    if not value:
        return False
    host = value.strip().lower()
    if host.startswith("["):  # an IPv6 literal: [::1] or [::1]:port
        name, closed, rest = host[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            return False
        sep, port = rest[:1], rest[1:]
    else:
        name, sep, port = host.partition(":")
    if sep and not port.isdigit():
        return False
    return name in _LOOPBACK_NAMES


def build_admin_app(runtime: Runtime) -> FastAPI:
    """Admin API for experiments: injection, kill/restart, mode. Serve it on 127.0.0.1 only;
    requests from other hosts are refused, and so are requests whose ``Host`` header is
    not a loopback name (a web page that rebinds its DNS name to 127.0.0.1 cannot reach it)."""
    app = FastAPI(title="coinfer admin", version="0.1.0")

    @app.middleware("http")
    async def loopback_only(request: Request, call_next):
        if not _is_loopback(request):
            return _error(403, "forbidden", "the admin API answers loopback clients only")
        host = request.headers.get("host")
        if not _loopback_host_header(host):
            return _error(
                403,
                "forbidden_host",
                f"the admin API answers requests for localhost, 127.0.0.1 or [::1] only; Host was {host!r}",
            )
        return await call_next(request)

    @app.exception_handler(CoinferError)
    async def coinfer_error(request: Request, exc: CoinferError) -> JSONResponse:
        return _error(422, "bad_request", str(exc))

    @app.get("/admin/state")
    async def state() -> dict[str, Any]:
        return runtime.state()

    @app.post("/admin/inject")
    async def inject(req: InjectRequest) -> dict[str, Any]:
        """Set a delay model, failure probability and corruption on workers (all none clears them)."""
        inj = Injection(
            kind=req.kind, ms=req.ms, p=req.p, alpha=req.alpha, fail_prob=req.fail_prob, corrupt=req.corrupt
        )
        runtime.set_injection(req.workers, inj)
        return runtime.state()

    @app.post("/admin/clear")
    async def clear() -> dict[str, Any]:
        """Remove every injection."""
        runtime.clear_injections()
        return runtime.state()

    @app.post("/admin/kill")
    async def kill(req: WorkerRequest) -> dict[str, Any]:
        """Kill a worker's process(es); it stays out of the pool until restarted."""
        return runtime.kill(req.worker)

    @app.post("/admin/restart")
    async def restart(req: WorkerRequest) -> dict[str, Any]:
        """Start new processes for a worker (pinned to the verified file), then use it again."""
        from coinfer.serving.runtime import WorkerRefused

        try:
            return await runtime.restart(req.worker)
        except WorkerRefused as exc:  # kept down, with the reason, in /admin/state
            return _error(409, "worker_refused", str(exc), worker=exc.worker, down=exc.reason)

    @app.post("/admin/config")
    async def config(req: ConfigRequest) -> dict[str, Any]:
        """Change the default mode, the request timeout, the hedging delay or the decode slack
        (validated together by the same rules as at start; nothing changes if one is refused)."""
        runtime.configure(**req.model_dump())
        return runtime.state()

    return app
