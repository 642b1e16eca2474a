"""The client's driver: the one place that carries out what the workflow core decides.

::

    Session (submit, cancel, shutdown) --+
                                         v  stimuli
    backend events -> probes (ids < 0) | Translator -> core (workflow.Workflow)
                                                        |  commands
    backend.submit / cancel   <-- Dispatch, CancelAttempt --+
    futures, journal, on_event <-- Resolve, Reject, Transition, ...

Everything runs in two phases: under the lock, stimuli go to the core and its commands
are turned into :class:`Actions` (``run``, a ``match`` over every command kind, so a new
kind the driver forgets is a mypy error); after the lock, the actions are done
(``finish``): the backend is called, futures resolved, user callbacks run. The journal is
written from here only (``journal_task``, ``journal_started``, worker reports), and the
timer thread and the backend's sink lead here too. The rules live elsewhere: what a
backend event means (:mod:`.translate`), when a silent backend is given up
(:class:`pilotfish.core.policy.Silence`), what a resumed task continues (:mod:`.resume`).
"""

from __future__ import annotations

import concurrent.futures as cf
import heapq
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, assert_never

from ..backends.base import (
    Alive,
    Backend,
    BackendEvent,
    Fatal,
    Lost,
    MasterReport,
    Result,
    Started,
    Unlinked,
)
from ..core import workflow as wf
from ..core.ledger import describe_exit
from ..core.policy import Silence
from ..core.states import State
from ..errors import Category, FailureRecord
from ..runtime.programs import make_lineage
from ..wire import messages as _wire
from . import lifecycle
from .events import HostDrained, MasterEvent, TaskEvent, WorkerEvent, WorkersGone
from .probes import Probes, is_probe
from .programs import backstop
from .settled import failure_of
from .staging import stage_failure
from .translate import Translator

if TYPE_CHECKING:
    from ..store.journal import Journal
    from .resume import Resumer
    from .task import Task, TaskTable

log = logging.getLogger("pilotfish")

__all__ = ["Actions", "Driver"]


class Actions:
    """Side effects of core commands, collected under the lock, done after it."""

    __slots__ = ("cancels", "dispatch", "events", "finish", "wake")

    def __init__(self) -> None:
        self.dispatch: list[_wire.RunAttempt] = []
        self.cancels: list[int] = []
        self.finish: list[tuple[Task, bool, Any]] = []
        self.events: list[Any] = []
        self.wake: float | None = None


