"""Stragglers and failures injected on purpose, for experiments.

An :class:`Injection` describes, for one worker, a delay model and a failure
probability. The frontend keeps one per worker and sends it with each request;
the worker samples its delay and failure from it (so the straggling happens in
the worker's process, after its inference), and the same settings reach every
replica of a worker.

Delay models (milliseconds):

* ``none``
* ``constant``: always ``ms``.
* ``exponential``: exponential with mean ``ms``.
* ``heavy``: with probability ``p`` a Pareto delay ``ms * (U ** (-1 / alpha))``
  (heavy-tailed, minimum ``ms``), otherwise none.

A worker may also answer *wrongly*, with well-formed outputs (``corrupt``):
``random`` (random probabilities) or ``other`` (the answer of another data
worker to the same input: worker j's of data row j + 1, a parity's of row 0).
The frontend applies it to the answer as it arrives.

A spec string, as used by the ``--delay`` flag: ``constant:20``,
``exponential:5``, ``heavy:50:0.05`` (``ms:p``, ``alpha`` 1.5) or
``heavy:50:0.05:2.0`` (``ms:p:alpha``).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from coinfer.errors import CoinferError

__all__ = ["Injection", "InjectedFailure", "parse_delay", "DELAY_KINDS", "CORRUPT_KINDS"]

DELAY_KINDS = ("none", "constant", "exponential", "heavy")
CORRUPT_KINDS = ("none", "random", "other")


class InjectedFailure(RuntimeError):
    """A failure injected on purpose (``fail_prob``)."""


@dataclass(frozen=True)
class Injection:
    """Delay model and failure probability of one worker.

    Attributes:
        kind: ``none``, ``constant``, ``exponential`` or ``heavy``.
        ms: the delay scale in milliseconds (see the module docstring).
        p: probability of a heavy-tailed delay (``heavy`` only).
        alpha: Pareto shape of the heavy tail (smaller: heavier).
        fail_prob: probability that a request to this worker fails.
        corrupt: ``none``, ``random`` or ``other``: well-formed wrong answers.
    """

    kind: str = "none"
    ms: float = 0.0
    p: float = 0.0
    alpha: float = 1.5
    fail_prob: float = 0.0
    corrupt: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in DELAY_KINDS:
            raise CoinferError(f"delay kind must be one of {list(DELAY_KINDS)}, got {self.kind!r}")
        if not self.ms >= 0:
            raise CoinferError(f"delay ms must be >= 0, got {self.ms!r}")
        if not 0 <= self.p <= 1:
            raise CoinferError(f"delay probability p must be in [0, 1], got {self.p!r}")
        if not self.alpha > 0:
            raise CoinferError(f"Pareto alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.fail_prob <= 1:
            raise CoinferError(f"fail_prob must be in [0, 1], got {self.fail_prob!r}")
        if self.corrupt not in CORRUPT_KINDS:
            raise CoinferError(f"corrupt must be one of {list(CORRUPT_KINDS)}, got {self.corrupt!r}")

    @property
    def active(self) -> bool:
        return (self.kind != "none" and self.ms > 0) or self.fail_prob > 0 or self.corrupt != "none"

    def sample_delay_s(self, rng: random.Random) -> float:
        """One delay in seconds."""
        if self.kind == "constant":
            return self.ms / 1000.0
        if self.kind == "exponential":
            return rng.expovariate(1.0) * self.ms / 1000.0
        if self.kind == "heavy" and rng.random() < self.p:
            u = 1.0 - rng.random()  # (0, 1]
            return self.ms * u ** (-1.0 / self.alpha) / 1000.0
        return 0.0

    def sample_failure(self, rng: random.Random) -> bool:
        return self.fail_prob > 0 and rng.random() < self.fail_prob

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Injection:
        unknown = set(d) - {"kind", "ms", "p", "alpha", "fail_prob", "corrupt"}
        if unknown:
            raise CoinferError(
                f"unknown injection fields {sorted(unknown)}; expected kind, ms, p, alpha, fail_prob, corrupt"
            )
        try:
            return cls(**{k: (str(v) if k in ("kind", "corrupt") else float(v)) for k, v in d.items()})
        except (TypeError, ValueError) as exc:
            raise CoinferError(f"invalid injection {d}: {exc}") from None


def parse_delay(spec: str, fail_prob: float = 0.0) -> Injection:
    """Parse ``kind[:ms[:p[:alpha]]]`` (see the module docstring)."""
    parts = spec.strip().split(":")
    kind = parts[0]
    if kind not in DELAY_KINDS:
        raise CoinferError(f"delay spec {spec!r}: kind must be one of {list(DELAY_KINDS)}")
    try:
        nums = [float(p) for p in parts[1:]]
    except ValueError:
        raise CoinferError(
            f"delay spec {spec!r}: expected numbers after the kind, e.g. heavy:50:0.05"
        ) from None
    need = {"none": 0, "constant": 1, "exponential": 1, "heavy": 2}[kind]
    if len(nums) < need or len(nums) > (3 if kind == "heavy" else need):
        raise CoinferError(
            f"delay spec {spec!r}: {kind} takes "
            + {"none": "no numbers", "constant": "ms", "exponential": "mean ms", "heavy": "ms:p[:alpha]"}[
                kind
            ]
        )
    kw: dict[str, Any] = {"kind": kind, "fail_prob": fail_prob}
    if nums:
        kw["ms"] = nums[0]
    if kind == "heavy":
        kw["p"] = nums[1]
        if len(nums) > 2:
            kw["alpha"] = nums[2]
    return Injection(**kw)
