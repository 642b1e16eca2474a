"""Session (a ``concurrent.futures.Executor``) and Task (a ``Future``).

The session is the only driver of I/O on the client: it turns user calls and
backend events into events for the pure workflow core
(:mod:`pilotfish.core.workflow`), executes the commands the core returns
(dispatch to the backend, resolve futures, deliver events), and runs user
callbacks outside its lock.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import heapq
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

from . import _wire
from ._events import MasterEvent, TaskEvent, WorkerEvent
from ._options import TaskFunction, TaskOptions, make_options
from .backends.base import Backend
from .backends.base import MasterEvent as BMasterEvent
from .commands import CommandResult
from .core import workflow as wf
from .core.policy import Backoff
from .core.states import State
from .errors import (
    EXCEPTION_FOR,
    Category,
    DependencyFailed,
    EnvironmentMismatch,
    FailureRecord,
    InvalidTask,
    PilotfishError,
    RemoteError,
)
from .journal import Journal, JournalError

log = logging.getLogger("pilotfish")

__all__ = ["Call", "Fail", "Retry", "Session", "Task", "as_completed", "wait"]


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """What a failure handler sees of the failed task's call."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: TaskOptions


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """Returned by ``on_failure``: resubmit after ``delay`` s, maybe with new args/options.

    ``options`` is a dict of option changes (``{"timeout": 60}``) or a TaskOptions.
    """

    delay: float = 0.0
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] | None = None
    options: dict[str, Any] | TaskOptions | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Fail:
    """Returned by ``on_failure``: stop, do not retry."""


class Task(cf.Future):  # type: ignore[type-arg]
    """A submitted task: a ``concurrent.futures.Future`` with pilotfish's record of it."""

    def __init__(
        self, session: Session, tid: int, key: str, name: str, options: TaskOptions
    ) -> None:
        super().__init__()
        self._session = session
        self._tid = tid
        self.key = key
        self.name = name
        self.options = options
        self._kind = "call"
        self._payload = b""
        self._deps: tuple[Task, ...] = ()
        self._call: tuple[Any, ...] | None = None
        self._value_bytes: bytes | None = None
        self._last_exc: BaseException | None = None
        self._last_failure: FailureRecord | None = None
        self._pending_value: Any = None
        self._declared_outputs: tuple[str, ...] = ()
        self._output_tasks: dict[str, Task] = {}
        self._cmd_timeout: float | None = None
        self._programs: tuple[str, ...] = ()

    @property
    def state(self) -> State:
        with self._session._lock:
            return self._session._core.state(self._tid)

    @property
    def attempts(self) -> list[wf.AttemptRecord]:
        with self._session._lock:
            return [dataclasses.replace(a) for a in self._session._core.attempts(self._tid)]

    @property
    def failure(self) -> FailureRecord | None:
        with self._session._lock:
            return self._session._core.failure(self._tid)

    @property
    def dependencies(self) -> tuple[Task, ...]:
        return self._deps

    def running(self) -> bool:
        with self._session._lock:
            return self._session._core.is_started(self._tid)

    def cancel(self) -> bool:
        """Cancel if not started yet (queued, waiting for inputs, or between retries)."""
        return self._session._cancel(self)

    def output(self, name: str) -> Task:
        """A Task resolving to the path of declared output ``name`` of this program task.

        Use it as an input or argument of later tasks to chain programs by their files.
        """
        if self._kind != "command":
            raise InvalidTask(f"{self!r} is not a program task; output() needs executable()")
        if name not in self._declared_outputs:
            raise InvalidTask(
                f"{name!r} is not a declared output of task {self.key!r}; declared: "
                f"{list(self._declared_outputs)} (add it to outputs=[...])"
            )
        with self._session._lock:
            t = self._output_tasks.get(name)
            if t is None:
                opts = TaskOptions(name=f"{self.name}.output", key=f"{self.key}:{name}")
                t = self._session._submit_call(_output_path, (self, name), {}, opts)
                self._output_tasks[name] = t
            return t

    def _force_cancel(self) -> None:
        # cancel, then notify waiters of cf.wait/as_completed, as an Executor must
        if super().cancel():
            self.set_running_or_notify_cancel()
        self._release_condition()

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._release_condition()

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        self._release_condition()

    def _release_condition(self) -> None:
        """A finished future is never waited on again (every waiter was notified and holds
        its own reference); its Condition (about 1 KB) is swapped for a shared one, which
        keeps the memory per finished task small in runs of 100,000 tasks."""
        if self.done():
            self._condition = _FINISHED_CONDITION

    def __repr__(self) -> str:
        return f"<Task {self.key!r} {self.state.name}>"


