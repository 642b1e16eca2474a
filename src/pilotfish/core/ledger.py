"""The attempt ledger: where every in-flight attempt is, and what a loss means for it.

One pure object (events in, commands out; no processes, sockets, clocks or files)
shared by every backend. The local master, the Dask backend, the RADICAL-Pilot
raptor master and the client side of each backend (for the loss of the master or
scheduler) keep *no* bookkeeping of their own about attempts: they turn their
engine's signals into the events below and carry out the commands that come back.
Tested directly in ``tests/test_ledger.py``.

An attempt's path::

    Enqueue      Hold(worker)        Start(worker, pid, host)     Finish(worker)
    queued ---------> held ------------------> started ----------------> (gone: Accept)
      ^                 |                         |
      |  requeue,       | WorkerLost / Bounce     | WorkerLost  -> Lost(worker_lost)
      +--- unblamed ----+  RuntimeLost            | RuntimeLost -> Lost(runtime_lost)
                                                  | TimePassed past its timeout -> Expired

The rules it owns, written once:

* **Start fence.** User code runs only after ``Start`` was *granted*: the attempt
  is queued or held by that same worker, and has not started anywhere. Any other
  ``Start`` (an engine re-running an attempt whose worker died, a task pushed
  twice, a worker already declared lost) is ``Refused`` and the caller must not
  run user code.
* **Worker loss.** A lost worker's *started* attempts are ``Lost(worker_lost)``
  with its exit code, signal and stderr tail, and the process groups of programs
  they started are to be killed; its held-but-unstarted attempts go back on the
  queue (``Requeue``) without blame.
* **Master/scheduler loss.** Started attempts are ``Lost(runtime_lost)``; every
  attempt that had not started (queued or held) is sent again (``Resend``), not
  blamed, so it uses no retry.
* **Results.** A result is accepted once, only from the worker that holds the
  attempt (``Accept``); anything else is ``Ignored`` with the reason.
* **Revoke.** An attempt that has not started is withdrawn (``Withdraw``); a
  started one runs on (its result is fenced by the workflow).
* **Drain.** A worker the client drained (:mod:`pilotfish.core.drain`: several
  different tasks failed there) gets no new attempts: what it holds but has not
  started goes back on the queue unblamed (``Requeue``), its running attempts
  finish, and any later ``Hold`` is ``Ignored`` and ``Start`` ``Refused`` ("worker
  w3 is drained"): the backend offers those attempts to another worker, and retires
  (Dask) or replaces (local) the drained one. An attempt given back because its worker
  is drained (``Bounce(drained=True)``) is never blamed and never counted as given back:
  no worker died, and its user code did not run.
* **Given back too often.** A ledger made with ``max_returns=N`` lets an engine give an
  attempt back (``Bounce`` before it started) N times; the next one is ``Lost`` (no
  worker and no pid: it never ran, so it is no evidence that the task kills workers).
  Drained refusals do not count.

Times are whatever clock the caller passes in events (wall time for reports).

(Longer than the size guide, on purpose: one module holds the machine's whole vocabulary,
its events and commands with a docstring each, the machine, its invariant check, and
``carry_out``, the one runner every backend uses, so a reader sees every rule about an
attempt's place in one file. The class itself stays near the guide.)
"""

from __future__ import annotations

import dataclasses
import signal as _signal
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple, Protocol, assert_never

from .machine import InvariantViolation, Story

__all__ = [
    "Accept",
    "Bounce",
    "Command",
    "Drain",
    "Enqueue",
    "Event",
    "Expired",
    "Finish",
    "Granted",
    "Group",
    "Hold",
    "Hooks",
    "Ignored",
    "KillGroups",
    "Ledger",
    "Lost",
    "Outcome",
    "Refused",
    "Renamed",
    "Report",
    "Requeue",
    "Resend",
    "Revoke",
    "RuntimeLost",
    "Start",
    "Started",
    "TimePassed",
    "Unrunnable",
    "Withdraw",
    "WorkerLeft",
    "WorkerLost",
    "carry_out",
    "describe_exit",
]

Where = Literal["queued", "held", "started"]
#: an attempt's id, unique among the attempts one ledger sees (the workflow's attempt id,
#: or a number the engine gives each of its tasks, e.g. the RADICAL master's)
AttemptId = int


