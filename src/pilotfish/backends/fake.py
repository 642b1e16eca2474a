"""An in-memory backend for tests: attempts run in this process, faults on cue.

As httpx ships a ``MockTransport``, pilotfish ships :class:`FakeBackend`: a
complete backend (the protocol of :mod:`pilotfish.backends.base`) without
processes, pipes or sockets, so the Session, the workflow core and the attempt
ledger are tested together in milliseconds, and races that are hard to provoke
with real processes are scripted exactly::

    from pilotfish.backends.fake import FakeBackend, LoseWorker

    fake = FakeBackend(faults=[LoseWorker(attempt=1, returncode=-9)])
    with pilotfish.Session(backend=fake, rundir=tmp, journal=None) as s:
        t = s.submit(pow, 2, 10)
    assert t.result() == 1024                       # attempt 2 ran it
    assert t.attempts[0].outcome == "worker_lost"   # attempt 1 died with its worker

How it works. ``workers`` threads take attempts in submission order (requeued or
resent ones first) and run them with :func:`pilotfish.runtime.execute.run_attempt`,
the code every real worker runs, so values, user exceptions and programs behave
as they do anywhere. The bookkeeping is a :class:`pilotfish.core.ledger.Ledger`,
as in every backend: a worker passes the ledger's start fence before user code
runs, results go through it, losses follow its rules. Its commands are carried out
by the backends' one runner (:func:`pilotfish.backends._driver.carry_out`) through
the fake's hooks (``report``, ``send``, ``withdraw``, ``kill_groups``, ``expire``),
and its threads belong to a :class:`pilotfish.backends._driver.Nursery` (a thread
that crashes is one ``Fatal``). Events reach the sink in
the order the ledger produced them, from the fake's threads. A ticker thread
sends ``Alive`` every ``alive_interval`` seconds (``None``: never, like a backend
without the signal) and ticks the ledger, so task timeouts expire; user code
cannot be killed in-process, so a timed-out attempt runs on in its thread and
its late result is dropped by the ledger.

Faults. Attempt ids are the workflow core's: 1, 2, 3, ... in dispatch order (a
retry takes the next free id). Each fault fires once, when its attempt is
granted to a worker (``Started`` is already reported):

==========================================  ==============================================
``LoseWorker(attempt, returncode=-9)``      the worker dies while running it: ``Lost``
                                            (WORKER_LOST, with exit code and signal),
                                            worker ``lost`` then ``replaced``
``LoseWorker(..., late_result=True)``       the same, but its user code had run: the
                                            result arrives late, right after the next
                                            attempt starts
``LoseMaster(attempt, restart=True)``       the master dies: started attempts are ``Lost``
                                            (RUNTIME_LOST), the others resent unblamed;
                                            it restarts, or ``restart=False``: ``Fatal``
``GoSilent(attempt=None)``                  nothing is delivered any more, not even
                                            ``Alive`` (``None``: at the first attempt)
``DuplicateResult(attempt)``                its result is delivered twice
``Reexecute(attempt, while_running=False)`` the engine starts it again on another worker
                                            after it finished (or while it runs): the
                                            ledger's fence refuses, user code does not run
==========================================  ==============================================

For assertions the fake keeps ``ran`` (attempt ids whose user code ran),
``refused`` and ``dropped`` (``(attempt, reason)`` from the ledger's fence),
``delivered`` (every event the sink got, in order), ``swallowed`` (withheld
while silent) and ``ledger`` itself.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from ..core import ledger as L
from ..core.ledger import describe_exit
from ..runtime.execute import run_attempt
from ._driver import Driver, Outcome, carry_out
from .base import Alive, BackendEvent, MasterReport, Result, RunAttempt, Sink, WorkerReport

__all__ = [
    "DuplicateResult",
    "FakeBackend",
    "Fault",
    "GoSilent",
    "LoseMaster",
    "LoseWorker",
    "Reexecute",
]


# --------------------------------------------------------------------------- faults


@dataclasses.dataclass(frozen=True, slots=True)
class LoseWorker:
    """The worker running ``attempt`` dies (``returncode``: -9 is SIGKILL). With
    ``late_result`` its user code had finished: the result is delivered after the
    loss, when the next attempt starts (a worker declared lost that was only slow)."""

    attempt: int
    returncode: int = -9
    stderr_tail: str = ""
    late_result: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class LoseMaster:
    """The master dies while ``attempt`` runs; it restarts unless ``restart=False``."""

    attempt: int
    returncode: int = -9
    restart: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class GoSilent:
    """From ``attempt`` on (``None``: the first attempt), deliver nothing at all."""

    attempt: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DuplicateResult:
    """Deliver ``attempt``'s result twice (in two batches)."""

    attempt: int


