"""Erasure-coded serving on Ray.

* :mod:`~coinfer.serving.collector` — first decodable set, plain Python.
* :mod:`~coinfer.serving.worker` — one model as a Ray Serve deployment with ``@serve.batch``.
* :mod:`~coinfer.serving.runtime` — Ray, the workers, the modes, admin actions.
* :mod:`~coinfer.serving.app` / :mod:`~coinfer.serving.server` — the HTTP API.
* :mod:`~coinfer.serving.client` — :class:`Client`.
* :mod:`~coinfer.serving.loadgen` — open-loop Poisson load generator.

Importing this package does not import Ray.
"""

from coinfer.serving.collector import CollectError, Collection, CollectTimeout, Plan, collect

__all__ = ["Collection", "CollectError", "CollectTimeout", "Plan", "collect"]