# --------------------------------------------------------------------------- reports
# What a backend tells the client about an attempt. Defined here, where the rules that
# produce them live; pilotfish.wire.messages re-exports them as wire messages.


class Started(NamedTuple):
    """The attempt was granted to ``worker`` and its user code is starting."""

    attempt: int
    worker: str
    pid: int
    time: float
    host: str = ""


class Lost(NamedTuple):
    """An attempt was lost with its worker or master, or stopped by its timeout."""

    attempt: int
    category: str  # a Category value: worker_lost | runtime_lost | timeout
    message: str
    worker: str
    pid: int
    returncode: int | None
    signal: str | None
    stderr_tail: str
    started: float | None
    ended: float
    host: str = ""
    #: why the loss is not the attempt's doing ('' if it may be): its retry is not charged
    unblamed: str = ""


def signal_name(returncode: int) -> str | None:
    """The name of the signal that killed a process, from a subprocess-style return code:
    ``-11`` -> ``"SIGSEGV"``, an unknown one ``"signal 99"``; zero and positive codes (the
    shell's 128+N included) give None."""
    if returncode >= 0:
        return None
    try:
        return _signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def describe_exit(returncode: int | None) -> tuple[str, str | None]:
    """How a process ended, in words, and its signal name:
    ``('was killed by signal SIGKILL (-9)', 'SIGKILL')`` or ``('exited with code 3', None)``.

    The one wording of an exit status, for a worker, a master and a program alike
    (``pilotfish.runtime.programs`` words a program's exit with it)."""
    if returncode is None:
        return "vanished (exit status unknown)", None
    name = signal_name(returncode)
    if name is not None:
        return f"was killed by signal {name} ({returncode})", name
    return f"exited with code {returncode}", None


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(slots=True)
class Entry:
    """One in-flight attempt. ``item`` is the backend's own object for it (what it sends
    again on ``Requeue``/``Resend``); the ledger never looks inside."""

    attempt: AttemptId
    key: str
    item: Any
    timeout: float | None
    where: Where = "queued"
    worker: str = ""
    pid: int = 0
    host: str = ""
    started: float | None = None
    groups: tuple[int, ...] = ()
    cancelled: bool = False  # held when cancelled: the worker is told to drop it
    returned: int = 0  # times the engine gave it back before it started (not drained)


# --------------------------------------------------------------------------- events


@dataclasses.dataclass(slots=True)
class Enqueue:
    """Attempts handed to the backend; they are queued until a worker holds them."""

    entries: tuple[tuple[AttemptId, str, Any, float | None], ...]  # (attempt, key, item, timeout)


@dataclasses.dataclass(slots=True)
class Renamed:
    """The backend's object for ``attempt`` changed (sent again under a new name); the
    attempt, its holder and its state do not."""

    attempt: AttemptId
    item: Any


@dataclasses.dataclass(slots=True)
class WorkerLeft:
    """``worker`` stopped in order holding nothing (no loss rules apply): forget it."""

    worker: str


@dataclasses.dataclass(slots=True)
class Hold:
    """``worker`` took these attempts (prefetch, a claim from a shared queue)."""

    worker: str
    attempts: tuple[AttemptId, ...]


@dataclasses.dataclass(slots=True)
class Start:
    """``worker`` asks to run ``attempt``'s user code now (the start fence)."""

    worker: str
    attempt: AttemptId
    pid: int
    host: str
    time: float


@dataclasses.dataclass(slots=True)
class Finish:
    """``worker`` delivered a result (value or error) for ``attempt``."""

    worker: str
    attempt: AttemptId


@dataclasses.dataclass(slots=True)
class Group:
    """A program of ``attempt`` runs in process group ``pgid`` (killed if the worker dies)."""

    worker: str
    attempt: AttemptId
    pgid: int


@dataclasses.dataclass(slots=True)
class Revoke:
    attempts: tuple[AttemptId, ...]


@dataclasses.dataclass(slots=True)
class Bounce:
    """The engine gave ``attempt`` back without running it here (e.g. Dask gave up on a
    task whose workers died): requeued unblamed if it never started, else lost.
    ``drained``: a start fence refused it because its worker is drained (never counted
    against ``max_returns``)."""

    attempt: AttemptId
    why: str
    time: float
    drained: bool = False