@dataclasses.dataclass(frozen=True, slots=True)
class Reexecute:
    """The engine tries to run ``attempt`` again on another worker: after it finished, or
    ``while_running``. The ledger's start fence must refuse it."""

    attempt: int
    while_running: bool = False


Fault = LoseWorker | LoseMaster | GoSilent | DuplicateResult | Reexecute
_FAULTS = (LoseWorker, LoseMaster, GoSilent, DuplicateResult, Reexecute)


# --------------------------------------------------------------------------- backend


class FakeBackend:
    """See the module docstring. ``Session(backend=FakeBackend(...))``."""

    name = "fake"
    drains_by_default = False

    def __init__(
        self,
        workers: int = 1,
        *,
        faults: Iterable[Fault] = (),
        rundir: str = ".pilotfish",
        alive_interval: float | None = 0.02,
        host: str = "fakehost",
        preload: Iterable[str] = (),
    ) -> None:
        self.preload = tuple(preload)  # imported here (this process) as the backend starts
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"FakeBackend(workers={workers!r}): give an int >= 1")
        if alive_interval is not None and not alive_interval > 0:
            raise ValueError(f"FakeBackend(alive_interval={alive_interval!r}): give s > 0")
        self.workers = workers
        self.rundir = rundir
        self.alive_interval = alive_interval
        self.host = host
        self.pid = os.getpid()  # every "process" of the fake is this one
        self.ledger = L.Ledger()
        self.ran: list[int] = []
        self.refused: list[tuple[int, str]] = []
        self.dropped: list[tuple[int, str]] = []
        self.delivered: list[BackendEvent] = []
        self.swallowed: list[BackendEvent] = []
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        for f in faults:
            self.add(f)
        self._work = threading.Condition(self._lock)
        self._emit_lock = threading.Lock()  # one batch at a time, in ledger order
        self._outbox: list[BackendEvent] = []
        self._queue: deque[int] = deque()
        self._names: list[str] = []
        self._made = 0
        self._late: list[Result] = []  # results of workers declared lost
        self._lose_after: dict[int, LoseWorker] = {}
        self._twice: set[int] = set()
        self._again_after: set[int] = set()
        self.driver = Driver("fake")
        self._stop = self.driver.stopping
        self._silent = False

    def add(self, fault: Fault) -> None:
        """Script one more fault (before or while the session runs)."""
        if not isinstance(fault, _FAULTS):
            raise TypeError(f"not a FakeBackend fault: {fault!r}")
        with self._lock:
            self._faults.append(fault)

    # ------------------------------------------------------------------ protocol
    def start(self, sink: Sink) -> None:
        self.driver.sink = sink
        if self.preload:
            from ..runtime.preflight import preload

            preload(self.preload, "fake")
        now = time.time()
        with self._lock:
            self._outbox.append(
                MasterReport("started", self.pid, now, message="fake backend (in-process)")
            )
            for _ in range(self.workers):
                self._names.append(self._new_worker(now))
            if self.alive_interval is not None:
                self._outbox.append(Alive(now))
        for slot in range(self.workers):
            self.driver.nursery.start(f"pilotfish-fake-w{slot + 1}", self._work_loop, slot)
        self.driver.nursery.start("pilotfish-fake-ticker", self._tick_loop)
        self._flush()

    def submit(self, attempts: Sequence[RunAttempt]) -> None:
        with self._lock:
            self.ledger.handle(L.Enqueue(tuple((a.attempt, a.key, a, a.timeout) for a in attempts)))
            self._queue.extend(a.attempt for a in attempts)
            self._work.notify_all()

    def cancel(self, attempts: Sequence[int]) -> None:
        with self._lock:
            self._run(self.ledger.handle(L.Revoke(tuple(attempts))))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads; one still inside user code is left to finish (it cannot be
        killed in-process) and nothing more is delivered."""
        with self._lock:
            self._stop.set()
            self._work.notify_all()
        self.driver.nursery.stop(min(timeout, 1.0))

    def processes(self) -> dict[str, Any]:
        return {"master": None, "workers": []}  # no processes: everything runs in this one

    def drain(self, name: str, kind: str = "worker", why: str = "") -> None:
        """The session drained worker ``name``: the ledger gives it nothing more (what it
        holds goes back, unblamed) and its slot gets a new worker, as the local master
        replaces one; an attempt it is running finishes there. A host is never drained
        (the fake's one host is the last)."""
        if kind != "worker":
            return
        with self._lock:
            now = time.time()
            self._run(self.ledger.handle(L.Drain(name, why or "drained", now)))
            if name in self._names:
                self._names[self._names.index(name)] = self._new_worker(now, replaces=name)
        self._flush()

    # ------------------------------------------------------------------ threads
    def _work_loop(self, slot: int) -> None:
        while True:
            with self._lock:
                while not self._stop.is_set() and (
                    self._silent or self.driver.dead or not self._queue
                ):
                    self._work.wait()
                if self._stop.is_set():
                    return
                aid = self._queue.popleft()
                entry = self.ledger.get(aid)
                if entry is None or entry.where != "queued":
                    continue  # withdrawn (cancelled) while queued
                m: RunAttempt = entry.item
                worker = self._names[slot]
                run = self._start(slot, worker, m)
            self._flush()
            if not run:
                continue
            res = run_attempt(m, worker=worker, host=self.host, rundir=self.rundir)
            with self._lock:
                self.ran.append(m.attempt)
                again = self._finish(slot, worker, res)
            self._flush()
            if again is not None:
                with self._lock:
                    self._outbox.append(again)
                self._flush()

    def _tick_loop(self) -> None:
        interval = self.alive_interval or 0.05
        while not self._stop.wait(interval):
            now = time.time()
            with self._lock:
                how = "the fake backend cannot stop user code; it runs on"
                self._run(self.ledger.handle(L.TimePassed(now, how)))
                if self.alive_interval is not None and not self.driver.dead:
                    self._outbox.append(Alive(now))
            self._flush()

    def _flush(self) -> None:
        with self._emit_lock:
            with self._lock:
                batch, self._outbox = self._outbox, []
                silent = self._silent
            if not batch or self._stop.is_set():
                return
            if silent:
                self.swallowed.extend(batch)
                return
            self.delivered.extend(batch)
            self.driver.emit(batch)

    # ------------------------------------------------------------------ attempts (locked)
    def _start(self, slot: int, worker: str, m: RunAttempt) -> bool:
        """The start fence, then this attempt's fault; True: run the user code."""
        now = time.time()
        start = L.Start(worker, m.attempt, self.pid, self.host, now)
        if not self._run(self.ledger.handle(start)).granted:
            return False
        self._outbox.extend(self._late)  # a lost worker's result, arriving late
        self._late.clear()
        fault = self._take_fault(m.attempt)
        if isinstance(fault, LoseWorker):
            if fault.late_result:
                self._lose_after[m.attempt] = fault
                return True
            self._lose_worker(slot, worker, fault, now)
            return False
        if isinstance(fault, LoseMaster):
            self._lose_master(fault, now)
            return False
        if isinstance(fault, GoSilent):
            self._silent = True
            return False
        if isinstance(fault, DuplicateResult):
            self._twice.add(m.attempt)
        elif isinstance(fault, Reexecute):
            if fault.while_running:
                self._reexecute(slot, m.attempt, now)
            else:
                self._again_after.add(m.attempt)
        return True

    def _finish(self, slot: int, worker: str, res: Result) -> Result | None:
        """Deliver a result through the ledger; a duplicate to send next, if scripted."""
        aid = res.attempt
        lose = self._lose_after.pop(aid, None)
        if lose is not None:
            self._lose_worker(slot, worker, lose, res.ended)
            self._late.append(res)
            return None
        if not self._run(self.ledger.handle(L.Finish(worker, aid))).accepted:
            return None
        self._outbox.append(res)
        if aid in self._again_after:
            self._again_after.discard(aid)
            self._reexecute(slot, aid, res.ended)
        if aid in self._twice:
            self._twice.discard(aid)
            return res
        return None

    def _reexecute(self, slot: int, aid: int, now: float) -> None:
        other = self._names[(slot + 1) % len(self._names)]
        if other == self._names[slot]:
            other = f"{other}-copy"  # one worker: the engine's copy elsewhere
        self._run(self.ledger.handle(L.Start(other, aid, self.pid, self.host, now)))

    def _lose_worker(self, slot: int, worker: str, f: LoseWorker, now: float) -> None:
        how, sig = describe_exit(f.returncode)
        why = f"worker {worker} (pid {self.pid}) {how}"
        running = tuple(self.ledger.started_on(worker))
        self._outbox.append(
            WorkerReport("lost", worker, self.pid, now, f.returncode, sig, running, why)
        )
        lost = L.WorkerLost(worker, why, now, f.returncode, sig, f.stderr_tail)
        self._run(self.ledger.handle(lost))
        new = self._new_worker(now, replaces=worker)
        self._names[slot] = new

    def _lose_master(self, f: LoseMaster, now: float) -> None:
        how, sig = describe_exit(f.returncode)
        what = f"the fake master (pid {self.pid}) {how}"
        self._outbox.append(MasterReport("lost", self.pid, now, f.returncode, sig, "", what))
        lost = L.RuntimeLost(what, now, "master", self.pid, f.returncode, sig)
        self._run(self.ledger.handle(lost))
        if not f.restart:
            self._outbox.append(self.driver.fatal(f"{what}; it is not restarted"))
            return
        self._outbox.append(MasterReport("restarted", self.pid, now, message="fake master"))
        self._names = [self._new_worker(now) for _ in self._names]  # its workers died with it

    def _new_worker(self, now: float, replaces: str = "") -> str:
        self._made += 1
        name = f"w{self._made}"
        if replaces:
            self._outbox.append(
                WorkerReport("replaced", name, self.pid, now, message=f"replaces {replaces}")
            )
        self._outbox.append(WorkerReport("started", name, self.pid, now))
        return name

    def _take_fault(self, aid: int) -> Fault | None:
        for i, f in enumerate(self._faults):
            if f.attempt == aid or (isinstance(f, GoSilent) and f.attempt is None):
                return self._faults.pop(i)
        return None

    def _run(self, cmds: list[L.Command]) -> Outcome:
        """Do what the ledger says (through the hooks below); keep what it refused and
        dropped."""
        out = carry_out(cmds, self)
        self.refused.extend((c.attempt, c.reason) for c in out.refused)
        self.dropped.extend((c.attempt, c.reason) for c in out.dropped)
        return out

    # ------------------------------------------------------------------ driver hooks
    # (called by carry_out with the lock held)

    def report(self, msg: L.Started | L.Lost) -> None:
        self._outbox.append(msg)

    def send(self, items: tuple[Any, ...], resend: bool) -> None:
        """Requeued or resent attempts go first, in order."""
        self._queue.extendleft(reversed([m.attempt for m in items]))
        self._work.notify_all()

    def withdraw(self, worker: str, attempt: int) -> None:
        pass  # the queue skips an attempt the ledger let go of; a held one is not started

    def kill_groups(self, worker: str, pgids: tuple[int, ...]) -> None:
        pass  # never asked: nothing here sends the ledger a Group (no process groups)

    def expire(
        self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...], key: str = ""
    ) -> None:
        pass  # user code cannot be stopped in-process: it runs on, its result is dropped
