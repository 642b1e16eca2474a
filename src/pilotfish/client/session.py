"""Session (a ``concurrent.futures.Executor``) and Task (a ``Future``).

The session is the only driver of I/O on the client, and a thin loop::

    user calls -----> submit, executable, cancel -----------+
                                                            v   events
    backend events -> _probes (ids < 0) | _translate -> core (workflow.Workflow)
                                                            |   commands
    backend.submit / cancel   <-- Dispatch, CancelAttempt --+
    futures, journal, on_event <-- Resolve, Reject, Transition

It turns user calls and backend events into events for the pure workflow core
(:mod:`pilotfish.core.workflow`), executes the commands the core returns, and
runs user callbacks outside its lock. The rules live elsewhere, each in one
named place: what a backend event means (:mod:`._translate`), what a program
call may be (:mod:`._programs`), how a call is pickled (:mod:`._payloads`),
pre-flight probes (:mod:`._probes`), when a silent backend is given up
(:class:`pilotfish.core.policy.Silence`).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import contextlib
import heapq
import itertools
import logging
import os
import pickle
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..backends import backend_factory
from ..backends.base import Alive, Backend, BackendEvent, Fatal, Lost, Result, Started
from ..core import workflow as wf
from ..core.ledger import describe_exit
from ..core.policy import Backoff, Silence
from ..core.states import State
from ..errors import Category, EnvironmentMismatch, FailureRecord, InvalidTask
from ..runtime.execute import call_chunk, shared_process
from ..runtime.programs import find_sandbox, make_lineage, newest_sandbox, sandbox_index
from ..store import rundir as _rundir
from ..store.journal import Journal, JournalError
from ..store.trust import secure_rundir
from ..wire import messages as _wire
from .events import MasterEvent, TaskEvent, WorkerEvent, WorkersGone
from .options import (
    TaskFunction,
    TaskOptions,
    check_rundir,
    check_session_args,
    check_wait,
    str_list,
)
from .payloads import call_digest, call_key_digest, pickle_call
from .probes import Probes, is_probe
from .programs import backstop, input_stamps, program_spec
from .task import Task
from .translate import Call, Fail, Retry, Translator, drain_policy, on_drained

log = logging.getLogger("pilotfish")

__all__ = ["Call", "Fail", "Retry", "Session", "Task", "as_completed", "wait"]


_DEFAULT_OPTIONS = TaskOptions()  # frozen: one shared instance (the journal caches its JSON)


class _Actions:
    """Side effects of core commands, collected under the lock, done after it."""

    __slots__ = ("cancels", "dispatch", "events", "finish", "wake")

    def __init__(self) -> None:
        self.dispatch: list[_wire.RunAttempt] = []
        self.cancels: list[int] = []
        self.finish: list[tuple[Task, bool, Any]] = []
        self.events: list[Any] = []
        self.wake: float | None = None


class _TaskRef(weakref.ref):  # type: ignore[type-arg]
    __slots__ = ("tid",)
    tid: int


class _TaskTable:
    """The session's tasks by id, holding only the unfinished ones.

    A finished task stays reachable while the user (or a dependent task) holds it, and
    is freed with its result when nobody does: its id then appears in ``gone`` (a
    weakref callback, in whatever thread the last reference died; it only appends), and
    the session drops its record from the core under its lock (``Workflow.forget``; the
    journal has it). So memory grows with the tasks the user keeps, not with every task
    ever run, and an executor keeps no reference to results, as concurrent.futures
    promises.
    """

    __slots__ = ("_gone_cb", "_ids", "_live", "_refs", "gone")

    def __init__(self) -> None:
        self._live: dict[int, Task] = {}
        self._refs: dict[int, _TaskRef] = {}
        self._ids: dict[str, int] = {}  # every key ever used in the session -> task id
        self.gone: collections.deque[int] = collections.deque()
        gone = self.gone

        def on_gone(ref: _TaskRef) -> None:
            gone.append(ref.tid)

        self._gone_cb = on_gone

    def add(self, task: Task) -> None:
        tid = task._tid
        self._live[tid] = task
        ref = _TaskRef(task, self._gone_cb)
        ref.tid = tid
        self._refs[tid] = ref
        self._ids[task.key] = tid

    def release(self, tid: int) -> None:
        """``tid`` is final: hold it no more (it lives on while someone else holds it)."""
        self._live.pop(tid, None)

    def collect(self) -> list[int]:
        """The ids of tasks freed since the last call (under the session's lock)."""
        gone, refs, out = self.gone, self._refs, []
        while gone:
            tid = gone.popleft()
            ref = refs.get(tid)
            if ref is not None and ref() is None:
                del refs[tid]
                out.append(tid)
        return out

    def forget(self, task: Task) -> None:
        """A submit that failed half-way: as if never submitted (its key is free again)."""
        self._live.pop(task._tid, None)
        self._refs.pop(task._tid, None)
        if self._ids.get(task.key) == task._tid:
            del self._ids[task.key]

    def __getitem__(self, tid: int) -> Task:
        t = self._live.get(tid)
        if t is None:
            t = self._refs[tid]()
            if t is None:
                raise KeyError(tid)
        return t

    def get(self, tid: int) -> Task | None:
        t = self._live.get(tid)
        if t is None:
            ref = self._refs.get(tid)
            t = None if ref is None else ref()
        return t

    def by_key(self, key: str) -> Task | None:
        tid = self._ids.get(key)
        return None if tid is None else self.get(tid)

    def used(self, key: str) -> bool:
        return key in self._ids

    def alive(self) -> list[Task]:
        """The tasks that still exist (unfinished, or held by someone), in submission order."""
        out = [r() for r in list(self._refs.values())]
        return [t for t in out if t is not None]

    def unfinished(self) -> list[Task]:
        return list(self._live.values())


_live_sessions: weakref.WeakSet[Session] = weakref.WeakSet()
#: sessions with unfinished work keep themselves alive (the user may drop every
#: reference, as with ``pool.submit(print, "x")``: the work still runs, as in
#: concurrent.futures); an idle session is freed once the user lets go of it
_busy_sessions: set[Session] = set()
#: listeners added to every Session created in this process (used by `pilotfish run`)
_global_listeners: list[Callable[[Any], None]] = []
_exiting = False


def _python_exit() -> None:
    """At interpreter exit (before non-daemon threads are joined and before ``atexit``),
    as concurrent.futures does: every session runs its pending work to the end, then
    stops; new submits raise. Ctrl-C while waiting cancels what has not started."""
    global _exiting
    _exiting = True
    for s in sorted(_live_sessions, key=id):
        try:
            s.shutdown(wait=True)
        except KeyboardInterrupt:
            s.shutdown(wait=False, cancel_futures=True, _stop_now=True)
        except Exception:
            log.exception("pilotfish: shutting down %r at exit", s)


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


@atexit.register
def _shutdown_all() -> None:
    """Backstop: whatever is still running when atexit runs is stopped now."""
    for s in list(_live_sessions):
        with contextlib.suppress(Exception):
            s.shutdown(wait=False, cancel_futures=True, _stop_now=True)


def _timer_loop(ref: weakref.ref[Session], cv: threading.Condition) -> None:
    """The session's timer thread: it holds the session only weakly, so a session the
    user dropped is collected (and stops its backend) even while this waits."""
    with cv:
        while True:
            s = ref()
            if s is None or s._closed:
                return
            now = s._clock()
            timers = s._timers
            if timers and timers[0] <= now:
                while timers and timers[0] <= now:
                    heapq.heappop(timers)
                acts = _Actions()
                s._run(s._core.handle(wf.Tick(now)), acts)
                cv.release()
                try:
                    s._finish(acts)
                finally:
                    cv.acquire()
                continue
            timeout = (timers[0] - now) if timers else None
            del s, timers
            cv.wait(timeout)


def _weak_sink(session: Session) -> Callable[[Sequence[BackendEvent]], None]:
    """The backend's sink, holding the session weakly (see ``_timer_loop``)."""
    ref = weakref.ref(session)

    def sink(events: Sequence[BackendEvent]) -> None:
        s = ref()
        if s is not None:
            s._on_backend_events(events)

    return sink


class _Closer:
    """What closing a session does, kept apart from the session so that it also runs
    when the session is garbage-collected (``weakref.finalize``)."""

    def __init__(
        self,
        backend: Backend,
        journal: Journal | None,
        core: wf.Workflow,
        timer_cv: threading.Condition,
        locks: list[_rundir.RundirLock],
    ) -> None:
        self.backend = backend
        self.journal = journal
        self.locks = locks  # the run directory's: released last, once nothing writes
        self.core = core
        self.timer_cv = timer_cv
        self.stop_timeout: float | None = None  # set when the backend was given up
        self.collected = False

    def __call__(self) -> None:
        with self.timer_cv:
            self.timer_cv.notify_all()  # the timer thread sees its session gone, and ends
        if self.collected:
            # collected by the garbage collector, perhaps on one of the backend's own
            # threads, which stop() joins: stop it from a thread of its own
            threading.Thread(target=self.close, name="pilotfish-close", daemon=True).start()
        else:
            self.close()

    def close(self) -> None:
        if self.stop_timeout is not None:
            self.backend.stop(self.stop_timeout)
        else:
            self.backend.stop()
        if self.journal is not None:
            counts = self.core.counts
            status = (
                "failed"
                if counts[State.FAILED]
                else ("finished" if not self.core.unfinished() else "interrupted")
            )
            self.journal.close(status)
        _rundir.release(self.locks)


class Session(cf.Executor):
    """Run Python callables (and programs) with every failure recorded and handled.

    Keywords: ``workers`` (default: CPU count), ``backend`` (``"local"``, ``"dask"``,
    ``"radical"``, or a backend object such as
    :class:`pilotfish.backends.fake.FakeBackend`), ``rundir``, ``keep_going`` (default
    True: independent work continues after a failure; False cancels what has not
    started), ``on_event(event)``, ``on_failure(failure, call)``, ``poison_after``
    (worker deaths that make a task poison), ``heartbeat_interval``/``heartbeat_timeout``
    (s; a backend that sends ``Alive`` and then stays silent for longer than
    ``heartbeat_timeout`` while ``shutdown`` waits has its unfinished tasks failed
    RUNTIME_LOST), ``max_master_restarts``, ``backoff`` (a
    :class:`pilotfish.core.policy.Backoff`), ``clock`` and ``rand`` (injected for
    deterministic tests), ``drain_after`` (None: off; ``3`` or ``(3, 600.0)``: a worker
    or host where 3 different tasks failed WORKER_LOST, ENVIRONMENT or TIMEOUT within
    600 s is drained, those attempts uncharged; see :mod:`pilotfish.core.drain`). Other
    keywords go to the backend.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        max_workers: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        backend: str | Backend = "local",
        rundir: str = ".pilotfish",
        keep_going: bool = True,
        on_event: Callable[[Any], None] | None = None,
        on_failure: Callable[[FailureRecord, Call], Retry | Fail | None] | None = None,
        poison_after: int = 3,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_master_restarts: int = 3,
        journal: str | os.PathLike[str] | bool | None = True,
        resume: bool | None = None,
        keep_sandboxes: str = "failed",
        requires: Iterable[str] = (),
        requires_programs: Iterable[str] = (),
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] | None = None,
        drain_after: Any = None,
        **backend_options: Any,
    ) -> None:
        import random

        workers_name = "workers"
        if max_workers is not None:  # ProcessPoolExecutor's name for it
            if workers is not None:
                raise InvalidTask(
                    f"Session(workers={workers!r}, max_workers={max_workers!r}): give one "
                    "of them (max_workers is the concurrent.futures name for workers)"
                )
            workers, workers_name = max_workers, "max_workers"
        factory = backend_factory(backend, backend_options)
        check_session_args(
            workers,
            poison_after,
            heartbeat_interval,
            heartbeat_timeout,
            max_master_restarts,
            workers_name=workers_name,
        )
        rundir = check_rundir(rundir)
        if initializer is not None and not callable(initializer):
            raise InvalidTask(
                f"Session(initializer={initializer!r}) is invalid: give a callable, run once "
                "in every worker before its first task"
            )
        self._lock = threading.RLock()
        self._clock = clock
        self._core = wf.Workflow(
            poison_after=poison_after,
            keep_going=keep_going,
            backoff=backoff,
            rand=rand or random.Random().random,
            drain=drain_policy(drain_after),
        )
        shared_process()  # attempts run here (FakeBackend) leave the process alone
        self._nonce = f"{random.getrandbits(32):08x}"  # sandbox tags unique in the rundir
        #: resume: tid -> (the earlier run's interrupted attempt its first attempt continues
        #: from, as ``make_lineage`` takes it; the note of a Python task's attempt)
        self._earlier: dict[int, tuple[tuple[str, int, int | None, str], str]] = {}
        self._sandbox_index: dict[str, list[tuple[int, Path]]] | None = None
        self._tasks = _TaskTable()
        self._dups: dict[str, int] = {}
        self._keepalive = False
        self._next_tid = 1
        self._listeners: list[Callable[[Any], None]] = list(_global_listeners)
        if on_event is not None:
            self._listeners.append(on_event)
        self._on_event = bool(self._listeners)
        self._on_failure = on_failure
        self._rundir = rundir
        if keep_sandboxes not in ("failed", "all"):
            raise InvalidTask(
                f"Session(keep_sandboxes={keep_sandboxes!r}) is invalid: give 'failed' or 'all'"
            )
        self._keep_sandboxes = keep_sandboxes
        try:
            Path(rundir).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise EnvironmentMismatch(
                f"Session(rundir={rundir!r}): cannot create the run directory "
                f"({e.strerror or e}); choose a directory you can write"
            ) from e
        secure_rundir(rundir)  # pickles live there: it must be the user's, and private
        if resume is None:  # `pilotfish resume SCRIPT` sets it for the script's sessions
            resume = os.environ.get("PILOTFISH_RESUME") == "1"
        self._resume = resume
        self._journal: Journal | None = None
        if journal is True:
            journal = Path(rundir) / "journal.db"
        if not journal and resume:
            raise InvalidTask("Session(resume=True) needs a journal; do not pass journal=None")
        # one session at a time per run directory (and journal), with or without a journal:
        # held until the session is closed, released by the kernel if this process dies
        self._locks = _rundir.hold(rundir, Path(journal) if journal else None)
        if journal:
            try:
                self._journal = Journal(journal, resume=bool(resume))
            except (sqlite3.Error, OSError) as e:
                _rundir.release(self._locks)
                raise JournalError(
                    f"Session(journal={str(journal)!r}): cannot open the journal ({e}); "
                    "check the path, or pass journal=None to run without one"
                ) from e
            except BaseException:
                _rundir.release(self._locks)
                raise
        self._restored = 0
        self._shutdown_flag = False
        self._timers: list[float] = []
        self._timer_cv = threading.Condition(self._lock)
        self._closed = False
        self._closing = False  # a shutdown(wait=False) thread is draining
        # shutdown(wait=True) waits on this; bounded by the backend's silence
        self._drained = threading.Condition(self._lock)
        self._draining = False
        self._hb_interval, self._hb_timeout = heartbeat_interval, heartbeat_timeout
        self._silence = Silence(heartbeat_timeout + heartbeat_interval)
        self._gave_up = False  # the backend went silent: stop it without a long goodbye
        self._init = b""
        if initializer is not None:
            payload, deps = self._pickle_call(initializer, tuple(initargs), {})
            if deps:
                raise InvalidTask(
                    "Session(initargs=...) may not contain Tasks: the initializer runs "
                    "before any task, on every worker"
                )
            self._init = payload
        self._translate = Translator(
            self._core,
            self._tasks,  # type: ignore[arg-type]
            self._tasks.by_key,
            host=_wire.host_name(),
            clock=clock,
            on_failure=on_failure,
            repickle=self._pickle_call,
            public_events=self._on_event,
        )
        self._probes = Probes()
        try:
            self._backend: Backend = (
                factory(
                    workers,
                    heartbeat_interval=heartbeat_interval,
                    heartbeat_timeout=heartbeat_timeout,
                    max_master_restarts=max_master_restarts,
                    rundir=rundir,
                    **backend_options,
                )
                if isinstance(backend, str)
                else factory
            )
        except BaseException:  # e.g. a bad backend option: nothing ran, leave no journal open
            if self._journal is not None:
                self._journal.close("failed")
            _rundir.release(self._locks)
            raise
        self._closer = _Closer(
            self._backend, self._journal, self._core, self._timer_cv, self._locks
        )
        self._closer.collected = True  # until _close() says otherwise
        self._finalizer = weakref.finalize(self, self._closer)
        self._finalizer.atexit = False  # _python_exit/_shutdown_all close sessions first
        self._timer_thread = threading.Thread(
            target=_timer_loop,
            args=(weakref.ref(self), self._timer_cv),
            name="pilotfish-timer",
            daemon=True,
        )
        self._timer_thread.start()
        self._backend.start(_weak_sink(self))
        _live_sessions.add(self)
        modules = str_list(requires, "requires")
        programs = str_list(requires_programs, "requires_programs")
        if modules or programs:
            try:
                checks = self.preflight(modules, programs)
            except BaseException:
                self._close()
                raise
            bad = [c for c in checks if not c.ok]
            if bad:
                self._close()
                lines = "\n".join(f"  - {c.message()}" for c in bad)
                raise EnvironmentMismatch(
                    f"Session(requires=...): {len(bad)} pre-flight check(s) failed on the "
                    f"workers; nothing was submitted:\n{lines}"
                )

    # ------------------------------------------------------------------ public
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Task:
        """Run ``fn(*args, **kwargs)``; Tasks anywhere in the arguments are dependencies."""
        opts = _DEFAULT_OPTIONS
        if isinstance(fn, TaskFunction):
            opts, fn = fn.task_options, fn.fn
        if not callable(fn):
            raise InvalidTask(f"submit() needs a callable as first argument, got {fn!r}")
        return self._submit_call(fn, args, kwargs, opts)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``Executor.map``: submits every call now and yields the results in order
        (raising a call's exception when its turn comes; ``timeout`` counts from this
        call). ``chunksize=n`` runs n calls per attempt, as ProcessPoolExecutor does: fewer,
        larger tasks for many tiny calls; a failure then fails (and retries) its chunk."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise InvalidTask(
                f"map(chunksize={chunksize!r}) is invalid: chunksize must be >= 1 "
                "(the number of calls each task runs)"
            )
        check_wait("Session.map", timeout)
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        end = None if timeout is None else time.monotonic() + timeout
        opts = _DEFAULT_OPTIONS
        if isinstance(fn, TaskFunction):
            opts, fn = fn.task_options, fn.fn
        if not callable(fn):
            raise InvalidTask(f"map() needs a callable as first argument, got {fn!r}")
        name = f"{opts.name or getattr(fn, '__qualname__', None) or type(fn).__name__}[chunk]"
        opts = opts.merged(name=name)
        calls = zip(*iterables, strict=False)
        fs = [
            self._submit_call(call_chunk, (fn, chunk), {}, opts)
            for chunk in iter(lambda: tuple(itertools.islice(calls, chunksize)), ())
        ]
        return _chunk_results(fs, end)

    def executable(
        self,
        argv: Sequence[Any],
        /,
        *,
        inputs: dict[str, Any] | None = None,
        outputs: Sequence[str] = (),
        env: dict[str, str] | None = None,
        stdin: str | os.PathLike[str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        retry_exit_codes: Iterable[int] = (),
        name: str | None = None,
        key: str | None = None,
        keep_sandboxes: str | None = None,
        requires_programs: Iterable[str] = (),
        requires: Iterable[str] = (),
        inherit_env: bool | Iterable[str] = True,
        resume_files: Sequence[str] = (),
        resume_argv: Sequence[Any] | None = None,
    ) -> Task:
        """Run a program in its own sandbox; the Task's value is a :class:`CommandResult`.

        ``argv`` elements and ``inputs`` values may be Tasks (their value, e.g. from
        ``task.output(name)``, is substituted). ``outputs`` must exist after exit 0.
        ``retries`` covers transient failures (worker lost, timeout) and exit codes
        listed in ``retry_exit_codes``; any other non-zero exit is permanent.
        ``keep_sandboxes`` (default: the session's) is ``"failed"`` (successful
        sandboxes are removed after moving outputs to ``rundir/results/NAME``) or
        ``"all"``. Failed attempts' sandboxes are always kept. ``requires_programs``
        (programs that must be on the worker's PATH) and ``requires`` (Python modules)
        are checked on the worker first: a failed check is ENVIRONMENT, not retried.
        ``inherit_env`` is what the program inherits from the worker's environment (which
        is the client's, on the local backend): True (all), False (only ``env``), or a
        list of names to pass through, e.g. ``["PATH", "HOME"]``. ``cwd`` is relative to
        the sandbox (and may not climb out of it); an absolute ``cwd`` runs the program
        there but then no ``outputs`` may be declared, since outputs are only ever taken
        from inside the sandbox. ``resume_files`` (names in the sandbox, e.g. ``["md.cpt"]``):
        a retry after a lost, timed-out or ``retry_exit_codes`` attempt starts with them,
        copied from that attempt's sandbox (all or none), and ``resume_argv`` then
        replaces ``argv``; the attempt's ``note`` says which.
        """
        programs = str_list(requires_programs, "requires_programs")
        modules = str_list(requires, "requires")
        spec = program_spec(
            argv,
            inputs=inputs,
            outputs=outputs,
            env=env,
            stdin=stdin,
            cwd=cwd,
            timeout=timeout,
            retries=retries,
            retry_exit_codes=retry_exit_codes,
            name=name,
            key=key,
            keep_sandboxes=keep_sandboxes or self._keep_sandboxes,
            task_type=Task,
            inherit_env=inherit_env,
            resume_files=resume_files,
            resume_argv=resume_argv,
        )
        payload, deps = pickle_call(spec.template, self, Task, f"program {spec.shown!r}")
        digest = call_digest(payload, deps, input_stamps(spec.template))
        opts = spec.options
        task = self._register(opts.name or spec.shown, opts, digest, deps, payload, "command")
        task._declared_outputs = spec.outputs
        task._cmd_timeout = timeout
        task._programs = programs
        if modules:
            task.options = task.options.merged(requires=modules)
        return self._start(task)

    def preflight(
        self,
        requires: Iterable[str] = (),
        programs: Iterable[str] = (),
        timeout: float = 120.0,
    ) -> list[Any]:
        """Run the pre-flight checks on a worker and return every check (passed or not):
        Python, pilotfish and cloudpickle versions, sandbox root, disk space, and the given
        module requirements and programs. Used by ``Session(requires=...)`` and
        ``pilotfish check``."""
        return self._probes.preflight(
            self._backend.submit, self._rundir, requires, programs, timeout
        )

    def processes(self) -> dict[str, Any]:
        """``{"master": pid, "workers": [pids]}`` (diagnostics)."""
        return self._backend.processes()

    def failures(self) -> list[FailureRecord]:
        """The FailureRecord of every task that failed so far, in submission order."""
        with self._lock:
            return self._core.failures()

    def failure_digest(self) -> dict[str, Any]:
        """The failures grouped by category and normalised message, largest group first
        (plain data, as ``pilotfish failures --group --json`` prints): ``{"failed": n,
        "groups": [{"category", "signature", "count", "examples", "roots", ...}]}``."""
        from ..digest import failure_digest

        return failure_digest(self.failures())

    @property
    def tasks(self) -> list[Task]:
        """The tasks that are unfinished or still referenced (by you or a dependent task),
        in submission order; a finished task nobody holds is freed (its record is in
        :meth:`failures`, the journal and ``pilotfish status``)."""
        with self._lock:
            return self._tasks.alive()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {s.name: n for s, n in self._core.counts.items() if n}

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, _stop_now: bool = False
    ) -> None:
        """Stop taking tasks; with ``wait``, return when every task is final. That wait is
        bounded: a backend that sent ``Alive`` and then says nothing for longer than
        ``heartbeat_timeout`` is given up, and its unfinished tasks fail RUNTIME_LOST."""
        for name, flag in (("wait", wait), ("cancel_futures", cancel_futures)):
            if not isinstance(flag, bool | int):
                raise TypeError(f"Session.shutdown({name}={flag!r}) is invalid: give True or False")
        with self._lock:
            self._shutdown_flag = True
            acts = _Actions()
            if cancel_futures:
                for t in self._tasks.unfinished():
                    self._run(self._core.handle(wf.Cancel(t._tid, self._clock())), acts)
            closing, self._closing = self._closing, True
        self._finish(acts)
        if _stop_now:
            self._close()
        elif wait:
            self._drain()
            self._close()
        elif not closing:
            # return at once; the pending work still runs. A non-daemon thread waits for
            # it and then stops the backend; the interpreter does not exit before it ends
            threading.Thread(
                target=self._drain_and_close, name="pilotfish-shutdown", daemon=False
            ).start()

    def _drain_and_close(self) -> None:
        try:
            self._drain()
        finally:
            self._close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Ctrl-C in the with-block: do not wait for the whole ensemble
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.shutdown(wait=True, cancel_futures=interrupted)

    # ------------------------------------------------------------------ shutdown
    def _drain(self) -> None:
        """Wait until every task is final, or the backend is silent for too long."""
        while True:
            with self._lock:
                self._draining = True
                acts = self._wait_drained()
            if acts is None:
                break
            self._finish(acts)
        # tasks final in the core: their futures are being resolved (outside the lock)
        with self._lock:
            pending = [t for t in self._tasks.unfinished() if not t.done()]
        cf.wait(pending)

    def _wait_drained(self) -> _Actions | None:
        """Under the lock: None once no task is unfinished; else what giving up on a
        silent backend does (every unfinished task fails RUNTIME_LOST)."""
        while self._core.unfinished():
            silent = self._silence.silent_for(time.monotonic())
            if silent is not None:
                inflight = len(self._core.running_attempts())
                if inflight:
                    return self._give_up(silent, inflight)
            self._drained.wait(self._hb_interval / 2)
        return None

    def _give_up(self, silent: float, inflight: int) -> _Actions:
        name = getattr(self._backend, "name", type(self._backend).__name__)
        msg = (
            f"the {name} backend sent nothing for {silent:.1f} s (heartbeat_timeout="
            f"{self._hb_timeout:g} s) while {inflight} attempt(s) were in flight, so the "
            "session stopped waiting for them at shutdown; check that the backend's master "
            "or scheduler is still running and reachable (`pilotfish status` lists its "
            "processes) and read its log"
        )
        log.warning("pilotfish: %s", msg)
        self._gave_up = True
        now = self._clock()
        acts = _Actions()
        if self._on_event:
            acts.events.append(MasterEvent("lost", 0, now, message=msg))
        self._probes.fail_all(msg)
        self._run(self._core.handle(wf.Abort(Category.RUNTIME_LOST, msg, now)), acts)
        return acts

    # ------------------------------------------------------------------ submit
    def _submit_call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        opts: TaskOptions,
    ) -> Task:
        if self._shutdown_flag:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        payload, deps = self._pickle_call(fn, args, kwargs)
        name = opts.name or getattr(fn, "__qualname__", None) or type(fn).__name__
        digest, task_unstable = call_key_digest((fn, args, kwargs), payload, deps)
        task = self._register(name, opts, digest, deps, payload, "call")
        task._key_unstable = task_unstable if opts.key is None else None
        if self._on_failure is not None:
            task._call = (fn, args, kwargs)
        return self._start(task)

    def _pickle_call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, list[Task]]:
        return pickle_call((fn, args, kwargs), self, Task)

    def _register(
        self,
        name: str,
        opts: TaskOptions,
        digest: str,
        deps: list[Task],
        payload: bytes,
        kind: str,
    ) -> Task:
        with self._lock:
            if self._journal is not None:
                self._journal.raise_if_broken()  # loudly, rather than lose the run's history
            if opts.key is not None:
                key = opts.key
                if self._tasks.used(key):
                    raise InvalidTask(
                        f"task key {key!r} is already used in this session by "
                        f"{self._tasks.by_key(key) or 'an earlier task'!r}; keys must be unique"
                    )
            else:
                # the n-th identical call gets "-n": unique, and stable from run to run
                key = base = f"{name}-{digest}"
                n = self._dups.get(base, 1)
                while self._tasks.used(key):
                    n += 1
                    key = f"{base}-{n}"
                self._dups[base] = n
            tid = self._next_tid
            self._next_tid += 1
            task = Task(self, tid, key, name, opts)
            task._payload = payload
            task._deps = tuple(deps)
            task._kind = kind
            self._tasks.add(task)
            if not self._keepalive:
                self._keepalive = True
                _busy_sessions.add(self)
            return task

    def _start(self, task: Task) -> Task:
        acts = _Actions()
        earlier = None
        try:
            restored = self._restore_value(task) if self._resume else None
            if self._resume and restored is None:
                earlier = self._earlier_attempt(task)
        except BaseException:  # e.g. an untrusted value file: this task was never submitted
            with self._lock:
                self._tasks.forget(task)
            raise
        with self._lock:
            if self._tasks.gone:
                self._forget_freed()
            if restored is not None:
                task._value_bytes, task._pending_value = restored
                task._payload = b""
                self._restored += 1
                cmds = self._core.handle(wf.Restore(task._tid, task.key, self._clock()))
            else:
                if earlier is not None:
                    self._earlier[task._tid] = earlier
                cmds = self._core.handle(
                    wf.Submit(
                        task._tid,
                        task.key,
                        tuple(d._tid for d in task._deps),
                        task.options.retries,
                        self._clock(),
                    )
                )
                if self._journal is not None:
                    self._journal.record_submit(task, self._clock())
            self._run(cmds, acts)
        self._finish(acts)
        return task

    def _restore_value(self, task: Task) -> tuple[bytes, Any] | None:
        """resume: the journaled value of a task already DONE with this key, if any."""
        assert self._journal is not None
        with self._lock:
            data = self._journal.done_value(task.key)
        if data is None:
            if task._key_unstable is not None:
                log.warning(
                    "pilotfish resume: task %s is not DONE in the journal %s, perhaps because "
                    "its automatic key is not the same in every process: %s. It runs again; "
                    "give it a key (pilotfish.task(fn, key=...)) so resume can find it.",
                    task.key,
                    self._journal.path,
                    task._key_unstable,
                )
            return None
        try:
            return data, pickle.loads(data)
        except Exception:
            log.warning(
                "pilotfish: cannot unpickle the journaled value of %s; rerunning it", task.key
            )
            return None

    def _earlier_attempt(self, task: Task) -> tuple[tuple[str, int, int | None, str], str] | None:
        """resume: the attempt of an earlier run that ``task`` (not DONE) was running when
        that run's client died, which its first attempt continues from (``resume_files``,
        ``previous_attempt_files()``); its sandbox is left in place. Found in the journal
        (attempts are journaled when they start); an attempt started within the journal's
        last flush interval may not be there: then the task's newest sandbox (found by the
        key's own safe_dirname prefix, never a path made from the key) if its attempt is
        unknown to the journal. Returns the ``make_lineage`` ``earlier`` and the note of a
        Python task's attempt, or None."""
        assert self._journal is not None
        root = Path(self._rundir) / "sandboxes"
        try:
            with self._lock:
                hit = self._journal.interrupted(task.key)
                state = self._journal.task_state(task.key)
            if hit is not None:
                why = (
                    f"it ended {hit['ended']} and its retry had not started"
                    if hit.get("ended")
                    else "interrupted"
                ) + (
                    " when the client died"
                    if hit["status"] == "running"
                    else f" when that run ended ({hit['status']})"
                )
                nonce, aid, number = hit["nonce"], hit["attempt"], hit["number"]
                how = f"of run {hit['run']} ({why})"
            else:
                if state in ("DONE", "FAILED", "CANCELLED"):
                    return None  # that run ended the task: nothing was interrupted
                if self._sandbox_index is None:  # one scan for the whole resumed run
                    self._sandbox_index = sandbox_index(root)
                found = newest_sandbox(root, task.key, self._sandbox_index)
                if found is None or not found[1] or found[1] == self._nonce:
                    return None
                _, nonce, aid = found
                with self._lock:
                    known = self._journal.started_run(nonce, aid)
                if known is not None and known[1]:
                    return None  # a journaled attempt that ended, not an interrupted one
                number = None
                how = (
                    f"of {f'run {known[0]}' if known else 'an earlier run'} (interrupted when "
                    "the client died; its start was not journaled: its sandbox was found by "
                    f"searching {root})"
                )
        except (sqlite3.Error, OSError) as e:
            log.warning(
                "pilotfish resume: cannot tell whether task %s was interrupted in an earlier "
                "run (%s); it starts fresh",
                task.key,
                e,
            )
            return None
        which = (f"attempt {number} " if number is not None else "an attempt ") + how
        tag = f"{nonce}a{aid}"
        box = find_sandbox(root, task.key, tag) or find_sandbox(root, task.key, tag + "c0")
        note = f"previous_attempt_files() is {which}: " + (
            f"{box}, left in place" if box else "it made no scratch directory here"
        )
        return (nonce, aid, number, how), note

    # ------------------------------------------------------------------ cancel
    def _cancel(self, task: Task) -> bool:
        acts = _Actions()
        with self._lock:
            state = self._core.state(task._tid)
            if state is State.CANCELLED:
                return True
            if state.final or self._core.is_started(task._tid):
                return False
            self._run(self._core.handle(wf.Cancel(task._tid, self._clock())), acts)
            ok = self._core.state(task._tid) is State.CANCELLED
        self._finish(acts)
        return ok

    # ------------------------------------------------------------------ commands
    def _run(self, cmds: list[wf.Command], acts: _Actions) -> None:
        """Execute core commands (under the lock); side effects go to ``acts``."""
        for c in cmds:
            if isinstance(c, wf.Transition):
                if self._on_event:
                    t = self._tasks[c.tid]
                    n = len(self._core.attempts(c.tid)) or None
                    acts.events.append(TaskEvent(t.key, t.name, c.start, c.finish, c.now, n))
            elif isinstance(c, wf.Dispatch):
                t = self._tasks[c.tid]
                earlier = None
                if self._earlier:  # resume: this task continues an interrupted attempt
                    if c.resume is None:
                        earlier = self._earlier.get(c.tid)
                    else:  # it has one of its own now
                        self._earlier.pop(c.tid, None)
                    if earlier is not None and t._kind == "call":
                        self._core.attempts(c.tid)[-1].note = earlier[1]
                acts.dispatch.append(
                    _wire.RunAttempt(
                        c.attempt,
                        t.key,
                        t._kind,
                        t._payload,
                        tuple(d._value_bytes or b"" for d in t._deps),
                        t.options.timeout if t._kind == "call" else backstop(t._cmd_timeout),
                        t.options.requires,
                        t._programs,
                        self._init,
                        c.tid,
                        make_lineage(self._nonce, c.resume, earlier and earlier[0]),
                        t.name,
                        self._keep_sandboxes == "all",
                    )
                )
            elif isinstance(c, wf.Drained):
                acts.events.append(on_drained(c, self._backend, self._journal))
            elif isinstance(c, wf.Resolve):
                t = self._tasks[c.tid]
                if self._earlier:
                    self._earlier.pop(c.tid, None)
                value, t._pending_value = t._pending_value, None
                if c.attempt is not None:  # restored tasks are in the journal already
                    self._journal_task(t, "DONE", value=t._value_bytes)
                t._payload = b""  # never dispatched again
                acts.finish.append((t, True, value))
            elif isinstance(c, wf.Reject):
                t = self._tasks[c.tid]
                if self._earlier:
                    self._earlier.pop(c.tid, None)
                acts.finish.append((t, False, self._translate.exception_for(t, c.failure)))
                self._journal_task(t, "FAILED", failure=c.failure)
            elif isinstance(c, wf.Cancelled):
                if self._earlier:
                    self._earlier.pop(c.tid, None)
                acts.finish.append((self._tasks[c.tid], False, None))
                self._journal_task(self._tasks[c.tid], "CANCELLED")
            elif isinstance(c, wf.CancelAttempt):
                acts.cancels.append(c.attempt)
            elif isinstance(c, wf.Wake):
                acts.wake = c.at if acts.wake is None else min(acts.wake, c.at)
            elif isinstance(c, wf.Dropped):
                log.info("dropped %s event of attempt %s: %s", c.event, c.attempt, c.reason)
        if acts.finish and not self._core.unfinished():
            if self._draining:
                self._drained.notify_all()
            if self._keepalive:  # idle: the user's references alone keep it now
                self._keepalive = False
                _busy_sessions.discard(self)

    def _forget_freed(self) -> None:
        """Drop the core's records of finished tasks nobody holds any more."""
        forget = self._core.forget
        for tid in self._tasks.collect():
            forget(tid)

    def _journal_started(self, ev: wf.AttemptStarted) -> None:
        """The core took an attempt's start: journal what finds its sandbox later (a
        resumed run continues it if the client dies meanwhile: ``_earlier_attempt``)."""
        assert self._journal is not None
        tid = self._core.task_of(ev.attempt)
        if tid is None:
            return
        a = self._core.attempts(tid)[-1]
        if a.id == ev.attempt and a.started == ev.now:  # not a dropped (late, duplicate) one
            self._journal.record_started(self._core.key(tid), self._nonce, a.id, a.number, ev.now)

    def _journal_task(
        self,
        t: Task,
        state: str,
        failure: FailureRecord | None = None,
        value: bytes | None = None,
    ) -> None:
        if self._journal is not None:
            self._journal.record(
                t, state, self._core.history(t._tid), self._core.attempts(t._tid), failure, value
            )

    def _finish(self, acts: _Actions) -> None:
        """Side effects of commands, outside the lock (user callbacks run here)."""
        if acts.wake is not None:
            with self._lock:
                heapq.heappush(self._timers, acts.wake)
                self._timer_cv.notify()
        if acts.cancels:
            self._backend.cancel(acts.cancels)
        if acts.dispatch:
            self._backend.submit(acts.dispatch)
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
            with self._lock:
                for t, _, _ in acts.finish:
                    self._tasks.release(t._tid)
        if acts.events:
            for e in acts.events:
                for listener in self._listeners:
                    try:
                        listener(e)
                    except Exception:
                        log.exception("pilotfish: on_event callback raised on %r", e)

    # ------------------------------------------------------------------ backend events
    def _on_backend_events(self, events: Sequence[BackendEvent]) -> None:
        """The backend's sink (any thread): route each event, then act outside the lock."""
        acts = _Actions()
        with self._lock:
            self._silence.heard(time.monotonic())
            if self._tasks.gone:
                self._forget_freed()
            for ev in events:
                try:
                    self._route(ev, acts)
                except BaseException:  # even SystemExit: never kill a backend's thread
                    log.exception("pilotfish: error handling backend event %r", ev)
        self._finish(acts)

    def _route(self, ev: BackendEvent, acts: _Actions) -> None:
        if isinstance(ev, Result | Started | Lost) and is_probe(ev.attempt):
            self._probes.deliver(ev)
            return
        if isinstance(ev, Alive):
            self._silence.heard(time.monotonic(), alive=True)
            return
        if isinstance(ev, Fatal):
            self._probes.fail_all(ev.message)
        if isinstance(ev, _wire.WorkerReport) and self._journal is not None:
            msg = ev.message
            if ev.kind == "lost" and not msg:  # every backend names the cause; just in case
                msg = f"worker {ev.worker} {describe_exit(ev.returncode)[0]}"
            self._journal.record_event(ev.time, ev.kind, ev.worker, ev.pid or None, None, msg)
        step = self._translate.event(ev)
        if step is None:
            return
        if isinstance(step, WorkerEvent | MasterEvent | WorkersGone):
            acts.events.append(step)
            return
        self._run(self._core.handle(step), acts)
        if isinstance(step, wf.AttemptStarted) and self._journal is not None:
            self._journal_started(step)
        if isinstance(step, wf.Failed):  # a retry is coming: keep the failed attempt on record
            tid = self._core.task_of(step.attempt)
            if tid is not None and not self._core.state(tid).final:
                self._journal_task(self._tasks[tid], self._core.state(tid).name)

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._keepalive:
                self._keepalive = False
                _busy_sessions.discard(self)
        if self._gave_up:
            self._closer.stop_timeout = self._hb_timeout
        self._closer.collected = False
        self._finalizer()  # once: a later garbage collection does nothing
        _live_sessions.discard(self)


def _chunk_results(fs: list[Task], end: float | None) -> Iterator[Any]:
    """The items of ``map``'s chunk tasks in order; holds no task it has passed (so
    neither their results), and cancels the rest if the caller stops early."""
    fs.reverse()
    try:
        while fs:
            f = fs.pop()
            try:
                chunk = f.result(None if end is None else end - time.monotonic())
            finally:
                f.cancel()
                del f
            yield from chunk
            del chunk
    finally:
        for f in fs:
            f.cancel()


def wait(
    fs: Iterable[cf.Future[Any]],
    timeout: float | None = None,
    return_when: str = cf.ALL_COMPLETED,
) -> cf._base.DoneAndNotDoneFutures[Any]:
    """``concurrent.futures.wait`` for Tasks (and any futures)."""
    check_wait("wait", timeout, return_when)
    return cf.wait(fs, timeout=timeout, return_when=return_when)


def as_completed(
    fs: Iterable[cf.Future[Any]], timeout: float | None = None
) -> Iterator[cf.Future[Any]]:
    """``concurrent.futures.as_completed`` for Tasks (and any futures)."""
    check_wait("as_completed", timeout)
    return cf.as_completed(fs, timeout=timeout)
