"""The master's dispatcher: a pure state machine (events in, commands out).

It knows which attempt each worker holds, in order, and nothing else does
I/O here: the master's runner (``master.py``) feeds it what the OS and the
sockets say and executes the commands it returns. Tested without processes
in ``tests/test_dispatch.py``.

Worker slots hold up to ``prefetch`` attempts; a worker runs them in order, so
the first one held is the one running (``since`` is when it started). When a
worker dies, its results still in the socket are drained first; then only
the first held attempt is blamed (``Lost``), and the others, which never
started, are queued again without blame.

Hung workers (the design the heartbeat needs). A heartbeat thread in the
worker is starved when user code holds the GIL in a long C call
(``sum(range(10**10))``), so a silent heartbeat alone would kill healthy
workers. The runner therefore also samples each worker from the kernel
(``/proc/PID/stat``: scheduler state and CPU time), which user code cannot
starve. A worker is declared hung when

* the kernel says it is stopped (``T``/``t``: SIGSTOP, a debugger) at two
  samples ``heartbeat_interval`` apart, or
* it sent no heartbeat *and* used no CPU for ``heartbeat_timeout`` seconds
  (blocked, e.g. deadlocked in native code while holding the GIL).

A worker silent but burning CPU is busy, not hung: the per-task ``timeout``
is the tool for runaway work. If the master itself was suspended (its ticks
stopped), the clocks are reset rather than blaming the workers.

Recycling (``max_tasks_per_child=K``, as ``ProcessPoolExecutor`` has it). A worker
is given at most K attempts in its life, prefetched ones included. When it is given
its K-th, it is *retiring*: it gets no more work, ``Shutdown`` follows its last
attempt in the same message (it runs what it holds in order, then says ``Goodbye``
and exits, which is an orderly ``stopped``, not a loss), and its replacement is
spawned at once, so the pool keeps N workers taking work while the old one
finishes. Nothing is requeued or charged. A retiring worker that dies anyway is
lost like any other (its started attempt is WORKER_LOST, the held ones go back
unblamed), but it is not replaced a second time.

An attempt cancelled while queued here never counts. One cancelled after it was
prefetched counts until the worker withdraws it (it may have started it in the
meantime); a worker given its K-th attempt while it holds such a one takes no
more work but retires only once that answer came (``_settle``): withdrawn, it is
given back and the worker takes another. Only one cancelled after the retirement
(``Shutdown`` sent) is not given back: the worker then runs K - 1.

(Longer than the size guide: the slot states and their transition table, the stimuli
and commands, and the machine, which also carries out the ledger's commands for the
local master; it has no I/O, so splitting it would only spread one machine's rules.)
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, assert_never

from ...core import ledger as L
from ...core.ledger import describe_exit
from ...core.machine import InvariantViolation, Story
from ...errors import InvalidTransition
from ...wire.messages import (
    CancelAttempt,
    Fatal,
    Result,
    RunAttempt,
    Shutdown,
    Unlinked,
    WorkerReport,
)
from .._links import LinkTable

__all__ = [
    "SLOT_TRANSITIONS",
    "Boot",
    "CancelRequest",
    "Close",
    "Cmd",
    "Dispatcher",
    "DrainRequest",
    "GroupFrom",
    "HeartbeatFrom",
    "HelloFrom",
    "InvalidSlotTransition",
    "Kill",
    "PreflightFailedOn",
    "ResultFrom",
    "SendWorker",
    "Slot",
    "SlotState",
    "Spawn",
    "Stimulus",
    "SubmitAttempts",
    "TimePassed",
    "ToClient",
    "WithdrawnBy",
    "WorkerExited",
    "describe_exit",
]

# --------------------------------------------------------------------------- commands


class Spawn(NamedTuple):
    name: str


class SendWorker(NamedTuple):
    name: str
    msgs: list[Any]


class Kill(NamedTuple):
    """SIGKILL the worker and the process groups of programs it started."""

    name: str
    pgids: tuple[int, ...]


class ToClient(NamedTuple):
    msg: Any


Cmd = Spawn | SendWorker | Kill | ToClient

_INF = float("inf")
#: beyond ``prefetch``, a worker holds at most this many seconds of estimated work ...
_BACKLOG = 0.002
#: ... and at most this many attempts (short ones then travel in batches of about half)
_MAX_DEPTH = 64
#: an idle worker takes back attempts held behind one running longer than this
_STEAL_AFTER = 0.05
_MAX_NAMES = 10_000


class SlotState(enum.Enum):
    """A worker process's life as the master sees it.

    ``STARTING`` until it says hello; ``READY`` takes work; ``RETIRING`` takes no more
    (given its last attempt, or drained) and leaves by ``Shutdown`` once it ran what it
    holds; ``STOPPING`` was told to stop (session closed, pre-flight failed); ``LOST``
    died or was killed and was reported; ``DEAD`` is gone for good."""

    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"
    STOPPING = "stopping"
    LOST = "lost"
    DEAD = "dead"

    __hash__ = object.__hash__  # by identity (as core.states.State)


W = SlotState
#: Every allowed (start, finish) pair of a slot; anything else is an InvalidSlotTransition.
SLOT_TRANSITIONS: frozenset[tuple[SlotState, SlotState]] = frozenset(
    {
        (W.STARTING, W.READY),  # hello
        (W.STARTING, W.STOPPING),  # pre-flight failed, or the session closed
        (W.STARTING, W.DEAD),  # exited before its hello (a start failure)
        (W.READY, W.RETIRING),  # given its max_tasks_per_child-th attempt, or drained
        (W.READY, W.STOPPING),  # the session closed
        (W.READY, W.LOST),  # died, hung, or killed for a timeout
        (W.READY, W.DEAD),  # left in order (its Goodbye)
        (W.RETIRING, W.LOST),
        (W.RETIRING, W.DEAD),  # its Goodbye after the last attempt
        (W.STOPPING, W.LOST),  # killed for a timeout while it finishes
        (W.STOPPING, W.DEAD),
        (W.LOST, W.DEAD),  # the exit of a worker we killed
    }
)


class InvalidSlotTransition(InvalidTransition):
    """A worker slot was to make a move :data:`SLOT_TRANSITIONS` forbids: a pilotfish
    bug. ``history`` is the dispatcher's recent stimuli."""

    def __init__(self, key: str, start: str, finish: str, history: list[Any]) -> None:
        lines = "\n".join(f"  {h}" for h in history) or "  (none)"
        RuntimeError.__init__(
            self,
            f"worker slot {key!r}: invalid transition {start} -> {finish}; "
            f"recent stimuli, oldest first:\n{lines}",
        )
        self.failure = None
        self.key, self.start, self.finish, self.history = key, start, finish, history