_FINISHED_CONDITION = threading.Condition()
_DEFAULT_OPTIONS = TaskOptions()  # frozen: one shared instance (the journal caches its JSON)


class _Actions:
    __slots__ = ("cancels", "dispatch", "events", "finish", "wake")

    def __init__(self) -> None:
        self.dispatch: list[_wire.RunAttempt] = []
        self.cancels: list[int] = []
        self.finish: list[tuple[Task, bool, Any]] = []
        self.events: list[Any] = []
        self.wake: float | None = None


_live_sessions: weakref.WeakSet[Session] = weakref.WeakSet()
#: listeners added to every Session created in this process (used by `pilotfish run`)
_global_listeners: list[Callable[[Any], None]] = []
_session_hooks: list[Callable[[Session], None]] = []


@atexit.register
def _shutdown_all() -> None:
    for s in list(_live_sessions):
        with contextlib.suppress(Exception):
            s.shutdown(wait=False, cancel_futures=True, _stop_now=True)


class Session(cf.Executor):
    """Run Python callables (and programs) with every failure recorded and handled.

    Keywords: ``workers`` (default: CPU count), ``backend`` (``"local"`` or a backend
    object), ``rundir``, ``keep_going`` (default True: independent work continues
    after a failure; False cancels what has not started), ``on_event(event)``,
    ``on_failure(failure, call)``, ``poison_after`` (worker deaths that make a task
    poison), ``heartbeat_interval``/``heartbeat_timeout`` (s), ``max_master_restarts``,
    ``backoff`` (a :class:`pilotfish.core.policy.Backoff`), ``clock`` and ``rand``
    (injected for deterministic tests). Other keywords go to the backend.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
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
        **backend_options: Any,
    ) -> None:
        import random

        if isinstance(backend, str) and backend not in _BACKENDS:
            raise InvalidTask(
                f"unknown backend {backend!r}; available: {', '.join(map(repr, _BACKENDS))} "
                "(or pass a backend object)"
            )
        _check_session_args(
            workers, poison_after, heartbeat_interval, heartbeat_timeout, max_master_restarts
        )
        self._lock = threading.RLock()
        self._clock = clock
        self._core = wf.Workflow(
            poison_after=poison_after,
            keep_going=keep_going,
            backoff=backoff,
            rand=rand or random.Random().random,
        )
        self._tasks: dict[int, Task] = {}
        self._by_attempt: dict[int, Task] = {}
        self._keys: dict[str, Task] = {}
        self._dups: dict[str, int] = {}
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
        if resume is None:  # `pilotfish resume SCRIPT` sets it for the script's sessions
            resume = os.environ.get("PILOTFISH_RESUME") == "1"
        self._resume = resume
        self._journal: Journal | None = None
        if journal is True:
            journal = Path(rundir) / "journal.db"
        if journal:
            try:
                self._journal = Journal(journal)
            except (sqlite3.Error, OSError) as e:
                raise JournalError(
                    f"Session(journal={str(journal)!r}): cannot open the journal ({e}); "
                    "check the path, or pass journal=None to run without one"
                ) from e
        elif resume:
            raise InvalidTask("Session(resume=True) needs a journal; do not pass journal=None")
        self._restored = 0
        self._shutdown_flag = False
        self._host = _wire.host_name()
        self._timers: list[float] = []
        self._timer_cv = threading.Condition(self._lock)
        self._closed = False
        if isinstance(backend, str):
            self._backend: Backend = _backend_class(backend)(
                workers,
                heartbeat_interval=heartbeat_interval,
                heartbeat_timeout=heartbeat_timeout,
                max_master_restarts=max_master_restarts,
                rundir=rundir,
                **backend_options,
            )
        else:
            if backend_options:
                raise InvalidTask(
                    f"backend options {sorted(backend_options)} given with a backend object; "
                    "configure the backend object instead"
                )
            self._backend = backend
        self._timer_thread = threading.Thread(
            target=self._timer_loop, name="pilotfish-timer", daemon=True
        )
        self._timer_thread.start()
        self._probes: dict[int, cf.Future[Any]] = {}
        self._next_probe = -1
        self._backend.start(self._on_backend_events)
        _live_sessions.add(self)
        modules = _str_list(requires, "requires")
        programs = _str_list(requires_programs, "requires_programs")
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
    ) -> Task:
        """Run a program in its own sandbox; the Task's value is a :class:`CommandResult`.

        ``argv`` elements and ``inputs`` values may be Tasks (their value, e.g. from
        ``task.output(name)``, is substituted). ``outputs`` must exist after exit 0.
        ``retries`` covers transient failures (worker lost, timeout) and exit codes
        listed in ``retry_exit_codes``; any other non-zero exit is permanent.
        ``keep_sandboxes`` (default: the session's) is ``"failed"`` (successful
        sandboxes are removed after moving outputs to ``rundir/results/KEY``) or
        ``"all"``. Failed attempts' sandboxes are always kept. ``requires_programs``
        (programs that must be on the worker's PATH) and ``requires`` (Python modules)
        are checked on the worker first: a failed check is ENVIRONMENT, not retried.
        """
        programs = _str_list(requires_programs, "requires_programs")
        modules = _str_list(requires, "requires")
        template, opts, shown = self._command_template(
            argv,
            inputs,
            outputs,
            env,
            stdin,
            cwd,
            timeout,
            retries,
            retry_exit_codes,
            name,
            key,
            keep_sandboxes,
        )
        payload, deps = self._pickle_call_obj(template, f"program {shown!r}")
        digest = hashlib.blake2b(payload, digest_size=6)
        for d in deps:
            digest.update(d.key.encode())
        for path in template["inputs"].values():
            if isinstance(path, str):
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        task = self._register(
            opts.name or shown, opts, digest.hexdigest(), deps, payload, "command"
        )
        task._declared_outputs = tuple(template["outputs"])
        task._cmd_timeout = timeout
        task._programs = programs
        if modules:
            task.options = task.options.merged(requires=modules)
        return self._start(task)

    def _command_template(
        self,
        argv: Any,
        inputs: Any,
        outputs: Any,
        env: Any,
        stdin: Any,
        cwd: Any,
        timeout: Any,
        retries: Any,
        retry_exit_codes: Any,
        name: Any,
        key: Any,
        keep_sandboxes: Any,
    ) -> tuple[dict[str, Any], TaskOptions, str]:
        def bad(what: str) -> InvalidTask:
            return InvalidTask(f"executable(): {what}")

        if isinstance(argv, str | bytes) or not isinstance(argv, Sequence) or not argv:
            raise bad(
                f"argv={argv!r} must be a non-empty list such as ['gmx', 'mdrun'] "
                "(for a shell line use ['sh', '-c', LINE])"
            )
        for i, a in enumerate(argv):
            if not isinstance(a, str | os.PathLike | int | float | Task):
                raise bad(f"argv[{i}]={a!r} must be a str, path, number or Task")
        shown = os.path.basename(os.fspath(argv[0])) if not isinstance(argv[0], Task) else "program"
        ins: dict[str, Any] = {}
        for n, v in (inputs or {}).items():
            if not isinstance(n, str) or not n or os.path.isabs(n) or ".." in Path(n).parts:
                raise bad(f"input name {n!r} must be a relative path inside the sandbox")
            if isinstance(v, Task):
                ins[n] = v
            elif isinstance(v, str | os.PathLike):
                p = os.path.abspath(os.fspath(v))
                if not os.path.exists(p):
                    raise bad(f"input {n!r}: {p} does not exist")
                ins[n] = p
            else:
                raise bad(f"input {n!r}={v!r} must be a path or a Task")
        if isinstance(outputs, str) or not all(
            isinstance(o, str) and o and not os.path.isabs(o) and ".." not in Path(o).parts
            for o in outputs
        ):
            raise bad(f"outputs={outputs!r} must be a list of relative paths")
        if env is not None and not (
            isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise bad("env must be a dict of str to str")
        codes = list(retry_exit_codes)
        if not all(isinstance(c, int) and not isinstance(c, bool) and c != 0 for c in codes):
            raise bad(f"retry_exit_codes={codes!r} must be non-zero ints")
        keep = keep_sandboxes or self._keep_sandboxes
        if keep not in ("failed", "all"):
            raise bad(f"keep_sandboxes={keep!r} must be 'failed' or 'all'")
        opts = make_options(retries=retries, timeout=timeout, name=name, key=key)
        if stdin is not None:
            stdin = os.path.abspath(os.fspath(stdin))
            if not os.path.isfile(stdin):
                raise bad(f"stdin file {stdin} does not exist")
        template = {
            "argv": list(argv),
            "inputs": ins,
            "outputs": list(outputs),
            "env": env,
            "stdin": stdin,
            "cwd": cwd,
            "timeout": timeout,
            "retry_exit_codes": codes,
            "keep_sandboxes": keep,
        }
        return template, opts, shown

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
        from . import preflight as pf

        fut: cf.Future[Any] = cf.Future()
        with self._lock:
            aid = self._next_probe
            self._next_probe -= 1
            self._probes[aid] = fut
        payload = _wire.dumps_call(
            (
                pf.session_checks,
                (
                    pf.client_versions(),
                    str(Path(self._rundir).resolve()),
                    list(requires),
                    list(programs),
                ),
                {},
            ),
            lambda _obj: None,
        )
        self._backend.submit(
            [_wire.RunAttempt(aid, "pilotfish-preflight", "call", payload, (), timeout)]
        )
        try:
            ok, data = fut.result(timeout)
        except cf.TimeoutError:
            raise EnvironmentMismatch(
                f"pre-flight checks got no answer from any worker within {timeout:g} s"
            ) from None
        if not ok:
            raise EnvironmentMismatch(f"pre-flight checks could not run on a worker: {data}")
        checks: list[Any] = pickle.loads(data)
        return checks

    def processes(self) -> dict[str, Any]:
        """``{"master": pid, "workers": [pids]}`` (diagnostics)."""
        return self._backend.processes()

    def failures(self) -> list[FailureRecord]:
        """The FailureRecord of every task that failed so far, in submission order."""
        with self._lock:
            out = []
            for tid in self._tasks:
                f = self._core.failure(tid)
                if f is not None and self._core.state(tid) is State.FAILED:
                    out.append(f)
            return out

    @property
    def tasks(self) -> list[Task]:
        with self._lock:
            return list(self._tasks.values())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {s.name: n for s, n in self._core.counts.items() if n}

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, _stop_now: bool = False
    ) -> None:
        with self._lock:
            self._shutdown_flag = True
            acts = _Actions()
            if cancel_futures:
                for t in list(self._tasks.values()):
                    self._run(self._core.handle(wf.Cancel(t._tid, self._clock())), acts)
        self._finish(acts)
        if wait and not _stop_now:
            pending = [t for t in self.tasks if not t.done()]
            cf.wait(pending)
        self._close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Ctrl-C in the with-block: do not wait for the whole ensemble
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.shutdown(wait=True, cancel_futures=interrupted)

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
        payload, deps = self._pickle_call(fn, args, kwargs)
        name = opts.name or getattr(fn, "__qualname__", None) or type(fn).__name__
        digest = hashlib.blake2b(payload, digest_size=6)
        for d in deps:
            digest.update(d.key.encode())
        task = self._register(name, opts, digest.hexdigest(), deps, payload, "call")
        if self._on_failure is not None:
            task._call = (fn, args, kwargs)
        return self._start(task)

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
            if opts.key is not None:
                key = opts.key
                if key in self._keys:
                    raise InvalidTask(
                        f"task key {key!r} is already used in this session by "
                        f"{self._keys[key]!r}; keys must be unique"
                    )
            else:
                # the n-th identical call gets "-n": unique, and stable from run to run
                key = base = f"{name}-{digest}"
                n = self._dups.get(base, 1)
                while key in self._keys:
                    n += 1
                    key = f"{base}-{n}"
                self._dups[base] = n
            tid = self._next_tid
            self._next_tid += 1
            task = Task(self, tid, key, name, opts)
            task._payload = payload
            task._deps = tuple(deps)
            task._kind = kind
            self._keys[key] = task
            self._tasks[tid] = task
            return task

    def _start(self, task: Task) -> Task:
        acts = _Actions()
        restored = self._restore_value(task) if self._resume else None
        with self._lock:
            if restored is not None:
                task._value_bytes, task._pending_value = restored
                task._payload = b""
                self._restored += 1
                cmds = self._core.handle(wf.Restore(task._tid, task.key, self._clock()))
            else:
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
            return None
        try:
            return data, pickle.loads(data)
        except Exception:
            log.warning(
                "pilotfish: cannot unpickle the journaled value of %s; rerunning it", task.key
            )
            return None

    def _pickle_call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, list[Task]]:
        return self._pickle_call_obj((fn, args, kwargs), None)

    def _pickle_call_obj(self, obj: Any, what: str | None) -> tuple[bytes, list[Task]]:
        deps: list[Task] = []
        index: dict[int, int] = {}

        def ref(obj: Any) -> int | None:
            if isinstance(obj, Task):
                if obj._session is not self:
                    raise InvalidTask(
                        f"argument {obj!r} is a Task of another Session; a task can only "
                        "depend on tasks of its own session (pass its .result() instead)"
                    )
                i = index.get(obj._tid)
                if i is None:
                    i = index[obj._tid] = len(deps)
                    deps.append(obj)
                return i
            return None

        try:
            return _wire.dumps_call(obj, ref), deps
        except InvalidTask:
            raise
        except Exception as e:
            if what is not None:
                raise InvalidTask(f"cannot submit {what}: {type(e).__name__}: {e}") from e
            fn, args, kwargs = obj
            raise InvalidTask(_explain_unpicklable(fn, args, kwargs, ref, e)) from e

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
                self._by_attempt[c.attempt] = t
                acts.dispatch.append(
                    _wire.RunAttempt(
                        c.attempt,
                        t.key,
                        t._kind,
                        t._payload,
                        tuple(d._value_bytes or b"" for d in t._deps),
                        t.options.timeout if t._kind == "call" else _backstop(t._cmd_timeout),
                        t.options.requires,
                        t._programs,
                    )
                )
            elif isinstance(c, wf.Resolve):
                t = self._tasks[c.tid]
                self._by_attempt.pop(c.attempt or 0, None)
                value, t._pending_value = t._pending_value, None
                if c.attempt is not None:  # restored tasks are in the journal already
                    self._journal_task(t, "DONE", value=t._value_bytes)
                t._payload = b""  # never dispatched again
                acts.finish.append((t, True, value))
            elif isinstance(c, wf.Reject):
                t = self._tasks[c.tid]
                acts.finish.append((t, False, self._exception_for(t, c.failure)))
                self._journal_task(t, "FAILED", failure=c.failure)
            elif isinstance(c, wf.Cancelled):
                acts.finish.append((self._tasks[c.tid], False, None))
                self._journal_task(self._tasks[c.tid], "CANCELLED")
            elif isinstance(c, wf.CancelAttempt):
                self._by_attempt.pop(c.attempt, None)
                acts.cancels.append(c.attempt)
            elif isinstance(c, wf.Wake):
                acts.wake = c.at if acts.wake is None else min(acts.wake, c.at)
            elif isinstance(c, wf.Dropped):
                log.info("dropped %s event of attempt %s: %s", c.event, c.attempt, c.reason)

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
        for t, ok, value in acts.finish:
            if t.done():
                continue
            if ok:
                t.set_result(value)
            elif value is None:
                t._force_cancel()
            else:
                t.set_exception(value)
        if acts.events:
            for e in acts.events:
                for listener in self._listeners:
                    try:
                        listener(e)
                    except Exception:
                        log.exception("pilotfish: on_event callback raised on %r", e)

    # ------------------------------------------------------------------ failures
    def _exception_for(self, t: Task, f: FailureRecord) -> BaseException:
        if t._last_failure is f and t._last_exc is not None:
            return t._last_exc
        if f.category is Category.DEPENDENCY_FAILED:
            exc: BaseException = DependencyFailed(f.message, f)
            root = self._keys.get(f.root or "")
            if root is not None:
                cause = root._last_exc or (
                    self._exception_for(root, root.failure) if root.failure else None
                )
                exc.__cause__ = cause
            return exc
        return EXCEPTION_FOR.get(f.category, PilotfishError)(f.message, f)

    def _attempt_failure(
        self, t: Task, attempt: int, category: Category, message: str, **fields: Any
    ) -> FailureRecord:
        number = len(self._core.attempts(t._tid))
        return FailureRecord(
            key=t.key,
            category=category,
            message=message,
            transient=category.transient,
            attempt=number,
            host=fields.pop("host", None) or self._host,
            time=self._clock(),
            **fields,
        )

    def _user_failure(
        self, t: Task, res: _wire.Result
    ) -> tuple[FailureRecord, BaseException, bool]:
        env: _wire.Envelope = pickle.loads(res.data)
        env = env._replace(traceback=_wire.fix_dynamic_frames(env.traceback))
        number = len(self._core.attempts(t._tid))
        host = res.host or self._host
        category = Category(env.category)
        exc: BaseException | None = None
        if env.exc is not None and category is Category.USER_ERROR:
            try:
                exc = pickle.loads(env.exc)
            except Exception as e:
                env = env._replace(
                    traceback=env.traceback + "\n(pilotfish: the exception could not be "
                    f"unpickled on the client: {type(e).__name__}: {e})\n"
                )
        extra = env.extra
        f = FailureRecord(
            key=t.key,
            category=category,
            message=env.message
            if category is not Category.USER_ERROR
            else f"{env.type_name}: {env.message}",
            transient=category.transient,
            exc_type=env.type_name,
            traceback=env.traceback,
            returncode=extra.get("returncode"),
            signal=extra.get("signal"),
            stdout_path=extra.get("stdout_path"),
            stderr_path=extra.get("stderr_path"),
            sandbox=extra.get("sandbox"),
            worker=res.worker,
            host=host,
            pid=res.pid,
            attempt=number,
            time=res.ended,
        )
        if exc is None:
            if category is Category.USER_ERROR:
                exc = RemoteError(
                    env.message, f, type_name=env.type_name, remote_traceback=env.traceback
                )
            else:
                exc = EXCEPTION_FOR.get(category, PilotfishError)(env.message, f)
        with contextlib.suppress(Exception):
            exc.add_note(
                f"pilotfish: raised by task {t.key!r}, attempt {number}, on worker "
                f"{res.worker} (pid {res.pid}) at host {host}"
            )
        retry = False
        if category is Category.USER_ERROR:
            retry = t.options.matches(None if isinstance(exc, RemoteError) else exc, env.type_name)
        elif category is Category.COMMAND_FAILED:
            retry = bool(extra.get("retry_requested"))
        return f, exc, retry

    def _failed_attempt(
        self,
        t: Task,
        attempt: int,
        f: FailureRecord,
        exc: BaseException,
        retry: bool,
        acts: _Actions,
    ) -> None:
        t._last_exc, t._last_failure = exc, f
        override: wf.RetryOverride | wf.FailOverride | None = None
        if self._on_failure is not None and t._call is not None:
            override = self._ask_handler(t, f, exc)
        self._by_attempt.pop(attempt, None)
        self._run(self._core.handle(wf.Failed(attempt, f, self._clock(), retry, override)), acts)
        state = self._core.state(t._tid)
        if not state.final:  # a retry is coming: keep the failed attempt on record now
            self._journal_task(t, state.name)

    def _ask_handler(
        self, t: Task, f: FailureRecord, exc: BaseException
    ) -> wf.RetryOverride | wf.FailOverride | None:
        assert self._on_failure is not None and t._call is not None
        fn, args, kwargs = t._call
        try:
            decision = self._on_failure(f, Call(fn, args, kwargs, t.options))
            if decision is None:
                return None
            if isinstance(decision, Fail):
                return wf.FailOverride()
            if isinstance(decision, Retry):
                new_args = decision.args if decision.args is not None else args
                new_kwargs = decision.kwargs if decision.kwargs is not None else kwargs
                opts = t.options
                if isinstance(decision.options, TaskOptions):
                    opts = decision.options
                elif decision.options:
                    opts = opts.merged(**decision.options)
                if decision.args is not None or decision.kwargs is not None:
                    payload, deps = self._pickle_call(fn, tuple(new_args), dict(new_kwargs))
                    if any(d._tid not in {x._tid for x in t._deps} for d in deps):
                        raise InvalidTask("Retry(args=...) may not add new Task dependencies")
                    t._payload, t._deps = payload, tuple(deps)
                    t._call = (fn, tuple(new_args), dict(new_kwargs))
                retries = opts.retries if opts.retries != t.options.retries else None
                t.options = opts
                return wf.RetryOverride(delay=decision.delay, retries=retries)
            raise TypeError(
                f"on_failure returned {decision!r}; return pilotfish.Retry(...), "
                "pilotfish.Fail() or None"
            )
        except Exception as e:
            e.__cause__ = exc
            with contextlib.suppress(Exception):
                e.add_note(f"pilotfish: raised by the on_failure handler for task {t.key!r}")
            hf = dataclasses.replace(
                f,
                message=f"the on_failure handler raised {type(e).__name__}: {e} "
                f"(while handling: {f.one_line()})",
                exc_type=_wire.qualified_name(type(e)),
                traceback=_wire.format_exception(e) + "\nwhile handling:\n" + (f.traceback or ""),
                transient=False,
            )
            t._last_exc, t._last_failure = e, hf
            return wf.FailOverride(hf)

    # ------------------------------------------------------------------ backend events
    def _on_backend_events(self, events: Sequence[Any]) -> None:
        acts = _Actions()
        with self._lock:
            for ev in events:
                try:
                    self._on_backend_event(ev, acts)
                except Exception:
                    log.exception("pilotfish: error handling backend event %r", ev)
        self._finish(acts)

    def _on_backend_event(self, ev: Any, acts: _Actions) -> None:
        if isinstance(ev, _wire.Result | _wire.Lost) and ev.attempt < 0:
            probe = self._probes.pop(ev.attempt, None)
            if probe is not None and not probe.done():
                if isinstance(ev, _wire.Lost):
                    probe.set_result((False, ev.message))
                elif ev.ok:
                    probe.set_result((True, ev.data))
                else:
                    env = pickle.loads(ev.data)
                    probe.set_result((False, f"{env.type_name}: {env.message}\n{env.traceback}"))
            return
        if isinstance(ev, _wire.Result):
            tid = self._core.owner(ev.attempt)
            if tid is None:
                self._run([wf.Dropped(ev.attempt, "not the current attempt", "result")], acts)
                return
            t = self._tasks[tid]
            if ev.ok:
                try:
                    value = pickle.loads(ev.data)
                except Exception as e:
                    f = self._attempt_failure(
                        t,
                        ev.attempt,
                        Category.USER_ERROR,
                        f"the result of task {t.key!r} could not be unpickled on the client: "
                        f"{type(e).__name__}: {e}",
                        worker=ev.worker,
                        pid=ev.pid,
                        exc_type=_wire.qualified_name(type(e)),
                        traceback=_wire.format_exception(e),
                    )
                    exc: BaseException = RemoteError(
                        f.message, f, type_name=f.exc_type or "", remote_traceback=f.traceback or ""
                    )
                    self._failed_attempt(t, ev.attempt, f, exc, False, acts)
                    return
                t._value_bytes = ev.data
                t._pending_value = value
                self._run(
                    self._core.handle(
                        wf.Succeeded(ev.attempt, ev.ended, ev.worker, ev.host or self._host, ev.pid)
                    ),
                    acts,
                )
            else:
                f, exc, retry = self._user_failure(t, ev)
                self._failed_attempt(t, ev.attempt, f, exc, retry, acts)
        elif isinstance(ev, _wire.Started) and ev.attempt > 0:
            self._run(
                self._core.handle(
                    wf.Started(ev.attempt, ev.time, ev.worker, ev.host or self._host, ev.pid)
                ),
                acts,
            )
        elif isinstance(ev, _wire.Lost):
            tid = self._core.owner(ev.attempt)
            if tid is None:
                self._run([wf.Dropped(ev.attempt, "not the current attempt", "lost")], acts)
                return
            t = self._tasks[tid]
            cat = Category(ev.category)
            f = self._attempt_failure(
                t,
                ev.attempt,
                cat,
                ev.message,
                worker=ev.worker,
                pid=ev.pid,
                returncode=ev.returncode,
                signal=ev.signal,
                stderr_tail=ev.stderr_tail or None,
                host=ev.host or None,
            )
            exc = EXCEPTION_FOR[cat](ev.message, f)
            self._failed_attempt(t, ev.attempt, f, exc, False, acts)
        elif isinstance(ev, _wire.WorkerEvent):
            if self._on_event:
                held = tuple(self._by_attempt[a].key for a in ev.held if a in self._by_attempt)
                acts.events.append(
                    WorkerEvent(
                        ev.kind,
                        ev.worker,
                        ev.pid,
                        ev.time,
                        ev.returncode,
                        ev.signal,
                        held,
                        ev.message,
                    )
                )
        elif isinstance(ev, BMasterEvent):
            if self._on_event:
                acts.events.append(
                    MasterEvent(ev.kind, ev.pid, ev.time, ev.returncode, ev.signal, ev.message)
                )
        elif isinstance(ev, _wire.Fatal):
            for probe in self._probes.values():
                if not probe.done():
                    probe.set_result((False, ev.message))
            self._probes.clear()
            cat = Category(ev.category)
            self._run(self._core.handle(wf.Abort(cat, ev.message, self._clock())), acts)

    # ------------------------------------------------------------------ timers
    def _timer_loop(self) -> None:
        with self._lock:
            while not self._closed:
                now = self._clock()
                if self._timers and self._timers[0] <= now:
                    while self._timers and self._timers[0] <= now:
                        heapq.heappop(self._timers)
                    acts = _Actions()
                    self._run(self._core.handle(wf.Tick(now)), acts)
                    self._lock.release()
                    try:
                        self._finish(acts)
                    finally:
                        self._lock.acquire()
                    continue
                timeout = (self._timers[0] - now) if self._timers else None
                self._timer_cv.wait(timeout)

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._timer_cv.notify_all()
        self._backend.stop()
        if self._journal is not None:
            counts = self._core.counts
            status = (
                "failed"
                if counts[State.FAILED]
                else ("finished" if not self._core.unfinished() else "interrupted")
            )
            self._journal.close(status)
        _live_sessions.discard(self)


#: backend name -> (module, class); optional ones are installed as the extra of that name
_BACKENDS = {
    "local": ("pilotfish.backends.local.backend", "LocalBackend"),
    "dask": ("pilotfish.backends.dask", "DaskBackend"),
    "radical": ("pilotfish.backends.radical.backend", "RadicalBackend"),
}


def _backend_class(name: str) -> Any:
    """Import a backend by name; a missing optional dependency says how to install it."""
    import importlib

    module, cls = _BACKENDS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        hint = f"pilotfish[{name}]"
        if hint in str(e):
            raise EnvironmentMismatch(str(e)) from e
        raise EnvironmentMismatch(
            f"backend={name!r} needs an optional dependency that cannot be imported ({e}); "
            f"install it with: pip install '{hint}'"
        ) from e


def _str_list(items: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(items, str) or not all(isinstance(x, str) and x.strip() for x in items):
        raise InvalidTask(f"{what}={items!r} must be a list of non-empty strings")
    return tuple(items)


def _backstop(timeout: float | None) -> float | None:
    """The master's own deadline for a program: the program's timeout is enforced by the
    worker (killing its process group); if the worker itself is stuck, the master kills it."""
    return None if timeout is None else timeout + 10.0 + 0.1 * timeout


def _output_path(result: CommandResult, name: str) -> Path:
    return result.outputs[name]


def _check_session_args(
    workers: int | None,
    poison_after: int,
    hb_interval: float,
    hb_timeout: float,
    max_restarts: int,
) -> None:
    def bad(name: str, value: Any, need: str) -> InvalidTask:
        return InvalidTask(f"Session({name}={value!r}) is invalid: {need}")

    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise bad("workers", workers, "give an int >= 1 (or None for one per CPU)")
    if not isinstance(poison_after, int) or poison_after < 1:
        raise bad("poison_after", poison_after, "give an int >= 1")
    if not isinstance(hb_interval, int | float) or hb_interval <= 0:
        raise bad("heartbeat_interval", hb_interval, "give seconds > 0")
    if not isinstance(hb_timeout, int | float) or hb_timeout <= hb_interval:
        raise bad("heartbeat_timeout", hb_timeout, "give seconds > heartbeat_interval")
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise bad("max_master_restarts", max_restarts, "give an int >= 0")


def _explain_unpicklable(
    fn: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ref: Callable[[Any], int | None],
    err: Exception,
) -> str:
    """Find which part of the call cannot be pickled, to name it in the error."""
    parts: list[tuple[str, Any]] = [("the callable", fn)]
    parts += [(f"argument {i} ({type(a).__name__})", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r} ({type(v).__name__})", v) for k, v in kwargs.items()]
    for label, obj in parts:
        try:
            _wire.dumps_call(obj, ref)
        except Exception as e:
            return (
                f"cannot submit {getattr(fn, '__qualname__', fn)!r}: {label} cannot be pickled "
                f"({type(e).__name__}: {e}). Tasks run in other processes, so the callable and "
                "its arguments must be picklable (cloudpickle); pass a path or the data instead."
            )
    return f"cannot pickle the call to {fn!r}: {type(err).__name__}: {err}"


def wait(
    fs: Iterable[cf.Future[Any]],
    timeout: float | None = None,
    return_when: str = cf.ALL_COMPLETED,
) -> cf._base.DoneAndNotDoneFutures[Any]:
    """``concurrent.futures.wait`` for Tasks (and any futures)."""
    return cf.wait(fs, timeout=timeout, return_when=return_when)


def as_completed(
    fs: Iterable[cf.Future[Any]], timeout: float | None = None
) -> Iterator[cf.Future[Any]]:
    """``concurrent.futures.as_completed`` for Tasks (and any futures)."""
    return cf.as_completed(fs, timeout=timeout)
