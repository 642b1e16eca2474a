"""The workflow state machine: ``Workflow.handle(event) -> list[Command]``.

It owns the task graph, each task's state (see :mod:`.states`), its attempts
and the retry/poison policy. It knows nothing about processes, pipes, files
or wall clocks: time arrives inside events (``now``), randomness through an
injected ``rand`` callable, and everything it wants done leaves as commands
that the session executes.

Fencing: every dispatch gets a fresh attempt id. An event about an attempt is
accepted only if that attempt is the *current* attempt of a task that is
``RUNNING``; anything else (a late result from a worker already declared lost,
a duplicate message, a result for a cancelled task) produces a ``Dropped``
command and changes nothing. Hence a task is recorded ``DONE`` at most once,
with the value of the attempt that was accepted.

The events it takes and the commands it returns are plain records in :mod:`.events`
(re-exported here). This module is longer than the size guide, on purpose: the task
graph's records, the machine and its invariants in one file; every rule about a task's
state is here.
"""

from __future__ import annotations

import dataclasses
import heapq
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, assert_never

from .._rare import Rare
from ..errors import Category, FailureRecord, InvalidTransition
from .drain import DRAIN_CATEGORIES, DrainPolicy, DrainRule
from .events import (
    Abort,
    AttemptStarted,
    Cancel,
    CancelAttempt,
    Cancelled,
    Command,
    Dispatch,
    Drained,
    Dropped,
    Event,
    Failed,
    FailOverride,
    Reject,
    Resolve,
    Restore,
    RetryOverride,
    Settled,
    Submit,
    Succeeded,
    TimePassed,
    Transition,
    Unlinked,
    Wake,
)
from .machine import InvariantViolation, Story, add_story
from .policy import Backoff
from .states import TRANSITIONS, State

# the vocabulary (.events) is re-exported: callers name it wf.Submit, wf.Dispatch, ...
__all__ = [
    "FREE_RETRIES",
    "NO_LINK",
    "RESUMABLE",
    "Abort",
    "AttemptRecord",
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
    "Workflow",
    "is_poison",
    "unpack_history",
]

# --------------------------------------------------------------------------- records

#: a packed transition: when (a double), from and to (indices in _STATE_NAMES)
_HIST = struct.Struct("<dBB")
_STATE_NAMES = ("", *(st.name for st in State))
_STATE_CODE = {name: i for i, name in enumerate(_STATE_NAMES)}


def _record(t: _Task, now: float, start: str, finish: str) -> None:
    t.history += _HIST.pack(now, _STATE_CODE[start], _STATE_CODE[finish])


def unpack_history(history: bytes | bytearray) -> list[tuple[float, str, str]]:
    """(time, from, to) of every packed transition, oldest first."""
    names = _STATE_NAMES
    return [(t, names[a], names[b]) for t, a, b in _HIST.iter_unpack(history)]


@dataclasses.dataclass(slots=True)
class AttemptRecord:
    """One dispatch of a task. ``number`` counts from 1 within the task; ``id`` is global."""

    number: int
    id: int
    dispatched: float
    worker: str | None = None
    host: str | None = None
    pid: int | None = None
    started: float | None = None
    ended: float | None = None
    outcome: str | None = None  # "done" | category value | "cancelled" | "dropped"
    failure: FailureRecord | None = None
    #: what the attempt started from, or why it was not charged: "resumed from attempt 2:
    #: md.cpt, 48 MB", "fresh start: md.cpt missing", "not charged: worker w3 drained"
    note: str | None = None

    def add_note(self, text: str) -> None:
        """Append ``text`` to the attempt's note ("; " between notes)."""
        self.note = f"{self.note}; {text}" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["failure"] = self.failure.to_dict() if self.failure else None
        return d


def _killed_a_worker(a: AttemptRecord) -> bool:
    """Is attempt ``a`` evidence that its task kills workers (for ``poison_after``)? Only
    if it was lost with a worker it *ran* on (it started there: a pid). An attempt that
    never ran (a drained worker's start fence refused it, the engine gave it back, no
    worker was left) killed nobody, whatever category its loss was reported under."""
    return a.outcome == Category.WORKER_LOST.value and bool(a.pid or a.started is not None)


def _end(a: AttemptRecord, now: float) -> float:
    """When attempt ``a`` ended, never before it started: its start is the worker's clock
    (where it ran), an end the client decided (a loss, a timeout) is the client's, and
    clocks of two hosts differ by a little; so no duration is ever negative."""
    return now if a.started is None or now >= a.started else a.started


#: outcomes that may be the worker's (or its node's) fault: a retry goes elsewhere
_PLACE_FAILURES = frozenset(
    {Category.WORKER_LOST.value, Category.TIMEOUT.value, Category.ENVIRONMENT.value}
)


def _avoid(attempts: Sequence[AttemptRecord]) -> tuple[str, ...]:
    """The workers where ``attempts`` were lost, timed out or found the environment
    wanting, oldest first, each once (the new attempt, last, has none yet)."""
    seen: dict[str, None] = {}
    for a in attempts:
        if a.worker and a.outcome in _PLACE_FAILURES:
            seen[a.worker] = None
    return tuple(seen)


