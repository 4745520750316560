"""The HTTP API (FastAPI): the public app and the loopback-only admin app."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from coinfer.errors import CoinferError, DecodeError
from coinfer.serving.collector import BadWorkerOutput, CollectError, CollectTimeout
from coinfer.serving.injection import Injection
from coinfer.serving.runtime import MODES, Runtime
from coinfer.serving.validation import RequestError, parse_predict_request

__all__ = ["build_app", "build_admin_app"]


class PredictRequest(BaseModel):
    """Give exactly one of ``inputs`` or ``npy``."""

    inputs: list | None = Field(None, description="Nested lists of shape (B, *input_shape) or input_shape.")
    npy: str | None = Field(None, description="A base64-encoded .npy array of the same shapes.")
    mode: str | None = Field(None, description=f"One of {list(MODES)}; default: the server's mode.")
    return_probabilities: bool = Field(True, description="Include the probability vectors.")


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
    workers: dict[str, Any] = Field(description="used (worker: row), failed (worker: reason), late.")
    latency_ms: float


def _error(status: int, reason: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail, **extra}, status_code=status)


def build_app(runtime: Runtime) -> FastAPI:
    """The public API: predict, models, health, metrics."""
    app = FastAPI(
        title="coinfer",
        version="0.1.0",
        description="Erasure-coded inference: any k of the k + r workers answer every request.",
    )
    names = runtime.class_names
    cfg = runtime.config

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
        responses={
            400: {"description": "Malformed body: JSON, base64, .npy or fields."},
            413: {"description": "Body or batch over the size limit."},
            422: {"description": "Wrong shape or dtype, NaN/inf, unknown mode."},
            503: {"description": "Too many workers failed or are down to decode."},
            504: {"description": "No decodable set within the request timeout."},
        },
    )
    async def predict(request: Request) -> Any:
        """Run the inputs on the workers; return every data model's output as soon as
        a decodable set has arrived, with ``reconstructed`` per model."""
        t0 = time.perf_counter()
        body = await request.body()
        try:
            x, opts = parse_predict_request(body, runtime.input_shape, cfg.max_batch, cfg.max_body_bytes)
            mode = opts.get("mode", runtime.mode)
            if mode not in MODES:
                raise RequestError(422, "bad_mode", f"mode must be one of {list(MODES)}, got {mode!r}")
        except RequestError as exc:
            runtime.metrics.bad_request(exc.reason)
            return _error(exc.status, exc.reason, exc.message)
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
        probs = opts.get("return_probabilities", True)
        top = res.outputs.argmax(-1).tolist()
        outputs = []
        for j in range(runtime.code.k):
            outputs.append(
                {
                    "model": j,
                    "reconstructed": res.reconstructed[j],
                    "top1": top[j],
                    "labels": [names[t] if names else str(t) for t in top[j]],
                    "probabilities": res.outputs[j].tolist() if probs else None,
                }
            )
        return {
            "mode": mode,
            "batch": len(x),
            "outputs": outputs,
            "workers": {"used": res.used, "failed": res.failed, "late": res.late},
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
        }

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

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """``ok`` while at most r workers are down (every request can still be decoded)."""
        down = sorted(w for w in runtime.down if w < runtime.code.n)
        ok = len(down) <= runtime.code.r
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "down": sorted(runtime.down)},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        """Prometheus metrics: requests, latency, reconstructions, per-worker latency, failures, timeouts."""
        return runtime.metrics.render()

    return app


class InjectRequest(BaseModel):
    workers: list[int] | None = Field(None, description="Worker indices; null: all workers.")
    kind: str = Field("none", description="none, constant, exponential or heavy.")
    ms: float = 0.0
    p: float = 0.0
    alpha: float = 1.5
    fail_prob: float = 0.0


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


def build_admin_app(runtime: Runtime) -> FastAPI:
    """Admin API for experiments: injection, kill/restart, mode. Serve it on 127.0.0.1 only;
    requests from other hosts are refused as well."""
    app = FastAPI(title="coinfer admin", version="0.1.0")

    @app.middleware("http")
    async def loopback_only(request: Request, call_next):
        if not _is_loopback(request):
            return _error(403, "forbidden", "the admin API answers loopback clients only")
        return await call_next(request)

    @app.exception_handler(CoinferError)
    async def coinfer_error(request: Request, exc: CoinferError) -> JSONResponse:
        return _error(422, "bad_request", str(exc))

    @app.get("/admin/state")
    async def state() -> dict[str, Any]:
        return runtime.state()

    @app.post("/admin/inject")
    async def inject(req: InjectRequest) -> dict[str, Any]:
        """Set a delay model and failure probability on workers (kind none clears them)."""
        inj = Injection(kind=req.kind, ms=req.ms, p=req.p, alpha=req.alpha, fail_prob=req.fail_prob)
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
        """Wait for Serve to replace a killed worker, then use it again."""
        return await runtime.restart(req.worker)

    @app.post("/admin/config")
    async def config(req: ConfigRequest) -> dict[str, Any]:
        """Change the default mode, the request timeout, the hedging delay or the decode slack."""
        if req.mode is not None:
            if req.mode not in MODES:
                raise CoinferError(f"mode must be one of {list(MODES)}, got {req.mode!r}")
            runtime.plan(req.mode)
            runtime.mode = req.mode
        if req.timeout_s is not None:
            if not req.timeout_s > 0:
                raise CoinferError(f"timeout_s must be > 0, got {req.timeout_s}")
            runtime.timeout_s = req.timeout_s
        if req.hedge_ms is not None:
            if not req.hedge_ms >= 0:
                raise CoinferError(f"hedge_ms must be >= 0, got {req.hedge_ms}")
            runtime.hedge_ms = req.hedge_ms
        if req.decode_slack is not None:
            runtime.set_decode_slack(req.decode_slack)
        return runtime.state()

    return app
