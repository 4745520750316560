"""The control plane: worker processes on Ray (place, start, kill, restart, addresses).

The pool knows nothing of HTTP or of requests: it starts one
:class:`coinfer.serving.worker.ModelWorker` actor per worker process (with
``num_cpus`` / ``num_gpus``, on a local Ray or a cluster joined with
``--address``), asks each for the address of its data-plane socket, and kills
or replaces them on demand. Ray restarts a process that dies on its own (up to
``MAX_RESTARTS`` times); :meth:`WorkerPool.refresh` then learns its new address.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from coinfer.errors import CoinferError

__all__ = ["RayHandle", "WorkerPool", "WorkerRefused", "WorkerSpec", "start_ray"]

log = logging.getLogger("coinfer.serving")

#: Automatic restarts of a worker process that dies on its own (not killed by the admin API).
MAX_RESTARTS = 3


class WorkerRefused(CoinferError):
    """A worker whose process refused to start (its reason in ``reason``)."""

    def __init__(self, message: str, worker: int, reason: str) -> None:
        super().__init__(message)
        self.worker, self.reason = worker, reason


@dataclass
class WorkerSpec:
    """What one worker runs: its index, the code row, its kind and the actor's arguments."""

    index: int
    row: int
    kind: str  # "data", "coded" or "replica"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RayHandle:
    """Whether this process started Ray (and so stops it), and the temp folder it gave it."""

    started: bool
    local: bool
    temp_dir: str | None = None

    def stop(self) -> None:
        """Stop Ray if this process started it, and remove the session folders it left."""
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def start_ray(address: str | None, num_cpus: float | None, need_cpus: float, gpus: bool) -> RayHandle:
    """Start a local Ray on loopback (its session files in a temp folder of its own,
    removed by :meth:`RayHandle.stop`) or join the cluster at ``address``; nothing
    when Ray is already initialised in this process."""
    import ray

    if ray.is_initialized():
        return RayHandle(started=False, local=False)
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **quiet)
        return RayHandle(started=True, local=False)
    temp_dir = tempfile.mkdtemp(prefix="coinfer-ray-")
    try:
        ray.init(
            address="local",  # a new local instance, never a cluster found on this machine
            num_cpus=num_cpus or max(os.cpu_count() or 1, math.ceil(need_cpus)),
            num_gpus=None if gpus else 0,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            **quiet,
        )
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return RayHandle(started=True, local=True, temp_dir=temp_dir)


def _first_line(reason: str) -> str:
    """The telling line of a refusal: the one naming a changed file, else the first."""
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    for ln in lines:
        if "sha256 mismatch" in ln:
            return ln
    return lines[0] if lines else "unknown startup failure"