def _dependency_failure(
    key: str, message: str, upstream: str | None, root: str | None, now: float
) -> FailureRecord:
    """The DEPENDENCY_FAILED record of task ``key`` (an input failed, or too few of its
    settled inputs succeeded)."""
    return FailureRecord(
        key=key,
        category=Category.DEPENDENCY_FAILED,
        message=message,
        transient=False,
        upstream=upstream,
        root=root,
        time=now,
    )


def is_poison(lost: list[AttemptRecord], poison_after: int, hosts_seen: int) -> bool:
    """The poison rule: the task's attempts killed ``poison_after`` workers, at least two
    *different* ones (a worker that a nanny restarts under its name after every death is
    one: one bad worker cannot condemn a healthy task, whose retry goes elsewhere), and,
    once the run has seen more than one host, on more than one host: one bad node cannot
    either; it is drained instead (:mod:`.drain`), and the task's retries go on."""
    workers = {a.worker or f"attempt {a.id}" for a in lost}
    hosts = {a.host for a in lost if a.host}
    return (
        len(lost) >= poison_after
        and len(workers) >= min(2, poison_after)
        and (hosts_seen < 2 or len(hosts) >= 2)
    )


@dataclasses.dataclass(slots=True)
class _Rare:
    """The part of a task's record that most tasks never set (retries, settled inputs,
    resuming): one slot on :class:`_Task` (None) instead of six (issue 26: memory per
    held task), read and written as the task's own (:class:`.._rare.Rare`)."""

    settled: Settled | None = None
    retries_used: int = 0
    ready_at: float = 0.0
    #: (attempt id, number) of the attempt a retry may resume from (its sandbox's files)
    resume: tuple[int, int] | None = None
    charged: set[int] | None = None  # attempt ids charged to the retry budget
    free_retries: int = 0  # retries given without charge (drained places, ENVIRONMENT)


@dataclasses.dataclass(slots=True)
class _Task:
    tid: int
    key: str
    deps: tuple[int, ...]
    retries: int
    state: State = State.PENDING
    waiting: int = 0
    dependents: list[int] | None = None  # made by the first dependent
    current: int | None = None
    #: its attempts (see :attr:`attempts`): the usual single attempt is held as itself,
    #: more as a tuple (issue 26: a 1-tuple was 48 bytes per held task)
    att: AttemptRecord | tuple[AttemptRecord, ...] = ()
    #: every transition, packed (see _HIST): ~10 bytes each, where a list of tuples of
    #: a float and two names cost ~90 (issue 26: memory per held task); immutable bytes,
    #: one object, where a bytearray is two and is copied for every reader
    history: bytes = b""
    failure: FailureRecord | None = None
    #: its current attempt was dispatched *linked* to attempts of inputs still running
    #: (see :class:`_Linked`); ``NO_LINK``: its inputs must be DONE before it is sent
    linked: _Linked | None = None
    rare: _Rare | None = None  # see _Rare; None: all at their defaults
    #: timeouts it may retry (None: as many as ``retries``); set for nearly every task
    timeout_retries: int | None = None

    @property
    def attempts(self) -> tuple[AttemptRecord, ...]:
        a = self.att
        return (a,) if isinstance(a, AttemptRecord) else a

    @attempts.setter
    def attempts(self, value: tuple[AttemptRecord, ...]) -> None:
        self.att = value[0] if len(value) == 1 else value

    def last(self) -> AttemptRecord:
        """Its latest attempt (it has one)."""
        a = self.att
        return a if isinstance(a, AttemptRecord) else a[-1]

    settled = Rare("rare", _Rare)
    retries_used = Rare("rare", _Rare)
    ready_at = Rare("rare", _Rare)
    resume = Rare("rare", _Rare)
    charged = Rare("rare", _Rare)
    free_retries = Rare("rare", _Rare)


@dataclasses.dataclass(slots=True)
class _Linked:
    """A linked attempt's unresolved links, ``input attempt id -> input tid``, and its end
    when it came before every link resolved (held: see :meth:`Workflow._hold`)."""

    inputs: dict[int, int]
    held: Succeeded | Failed | None = None


#: a task whose linked attempt the backend could not link: it waits for its inputs
NO_LINK = _Linked({})


#: outcomes after which the next attempt may start from the failed one's files (also
#: read by a resumed run, whose first attempt continues such an attempt of an earlier run)
RESUMABLE = frozenset({Category.WORKER_LOST, Category.RUNTIME_LOST, Category.TIMEOUT})
#: at most this many retries per task are given without charge (drained places, the one
#: ENVIRONMENT failure that may be the worker's, losses that were not the attempt's
#: doing: ``Failed.unblamed``): a bound, so no task retries forever
FREE_RETRIES = 2


# --------------------------------------------------------------------------- machine