@dataclasses.dataclass(slots=True)
class Slot:
    """A worker process as the master sees it; what it holds is in the ledger. Its
    ``state`` changes only through the dispatcher (``Dispatcher._move``)."""

    name: str
    spawned: float
    state: SlotState = SlotState.STARTING
    pid: int = 0
    last_hb: float = 0.0
    cpu: float = -1.0
    cpu_at: float = 0.0
    stopped_since: float | None = None
    given: int = 0  # attempts it was given (counted only with max_tasks_per_child)
    backlog: float = 0.0  # estimated seconds of the attempts it holds (known estimates)
    unknown: int = 0  # attempts it holds whose run time nobody can estimate yet


# --------------------------------------------------------------------------- stimuli
# What the master's runner saw, one dataclass each, fed to ``Dispatcher.handle``. Those
# made per task (SubmitAttempts, ResultFrom) are not frozen: cheaper to make (see
# core.workflow).


@dataclasses.dataclass(frozen=True, slots=True)
class Boot:
    """The master starts: spawn the pool."""

    now: float


@dataclasses.dataclass(slots=True)
class SubmitAttempts:
    attempts: Sequence[RunAttempt]
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class DrainRequest:
    """The client drained worker ``name`` (see ``Dispatcher._drain``)."""

    name: str
    why: str
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class CancelRequest:
    """Withdraw attempts not yet started; a started one runs on (its result is fenced)."""

    attempts: tuple[int, ...]
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class HelloFrom:
    name: str
    pid: int
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class PreflightFailedOn:
    name: str
    problems: tuple[str, ...]
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatFrom:
    name: str
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class GroupFrom:
    """A program of ``attempt`` runs on worker ``name`` in process group ``pgid``."""

    name: str
    attempt: int
    pgid: int


@dataclasses.dataclass(slots=True)
class ResultFrom:
    name: str
    result: Result
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class WithdrawnBy:
    """Worker ``name`` gave ``attempt`` back unstarted (it was asked to)."""

    name: str
    attempt: int
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerExited:
    """The OS says the worker process is gone (its socket already drained)."""

    name: str
    returncode: int | None
    stderr_tail: str
    now: float
    goodbye: bool