class Driver:
    """Feeds the core (under ``lock``) and carries out its commands (after it).

    ``core``, ``tasks`` and ``journal`` are read and written under ``lock`` only. The
    backend is attached by :meth:`start`. The driver holds its session only while it has
    work (``hold_session``), and is held weakly by its timer thread and by the backend's
    sink, so an idle session the user dropped is collected, and closes itself. (A little
    over the size guide: it is the one place every command of the core is carried out.)"""

    def __init__(
        self,
        core: wf.Workflow,
        tasks: TaskTable,
        translate: Translator,
        journal: Journal | None,
        resumer: Resumer | None,
        *,
        lock: threading.RLock,
        clock: Callable[[], float],
        listeners: list[Callable[[Any], None]],
        nonce: str,
        keep_all_sandboxes: bool,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        rundir: str | None = None,
    ) -> None:
        self.lock = lock
        self.rundir = rundir  # where a failure's files are staged (client/staging.py)
        self.core = core
        self.tasks = tasks
        self.translate = translate
        self.journal = journal
        self.resumer = resumer
        self.clock = clock
        self.listeners = listeners
        core.transitions = bool(listeners)  # only on_event listeners need them
        self.nonce = nonce
        self.keep_all = keep_all_sandboxes
        self.init = b""  # the initializer's payload, sent with every attempt
        #: the largest value the journal keeps (Session(journal_values=)); None: any
        self.value_limit: int | None = None
        self.probes = Probes()
        self.backend: Backend | None = None
        self.held: Any = None  # the session, held (lifecycle.busy) while it has work
        self.closed = False
        self.gave_up = False  # the backend went silent: stop it without a long goodbye
        self.timers: list[float] = []
        self.timer_cv = threading.Condition(lock)
        # shutdown(wait=True) waits on this; bounded by the backend's silence
        self.drained = threading.Condition(lock)
        self.draining = False
        self.hb_interval, self.hb_timeout = heartbeat_interval, heartbeat_timeout
        self.silence = Silence(heartbeat_timeout + heartbeat_interval)
        #: keys of the tasks made by ``Task.output()``: references, not the user's tasks
        self.output_keys: set[str] = set()

    @property
    def public_events(self) -> bool:
        return bool(self.listeners)

    # ---------------------------------------------------------------- start
    def start(self, backend: Backend) -> None:
        """Start the timer thread and the backend, which from now on calls the sink."""
        self.backend = backend
        threading.Thread(
            target=_timer_loop,
            args=(weakref.ref(self), self.timer_cv),
            name="pilotfish-timer",
            daemon=True,
        ).start()
        backend.start(_weak_sink(self))

    @property
    def running_backend(self) -> Backend:
        assert self.backend is not None, "the driver was not started"
        return self.backend

    # ---------------------------------------------------------------- stimuli
    def handle(self, stimulus: wf.Event) -> None:
        """One stimulus to the core, and its commands carried out."""
        acts = Actions()
        with self.lock:
            self.run(self.core.handle(stimulus), acts)
        self.finish(acts)

    def enqueue(
        self,
        task: Task,
        restored: tuple[bytes, Any] | None,
        earlier: Any,
        call: str | None = None,
    ) -> None:
        """A registered task enters the core: restored from the journal (``restored``), or
        submitted (continuing ``earlier``, an interrupted attempt of an earlier run);
        ``call``, the description of its call for the journal's submit row, is not kept."""
        acts = Actions()
        with self.lock:
            if self.tasks.gone:
                self.forget_freed()
            now = self.clock()
            if restored is not None:
                task._value_bytes, task._pending_value = restored
                task._payload = b""
                cmds = self.core.handle(wf.Restore(task._tid, task.key, now))
            else:
                if earlier is not None and self.resumer is not None:
                    self.resumer.pending[task._tid] = earlier
                deps = tuple(d._tid for d in task._deps)
                o = task.options
                cmds = self.core.handle(
                    wf.Submit(
                        task._tid,
                        task.key,
                        deps,
                        o.retries,
                        now,
                        task._settled,
                        1 if o.timeout_retries is None else o.timeout_retries,
                    )
                )
                if self.journal is not None:
                    self.journal.record_submit(task, now, call)
            self.run(cmds, acts)
        self.finish(acts)

    def cancel(self, task: Task) -> bool:
        """Cancel ``task`` if it has not started (``Future.cancel``)."""
        acts = Actions()
        with self.lock:
            state = self.core.state(task._tid)
            if state is State.CANCELLED:
                return True
            if state.final or self.core.is_started(task._tid):
                return False
            self.run(self.core.handle(wf.Cancel(task._tid, self.clock())), acts)
            ok = self.core.state(task._tid) is State.CANCELLED
        self.finish(acts)
        return ok

    def cancel_unfinished(self) -> None:
        """``shutdown(cancel_futures=True)``: cancel every task that has not started."""
        acts = Actions()
        with self.lock:
            for t in self.tasks.unfinished():
                self.run(self.core.handle(wf.Cancel(t._tid, self.clock())), acts)
        self.finish(acts)

    # ---------------------------------------------------------------- commands
    def run(self, cmds: list[wf.Command], acts: Actions) -> None:
        """Carry out core commands (under the lock); side effects go to ``acts``."""
        for c in cmds:
            match c:
                case wf.Transition():
                    if self.listeners:
                        t = self.tasks[c.tid]
                        n = len(self.core.attempts(c.tid)) or None
                        f = self.core.failure(c.tid) if c.finish is State.FAILED else None
                        acts.events.append(TaskEvent(t.key, t.name, c.start, c.finish, c.now, n, f))
                case wf.Dispatch():
                    acts.dispatch.append(self._attempt(c))
                case wf.Drained():
                    acts.events.append(self._drain(c))
                case wf.Resolve():
                    t = self.tasks[c.tid]
                    self._ended(c.tid)
                    value, t._pending_value = t._pending_value, None
                    if c.attempt is not None:  # restored tasks are in the journal already
                        self.journal_task(t, "DONE", value=t._value_bytes)
                    t._payload = b""  # never dispatched again
                    acts.finish.append((t, True, value))
                case wf.Reject():
                    t = self.tasks[c.tid]
                    self._ended(c.tid)
                    # (a linked attempt's result may have come, then been dropped)
                    t._value_bytes = t._pending_value = None
                    acts.finish.append((t, False, self.translate.exception_for(t, c.failure)))
                    self.journal_task(t, "FAILED", failure=c.failure)
                case wf.Cancelled():
                    self._ended(c.tid)
                    t = self.tasks[c.tid]
                    t._value_bytes = t._pending_value = None
                    acts.finish.append((t, False, None))
                    self.journal_task(t, "CANCELLED")
                case wf.CancelAttempt():
                    acts.cancels.append(c.attempt)
                case wf.Wake():
                    acts.wake = c.at if acts.wake is None else min(acts.wake, c.at)
                case wf.Dropped():
                    log.info("dropped %s event of attempt %s: %s", c.event, c.attempt, c.reason)
                case _:
                    assert_never(c)
        if acts.finish and not self.core.unfinished():
            if self.draining:
                self.drained.notify_all()
            self.release_session()  # idle: the user's references alone keep it now

    def _inputs(self, t: Task) -> tuple[bytes, ...]:
        """The pickled values of ``t``'s inputs; one it takes settled that did not succeed
        is its :class:`pilotfish.Failure` (see :mod:`.settled`)."""
        if t._settled is None:
            return tuple(d._value_bytes or b"" for d in t._deps)
        return tuple(
            d._value_bytes
            if d._value_bytes is not None
            else _wire.dumps_value(failure_of(d, self.core.failure(d._tid)))
            for d in t._deps
        )

    def _attempt(self, c: wf.Dispatch) -> _wire.RunAttempt:
        """The message that runs attempt ``c.attempt`` of its task on a worker."""
        t = self.tasks[c.tid]
        earlier = None
        if self.resumer is not None:  # resume: this task continues an interrupted attempt
            earlier = self.resumer.for_dispatch(c.tid, c.resume)
            if earlier is not None and t._kind == "call":
                self.core.attempts(c.tid)[-1].note = earlier[1]
        deps = self._inputs(t)
        links: tuple[tuple[int, int], ...] = ()
        if c.links:  # inputs still running: the backend passes their values on
            of = dict(c.links)
            links = tuple((i, of[d._tid]) for i, d in enumerate(t._deps) if d._tid in of)
            deps = tuple(b"" if d._tid in of else v for d, v in zip(t._deps, deps, strict=True))
        return _wire.RunAttempt(
            c.attempt,
            t.key,
            t._kind,
            t._payload,
            deps,
            t.options.timeout if t._kind == "call" else backstop(t._cmd_timeout),
            t.options.requires,
            t._programs,
            self.init,
            c.tid,
            make_lineage(self.nonce, c.resume, earlier and earlier[0]),
            t.name,
            self.keep_all,
            c.avoid,
            links,
        )

    def _drain(self, c: wf.Drained) -> HostDrained:
        """The core drained a worker or host: tell the backend (its optional ``drain(name,
        kind=...)``: Dask retires the worker, the local master replaces it), journal it,
        log it; the public ``HostDrained`` event."""
        log.warning("pilotfish: %s (tasks: %s)", c.reason, ", ".join(c.keys))
        try:
            self.running_backend.drain(
                c.name, kind=c.kind, why=f"{c.reason} (tasks: {', '.join(c.keys)})"
            )
        except Exception:
            log.exception("pilotfish: the backend could not drain %s %s", c.kind, c.name)
        if self.journal is not None:
            self.journal.record_drain(
                {
                    "kind": c.kind,
                    "name": c.name,
                    "host": c.host,
                    "time": c.now,
                    "reason": c.reason,
                    "keys": list(c.keys),
                    "attempts": list(c.attempts),
                }
            )
        return HostDrained(c.kind, c.name, c.host, c.now, c.reason, c.keys)

    def _ended(self, tid: int) -> None:
        if self.resumer is not None:
            self.resumer.ended(tid)

    def hold_session(self, session: Any) -> None:
        """A task was registered (under the lock): ``session`` is held until it is idle,
        as concurrent.futures holds an executor with pending work."""
        if self.held is None:
            self.held = session
            lifecycle.busy(session)

    def release_session(self) -> None:
        if self.held is not None:
            lifecycle.idle(self.held)
            self.held = None

    def forget_freed(self) -> None:
        """Drop the core's records of finished tasks nobody holds any more."""
        forget = self.core.forget
        for tid in self.tasks.collect(self.core.key):
            forget(tid)

    # ---------------------------------------------------------------- journal
    def journal_started(self, ev: wf.AttemptStarted) -> None:
        """The core took an attempt's start: journal what finds its sandbox later (a
        resumed run continues it if the client dies meanwhile)."""
        assert self.journal is not None
        tid = self.core.task_of(ev.attempt)
        if tid is None:
            return
        a = self.core.attempts(tid)[-1]
        if a.id == ev.attempt and a.started == ev.now:  # not a dropped (late, duplicate) one
            self.journal.record_started(self.core.key(tid), self.nonce, a.id, a.number, ev.now)

    def journal_task(
        self,
        t: Task,
        state: str,
        failure: FailureRecord | None = None,
        value: bytes | None = None,
    ) -> None:
        if self.journal is not None:
            if value is not None and not self._keeps(t, value):
                value = None  # DONE without a value: resume runs it again
            self.journal.record(
                t,
                state,
                self.core.packed_history(t._tid),  # unpacked by the journal's writer
                self.core.attempts(t._tid),
                failure,
                value,
            )

    def _keeps(self, t: Task, value: bytes) -> bool:
        """Does the journal keep ``t``'s value (its ``keep_result``, else the session's
        ``journal_values``: ``value_limit`` None for all, else a size in bytes)?"""
        keep = t.options.keep_result
        if keep is not None:
            return keep
        return self.value_limit is None or len(value) <= self.value_limit

    # ---------------------------------------------------------------- after the lock
    def finish(self, acts: Actions) -> None:
        """Side effects of commands, outside the lock (user callbacks run here)."""
        if acts.wake is not None:
            with self.lock:
                heapq.heappush(self.timers, acts.wake)
                self.timer_cv.notify()
        if acts.cancels:
            self.running_backend.cancel(acts.cancels)
        if acts.dispatch:
            self.running_backend.submit(acts.dispatch)
        if acts.finish:
            for t, ok, value in acts.finish:
                if t.done():
                    continue
                if ok:
                    t.set_result(value)
                elif value is None:
                    t._force_cancel()
                else:
                    t.set_exception(value)
            with self.lock:
                for t, _, _ in acts.finish:
                    self.tasks.release(t._tid)
        for e in acts.events:
            for listener in self.listeners:
                try:
                    listener(e)
                except Exception:
                    log.exception("pilotfish: on_event callback raised on %r", e)

    # ---------------------------------------------------------------- backend events
    def _staged(self, res: Result) -> Result:
        """A failed result with its shipped files staged (client/staging.py): the same
        result if that went wrong in a way it did not foresee (logged; the record keeps
        the worker's paths)."""
        assert self.rundir is not None
        try:
            return stage_failure(res, self.rundir)
        except Exception:
            log.exception("pilotfish: cannot stage the files of failed attempt %s", res.attempt)
            return res

    def on_backend_events(self, events: Sequence[BackendEvent]) -> None:
        """The backend's sink (any thread): route each event, then act outside the lock.
        A failed attempt's files that cannot be read here are staged first, unlocked."""
        if self.rundir is not None and any(isinstance(e, Result) and not e.ok for e in events):
            events = [self._staged(e) if isinstance(e, Result) and not e.ok else e for e in events]
        acts = Actions()
        with self.lock:
            self.silence.heard(time.monotonic())
            if self.tasks.gone:
                self.forget_freed()
            for ev in events:
                try:
                    self._route(ev, acts)
                except BaseException as e:  # even SystemExit: never kill a backend's thread
                    log.exception("pilotfish: error handling backend event %r", ev)
                    self._unroutable(ev, e, acts)
        self.finish(acts)

    def _unroutable(self, ev: BackendEvent, err: BaseException, acts: Actions) -> None:
        """An attempt's end that could not be handled (a bug in pilotfish) must not leave
        its task waiting for ever: the attempt fails RUNTIME_LOST, naming the error, and is
        not retried (the same end would fail the same way)."""
        attempt = getattr(ev, "attempt", None)
        if not isinstance(ev, Result | Lost | Unlinked) or not isinstance(attempt, int):
            return
        try:
            tid = None if is_probe(attempt) else self.core.owner(attempt)
            if tid is None:
                return
            key = self.core.key(tid)
            msg = (
                f"pilotfish could not take the end of attempt {attempt} of task "
                f"{key!r} ({type(err).__name__}: {err}); what the attempt "
                "returned is unknown, so the task failed. This is a bug in pilotfish: "
                "please report it with the session's log"
            )
            f = FailureRecord(
                key=key,
                category=Category.RUNTIME_LOST,
                message=msg,
                exc_type=type(err).__name__,
                traceback="".join(traceback.format_exception(err)),
                attempt=len(self.core.attempts(tid)),
            )
            failed = wf.Failed(attempt, f, self.clock(), override=wf.FailOverride())
            self.run(self.core.handle(failed), acts)
        except BaseException:
            log.exception("pilotfish: cannot fail attempt %s after that error", attempt)

    def _route(self, ev: BackendEvent, acts: Actions) -> None:
        if isinstance(ev, Result | Started | Lost) and is_probe(ev.attempt):
            self.probes.deliver(ev)
            return
        if isinstance(ev, Alive):
            self.silence.heard(time.monotonic(), alive=True)
            return
        if isinstance(ev, Fatal):
            self.probes.fail_all(ev.message)
        if isinstance(ev, _wire.WorkerReport) and self.journal is not None:
            msg = ev.message
            if ev.kind == "lost" and not msg:  # every backend names the cause; just in case
                msg = f"worker {ev.worker} {describe_exit(ev.returncode)[0]}"
            self.journal.record_event(ev.time, ev.kind, ev.worker, ev.pid or None, None, msg)
        if isinstance(ev, MasterReport) and ev.kind != "started" and self.journal is not None:
            # the master or scheduler lost, back, its link silent: `status` shows when
            self.journal.record_event(
                ev.time, f"master-{ev.kind}", "", ev.pid or None, None, ev.message
            )
        step = self.translate.event(ev)
        if step is None:
            return
        if isinstance(step, WorkerEvent | MasterEvent | WorkersGone):
            acts.events.append(step)
            return
        self.run(self.core.handle(step), acts)
        if isinstance(step, wf.AttemptStarted) and self.journal is not None:
            self.journal_started(step)
        if isinstance(step, wf.Failed):  # a retry is coming: keep the failed attempt on record
            tid = self.core.task_of(step.attempt)
            if tid is not None and not self.core.state(tid).final:
                self.journal_task(self.tasks[tid], self.core.state(tid).name)

    # ---------------------------------------------------------------- shutdown
    def drain(self) -> None:
        """Wait until every task is final, or the backend is silent for too long."""
        while True:
            with self.lock:
                self.draining = True
                acts = self._wait_drained()
            if acts is None:
                break
            self.finish(acts)
        # tasks final in the core: their futures are being resolved (outside the lock)
        with self.lock:
            pending = [t for t in self.tasks.unfinished() if not t.done()]
        cf.wait(pending)

    def _wait_drained(self) -> Actions | None:
        """Under the lock: None once no task is unfinished; else what giving up on a
        silent backend does (every unfinished task fails RUNTIME_LOST)."""
        while self.core.unfinished():
            silent = self.silence.silent_for(time.monotonic())
            if silent is not None:
                inflight = len(self.core.running_attempts())
                if inflight:
                    return self._give_up(silent, inflight)
            self.drained.wait(self.hb_interval / 2)
        return None

    def _give_up(self, silent: float, inflight: int) -> Actions:
        backend = self.running_backend
        name = getattr(backend, "name", type(backend).__name__)
        msg = (
            f"the {name} backend sent nothing for {silent:.1f} s (heartbeat_timeout="
            f"{self.hb_timeout:g} s) while {inflight} attempt(s) were in flight, so the "
            "session stopped waiting for them at shutdown; check that the backend's master "
            "or scheduler is still running and reachable (`pilotfish status` lists its "
            "processes) and read its log"
        )
        log.warning("pilotfish: %s", msg)
        self.gave_up = True
        now = self.clock()
        acts = Actions()
        if self.listeners:
            acts.events.append(MasterEvent("lost", 0, now, message=msg))
        self.probes.fail_all(msg)
        self.run(self.core.handle(wf.Abort(Category.RUNTIME_LOST, msg, now)), acts)
        return acts

    def close(self) -> bool:
        """Mark the driver closed (under the lock); False if it already was."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            self.release_session()
            self.timer_cv.notify_all()
        return True


def _timer_loop(ref: weakref.ref[Driver], cv: threading.Condition) -> None:
    """The driver's timer thread (Wake commands: backoff, timeouts, drains): it holds the
    driver only weakly, so a session the user dropped is collected even while this waits."""
    with cv:
        while True:
            d = ref()
            if d is None or d.closed:
                return
            now = d.clock()
            timers = d.timers
            if timers and timers[0] <= now:
                while timers and timers[0] <= now:
                    heapq.heappop(timers)
                acts = Actions()
                d.run(d.core.handle(wf.TimePassed(now)), acts)
                cv.release()
                try:
                    d.finish(acts)
                finally:
                    cv.acquire()
                continue
            timeout = (timers[0] - now) if timers else None
            del d, timers
            cv.wait(timeout)


def _weak_sink(driver: Driver) -> Callable[[Sequence[BackendEvent]], None]:
    """The backend's sink, holding the driver weakly (see ``_timer_loop``)."""
    ref = weakref.ref(driver)

    def sink(events: Sequence[BackendEvent]) -> None:
        d = ref()
        if d is not None:
            d.on_backend_events(events)

    return sink
