"""The core's vocabulary: the events :class:`.workflow.Workflow` takes and the commands it
returns (``Workflow.handle(event) -> list[Command]``), and :class:`Settled`, the part of a
``Submit`` that says which inputs a task takes settled. Plain records, no behaviour: the
rules that connect them live in :mod:`.workflow`, which re-exports every name here.
"""

from __future__ import annotations

import dataclasses

from ..errors import Category, FailureRecord
from .states import State

__all__ = [
    "Abort",
    "AttemptStarted",
    "Cancel",
    "CancelAttempt",
    "Cancelled",
    "Command",
    "Dispatch",
    "Drained",
    "Dropped",
    "Event",
    "FailOverride",
    "Failed",
    "Reject",
    "Resolve",
    "Restore",
    "RetryOverride",
    "Settled",
    "Submit",
    "Succeeded",
    "TimePassed",
    "Transition",
    "Unlinked",
    "Wake",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Settled:
    """The inputs a task takes *settled*: it runs once each of them has finished, however
    it ended, and gets a value or a failure for each. ``soft``: the inputs whose failure
    or cancellation does not fail it (they appear only inside settled groups); ``groups``:
    each group's inputs and how many of them must be DONE (``at_least``); fewer, and the
    task fails with DEPENDENCY_FAILED naming the first failure's root."""

    soft: frozenset[int]
    groups: tuple[tuple[tuple[int, ...], int], ...]


# --------------------------------------------------------------------------- events
# Events and commands are slotted dataclasses. Those made for every task (Submit,
# AttemptStarted, Succeeded, Failed; Dispatch, Transition, Resolve) are not frozen: a
# frozen dataclass's __init__ sets each field through object.__setattr__, which made the
# core's submit twice as slow (11.3 -> 5.9 us). Nobody mutates them.


@dataclasses.dataclass(slots=True)  # not frozen: made per task (see below)
class Submit:
    """A new task; ``deps`` are tids of tasks already submitted. ``settled``: the groups
    of inputs it takes settled (``pilotfish.settled``), or None (see :class:`Settled`)."""

    tid: int
    key: str
    deps: tuple[int, ...]
    retries: int
    now: float
    settled: Settled | None = None
    #: how many timed-out attempts are retried (within ``retries``); None: no own limit
    timeout_retries: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Restore:
    """A task found DONE in the journal (resume): it becomes DONE without running."""

    tid: int
    key: str
    now: float


@dataclasses.dataclass(slots=True)  # not frozen: made per task (see below)
class AttemptStarted:
    """The backend reported the attempt started on a worker (the backend's ``Started``)."""

    attempt: int
    now: float
    worker: str | None = None
    host: str | None = None
    pid: int | None = None


@dataclasses.dataclass(slots=True)  # not frozen: made per task (see below)
class Succeeded:
    attempt: int
    now: float
    worker: str | None = None
    host: str | None = None
    pid: int | None = None
    note: str | None = None  # the attempt record's note (what it resumed from)


@dataclasses.dataclass(frozen=True, slots=True)
class RetryOverride:
    """The failure handler asked for a retry (after ``delay`` s), maybe with a new budget."""

    delay: float = 0.0
    retries: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class FailOverride:
    """The failure handler asked to stop; ``failure`` replaces the attempt's if given."""

    failure: FailureRecord | None = None


@dataclasses.dataclass(slots=True)  # not frozen: made per task (see below)
class Failed:
    """An attempt failed. ``retry_requested``: a USER_ERROR matched the task's ``retry_on``
    or a COMMAND_FAILED exit code is in ``retry_exit_codes``."""

    attempt: int
    failure: FailureRecord
    now: float
    retry_requested: bool = False
    override: RetryOverride | FailOverride | None = None
    note: str | None = None
    #: why the failure is not the attempt's doing (its backend lost it: a broken link):
    #: retried without charge (at most FREE_RETRIES such retries per task)
    unblamed: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TimePassed:
    """Time has passed: tasks whose backoff ended become READY."""

    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel a task if it has not started running (concurrent.futures semantics)."""

    tid: int
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class Abort:
    """The runtime is gone for good: every task not final fails with ``failure``'s category."""

    category: Category
    message: str
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class Unlinked:
    """The backend could not run a linked attempt: an input attempt it was linked to is
    not there to take the value from (it ended, was lost or cancelled, or its value was
    lost with its worker). Nothing ran; the task waits for its inputs to be DONE."""

    attempt: int
    reason: str
    now: float


Event = (
    Submit | Restore | AttemptStarted | Succeeded | Failed | TimePassed | Cancel | Abort | Unlinked
)

# --------------------------------------------------------------------------- commands


@dataclasses.dataclass(slots=True)  # not frozen: made per task (see below)
class Dispatch:
    """Run attempt ``attempt`` (number ``number``) of task ``tid``. ``resume``: the
    (attempt id, number) of the task's earlier attempt that was lost, timed out or asked
    for a retry, whose sandbox files (``resume_files``) this attempt may start from."""

    tid: int
    attempt: int
    number: int
    resume: tuple[int, int] | None = None
    #: the workers this task's earlier attempts were lost or timed out on: a backend that
    #: can choose sends the attempt elsewhere while another worker is there
    avoid: tuple[str, ...] = ()
    #: ``(input tid, input attempt id)`` of the inputs not DONE yet, whose values the
    #: backend passes from those attempts to this one (``Workflow.links``)
    links: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class CancelAttempt:
    """Withdraw a dispatched attempt the backend has not started yet."""

    attempt: int


@dataclasses.dataclass(slots=True)  # not frozen: made per task (see below)
class Transition:
    tid: int
    key: str
    start: State
    finish: State
    now: float
    attempt: int | None = None


@dataclasses.dataclass(slots=True)  # not frozen: made per task (see below)
class Resolve:
    """The task is DONE with the value of ``attempt`` (None when restored)."""

    tid: int
    attempt: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Reject:
    """The task FAILED for good with ``failure``."""

    tid: int
    failure: FailureRecord


@dataclasses.dataclass(frozen=True, slots=True)
class Cancelled:
    tid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Dropped:
    """An event about a superseded or unknown attempt was ignored (fencing)."""

    attempt: int
    reason: str
    event: str


@dataclasses.dataclass(frozen=True, slots=True)
class Wake:
    """Deliver a ``TimePassed`` at time ``at`` (a backoff ends then)."""

    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class Drained:
    """A worker or host is drained (see :mod:`.drain`): send it no new attempts; the
    session tells the backend (``backend.drain``), journals it and emits ``HostDrained``.
    ``keys`` are the tasks whose failures showed it; ``attempts`` were not charged."""

    kind: str  # "worker" | "host"
    name: str
    host: str | None
    reason: str
    keys: tuple[str, ...]
    attempts: tuple[int, ...]
    now: float


Command = (
    Dispatch | CancelAttempt | Transition | Resolve | Reject | Cancelled | Dropped | Wake | Drained
)