class Workflow:
    """The pure state machine. Not thread-safe: the caller serialises ``handle``.

    ``story`` keeps the last stimuli (see :mod:`.machine`); with ``debug`` (a class
    attribute the tests turn on) every ``handle`` ends with ``validate()``."""

    #: validate after every stimulus (tests; off in production: O(tasks) per step)
    debug = False
    #: emit a ``Transition`` command for every move (for ``on_event`` listeners); a
    #: session nobody listens to turns it off: three commands per task fewer to make
    transitions = True
    #: dispatch a task whose inputs are still running, *linked* to their attempts, when
    #: the backend passes values between attempts itself (Dask's scheduler chains them);
    #: set per session from the backend's ``links``. The rules:
    #:
    #: * a task is linked when every input not DONE is RUNNING (a linked one too, so a
    #:   whole chain goes out at once), it takes no input settled, and no earlier link of
    #:   its failed on the backend (:class:`Unlinked`: then it waits for DONE inputs);
    #: * its end (success or failure) is *held* until every linked input is DONE, so a
    #:   task never ends before its inputs;
    #: * when a linked input's attempt ends in any other way (failed, lost, timed out,
    #:   cancelled), the linked attempt is *dropped*: not charged, its held end and any
    #:   late result discarded, withdrawn from the backend, and the task waits for that
    #:   input again (``RUNNING -> PENDING``); what was linked to it is dropped in turn.
    #:   A retry of the input is linked to again; a final failure fails it as usual
    #:   (DEPENDENCY_FAILED).
    links = False

    def __init__(
        self,
        *,
        poison_after: int = 3,
        keep_going: bool = True,
        backoff: Backoff | None = None,
        rand: Callable[[], float] = lambda: 0.5,
        drain: DrainPolicy | None = None,
    ) -> None:
        if poison_after < 1:
            raise ValueError(f"poison_after must be >= 1, got {poison_after!r}")
        self.poison_after = poison_after
        self._hosts: set[str] = set()  # every host an attempt started on (the poison rule)
        #: one int object per worker pid, shared by its attempts' records (each message
        #: brings its own: 28 bytes per held task; issue 26)
        self._pids: dict[int, int] = {}
        self.keep_going = keep_going
        self.backoff = backoff or Backoff()
        self._rand = rand
        self._tasks: dict[int, _Task] = {}
        self._attempt_owner: dict[int, int] = {}
        self._next_attempt = 1
        self._timers: list[tuple[float, int]] = []
        self._stopped = False  # keep_going=False tripped, or aborted
        self._aborted: Abort | None = None
        self.counts: dict[State, int] = dict.fromkeys(State, 0)
        self._forgotten_failures: dict[int, FailureRecord | None] = {}
        #: held ends of linked attempts whose links all resolved, to apply (handle())
        self._replay: list[Succeeded | Failed] = []
        self.drain = DrainRule(drain) if drain is not None else None
        self.story = Story()

    # ----------------------------------------------------------------- queries
    def state(self, tid: int) -> State:
        return self._tasks[tid].state

    def attempts(self, tid: int) -> tuple[AttemptRecord, ...]:
        return self._tasks[tid].attempts

    def failure(self, tid: int) -> FailureRecord | None:
        return self._tasks[tid].failure

    def history(self, tid: int) -> list[tuple[float, str, str]]:
        """(time, from, to) of every transition of the task, oldest first."""
        return unpack_history(self._tasks[tid].history)

    def packed_history(self, tid: int) -> bytes:
        """The task's history as it is kept (:func:`unpack_history` reads it): immutable,
        so a reader in another thread (the journal) takes it as it is."""
        return self._tasks[tid].history

    def key(self, tid: int) -> str:
        return self._tasks[tid].key

    def owner(self, attempt: int) -> int | None:
        """The task whose *current*, running attempt this is, else None (fencing)."""
        tid = self._attempt_owner.get(attempt)
        if tid is None:
            return None
        t = self._tasks[tid]
        if t.current != attempt or t.state is not State.RUNNING:
            return None
        return tid

    def task_of(self, attempt: int) -> int | None:
        """The task of ``attempt``, current or superseded (no fencing: for naming only)."""
        return self._attempt_owner.get(attempt)

    def is_started(self, tid: int) -> bool:
        t = self._tasks[tid]
        return t.state is State.RUNNING and bool(t.attempts) and t.last().started is not None

    def running_attempts(self) -> list[int]:
        return [t.current for t in self._tasks.values() if t.state is State.RUNNING and t.current]

    def unfinished(self) -> int:
        c = self.counts
        return c[State.PENDING] + c[State.READY] + c[State.RUNNING] + c[State.RETRYING]

    def failures(self) -> list[FailureRecord]:
        """The record of every FAILED task (forgotten ones too), in submission order."""
        live = [(tid, t.failure) for tid, t in self._tasks.items() if t.state is State.FAILED]
        both = sorted([*live, *self._forgotten_failures.items()], key=lambda x: x[0])
        return [f for _, f in both if f is not None]

    def forget(self, tid: int) -> bool:
        """Drop a final task's record (its history and attempts; the journal has them):
        the session does this when nobody holds the Task any more, so memory grows with
        the tasks in use, not with every task ever run. Counts are kept, and so is the
        failure record of a FAILED task (for ``failures()``). False if not final."""
        t = self._tasks.get(tid)
        if t is None or not t.state.final:
            return False
        del self._tasks[tid]
        for a in t.attempts:
            self._attempt_owner.pop(a.id, None)
        if t.state is State.FAILED:
            self._forgotten_failures[tid] = t.failure
        return True

    def _children(self, t: _Task) -> list[_Task]:
        """``t``'s dependents that are still on record (a forgotten one is final)."""
        if not t.dependents:
            return []
        tasks = self._tasks
        return [c for c in map(tasks.get, t.dependents) if c is not None]

    # ----------------------------------------------------------------- driver
    def handle(self, event: Event) -> list[Command]:
        """The one entry: apply ``event``, return what is to be done."""
        self.story.append(event)
        out: list[Command] = []
        try:
            match event:
                case Submit():
                    self._submit(event, out)
                case AttemptStarted():
                    self._started(event, out)
                case Succeeded():
                    self._succeeded(event, out)
                case Failed():
                    self._failed(event, out)
                case TimePassed():
                    self._tick(event.now, out)
                case Cancel():
                    self._cancel(event, out)
                case Restore():
                    self._restore(event, out)
                case Abort():
                    self._abort(event, out)
                case Unlinked():
                    self._unlinked(event, out)
                case _:
                    assert_never(event)
            replay = self._replay
            while replay:
                held = replay.pop()
                if isinstance(held, Succeeded):
                    self._succeeded(held, out)
                else:
                    self._failed(held, out)
        except InvalidTransition as e:
            raise add_story(e, self.story) from None
        if self.debug:
            self.validate()
        return out

    # ----------------------------------------------------------------- invariants
    def validate(self) -> None:
        """Check every invariant of the machine; raise :class:`InvariantViolation` naming
        the first one broken, with the recent stimuli. For tests (``debug``): O(tasks)."""
        for problem in self._problems():
            raise InvariantViolation("workflow", problem, self.story)

    def _problems(self) -> Iterator[str]:
        tasks = self._tasks
        counted = dict.fromkeys(State, 0)
        for t in tasks.values():
            counted[t.state] += 1
        for s in State:
            # forgotten tasks are final and keep their count
            broken = self.counts[s] < counted[s] if s.final else self.counts[s] != counted[s]
            if broken:
                yield f"counts[{s.name}] is {self.counts[s]} but {counted[s]} tasks are {s.name}"
        timers = {tid for _, tid in self._timers}
        for tid, t in tasks.items():
            k = f"task {t.key!r} ({t.state.name})"
            if t.tid != tid:
                yield f"{k} is filed under tid {tid} but has tid {t.tid}"
            hist = unpack_history(t.history)
            if not hist or hist[-1][2] != t.state.name:
                yield f"{k}: its history does not end in its state: {hist[-1:]}"
            numbers = [a.number for a in t.attempts]
            if numbers != list(range(1, len(numbers) + 1)):
                yield f"{k}: attempt numbers are {numbers}"
            for a in t.attempts:
                if self._attempt_owner.get(a.id) != tid:
                    yield f"{k}: attempt {a.id} is owned by {self._attempt_owner.get(a.id)}"
                if a.id >= self._next_attempt:
                    yield f"{k}: attempt id {a.id} was never handed out"
            if t.state is State.RUNNING:
                if t.current is None or not t.attempts or t.last().id != t.current:
                    yield f"{k} has no current attempt (current={t.current})"
                elif t.last().ended is not None or t.last().outcome is not None:
                    yield f"{k}: its current attempt {t.current} already ended"
            elif t.current is not None:
                yield f"{k} is not RUNNING but has a current attempt {t.current}"
            if any(a.outcome is None for a in t.attempts[:-1]):
                yield f"{k}: an attempt before the last has no outcome"
            if t.state is State.PENDING:
                soft = t.settled.soft if t.settled is not None else frozenset()
                unfinished = [
                    d
                    for d in t.deps
                    if d in tasks
                    and tasks[d].state is not State.DONE
                    and not (d in soft and tasks[d].state.final)
                ]
                if not unfinished:
                    yield f"{k} waits but every input is DONE"
                if t.waiting != len(unfinished):
                    yield f"{k} waits for {t.waiting} inputs but {len(unfinished)} are not DONE"
                for d in unfinished:
                    if tasks[d].state.final:
                        yield f"{k} waits for input {tasks[d].key!r} which is {tasks[d].state.name}"
                    elif tid not in (tasks[d].dependents or ()):
                        yield f"{k} waits for {tasks[d].key!r}, which does not list it"
            if t.linked is not None and t.linked is not NO_LINK:
                if t.state is not State.RUNNING:
                    yield f"{k} holds links but is {t.state.name}"
                for aid, dtid in t.linked.inputs.items():
                    up = tasks.get(dtid)
                    if up is None or up.current != aid or up.state is not State.RUNNING:
                        yield f"{k} is linked to attempt {aid}, not a running input's current"
            if t.state is State.RETRYING and tid not in timers:
                yield f"{k} has no timer to wake it"
            if t.state is State.FAILED and t.failure is None:
                yield f"{k} has no failure record"
            if t.state is State.DONE and t.failure is not None:
                yield f"{k} has a failure record"
            if t.retries_used != len(t.charged or ()):
                yield f"{k}: {t.retries_used} retries used but {len(t.charged or ())} charged"
            if not 0 <= t.free_retries <= FREE_RETRIES:
                yield f"{k}: {t.free_retries} free retries (at most {FREE_RETRIES})"
        for aid, tid in self._attempt_owner.items():
            if tid not in tasks:
                yield f"attempt {aid} belongs to task {tid}, which is not on record"
        if self.drain is not None:
            yield from self.drain.problems()

    # ----------------------------------------------------------------- internals
    def _move(self, t: _Task, finish: State, now: float, out: list[Command]) -> None:
        start = t.state
        if (start, finish) not in TRANSITIONS:
            raise InvalidTransition(t.key, start.name, finish.name, unpack_history(t.history))
        t.state = finish
        _record(t, now, start._name_, finish._name_)  # _name_: no enum property call
        counts = self.counts
        counts[start] -= 1
        counts[finish] += 1
        if self.transitions:
            out.append(Transition(t.tid, t.key, start, finish, now, t.current))

    def _submit(self, ev: Submit, out: list[Command]) -> None:
        if ev.tid in self._tasks:
            raise ValueError(f"task id {ev.tid} submitted twice")
        t = _Task(ev.tid, ev.key, ev.deps, ev.retries)
        t.settled = ev.settled
        t.timeout_retries = ev.timeout_retries
        soft = ev.settled.soft if ev.settled is not None else frozenset()
        _record(t, ev.now, "", "PENDING")
        self._tasks[ev.tid] = t
        self.counts[State.PENDING] += 1
        if self.transitions:
            out.append(Transition(t.tid, t.key, State.PENDING, State.PENDING, ev.now))
        failed_dep: _Task | None = None
        for d in ev.deps:
            dt = self._tasks[d]
            if dt.state is State.DONE:
                continue
            if dt.state in (State.FAILED, State.CANCELLED):
                if d not in soft:
                    failed_dep = dt
                continue
            t.waiting += 1
            if dt.dependents is None:
                dt.dependents = [t.tid]
            else:
                dt.dependents.append(t.tid)
        if failed_dep is not None:
            self._fail_downstream_of(failed_dep, [t], ev.now, out)
            return
        if self._aborted is not None:
            self._abort_one(t, self._aborted.category, self._aborted.message, ev.now, out)
            return
        if self._stopped:
            self._move(t, State.CANCELLED, ev.now, out)
            out.append(Cancelled(t.tid))
            return
        if t.waiting == 0:
            self._inputs_ready(t, ev.now, out)
        elif self.links:
            self._link(t, ev.now, out)

    def _inputs_ready(self, t: _Task, now: float, out: list[Command]) -> None:
        """Every input of PENDING ``t`` has finished as it needs: ready, unless a settled
        group of its inputs has fewer successes than it asked for."""
        if t.settled is not None:
            short = self._short_group(t, now)
            if short is not None:
                self._fail(t, short, now, out)
                return
        self._make_ready(t, now, out)

    def _short_group(self, t: _Task, now: float) -> FailureRecord | None:
        """DEPENDENCY_FAILED for ``t`` if a settled group of its inputs has fewer DONE
        than its ``at_least``, naming the first failed input and where its failure began."""
        assert t.settled is not None
        for members, need in t.settled.groups:
            ended = [self._tasks[m] for m in members]
            done = sum(1 for m in ended if m.state is State.DONE)
            if done >= need:
                continue
            bad = next((m for m in ended if m.state is not State.DONE), None)
            up = bad.key if bad is not None else None
            f = bad.failure if bad is not None else None
            root = (f.root or up) if f is not None else up
            why = f"{f.category.value}: {f.one_line()}" if f is not None else "cancelled"
            msg = (
                f"task {t.key!r} did not run: {done} of its {len(members)} settled inputs "
                f"succeeded, it asked for at least {need}; the first that did not is {up!r}, "
                f"whose failure began in {root!r} ({why}). "
                f"Run `pilotfish show {root}` for the full record."
            )
            return _dependency_failure(t.key, msg, up, root, now)
        return None

    def _restore(self, ev: Restore, out: list[Command]) -> None:
        t = _Task(ev.tid, ev.key, (), 0)
        _record(t, ev.now, "", "PENDING")
        self._tasks[ev.tid] = t
        self.counts[State.PENDING] += 1
        self._move(t, State.DONE, ev.now, out)
        out.append(Resolve(t.tid, None))

    def _make_ready(self, t: _Task, now: float, out: list[Command]) -> None:
        self._move(t, State.READY, now, out)
        self._dispatch(t, now, out)

    def _dispatch(
        self, t: _Task, now: float, out: list[Command], links: tuple[tuple[int, int], ...] = ()
    ) -> None:
        aid = self._next_attempt
        self._next_attempt += 1
        t.current = aid
        self._attempt_owner[aid] = t.tid
        t.attempts += (AttemptRecord(len(t.attempts) + 1, aid, now),)
        self._move(t, State.RUNNING, now, out)
        out.append(Dispatch(t.tid, aid, len(t.attempts), t.resume, _avoid(t.attempts), links))
        if self.links and t.dependents and not links:
            self._link_down(t, now, out)  # its waiting dependents may link to this attempt

    # ----------------------------------------------------------------- links
    def _link(self, t: _Task, now: float, out: list[Command]) -> None:
        """Dispatch PENDING ``t`` linked to its running inputs' attempts if it may be (see
        :attr:`links`), then what waits for it in turn (a loop: a long chain whose head
        is sent again does not recurse)."""
        if self._link_one(t, now, out):
            self._link_down(t, now, out)

    def _link_down(self, t: _Task, now: float, out: list[Command]) -> None:
        stack = [t]
        while stack:
            for c in self._children(stack.pop()):
                if c.state is State.PENDING and self._link_one(c, now, out):
                    stack.append(c)

    def _link_one(self, t: _Task, now: float, out: list[Command]) -> bool:
        if t.linked is NO_LINK or t.settled is not None or self._stopped:
            return False
        tasks = self._tasks
        links: dict[int, int] = {}
        for d in t.deps:
            dt = tasks.get(d)
            if dt is None or dt.state is State.DONE:
                continue
            if dt.state is not State.RUNNING or dt.current is None:
                return False
            links[dt.current] = d
        if not links:
            return False
        self._move(t, State.READY, now, out)
        t.linked = _Linked(links)
        self._dispatch(t, now, out, tuple((d, aid) for aid, d in links.items()))
        return True

    def _hold(self, t: _Task, ev: Succeeded | Failed) -> bool:
        """Keep the end of a linked attempt whose inputs are not all DONE yet (it is
        applied when they are: :meth:`_resolve_link`); True if held."""
        ln = t.linked
        if ln is None or not ln.inputs:
            return False
        if ln.held is None:
            ln.held = ev
        return True

    def _resolve_link(self, aid: int, c: _Task) -> None:
        """An input of RUNNING ``c`` is DONE with attempt ``aid``: that link holds; once
        every link does, an end that came early is applied."""
        ln = c.linked
        if ln is None or ln is NO_LINK or ln.inputs.pop(aid, None) is None or ln.inputs:
            return
        held, c.linked = ln.held, None
        if held is not None:  # applied by handle(), in a loop: a held chain does not recurse
            self._replay.append(held)

    def _unlink_from(self, up: _Task, aid: int, why: str, now: float, out: list[Command]) -> None:
        """Attempt ``aid`` of ``up`` ended without success: drop every attempt linked to
        it (and, in turn, what was linked to those); each such task waits for its inputs
        again."""
        stack = [(up, aid)]
        while stack:
            src, src_aid = stack.pop()
            for c in self._children(src):
                ln = c.linked
                if c.state is not State.RUNNING or ln is None or src_aid not in ln.inputs:
                    continue
                assert c.current is not None
                a = c.attempts[-1]
                a.ended, a.outcome = now, "dropped"
                a.add_note(
                    f"not charged: its input {src.key!r} (attempt {src_aid}) {why} before "
                    "this attempt could use its value"
                )
                out.append(CancelAttempt(c.current))
                stack.append((c, c.current))
                c.current, c.linked = None, None
                self._move(c, State.PENDING, now, out)

    def _unlinked(self, ev: Unlinked, out: list[Command]) -> None:
        t = self._fenced(ev.attempt, "unlinked", out)
        if t is None:
            return
        a = t.last()
        a.ended, a.outcome = ev.now, "dropped"
        a.add_note(f"not charged: not run: {ev.reason}")
        self._unlink_from(t, ev.attempt, "was dropped", ev.now, out)
        t.current, t.linked = None, NO_LINK
        self._move(t, State.PENDING, ev.now, out)
        if t.waiting == 0:
            self._inputs_ready(t, ev.now, out)

    def _fenced(self, aid: int, what: str, out: list[Command]) -> _Task | None:
        tid = self._attempt_owner.get(aid)
        if tid is None:
            out.append(Dropped(aid, "unknown attempt", what))
            return None
        t = self._tasks[tid]
        if t.state is not State.RUNNING or t.current is None:
            out.append(Dropped(aid, f"task {t.key!r} is {t.state.name}", what))
            return None
        if t.current != aid:
            out.append(Dropped(aid, f"superseded by attempt {t.current} of {t.key!r}", what))
            return None
        return t

    def _shared_pid(self, pid: int | None) -> int | None:
        """``pid`` as the one int object kept for that worker pid (see ``_pids``)."""
        return self._pids.setdefault(pid, pid) if pid else pid

    def _started(self, ev: AttemptStarted, out: list[Command]) -> None:
        t = self._fenced(ev.attempt, "started", out)
        if t is None:
            return
        a = t.last()
        if a.started is not None:
            out.append(Dropped(ev.attempt, "duplicate start", "started"))
            return
        a.started, a.worker, a.host = ev.now, ev.worker, ev.host
        a.pid = self._shared_pid(ev.pid)
        if ev.host:
            self._hosts.add(ev.host)
        if self.drain is not None:
            self.drain.seen(ev.host)

    def _succeeded(self, ev: Succeeded, out: list[Command]) -> None:
        t = self._fenced(ev.attempt, "succeeded", out)
        if t is None or self._hold(t, ev):
            return
        a = t.last()
        a.ended, a.outcome = _end(a, ev.now), "done"
        a.note = ev.note or a.note
        a.worker = ev.worker or a.worker
        a.host = ev.host or a.host
        if ev.pid and ev.pid != a.pid:
            a.pid = self._shared_pid(ev.pid)
        if a.started is None:
            a.started = a.dispatched
        t.current = None
        self._move(t, State.DONE, ev.now, out)
        out.append(Resolve(t.tid, ev.attempt))
        for dt in self._children(t):
            if dt.state is State.RUNNING and dt.linked is not None:
                dt.waiting -= 1
                self._resolve_link(ev.attempt, dt)
                continue
            if dt.state is not State.PENDING:
                continue
            dt.waiting -= 1
            if dt.waiting == 0:
                self._inputs_ready(dt, ev.now, out)
            elif self.links:
                self._link(dt, ev.now, out)

    def _failed(self, ev: Failed, out: list[Command]) -> None:
        t = self._fenced(ev.attempt, "failed", out)
        if t is None or self._hold(t, ev):
            return
        f = ev.failure
        a = t.last()
        a.ended, a.outcome, a.failure = _end(a, ev.now), f.category.value, f
        if t.dependents:
            self._unlink_from(t, a.id, f"ended {f.category.value}", ev.now, out)
        a.worker = f.worker or a.worker
        a.host = f.host or a.host
        a.pid = f.pid or a.pid
        a.note = ev.note or a.note
        t.current = None
        ov = ev.override
        if f.category in RESUMABLE or ev.retry_requested or isinstance(ov, RetryOverride):
            t.resume = (a.id, a.number)
        elif f.category is not Category.ENVIRONMENT:  # it did not run: keep the older one
            t.resume = None
        if isinstance(ov, FailOverride):
            self._fail(t, ov.failure or f, ev.now, out)
            return
        if isinstance(ov, RetryOverride):
            if ov.retries is not None:
                t.retries = ov.retries
            self._retry(t, ev.now + max(0.0, ov.delay), ev.now, out)
            return
        if ev.unblamed and f.category.transient and t.free_retries < FREE_RETRIES:
            free: str | None = f"not charged: {ev.unblamed}"
        else:
            free = self._free_retry(t, a, f, ev.now, out)
        if free is not None and not self._stopped:
            a.add_note(free)
            t.free_retries += 1
            self._retry(t, ev.now + self.backoff.delay(1, self._rand()), ev.now, out)
            return
        lost = [x for x in t.attempts if _killed_a_worker(x)]
        if _killed_a_worker(a) and is_poison(lost, self.poison_after, len(self._hosts)):
            self._fail(t, self._poison_record(t, f, lost), ev.now, out)
            return
        retryable = f.category.transient or ev.retry_requested
        if retryable and f.category is Category.TIMEOUT and t.timeout_retries is not None:
            timeouts = sum(1 for x in t.attempts if x.outcome == Category.TIMEOUT.value)
            if timeouts > t.timeout_retries:
                stop = (
                    f"not retried: timed out {timeouts} times (timeout_retries="
                    f"{t.timeout_retries}: a task that hangs again will likely hang for good; "
                    "give a longer timeout= or a larger timeout_retries=)"
                )
                a.add_note(stop)
                self._fail(t, f, ev.now, out)
                return
        if retryable and t.retries_used < t.retries and not self._stopped:
            t.retries_used += 1
            if t.charged is None:
                t.charged = set()
            t.charged.add(a.id)
            delay = self.backoff.delay(t.retries_used, self._rand())
            self._retry(t, ev.now + delay, ev.now, out)
            return
        self._fail(t, f, ev.now, out)

    # ----------------------------------------------------------------- draining
    def _free_retry(
        self, t: _Task, a: AttemptRecord, f: FailureRecord, now: float, out: list[Command]
    ) -> str | None:
        """With draining on: feed the rule; if this attempt failed on a place that is (now)
        drained, or is the task's first ENVIRONMENT failure (maybe the worker's fault),
        the reason it is retried without charge; else None (the normal policy)."""
        rule = self.drain
        if rule is None or f.category not in DRAIN_CATEGORIES:
            return None
        drained_before = rule.is_drained(a.worker, a.host)
        for d in rule.failed(
            key=t.key,
            attempt=a.id,
            category=f.category,
            worker=a.worker,
            host=a.host,
            pid=a.pid,
            now=now,
        ):
            out.append(Drained(d.kind, d.name, d.host, d.reason, d.keys, d.attempts, d.time))
            self._refund(d.attempts, f"not charged: {d.kind} {d.name} drained", a.id)
        if t.free_retries >= FREE_RETRIES:
            return None
        place = a.worker or a.host or "?"
        if rule.is_drained(a.worker, a.host):
            what = "worker" if a.worker and ("worker", a.worker) in rule.drained else "host"
            name = a.worker if what == "worker" else a.host
            return f"not charged: {what} {name} {'was ' if drained_before else ''}drained"
        if (
            f.category is Category.ENVIRONMENT
            and a.worker is not None
            and not any(x.outcome == Category.ENVIRONMENT.value for x in t.attempts[:-1])
        ):
            return f"not charged: ENVIRONMENT on worker {place} may be the worker's"
        return None

    def _refund(self, attempts: Iterable[int], note: str, skip: int) -> None:
        """Give back the retries charged for ``attempts`` (evidence of a drained place)."""
        for aid in attempts:
            if aid == skip:
                continue
            tid = self._attempt_owner.get(aid)
            t = self._tasks.get(tid) if tid is not None else None
            if t is None:
                continue
            for rec in t.attempts:
                if rec.id == aid:
                    rec.add_note(note)
            if t.charged and aid in t.charged and not t.state.final:
                t.charged.discard(aid)
                t.retries_used -= 1

    def _poison_record(
        self, t: _Task, last: FailureRecord, lost: list[AttemptRecord]
    ) -> FailureRecord:
        workers = len({a.worker or f"attempt {a.id}" for a in lost})
        hosts = len({a.host for a in lost if a.host})
        on = f" on {hosts} hosts" if hosts > 1 else ""
        killed = (
            f"{workers} different workers{on}"
            if workers == len(lost)
            else f"workers {len(lost)} times ({workers} different workers{on})"
        )
        lines = [
            f"task {t.key!r} is poison: its attempts killed {killed} "
            f"(poison_after={self.poison_after}); it will not be retried again. Attempts:"
        ]
        for a in lost:
            af = a.failure
            assert af is not None
            how = af.signal or (f"exit code {af.returncode}" if af.returncode is not None else "?")
            lines.append(f"  attempt {a.number} on {a.worker or '?'} (pid {a.pid}): {how}")
            if af.stderr_tail:
                lines.extend("    | " + ln for ln in af.stderr_tail.splitlines())
        return dataclasses.replace(last, message="\n".join(lines), transient=False)

    def _retry(self, t: _Task, at: float, now: float, out: list[Command]) -> None:
        self._move(t, State.RETRYING, now, out)
        t.ready_at = at
        if at <= now:
            self._move(t, State.READY, now, out)
            self._dispatch(t, now, out)
        else:
            heapq.heappush(self._timers, (at, t.tid))
            out.append(Wake(at))

    def _tick(self, now: float, out: list[Command]) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, tid = heapq.heappop(self._timers)
            t = self._tasks.get(tid)
            if t is not None and t.state is State.RETRYING and t.ready_at <= now:
                self._move(t, State.READY, now, out)
                self._dispatch(t, now, out)
        if self._timers:
            out.append(Wake(self._timers[0][0]))

    def _fail(self, t: _Task, f: FailureRecord, now: float, out: list[Command]) -> None:
        f = f if f.key == t.key else dataclasses.replace(f, key=t.key)
        t.failure = f
        self._move(t, State.FAILED, now, out)
        out.append(Reject(t.tid, f))
        self._fail_downstream_of(t, self._children(t), now, out)
        if not self.keep_going and not self._stopped:
            self._stop_all(now, out)

    def _fail_downstream_of(
        self, failed: _Task, children: list[_Task], now: float, out: list[Command]
    ) -> None:
        """Fail (or cancel) every task downstream of ``failed`` at once: no hang."""
        root_f = failed.failure
        root = (root_f.root or failed.key) if root_f else failed.key
        stack = [(failed, c) for c in children]
        while stack:
            up, c = stack.pop()
            if c.state.final or c.state is not State.PENDING:
                continue
            if c.settled is not None and up.tid in c.settled.soft:
                c.waiting -= 1  # it takes this input settled: finished, however it ended
                if c.waiting == 0:
                    self._inputs_ready(c, now, out)
                continue
            if failed.state is State.CANCELLED and root_f is None:
                self._move(c, State.CANCELLED, now, out)
                out.append(Cancelled(c.tid))
            else:
                what = root_f.one_line() if root_f else "failed"
                cat = root_f.category.value if root_f else "?"
                msg = (
                    f"task {c.key!r} did not run: its input {up.key!r} failed; "
                    f"the failure began in {root!r} ({cat}: {what}). "
                    f"Run `pilotfish show {root}` for the full record."
                )
                c.failure = _dependency_failure(c.key, msg, up.key, root, now)
                self._move(c, State.FAILED, now, out)
                out.append(Reject(c.tid, c.failure))
            stack.extend((c, d) for d in self._children(c))

    def _cancel(self, ev: Cancel, out: list[Command]) -> None:
        t = self._tasks[ev.tid]
        if t.state.final:
            return
        if t.state is State.RUNNING:
            if t.last().started is not None:
                return  # started: cannot be cancelled (concurrent.futures semantics)
            assert t.current is not None
            out.append(CancelAttempt(t.current))
            t.last().outcome = "cancelled"
            t.last().ended = ev.now
            self._unlink_from(t, t.current, "was cancelled", ev.now, out)
            t.current, t.linked = None, None
        self._move(t, State.CANCELLED, ev.now, out)
        out.append(Cancelled(t.tid))
        self._fail_downstream_of(t, self._children(t), ev.now, out)

    def _stop_all(self, now: float, out: list[Command]) -> None:
        """keep_going=False: cancel everything that has not started; running work finishes."""
        self._stopped = True
        for t in list(self._tasks.values()):
            if t.state in (State.PENDING, State.READY, State.RETRYING) or (
                t.state is State.RUNNING and t.last().started is None
            ):
                self._cancel(Cancel(t.tid, now), out)

    def _abort(self, ev: Abort, out: list[Command]) -> None:
        self._stopped = True
        self._aborted = ev
        for t in list(self._tasks.values()):
            if not t.state.final:
                self._abort_one(t, ev.category, ev.message, ev.now, out)

    def _abort_one(
        self, t: _Task, category: Category, message: str, now: float, out: list[Command]
    ) -> None:
        if t.current is not None:
            a = t.last()
            a.ended, a.outcome = _end(a, now), category.value
            t.current, t.linked = None, None
        t.failure = FailureRecord(
            key=t.key,
            category=category,
            message=f"task {t.key!r}: {message}",
            transient=category.transient,
            time=now,
        )
        self._move(t, State.FAILED, now, out)
        out.append(Reject(t.tid, t.failure))