@dataclasses.dataclass(frozen=True, slots=True)
class TimePassed:
    """Timeouts and hang checks. ``samples``: worker -> (kernel state, CPU seconds)."""

    now: float
    samples: dict[str, tuple[str, float]]
    stderr_tails: dict[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """The session closes: every worker is told to stop."""


Stimulus = (
    Boot
    | SubmitAttempts
    | DrainRequest
    | CancelRequest
    | HelloFrom
    | PreflightFailedOn
    | HeartbeatFrom
    | GroupFrom
    | ResultFrom
    | WithdrawnBy
    | WorkerExited
    | TimePassed
    | Close
)


class _Hooks:
    """The dispatcher's answers to its ledger's commands (:class:`pilotfish.core.ledger.
    Hooks`), as commands for the master's runner."""

    __slots__ = ("d", "now", "out")

    def __init__(self, d: Dispatcher, out: list[Cmd], now: float) -> None:
        self.d, self.out, self.now = d, out, now

    def report(self, msg: L.Started | L.Lost) -> None:
        self.out.append(ToClient(msg))
        if isinstance(msg, L.Lost):
            self.d._unlink(msg.attempt, f"was lost ({msg.category})", self.now, self.out)

    def send(self, items: tuple[Any, ...], resend: bool) -> None:
        # Requeue: never started, back on the queue ahead of others, unblamed (the master's
        # ledger never resends: a lost master is its client's business)
        for a in items:
            self.d._unhold(a.attempt)
        self.d.queue.extendleft(reversed(items))

    def withdraw(self, worker: str, attempt: int) -> None:
        if worker:  # held by a worker: it answers Withdrawn (or Started, too late)
            self.out.append(SendWorker(worker, [CancelAttempt(attempt)]))
        self.d._unlink(attempt, "was withdrawn", self.now, self.out)

    def kill_groups(self, worker: str, pgids: tuple[int, ...]) -> None:
        self.out.append(Kill(worker, pgids))

    def expire(
        self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...], key: str = ""
    ) -> None:
        # the only way to stop a running call is to kill its worker, which is replaced
        d, now = self.d, self.now
        s = d.slots[worker]
        d._unhold(attempt)  # the ledger forgot it: so does the depth count
        what = f"attempt {attempt} of task {key!r}" if key else f"attempt {attempt}"
        why = f"worker {s.name} (pid {s.pid}) was killed: {what} timed out"
        self.out.append(Kill(s.name, pgids + d.pgids(s.name)))
        d._lose(s, now, L.WorkerLost(s.name, why, now, signal="SIGKILL"), self.out)


