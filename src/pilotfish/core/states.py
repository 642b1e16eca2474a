"""Task states and the explicit table of allowed transitions."""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where a task is in its life.

    ``PENDING`` waits for inputs; ``READY`` may be dispatched; ``RUNNING`` has
    one attempt dispatched to the backend; ``RETRYING`` waits out a backoff
    before going back to ``READY``. ``DONE``, ``FAILED`` and ``CANCELLED`` are
    final.
    """

    PENDING = "pending"
    READY = "ready"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    # members are singletons: hash by identity (in C), not Enum's hash of the name in
    # Python; the core hashes states several times per task (counts, transition table)
    __hash__ = object.__hash__

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({State.DONE, State.FAILED, State.CANCELLED})

S = State
#: Every allowed (start, finish) pair; anything else is an InvalidTransition.
TRANSITIONS: frozenset[tuple[State, State]] = frozenset(
    {
        (S.PENDING, S.READY),
        (S.PENDING, S.FAILED),  # an input failed, or the runtime is gone
        (S.PENDING, S.CANCELLED),
        (S.PENDING, S.DONE),  # resumed from the journal
        (S.READY, S.RUNNING),
        (S.READY, S.FAILED),
        (S.READY, S.CANCELLED),
        (S.READY, S.DONE),  # resumed from the journal
        (S.RUNNING, S.DONE),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.RETRYING),
        (S.RUNNING, S.CANCELLED),  # cancelled while queued at the backend, not yet started
        (S.RUNNING, S.PENDING),  # a linked attempt dropped: its input's attempt did not succeed
        (S.RETRYING, S.READY),
        (S.RETRYING, S.FAILED),
        (S.RETRYING, S.CANCELLED),
    }
)
