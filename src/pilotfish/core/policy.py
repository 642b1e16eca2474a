"""Retry, backoff, poison and silence rules as plain data (no clock, no randomness inside)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: ``base * factor**(n-1)``, capped at ``maximum``.

    ``jitter`` is the fraction of the delay drawn at random: with ``jitter=0.5``
    the delay lies in ``[0.5 d, d]`` ("equal jitter"), which spreads retries of
    many tasks that failed together (a lost node) without ever retrying at once.
    """

    base: float = 0.05
    factor: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base < 0 or self.factor < 1 or self.maximum < 0 or not 0 <= self.jitter <= 1:
            raise ValueError(
                f"invalid Backoff {self}: need base >= 0, factor >= 1, maximum >= 0, "
                "0 <= jitter <= 1"
            )

    def delay(self, failures: int, rand: float) -> float:
        """Delay before the retry following the ``failures``-th failed attempt.

        ``rand`` in ``[0, 1)`` is injected by the caller (a seeded RNG in tests).
        """
        if self.base == 0:
            return 0.0
        try:
            grown = self.base * self.factor ** max(0, failures - 1)
        except OverflowError:  # thousands of retries: the cap applies
            grown = math.inf
        d = min(self.maximum, grown)
        return d * (1.0 - self.jitter * rand)


NO_BACKOFF = Backoff(base=0.0, jitter=0.0)


@dataclasses.dataclass(slots=True)
class Silence:
    """When to stop waiting for a backend that says nothing (times passed in, any clock).

    A backend that sent ``Alive`` once (``armed``) has promised to say something at
    least every heartbeat interval while it works; after ``limit`` seconds without a
    word it is taken for gone. A backend that never sent ``Alive`` is never timed out
    here: it reports its own losses.
    """

    limit: float
    armed: bool = False
    last: float = 0.0

    def heard(self, now: float, alive: bool = False) -> None:
        """The backend delivered events at ``now`` (``alive``: one was an ``Alive``)."""
        self.last = now
        self.armed = self.armed or alive

    def silent_for(self, now: float) -> float | None:
        """Seconds of silence when past the limit (and armed), else None."""
        if self.armed and now - self.last > self.limit:
            return now - self.last
        return None