class Dispatcher:
    """The local master's scheduling: worker slots, the queue and hang detection; what
    each worker holds, and what its loss means, is the shared :class:`~pilotfish.core.
    ledger.Ledger`'s. One entry, :meth:`handle`; ``story`` keeps the last stimuli and
    ``validate()`` checks the invariants (see :mod:`pilotfish.core.machine`)."""

    #: validate after every stimulus (tests; off in production: O(attempts) per step)
    debug = False

    def __init__(
        self,
        workers: int,
        *,
        prefetch: int = 2,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_start_failures: int = 3,
        start_timeout: float = 60.0,
        max_tasks_per_child: int | None = None,
        links: bool = True,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ValueError(f"max_tasks_per_child must be >= 1 or None, got {max_tasks_per_child}")
        self.max_tasks = max_tasks_per_child
        self.n = workers
        self.prefetch = max(1, prefetch)
        self.hb_interval = heartbeat_interval
        self.hb_timeout = heartbeat_timeout
        self.max_start_failures = max_start_failures
        self.start_timeout = start_timeout
        self.slots: dict[str, Slot] = {}
        self.queue: deque[RunAttempt] = deque()
        self._newest = 0  # the highest task order queued so far (see _enqueue)
        self.ledger = L.Ledger()
        self.start_failures = 0
        self.stopping = False
        self.fatal = False
        self._seq = 0
        self._last_tick: float | None = None
        # run-time estimates by task name, and what each held attempt was estimated at
        self._est: dict[str, float] = {}
        self._held_cost: dict[int, tuple[str, str, float]] = {}  # attempt -> worker, name, s
        self._stolen: set[int] = set()  # asked back from a busy worker for an idle one
        self._steal_at: float | None = None
        #: linked attempts waiting for their inputs' values (off the queue and the ledger);
        #: ``linking``: the session links chains (else no value is kept for them)
        self.links = LinkTable()
        self.linking = links
        self.story = Story()

    # ------------------------------------------------------------------ helpers
    def _new_slot(self, now: float) -> Spawn:
        self._seq += 1
        name = f"w{self._seq}"
        self.slots[name] = Slot(name, now, last_hb=now, cpu_at=now)
        return Spawn(name)

    def _move(self, s: Slot, finish: SlotState) -> None:
        """The one way a slot's state changes: by :data:`SLOT_TRANSITIONS`."""
        if (s.state, finish) not in SLOT_TRANSITIONS:
            raise InvalidSlotTransition(s.name, s.state.name, finish.name, self.story.lines())
        s.state = finish

    def pgids(self, name: str) -> tuple[int, ...]:
        """Process groups of programs that worker ``name``'s attempts started."""
        return tuple(g for a in self.ledger.held_by(name) for g in self.ledger.entries[a].groups)

    def _carry_out(self, cmds: list[L.Command], out: list[Cmd], now: float) -> L.Outcome:
        """The ledger's commands, through the one runner (:func:`pilotfish.core.ledger.
        carry_out`: a command nobody handles is a type error, not a silent no-op)."""
        return L.carry_out(cmds, _Hooks(self, out, now))

    # ------------------------------------------------------------------ depth
    def _cost(self, a: RunAttempt) -> float:
        """How long ``a`` is expected to run (seconds); inf if nothing like it ran yet."""
        return self._est.get(a.name, _INF) if a.name else _INF

    def _hold(self, s: Slot, a: RunAttempt) -> None:
        cost = self._cost(a)
        self._held_cost[a.attempt] = (s.name, a.name, cost)
        if cost == _INF:
            s.unknown += 1
        else:
            s.backlog += cost

    def _unhold(self, attempt: int) -> None:
        held = self._held_cost.pop(attempt, None)
        if held is None:
            return
        s = self.slots.get(held[0])
        if s is None:
            return
        if held[2] == _INF:
            s.unknown -= 1
        else:
            s.backlog = max(0.0, s.backlog - held[2])

    def _learn(self, attempt: int, res: Result) -> None:
        """An attempt ran: its run time refines the estimate for its task name."""
        held = self._held_cost.get(attempt)
        if held is None or not held[1]:
            return
        took = max(0.0, res.ended - res.started)
        est = self._est
        old = est.get(held[1])
        if old is None and len(est) >= _MAX_NAMES:
            est.clear()  # a run with countless names: start over rather than grow
        est[held[1]] = took if old is None else (old + took) / 2

    def _open(self, s: Slot) -> bool:
        """Does worker ``s`` take work at all (ready, and not given its last attempt)?"""
        return s.state is W.READY and (self.max_tasks is None or s.given < self.max_tasks)

    def _hungry(self, s: Slot, load: int) -> bool:
        """Does worker ``s`` take work now? Below ``prefetch``, always; beyond it only with
        short attempts of known run time, and (hysteresis, so that attempts travel in
        batches, not one per result) once it is down to half of what it may hold."""
        if load < self.prefetch:
            return True
        return s.unknown == 0 and s.backlog <= _BACKLOG / 2 and load <= _MAX_DEPTH // 2

    def _room(self, s: Slot, load: int, a: RunAttempt) -> bool:
        """May worker ``s``, holding ``load`` attempts, take ``a`` as well?"""
        if load < self.prefetch:
            return True
        if load >= _MAX_DEPTH or s.unknown:
            return False
        cost = self._cost(a)
        return cost != _INF and s.backlog + cost <= _BACKLOG

    def _assign(self, now: float, out: list[Cmd]) -> None:
        if not self.queue:
            self._balance(now, out)
            return
        ledger = self.ledger
        slots = self.slots
        load = {
            s.name: n
            for s in slots.values()
            if self._open(s) and self._hungry(s, n := ledger.count(s.name))
        }
        limit = self.max_tasks
        if not load:
            return
        batches: dict[str, list[Any]] = {}
        while self.queue and load:
            name = min(load, key=load.__getitem__)
            s = slots[name]
            a = self.queue[0]
            if not self._room(s, load[name], a):
                del load[name]  # full: the others may still take it
                continue
            self.queue.popleft()
            e = ledger.entries.get(a.attempt)
            if e is None or e.where != "queued":
                continue  # cancelled while queued
            ledger.handle(L.Hold(name, (a.attempt,)))
            self._hold(s, a)
            load[name] += 1
            batches.setdefault(name, []).append(a)
            if load[name] == 1:
                self._begin(s, now, out)
            if limit is not None:
                s.given += 1
                if s.given >= limit:
                    del load[name]
                    self._retire(s, now, batches[name], out)
        for name, msgs in batches.items():
            out.append(SendWorker(name, msgs))
        if not self.queue:
            self._balance(now, out)

    def _balance(self, now: float, out: list[Cmd]) -> None:
        """Nothing queued, a worker idle, and another holding attempts it has not started
        behind one that runs longer than expected (``_STEAL_AFTER``): ask those back
        (``CancelAttempt``; the worker withdraws what it has not started, and
        ``on_withdrawn`` queues them again unblamed) so the idle worker takes them. A
        worker holds more than ``prefetch`` only while attempts are short, so this is
        the exception that keeps a long one from holding up the ones behind it."""
        self._steal_at = None
        ledger = self.ledger
        ready = [s for s in self.slots.values() if s.state is W.READY]
        if not any(ledger.count(s.name) == 0 and self._open(s) for s in ready):
            return
        for s in ready:
            held = ledger.held_by(s.name)
            if len(held) < 2:
                continue
            first = ledger.entries[held[0]]
            if first.started is None:
                continue
            due = first.started + _STEAL_AFTER
            if now < due:
                self._steal_at = due if self._steal_at is None else min(self._steal_at, due)
                continue
            for aid in held[1:]:
                e = ledger.entries[aid]
                if e.where == "held" and not e.cancelled and aid not in self._stolen:
                    self._stolen.add(aid)
                    out.append(SendWorker(s.name, [CancelAttempt(aid)]))

    def _retire(self, s: Slot, now: float, batch: list[Any], out: list[Cmd]) -> None:
        """``s`` was given its last attempt: ``Shutdown`` goes after it (in the same
        message if there is one: ``batch``), and a fresh worker takes its place in the
        pool now. Not yet if an attempt it holds was cancelled and may still be
        withdrawn (given back): the answer comes first (see ``_settle``)."""
        ledger = self.ledger
        if any(ledger.entries[a].cancelled for a in ledger.held_by(s.name)):
            return
        self._move(s, W.RETIRING)
        why = f"it was given max_tasks_per_child={self.max_tasks} attempts"
        batch.append(Shutdown(why))
        if not self.stopping and not self.fatal:
            self._replace(s, now, f" ({why})", out)

    def _settle(self, s: Slot, now: float, out: list[Cmd]) -> None:
        """A worker given its last attempts, retirement pending on a cancelled one: that
        one ended (withdrawn: given back, so the worker takes more; or it ran anyway)."""
        limit = self.max_tasks
        if limit is not None and s.state is W.READY and s.given >= limit:
            batch: list[Any] = []
            self._retire(s, now, batch, out)
            if batch:
                out.append(SendWorker(s.name, batch))

    def _replace(self, s: Slot, now: float, why: str, out: list[Cmd]) -> None:
        new = self._new_slot(now)
        out.append(new)
        out.append(
            ToClient(WorkerReport("replaced", new.name, 0, now, message=f"replaces {s.name}{why}"))
        )

    def _begin(self, s: Slot, now: float, out: list[Cmd]) -> None:
        """The worker runs what it holds in order: its first held attempt starts now (the
        master sent it to this worker alone, which is the local start fence)."""
        first = self.ledger.first(s.name)
        if (
            first is not None
            and not self.ledger.entries[first].cancelled
            and first not in self._stolen  # asked back: withdrawn, or started after all
        ):
            self._carry_out(self.ledger.handle(L.Start(s.name, first, s.pid, "", now)), out, now)

    # ------------------------------------------------------------------ the entry
    def handle(self, ev: Stimulus) -> list[Cmd]:
        """The one entry: apply what the runner saw, return what it is to do."""
        self.story.append(ev)
        out: list[Cmd] = []
        match ev:  # the most frequent first
            case ResultFrom():
                self._result(ev.name, ev.result, ev.now, out)
            case SubmitAttempts():
                self._submit(ev.attempts, ev.now, out)
            case HeartbeatFrom():
                s = self.slots.get(ev.name)
                if s is not None:
                    s.last_hb = ev.now
            case TimePassed():
                self._tick(ev.now, ev.samples, ev.stderr_tails, out)
            case CancelRequest():
                rest = tuple(a for a in ev.attempts if not self.links.cancel(a))
                self._carry_out(self.ledger.handle(L.Revoke(rest)), out, ev.now)
            case WithdrawnBy():
                self._withdrawn(ev.name, ev.attempt, ev.now, out)
            case GroupFrom():
                self.ledger.handle(L.Group(ev.name, ev.attempt, ev.pgid))
            case HelloFrom():
                self._hello(ev.name, ev.pid, ev.now, out)
            case WorkerExited():
                self._exit(ev.name, ev.returncode, ev.stderr_tail, ev.now, ev.goodbye, out)
            case DrainRequest():
                self._drain(ev.name, ev.why, ev.now, out)
            case PreflightFailedOn():
                self._preflight_failed(ev.name, ev.problems, ev.now, out)
            case Boot():
                out.extend(self._new_slot(ev.now) for _ in range(self.n))
            case Close():
                self._close(out)
            case _:
                assert_never(ev)
        if self.debug:
            self.validate()
        return out

    # ------------------------------------------------------------------ invariants
    def validate(self) -> None:
        """Check every invariant (the ledger's too); raise :class:`InvariantViolation`
        naming the first one broken, with the recent stimuli. For tests (``debug``)."""
        self.ledger.validate()
        for problem in self._problems():
            raise InvariantViolation("local dispatcher", problem, self.story)

    def _problems(self) -> Iterator[str]:
        ledger = self.ledger
        depth = max(self.prefetch, _MAX_DEPTH)
        for name, s in self.slots.items():
            if not isinstance(s.state, SlotState) or s.name != name:
                yield f"slot {name} is filed as {s.name!r} in state {s.state!r}"
                continue
            held = ledger.held_by(name)
            if held and s.state not in (W.READY, W.RETIRING, W.STOPPING):
                yield f"worker {name} is {s.state.name} but holds attempts {held}"
            if len(held) > depth:
                yield f"worker {name} holds {len(held)} attempts (at most {depth})"
            if self.max_tasks is not None and s.given > self.max_tasks:
                yield f"worker {name} was given {s.given} attempts (max {self.max_tasks})"
            costs = [c for w, _, c in self._held_cost.values() if w == name]
            unknown = sum(1 for c in costs if c == _INF)
            if s.unknown != unknown:
                yield f"worker {name} counts {s.unknown} attempts of unknown cost, not {unknown}"
            if abs(s.backlog - sum(c for c in costs if c != _INF)) > 1e-6:
                yield f"worker {name}'s backlog {s.backlog} is not the sum of its held costs"
            for aid in held[1:]:
                if ledger.entries[aid].where == "started":
                    yield f"worker {name} started attempt {aid}, which is not its first"
        for aid, (w, _, _) in self._held_cost.items():
            e = ledger.entries.get(aid)
            if e is None or e.worker != w:
                yield f"attempt {aid} is costed to {w} but held by {e.worker if e else 'nobody'}"
        for aid in self._stolen:
            e = ledger.entries.get(aid)
            if e is None or e.where != "held":
                yield f"attempt {aid} was asked back but is {e.where if e else 'gone'}"
        seen: set[int] = set()
        for a in self.queue:
            e = ledger.entries.get(a.attempt)
            if e is not None and e.where != "queued":
                yield f"attempt {a.attempt} is on the queue but {e.where} by {e.worker}"
            if e is not None and a.attempt in seen:
                yield f"attempt {a.attempt} is on the queue twice"
            seen.add(a.attempt)
        for aid, e in ledger.entries.items():
            if e.where == "queued" and aid not in seen:
                yield f"attempt {aid} is queued in the ledger but not on the queue (a hang)"
        for aid in self.links.waiting:
            if aid in ledger.entries:
                yield f"linked attempt {aid} waits for its inputs but is in the ledger too"
        yield from self.links.problems(ledger.entries.__contains__)

    # The local master's runner (master.py) still calls these; each is handle() of one
    # stimulus. To go once the runner builds the stimuli itself.
    # ------------------------------------------------------------------ events
    def _submit(self, batch: Sequence[RunAttempt], now: float, out: list[Cmd]) -> None:
        if any(a.links for a in batch):
            self._link(batch, now, out)
        else:
            self._queue(batch)
        self._assign(now, out)

    def _queue(self, batch: Sequence[RunAttempt]) -> None:
        self.ledger.handle(L.Enqueue(tuple((a.attempt, a.key, a, a.timeout) for a in batch)))
        for a in batch:
            self._enqueue(a)

    def _link(self, batch: Sequence[RunAttempt], now: float, out: list[Cmd]) -> None:
        """Queue the plain attempts of ``batch``; the linked ones (``RunAttempt.links``)
        wait for their inputs' values here (:class:`.._links.LinkTable`) and are queued
        once those are in place; one whose input is not in flight here is ``Unlinked``."""
        self._queue([a for a in batch if not a.links])  # the inputs may be among them
        entries = self.ledger.entries
        for a in batch:
            if a.links:
                got = self.links.take(a, entries.__contains__)
                if isinstance(got, str):
                    out.append(ToClient(Unlinked(a.attempt, f"task {a.key!r}: {got}", now)))
                elif got is not None:  # its inputs succeeded here already
                    self._queue([got])

    def _unlink(self, attempt: int, why: str, now: float, out: list[Cmd]) -> None:
        """Input ``attempt`` ended without a value: what waited for it is ``Unlinked``."""
        if not self.links.waiting:
            return
        for aid, said in self.links.ended(attempt, why):
            out.append(ToClient(Unlinked(aid, said, now)))

    def _enqueue(self, a: RunAttempt) -> None:
        """Queue ``a`` by its task's submission order: a retry (or a resend) of a task goes
        before every task submitted after it, not behind the whole queue, so a task lost
        with its worker runs again as soon as a worker is free (as Dask orders by
        submission). Fresh tasks arrive in order and are appended."""
        q, order = self.queue, a.order
        if not order or order >= self._newest or not q:
            q.append(a)
            self._newest = max(self._newest, order)
            return
        for i, b in enumerate(q):
            if b.order > order:
                q.insert(i, a)
                return
        q.append(a)

    def _drain(self, name: str, why: str, now: float, out: list[Cmd]) -> None:
        """The client drained worker ``name``: it is given nothing more, runs what it
        already holds (its failures there are not charged to their tasks, and nothing it
        was sent runs twice), then leaves by its orderly ``Shutdown``; a fresh worker
        takes its place now (as for ``max_tasks_per_child``)."""
        s = self.slots.get(name)
        if s is None or s.state is not W.READY:
            return
        self._move(s, W.RETIRING)
        out.append(SendWorker(name, [Shutdown(f"drained: {why}")]))
        if not self.stopping and not self.fatal:
            self._replace(s, now, f" (drained: {why})", out)
        self._assign(now, out)

    def _hello(self, name: str, pid: int, now: float, out: list[Cmd]) -> None:
        s = self.slots[name]
        if s.state is not W.STARTING:
            return
        self._move(s, W.READY)
        s.pid, s.last_hb, s.cpu_at = pid, now, now
        self.start_failures = 0
        out.append(ToClient(WorkerReport("started", name, pid, now)))
        self._assign(now, out)

    def _preflight_failed(
        self, name: str, problems: tuple[str, ...], now: float, out: list[Cmd]
    ) -> None:
        """The worker's environment cannot run anything: fail everything, clearly, at once
        (all local workers share one environment, so starting more would not help)."""
        s = self.slots[name]
        self._move(s, W.STOPPING)
        self.fatal = True
        lines = "\n".join(f"  - {p}" for p in problems)
        out.append(
            ToClient(WorkerReport("start_failed", name, s.pid, now, message="pre-flight failed"))
        )
        out.append(
            ToClient(Fatal("environment", f"pre-flight checks failed on worker {name}:\n{lines}"))
        )

    def _finish(self, s: Slot, attempt: int, now: float, out: list[Cmd]) -> bool:
        first = self.ledger.first(s.name) == attempt
        if not isinstance(self.ledger.handle(L.Finish(s.name, attempt))[0], L.Accept):
            return False
        self._unhold(attempt)
        self._stolen.discard(attempt)
        if first:
            self._begin(s, now, out)
        return True

    def _result(self, name: str, res: Result, now: float, out: list[Cmd]) -> None:
        s = self.slots[name]
        s.last_hb = now
        self._learn(res.attempt, res)
        e = self.ledger.entries.get(res.attempt)
        if e is not None and e.where == "held" and e.worker == name and not e.cancelled:
            # asked back too late: the worker had started it (it runs what it holds in
            # order), so it started when it says, before its result
            st = L.Start(name, res.attempt, res.pid, res.host, res.started)
            self._carry_out(self.ledger.handle(st), out, now)
        head = len(out)  # the result goes before what its end starts (after its Started)
        accepted = self._finish(s, res.attempt, now, out)
        if accepted or s.state is W.LOST:
            # a result from a worker already declared lost is still forwarded: the
            # client's fencing decides (it was reported lost, so it will be dropped)
            out.insert(head, ToClient(res))
        if accepted and self.linking:  # what waited for its value goes on the queue
            if res.ok:  # (and the value is kept a while, for a link that comes late)
                ready = self.links.succeeded(res.attempt, res.data)
                if ready:
                    self._queue(ready)
            else:
                self._unlink(res.attempt, "failed", now, out)
        if self.max_tasks is not None:
            self._settle(s, now, out)
        self._assign(now, out)

    def _withdrawn(self, name: str, attempt: int, now: float, out: list[Cmd]) -> None:
        s = self.slots[name]
        if attempt in self._stolen:  # asked back by _balance: queued again, unblamed
            self._stolen.discard(attempt)
            e = self.ledger.entries.get(attempt)
            if e is not None and e.worker == name and e.where == "held" and not e.cancelled:
                first = self.ledger.first(name) == attempt
                self._carry_out(self.ledger.handle(L.Bounce(attempt, "rebalanced", now)), out, now)
                if first:  # the worker goes on with the next one it holds
                    self._begin(s, now, out)
                if self.max_tasks is not None and s.state is W.READY:
                    s.given -= 1
                    self._settle(s, now, out)
                self._assign(now, out)
                return
        if self._finish(s, attempt, now, out) and self.max_tasks is not None:
            if s.state is W.READY:
                s.given -= 1  # it never ran: it does not count (a retiring worker stays retired)
            self._settle(s, now, out)
        self._assign(now, out)

    def _exit(
        self,
        name: str,
        returncode: int | None,
        stderr_tail: str,
        now: float,
        goodbye: bool,
        out: list[Cmd],
    ) -> None:
        """The OS says the worker process is gone (its socket already drained)."""
        s = self.slots[name]
        if s.state is W.LOST:  # we killed it and already reported it
            self._move(s, W.DEAD)
            return
        if goodbye or s.state is W.STOPPING:
            why = (
                f"retired: it was given its max_tasks_per_child={self.max_tasks} attempts"
                if s.state is W.RETIRING
                else ""
            )
            self._move(s, W.DEAD)
            self.ledger.handle(L.WorkerLeft(name))
            out.append(ToClient(WorkerReport("stopped", name, s.pid, now, returncode, message=why)))
            return
        how, sig = describe_exit(returncode)
        if s.state is W.STARTING:
            self._move(s, W.DEAD)
            self.start_failures += 1
            msg = (
                f"worker {name} {how} before it finished starting "
                f"(start failure {self.start_failures} of {self.max_start_failures})"
            )
            out.append(
                ToClient(WorkerReport("start_failed", name, s.pid, now, returncode, sig, (), msg))
            )
            if self.start_failures >= self.max_start_failures:
                self.fatal = True
                out.append(
                    ToClient(
                        Fatal(
                            "environment",
                            f"no worker could start: {self.start_failures} consecutive "
                            f"start-up failures; the last one {how}. Its stderr:\n"
                            f"{stderr_tail or '(empty)'}",
                        )
                    )
                )
                return
            if not self.stopping:
                out.append(self._new_slot(now))
            return
        self._lose(
            s,
            now,
            L.WorkerLost(
                name, f"worker {name} (pid {s.pid}) {how}", now, returncode, sig, stderr_tail
            ),
            out,
        )

    def _lose(self, s: Slot, now: float, ev: L.WorkerLost, out: list[Cmd]) -> None:
        """The ledger reports what the worker was running and requeues the rest unblamed."""
        running = tuple(self.ledger.started_on(s.name))
        retiring = s.state is W.RETIRING  # its replacement is already there
        for aid in self.ledger.held_by(s.name):
            self._unhold(aid)
            self._stolen.discard(aid)
        self._move(s, W.LOST)
        out.append(
            ToClient(
                WorkerReport("lost", s.name, s.pid, now, ev.returncode, ev.signal, running, ev.why)
            )
        )
        self._carry_out(self.ledger.handle(ev), out, now)
        if not self.stopping and not self.fatal and not retiring:
            self._replace(s, now, "", out)
        self._assign(now, out)

    # ------------------------------------------------------------------ time
    def next_deadline(self) -> float | None:
        d = self.ledger.next_deadline()
        if self._steal_at is not None:
            return self._steal_at if d is None else min(d, self._steal_at)
        return d

    def _tick(
        self,
        now: float,
        samples: dict[str, tuple[str, float]],
        stderr_tails: dict[str, str],
        out: list[Cmd],
    ) -> None:
        """Timeouts and hang checks. ``samples``: worker -> (kernel state, CPU seconds)."""
        if self._last_tick is not None and now - self._last_tick > 3 * self.hb_interval + 1:
            for s in self.slots.values():  # we were suspended ourselves: nobody is to blame
                s.last_hb, s.cpu_at, s.stopped_since = now, now, None
        self._last_tick = now
        if self._steal_at is not None and now >= self._steal_at:
            self._balance(now, out)
        # timeouts: the ledger reports the attempt; the only way to stop a running call is
        # to kill its worker, which is then replaced (what else it held goes back unblamed)
        self._carry_out(
            self.ledger.handle(
                L.TimePassed(now, "pilotfish stopped it by killing the worker, which is replaced")
            ),
            out,
            now,
        )
        for s in list(self.slots.values()):
            if s.state is W.STARTING and s.pid and now - s.spawned > self.start_timeout:
                # hung while starting (an import stuck on a dead filesystem, say): kill it;
                # its exit is then counted as a start failure, so nothing waits forever
                out.append(Kill(s.name, ()))
                s.spawned = now  # one kill per timeout
                continue
            if s.state is not W.READY and s.state is not W.RETIRING:
                continue
            sample = samples.get(s.name)
            if sample is None:
                continue
            st, cpu = sample
            if st in ("T", "t"):
                if s.stopped_since is None:
                    s.stopped_since = now
                elif now - s.stopped_since >= self.hb_interval:
                    self._hung(
                        s,
                        now,
                        f"is stopped (kernel state {st!r}: SIGSTOP or a "
                        f"debugger) for {now - s.stopped_since:.1f} s",
                        stderr_tails,
                        out,
                    )
                    continue
            else:
                s.stopped_since = None
            if cpu > s.cpu:
                s.cpu, s.cpu_at = cpu, now
            silent = now - s.last_hb
            if silent > self.hb_timeout and now - s.cpu_at > self.hb_timeout:
                self._hung(
                    s,
                    now,
                    f"sent no heartbeat and used no CPU for {silent:.1f} s "
                    f"(heartbeat_timeout={self.hb_timeout:g})",
                    stderr_tails,
                    out,
                )

    def _hung(self, s: Slot, now: float, why: str, tails: dict[str, str], out: list[Cmd]) -> None:
        out.append(Kill(s.name, self.pgids(s.name)))
        why = f"worker {s.name} (pid {s.pid}) {why}; declared hung and killed"
        self._lose(
            s, now, L.WorkerLost(s.name, why, now, None, "SIGKILL", tails.get(s.name, "")), out
        )

    def _close(self, out: list[Cmd]) -> None:
        self.stopping = True
        for s in self.slots.values():
            if s.state is W.STARTING or s.state is W.READY:
                self._move(s, W.STOPPING)
                out.append(SendWorker(s.name, [Shutdown("session closed")]))
