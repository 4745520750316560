"""A worker: one model of a bundle as a Ray Serve deployment.

The model code does not know it is served: the worker loads one model file of
a bundle that the frontend verified and runs it under Serve's dynamic batching
(``@serve.batch``), returning softmax probabilities. Injected delays and
failures (see :mod:`coinfer.serving.injection`) are applied here, in the
worker's process, per request.

A worker is *pinned* to what the frontend verified at start: it receives the
expected sha256 of its model file and the architecture and parity structure,
never re-reads the manifest, and refuses (raises in its constructor) a file
whose bytes differ — so a replica that Serve (re)starts after the bundle
changed on disk does not serve another model's outputs.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve

from coinfer.bundle import Bundle, load_model
from coinfer.serving.injection import InjectedFailure, Injection

__all__ = ["ModelWorker"]


class ModelWorker:
    """Serves row ``row`` (``0..n-1``) of the bundle at ``bundle_path``.

    Args:
        bundle_path: the bundle directory (must be readable where the worker runs).
        row: the generator row, i.e. which model: data ``0..k-1``, coded ``k..n-1``.
        worker: this worker's index in the frontend (replicas have their own).
        device: ``cpu`` or ``cuda``.
        num_threads: torch intra-op threads.
        max_batch_size, batch_wait_timeout_s: Serve dynamic batching settings.
        seed: seed of the injected delays and failures.
        k: the bundle's number of data models (names the file of ``row``).
        sha256: the sha256 of the model file that the frontend verified; the
            worker hashes the bytes it loads and raises ``BundleError`` (words
            "sha256 mismatch") on any difference.
        architecture: the architecture spec the frontend verified.
        parity: the row's parity structure the frontend verified (None: a
            model of the architecture itself).
        trust_code: the operator's opt-in to a ``package.module:factory`` architecture.
    """

    def __init__(
        self,
        bundle_path: str,
        row: int,
        worker: int,
        device: str = "cpu",
        num_threads: int = 1,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.002,
        seed: int = 0,
        *,
        k: int,
        sha256: str,
        architecture: dict[str, Any],
        parity: dict[str, Any] | None = None,
        trust_code: bool = False,
    ) -> None:
        torch.set_num_threads(max(1, num_threads))
        path = Path(bundle_path) / Bundle.filename(row, k)
        self.device = torch.device(device)
        model = load_model(architecture, path, parity, trust_code=trust_code, sha256=sha256)
        self.model = model.to(self.device).eval()
        self.row, self.worker = row, worker
        self.rng = random.Random(seed * 1_000_003 + worker)
        self._infer.set_max_batch_size(max_batch_size)
        self._infer.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _infer(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(x) for x in xs]
        x = torch.from_numpy(np.concatenate(xs)).to(self.device)
        with torch.inference_mode():
            p = torch.softmax(self.model(x), dim=-1).float().cpu().numpy()
        return list(np.split(p, np.cumsum(sizes)[:-1]))

    async def predict(self, x: np.ndarray, injection: dict[str, Any] | None = None) -> np.ndarray:
        """``(B, C)`` probabilities for ``(B, *input_shape)`` float32 inputs."""
        inj = Injection.from_dict(injection) if injection else None
        if inj is not None and inj.sample_failure(self.rng):
            raise InjectedFailure(f"injected failure in worker {self.worker}")
        out = await self._infer(x)
        if inj is not None:
            delay = inj.sample_delay_s(self.rng)
            if delay > 0:
                await asyncio.sleep(delay)
        return out

    async def info(self) -> dict[str, Any]:
        """Process id, row and device (also a health probe)."""
        return {"pid": os.getpid(), "row": self.row, "worker": self.worker, "device": str(self.device)}


def deployment(num_cpus: float, num_gpus: float, num_replicas: int) -> serve.Deployment:
    """The Serve deployment of :class:`ModelWorker` with these resources."""
    return serve.deployment(
        ModelWorker,
        num_replicas=num_replicas,
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        health_check_period_s=2.0,
        max_constructor_retry_count=3,  # a refused file fails the first deploy fast
        graceful_shutdown_timeout_s=1.0,
    )