@dataclasses.dataclass(slots=True)
class Unrunnable:
    """The engine cannot run ``attempt`` at all (it refused the submission, or gave it back
    too often): it leaves the ledger, reported lost with ``category``."""

    attempt: int
    category: str
    why: str
    time: float


@dataclasses.dataclass(slots=True)
class WorkerLost:
    """``worker`` is gone (``why``: 'worker w1 (pid 7) was killed by signal SIGKILL (-9)')."""

    worker: str
    why: str
    time: float
    returncode: int | None = None
    signal: str | None = None
    stderr_tail: str = ""
    category: str = "worker_lost"  # or "timeout" when it was killed for a timeout


@dataclasses.dataclass(slots=True)
class RuntimeLost:
    """The master or scheduler that ran these attempts is gone."""

    why: str
    time: float
    worker: str = "master"
    pid: int = 0
    returncode: int | None = None
    signal: str | None = None
    stderr_tail: str = ""
    #: why the loss is not the attempts' doing (the link to the scheduler broke, not the
    #: scheduler): their retries are not charged; '' if it may be theirs
    unblamed: str = ""


@dataclasses.dataclass(slots=True)
class TimePassed:
    """Time passed: started attempts past their timeout expire. ``how`` says how the
    backend stops an expired attempt (appended to its message)."""

    time: float
    how: str = ""


@dataclasses.dataclass(slots=True)
class Drain:
    """The client drained ``worker``: no new attempts go there (see the module docstring)."""

    worker: str
    why: str
    time: float


Event = (
    Enqueue
    | Hold
    | Start
    | Finish
    | Group
    | Revoke
    | Bounce
    | Unrunnable
    | WorkerLost
    | RuntimeLost
    | TimePassed
    | Drain
    | Renamed
    | WorkerLeft
)


# --------------------------------------------------------------------------- commands


@dataclasses.dataclass(slots=True)
class Report:
    """Tell the client (a :class:`Started` or :class:`Lost`)."""

    msg: Started | Lost


@dataclasses.dataclass(slots=True)
class Granted:
    """The start fence let ``worker`` run ``attempt``."""

    worker: str
    attempt: AttemptId


@dataclasses.dataclass(slots=True)
class Refused:
    """The start fence refused: ``worker`` must not run ``attempt``'s user code."""

    worker: str
    attempt: AttemptId
    reason: str


@dataclasses.dataclass(slots=True)
class Accept:
    """Deliver this result to the client."""

    worker: str
    attempt: AttemptId


@dataclasses.dataclass(slots=True)
class Ignored:
    """A result, hold or event that is not from the attempt's holder (logged, ignored)."""

    worker: str
    attempt: AttemptId
    reason: str


@dataclasses.dataclass(slots=True)
class Requeue:
    """Put these attempts back on the queue, in order, ahead of others: never started."""

    items: tuple[Any, ...]


@dataclasses.dataclass(slots=True)
class Resend:
    """Send these attempts again to the new master/scheduler: never started."""

    items: tuple[Any, ...]


@dataclasses.dataclass(slots=True)
class Withdraw:
    """Take back ``attempt`` (not started); ``worker`` holds it, or '' if only queued."""

    worker: str
    attempt: AttemptId


@dataclasses.dataclass(slots=True)
class KillGroups:
    """Kill these program process groups: their worker is gone."""

    worker: str
    pgids: tuple[int, ...]


@dataclasses.dataclass(slots=True)
class Expired:
    """``attempt`` ran past its timeout on ``worker``: stop it there, with the process
    groups of programs it started (already reported)."""

    worker: str
    attempt: AttemptId
    pid: int
    pgids: tuple[int, ...] = ()
    key: str = ""  # the attempt's task (for messages)