class WorkerPool:
    """The worker processes of one runtime: ``replicas`` processes per worker.

    Args:
        specs: worker index -> :class:`WorkerSpec`.
        num_cpus, num_gpus: Ray resources per process.
        replicas: processes per worker.
        start_timeout_s: how long a process may take to start and report its address.
    """

    def __init__(
        self,
        specs: dict[int, WorkerSpec],
        num_cpus: float,
        num_gpus: float,
        replicas: int = 1,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.specs = specs
        self.num_cpus, self.num_gpus, self.replicas = num_cpus, num_gpus, replicas
        self.start_timeout_s = start_timeout_s
        self._actors: dict[int, list[Any]] = {}
        self._addresses: dict[int, list[tuple[str, int]]] = {}
        self.pids: dict[int, list[int]] = {}

    def _spawn(self, w: int) -> list[Any]:
        import ray

        from coinfer.serving.worker import ModelWorker

        cls = ray.remote(ModelWorker).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=MAX_RESTARTS, max_task_retries=0
        )
        spec = self.specs[w]
        return [cls.remote(row=spec.row, worker=w, **spec.kwargs) for _ in range(self.replicas)]

    def _await(self, started: dict[int, list[Any]]) -> dict[int, str]:
        """Wait for the new processes' addresses; worker -> reason for those that refused."""
        import ray

        refs = {(w, i): a.address.remote() for w, actors in started.items() for i, a in enumerate(actors)}
        deadline = time.monotonic() + self.start_timeout_s
        refused: dict[int, str] = {}
        addresses: dict[int, list[tuple[str, int]]] = {w: [] for w in started}
        pids: dict[int, list[int]] = {w: [] for w in started}
        for (w, _), ref in refs.items():
            try:
                info = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except Exception as exc:  # the process died before answering, or took too long
                refused.setdefault(
                    w, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
                )
                continue
            if "refused" in info:
                refused.setdefault(w, _first_line(info["refused"]))
            else:
                addresses[w].append((info["host"], int(info["port"])))
                pids[w].append(int(info["pid"]))
        for w, actors in started.items():
            if w in refused:
                for a in actors:
                    ray.kill(a, no_restart=True)
                continue
            for old in self._actors.get(w, []):  # a concurrent restart's: replaced, so not left running
                try:
                    ray.kill(old, no_restart=True)
                except Exception:  # already gone
                    pass
            self._actors[w], self._addresses[w], self.pids[w] = actors, addresses[w], pids[w]
        return refused

    def start(self, workers: list[int] | None = None) -> None:
        """Start every worker's processes (all at once) and wait for their addresses.

        Raises:
            WorkerRefused: a worker refused to start (e.g. its file changed since it
                was verified: "sha256 mismatch"); every process started here is stopped.
        """
        workers = list(self.specs) if workers is None else workers
        started = {w: self._spawn(w) for w in workers}
        refused = self._await(started)
        if refused:
            for w in workers:
                self.kill(w)
            w, reason = min(refused.items())
            raise WorkerRefused(f"worker {w} refused to start: {reason}", w, reason)

    def restart(self, w: int) -> dict[str, Any]:
        """Replace worker ``w``'s processes with new ones (pinned as before); return their pids.

        Raises:
            WorkerRefused: the new process refused to start; the worker is left with none.
        """
        self.kill(w)
        refused = self._await({w: self._spawn(w)})
        if w in refused:
            raise WorkerRefused(f"worker {w} refused to start and stays down: {refused[w]}", w, refused[w])
        return {"pids": self.pids[w]}

    def addresses(self, w: int) -> list[tuple[str, int]]:
        """The data-plane addresses of worker ``w``'s processes (empty: none running)."""
        return self._addresses.get(w, [])

    def refresh(self, w: int, timeout_s: float = 5.0) -> list[tuple[str, int]]:
        """Ask worker ``w``'s processes for their addresses again (after Ray restarted one)."""
        import ray

        actors = self._actors.get(w, [])
        old = list(self._addresses.get(w, []))
        fresh = []
        for i, a in enumerate(actors):
            try:
                info = ray.get(a.address.remote(), timeout=timeout_s)
            except Exception as exc:  # still restarting: keep what we knew, a later refresh retries
                log.warning("worker %d: no address from its process: %s", w, type(exc).__name__)
                info = {}
            if "host" in info:
                fresh.append((info["host"], int(info["port"])))
            elif "refused" in info:  # restarted by Ray and refused its file: no address to keep
                log.warning(
                    "worker %d: its restarted process refused to start: %s", w, _first_line(info["refused"])
                )
            elif i < len(old):
                fresh.append(old[i])
        if self._actors.get(w) is actors:  # not replaced by a restart meanwhile
            self._addresses[w] = fresh
        return self.addresses(w)

    def kill(self, w: int) -> int:
        """SIGKILL worker ``w``'s processes through Ray (no automatic restart); how many."""
        import ray

        actors = self._actors.pop(w, [])
        self._addresses.pop(w, None)
        self.pids.pop(w, None)
        killed = 0
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
                killed += 1
            except Exception:  # already gone
                pass
        return killed

    def info(self, w: int, timeout_s: float = 3.0) -> list[dict[str, Any]]:
        """Each of worker ``w``'s processes' :meth:`ModelWorker.info`."""
        import ray

        return ray.get([a.info.remote() for a in self._actors.get(w, [])], timeout=timeout_s)

    def shutdown(self) -> None:
        """Kill every process of the pool."""
        for w in list(self._actors):
            self.kill(w)
