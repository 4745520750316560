"""Erasure-coded serving on Ray.

* :mod:`~coinfer.serving.collector` — first decodable set, plain Python.
* :mod:`~coinfer.serving.config` — :class:`ServeConfig` and its validator.
* :mod:`~coinfer.serving.wire` / :mod:`~coinfer.serving.channel` — the data plane's frames and connections.
* :mod:`~coinfer.serving.worker` — one model behind a socket, worker-side batching (a Ray actor).
* :mod:`~coinfer.serving.pool` — the control plane: worker processes on Ray.
* :mod:`~coinfer.serving.runtime` — the request path (plan, fan-out, collect, accounting).
* :mod:`~coinfer.serving.admin` — the admin actions on a runtime (injection, kill, restart, state).
* :mod:`~coinfer.serving.app` / :mod:`~coinfer.serving.server` — the HTTP API.
* :mod:`~coinfer.serving.client` — :class:`Client`.
* :mod:`~coinfer.serving.loadgen` — open-loop Poisson load generator.

Importing this package does not import Ray.
"""

from coinfer.serving.collector import CollectError, Collection, CollectTimeout, Plan, collect

__all__ = ["Collection", "CollectError", "CollectTimeout", "Plan", "collect"]