Command = (
    Report
    | Granted
    | Refused
    | Accept
    | Ignored
    | Requeue
    | Resend
    | Withdraw
    | KillGroups
    | Expired
)


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """See the module docstring. ``handle(event) -> list[Command]``; ``story`` keeps the
    last events and ``validate()`` checks the invariants (:mod:`.machine`)."""

    #: validate after every event (tests; off in production: O(attempts) per step)
    debug = False

    def __init__(self, max_returns: int | None = None) -> None:
        #: how often an engine may give an attempt back unstarted (None: no limit)
        self.max_returns = max_returns
        self.entries: dict[AttemptId, Entry] = {}
        # worker -> attempts it holds or runs, in the order it took them
        self._by_worker: dict[str, dict[AttemptId, None]] = {}
        # started attempts that have a timeout -> when it expires (scanned by TimePassed and
        # next_deadline instead of every entry)
        self._deadlines: dict[AttemptId, float] = {}
        self.drained: dict[str, str] = {}  # worker -> why (no new attempts go there)
        self.refused = 0  # start requests refused (an engine's own re-execution, ...)
        self.dropped = 0  # results dropped (not from the holder, or late)
        self.story = Story()  # the last events (for the message of InvariantViolation)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, attempt: object) -> bool:
        return attempt in self.entries

    def get(self, attempt: AttemptId) -> Entry | None:
        return self.entries.get(attempt)

    def held_by(self, worker: str) -> list[AttemptId]:
        """Attempts ``worker`` holds or runs, in the order it took them."""
        return list(self._by_worker.get(worker, ()))

    def count(self, worker: str) -> int:
        """How many attempts ``worker`` holds or runs."""
        held = self._by_worker.get(worker)
        return len(held) if held else 0

    def first(self, worker: str) -> AttemptId | None:
        """The first attempt ``worker`` took of those it still holds (None if none)."""
        held = self._by_worker.get(worker)
        return next(iter(held)) if held else None

    def started_on(self, worker: str) -> list[AttemptId]:
        return [a for a in self._by_worker.get(worker, ()) if self.entries[a].where == "started"]

    def started(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.where == "started"]

    def next_deadline(self) -> float | None:
        """The earliest time a started attempt's timeout expires (for the caller's timer)."""
        return min(self._deadlines.values()) if self._deadlines else None

    # ------------------------------------------------------------------ events
    def handle(self, ev: Event) -> list[Command]:
        """The one entry: apply ``ev``, return what the backend is to do."""
        self.story.append(ev)
        out: list[Command] = []
        match ev:  # the most frequent first: a match tries its cases in order
            case Hold():
                self._hold(ev, out)
            case Start():
                self._start(ev, out)
            case Finish():
                self._finish(ev, out)
            case Enqueue():
                self._submit(ev, out)
            case TimePassed():
                self._tick(ev, out)
            case Revoke():
                self._cancel(ev, out)
            case Group():
                self._group(ev, out)
            case Bounce():
                self._bounce(ev, out)
            case WorkerLost():
                self._worker_lost(ev, out)
            case Drain():
                self._drain(ev, out)
            case Unrunnable():
                self._reject(ev, out)
            case RuntimeLost():
                self._runtime_lost(ev, out)
            case Renamed():
                self.entries[ev.attempt].item = ev.item
            case WorkerLeft():
                self._by_worker.pop(ev.worker, None)
            case _:
                assert_never(ev)
        if self.debug:
            self.validate()
        return out

    # ------------------------------------------------------------------ invariants
    def validate(self) -> None:
        """Check every invariant; raise :class:`InvariantViolation` naming the first one
        broken, with the recent events. For tests (``debug``): O(attempts)."""
        for problem in self._problems():
            raise InvariantViolation("attempt ledger", problem, self.story)

    def _problems(self) -> Iterator[str]:
        holder: dict[AttemptId, str] = {}
        for w, mine in self._by_worker.items():
            for aid in mine:
                if aid in holder:
                    yield f"attempt {aid} is held by both {holder[aid]} and {w}"
                holder[aid] = w
                e = self.entries.get(aid)
                if e is None:
                    yield f"worker {w} holds attempt {aid}, which is not in flight"
                elif e.worker != w or e.where == "queued":
                    yield f"worker {w} holds attempt {aid}, which is {e.where} by {e.worker!r}"
                elif w in self.drained and e.where == "held":
                    yield f"drained worker {w} still holds attempt {aid} it has not started"
        for aid, e in self.entries.items():
            k = f"attempt {aid} ({e.key!r}, {e.where})"
            if e.attempt != aid:
                yield f"{k} is filed under the id {aid} but is attempt {e.attempt}"
            if e.where == "queued":
                if e.worker or aid in holder:
                    yield f"{k} is queued but held by {e.worker or holder[aid]}"
                if e.started is not None or e.cancelled:
                    yield f"{k} is queued but started={e.started} cancelled={e.cancelled}"
            elif e.where in ("held", "started"):
                if holder.get(aid) != e.worker or not e.worker:
                    yield f"{k} names worker {e.worker!r} but is held by {holder.get(aid)!r}"
                if (e.where == "started") != (e.started is not None):
                    yield f"{k} has started={e.started}"
                if e.where == "started" and e.cancelled:
                    yield f"{k} is started and cancelled (a started attempt runs on)"
            else:
                yield f"{k}: no such place {e.where!r}"
            due = e.started + e.timeout if e.started is not None and e.timeout is not None else None
            if e.where == "started" and e.timeout is not None and self._deadlines.get(aid) != due:
                yield f"{k}: its deadline is {self._deadlines.get(aid)}, not started+timeout"
            if self.max_returns is not None and e.returned > self.max_returns:
                yield f"{k} was given back {e.returned} times (max_returns={self.max_returns})"
        for aid in self._deadlines:
            e = self.entries.get(aid)
            if e is None or e.where != "started" or e.timeout is None:
                yield f"attempt {aid} has a deadline but is not a started attempt with a timeout"

    def _submit(self, ev: Enqueue, out: list[Command]) -> None:
        for aid, key, item, timeout in ev.entries:
            self.entries[aid] = Entry(aid, key, item, timeout)

    def _group(self, ev: Group, out: list[Command]) -> None:
        e = self.entries.get(ev.attempt)
        if e is not None and e.worker == ev.worker:
            e.groups += (ev.pgid,)

    def _reject(self, ev: Unrunnable, out: list[Command]) -> None:
        e = self.entries.get(ev.attempt)
        if e is not None:
            self._forget(e)
            out.append(Report(self._lost(e, ev.category, ev.why, ev.time)))

    def _hold(self, ev: Hold, out: list[Command]) -> None:
        if ev.worker in self.drained:
            for aid in ev.attempts:
                out.append(Ignored(ev.worker, aid, f"worker {ev.worker} is drained"))
            return
        mine = self._by_worker.setdefault(ev.worker, {})
        for aid in ev.attempts:
            e = self.entries.get(aid)
            if e is None:
                out.append(Ignored(ev.worker, aid, "not in flight (finished, cancelled or lost)"))
            elif e.where != "queued":
                if e.worker != ev.worker:
                    out.append(Ignored(ev.worker, aid, f"already held by {e.worker}"))
            else:
                e.where, e.worker = "held", ev.worker
                mine[aid] = None

    def _start(self, ev: Start, out: list[Command]) -> None:
        e = self.entries.get(ev.attempt)
        why = ""
        if e is None:
            why = "it is not in flight any more (finished, cancelled or lost)"
        elif e.where == "started":
            why = f"it already started on {e.worker} (pid {e.pid})"
        elif e.where == "held" and e.worker != ev.worker:
            why = f"it is held by {e.worker}"
        elif e.cancelled:
            why = "it was cancelled"
        elif ev.worker in self.drained:
            why = f"worker {ev.worker} is drained ({self.drained[ev.worker]})"
            if e.where == "held":  # it goes to another worker, unblamed
                self._unhold(e)
                out.append(Requeue((e.item,)))
        if why or e is None:
            self.refused += 1
            if e is not None and e.cancelled:
                self._forget(e)  # its holder will not run it: nothing more to wait for
            out.append(Refused(ev.worker, ev.attempt, why))
            return
        if e.where == "queued":  # an engine without a separate hold step (Dask)
            self._by_worker.setdefault(ev.worker, {})[ev.attempt] = None
        e.where, e.worker, e.pid, e.host, e.started = "started", ev.worker, ev.pid, ev.host, ev.time
        if e.timeout is not None:
            self._deadlines[e.attempt] = ev.time + e.timeout
        out.append(Granted(ev.worker, ev.attempt))
        out.append(Report(Started(ev.attempt, ev.worker, ev.pid, ev.time, ev.host)))

    def _finish(self, ev: Finish, out: list[Command]) -> None:
        e = self.entries.get(ev.attempt)
        if e is None or e.worker != ev.worker or e.where == "queued":
            self.dropped += 1
            why = (
                "it is not in flight any more (finished, cancelled or lost)"
                if e is None
                else f"it is held by {e.worker or 'nobody'}, not {ev.worker}"
            )
            out.append(Ignored(ev.worker, ev.attempt, why))
            return
        self._forget(e)
        out.append(Accept(ev.worker, ev.attempt))

    def _cancel(self, ev: Revoke, out: list[Command]) -> None:
        for aid in ev.attempts:
            e = self.entries.get(aid)
            if e is None or e.where == "started" or e.cancelled:
                continue  # unknown, or runs on: its result is fenced by the workflow
            if e.where == "held":
                # the worker has it: it stays held (its start refused) until the worker
                # says it dropped it (Finish), or is lost (then it is not requeued)
                e.cancelled = True
            else:
                self._forget(e)
            out.append(Withdraw(e.worker, aid))

    def _bounce(self, ev: Bounce, out: list[Command]) -> None:
        e = self.entries.get(ev.attempt)
        if e is None:
            return
        if e.where == "started":
            self._forget(e)
            out.append(Report(self._lost(e, "worker_lost", ev.why, ev.time)))
        elif e.cancelled:
            self._forget(e)
        elif not ev.drained and self.max_returns is not None and e.returned + 1 > self.max_returns:
            self._forget(e)
            why = (
                f"task {e.key!r} (attempt id {e.attempt}) was given back "
                f"{e.returned + 1} times without running (last: {ev.why}); pilotfish gives "
                "up on this attempt (no worker died: it never started)"
            )
            e.worker, e.pid, e.host = "", 0, ""
            out.append(Report(self._lost(e, "worker_lost", why, ev.time)))
        else:
            if not ev.drained:
                e.returned += 1
            self._unhold(e)
            out.append(Requeue((e.item,)))

    def _drain(self, ev: Drain, out: list[Command]) -> None:
        self.drained[ev.worker] = ev.why
        back = []
        for aid in list(self._by_worker.get(ev.worker, ())):
            e = self.entries[aid]
            if e.where != "held":
                continue  # started: it runs on
            if e.cancelled:
                self._forget(e)
                out.append(Withdraw(ev.worker, aid))
            else:
                self._unhold(e)
                back.append(e.item)
        if back:
            out.append(Requeue(tuple(back)))

    def _worker_lost(self, ev: WorkerLost, out: list[Command]) -> None:
        ids = list(self._by_worker.pop(ev.worker, ()))
        groups: list[int] = []
        requeue: list[Any] = []
        for aid in ids:
            e = self.entries[aid]
            groups.extend(e.groups)
            if e.where == "started":
                del self.entries[aid]
                self._deadlines.pop(aid, None)
                elapsed = ev.time - e.started if e.started is not None else 0.0
                if ev.category == "worker_lost":
                    msg = (
                        f"{ev.why} while running task {e.key!r} (attempt id {aid}, "
                        f"after {elapsed:.2f} s)"
                    )
                    if ev.stderr_tail:
                        msg += f"; last lines of its stderr:\n{ev.stderr_tail}"
                else:
                    msg = ev.why
                out.append(
                    Report(
                        self._lost(
                            e, ev.category, msg, ev.time, ev.returncode, ev.signal, ev.stderr_tail
                        )
                    )
                )
            elif e.cancelled:  # cancelled while held: nothing to run again
                del self.entries[aid]
            else:  # held, never started: back on the queue, unblamed
                e.where, e.worker = "queued", ""
                requeue.append(e.item)
        if groups:
            out.append(KillGroups(ev.worker, tuple(groups)))
        if requeue:
            out.append(Requeue(tuple(requeue)))

    def _runtime_lost(self, ev: RuntimeLost, out: list[Command]) -> None:
        resend: list[Any] = []
        for e in list(self.entries.values()):
            if e.where == "started":
                msg = f"{ev.why} while task {e.key!r} was running"
                if ev.stderr_tail:
                    msg += f"; last lines of its stderr:\n{ev.stderr_tail}"
                lost = self._lost(
                    e, "runtime_lost", msg, ev.time, ev.returncode, ev.signal, ev.stderr_tail
                )
                # reported as lost with the master, not with a worker of it
                out.append(
                    Report(lost._replace(worker=ev.worker, pid=ev.pid, unblamed=ev.unblamed))
                )
                del self.entries[e.attempt]
            elif e.cancelled:
                del self.entries[e.attempt]
            else:
                e.where, e.worker = "queued", ""
                resend.append(e.item)
        self._by_worker.clear()
        self._deadlines.clear()
        if resend:
            out.append(Resend(tuple(resend)))

    def _tick(self, ev: TimePassed, out: list[Command]) -> None:
        for aid, deadline in list(self._deadlines.items()):
            if ev.time < deadline:
                continue
            e = self.entries[aid]
            assert e.timeout is not None and e.started is not None
            ran = ev.time - e.started
            self._forget(e)
            out.append(
                Report(
                    self._lost(
                        e,
                        "timeout",
                        f"task {e.key!r} exceeded its timeout of {e.timeout:g} s "
                        f"(ran {ran:.2f} s on {e.worker}"
                        f"{' at host ' + e.host if e.host else ''}, pid {e.pid})"
                        + (f"; {ev.how}" if ev.how else ""),
                        ev.time,
                    )
                )
            )
            out.append(Expired(e.worker, e.attempt, e.pid, e.groups, e.key))

    # ------------------------------------------------------------------ helpers
    def _lost(
        self,
        e: Entry,
        category: str,
        why: str,
        now: float,
        returncode: int | None = None,
        signal: str | None = None,
        stderr_tail: str = "",
    ) -> Lost:
        """The one report of a lost attempt (where it ran, since when, how it ended)."""
        return Lost(
            e.attempt,
            category,
            why,
            e.worker,
            e.pid,
            returncode,
            signal,
            stderr_tail,
            e.started,
            now,
            e.host,
        )

    def _unhold(self, e: Entry) -> None:
        if e.worker:
            self._by_worker.get(e.worker, {}).pop(e.attempt, None)
        e.where, e.worker = "queued", ""

    def _forget(self, e: Entry) -> None:
        if e.worker:
            self._by_worker.get(e.worker, {}).pop(e.attempt, None)
        del self.entries[e.attempt]
        self._deadlines.pop(e.attempt, None)


# --------------------------------------------------------------------------- runner


class Hooks(Protocol):
    """What a backend does for the ledger's commands (see :func:`carry_out`). Every
    backend implements every hook; one with nothing to do says why in its body."""

    def report(self, msg: Started | Lost) -> None:
        """Tell the session (``Report``)."""

    def send(self, items: tuple[Any, ...], resend: bool) -> None:
        """Run these never-started attempts again, unblamed, ahead of others: ``Requeue``
        (``resend=False``: to another worker) or ``Resend`` (to a new master)."""

    def withdraw(self, worker: str, attempt: int) -> None:
        """Take back an attempt that has not started (``worker`` holds it, or '')."""

    def kill_groups(self, worker: str, pgids: tuple[int, ...]) -> None:
        """Kill the process groups of programs whose worker is gone."""

    def expire(
        self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...], key: str = ""
    ) -> None:
        """Stop an attempt (of task ``key``) that ran past its timeout (already reported
        lost)."""


@dataclasses.dataclass(slots=True)
class Outcome:
    """What the commands answered for the caller: the start fence (``granted`` /
    ``refused``) and results (``accepted`` / ``dropped``)."""

    granted: list[Granted] = dataclasses.field(default_factory=list)
    refused: list[Refused] = dataclasses.field(default_factory=list)
    accepted: list[Accept] = dataclasses.field(default_factory=list)
    dropped: list[Ignored] = dataclasses.field(default_factory=list)

    def reasons(self) -> str:
        """Why a start was refused or a result dropped, for a log line."""
        return "; ".join([c.reason for c in self.refused] + [c.reason for c in self.dropped])


def carry_out(cmds: Sequence[Command], hooks: Hooks) -> Outcome:
    """Carry out the ledger's commands, in order, through ``hooks``; the fence's and the
    result fence's answers come back in the :class:`Outcome`."""
    out = Outcome()
    for c in cmds:
        match c:
            case Report():
                hooks.report(c.msg)
            case Granted():
                out.granted.append(c)
            case Accept():
                out.accepted.append(c)
            case Requeue():
                hooks.send(c.items, False)
            case Resend():
                hooks.send(c.items, True)
            case Withdraw():
                hooks.withdraw(c.worker, c.attempt)
            case Refused():
                out.refused.append(c)
            case Ignored():
                out.dropped.append(c)
            case KillGroups():
                hooks.kill_groups(c.worker, c.pgids)
            case Expired():
                hooks.expire(c.worker, c.attempt, c.pid, c.pgids, c.key)
            case _:
                assert_never(c)
    return out
