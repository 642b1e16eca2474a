"""Run one attempt wherever a backend puts it: the code every worker shares.

``run_attempt`` turns a :class:`~pilotfish.wire.messages.RunAttempt` into a
:class:`~pilotfish.wire.messages.Result` and never raises: user exceptions, results
that cannot be pickled, calls that cannot be loaded (a module missing on the
worker) and program failures all become an ``Envelope`` in the result. The
local worker and the Dask backend both call it, so a task behaves the same
on every backend.

Signal dispositions are per process and outlive the task that changed them: a
Python task that calls ``signal.signal(SIGCHLD, SIG_IGN)`` would make the
kernel reap every later program's child, and its exit status would be lost.
So the dispositions this module found when the worker imported it (before any
user code ran) are put back before every attempt, where that is possible (in
the main thread; elsewhere user code cannot change them either).

The same holds for the rest of what a process shares between its attempts
(:class:`_Worker`, one per process, used by every backend's worker path through
:func:`run_attempt`): each attempt starts with the worker's file descriptors 0-2
(a task that closed or replaced them would break the next task's ``print``),
its working directory and its environment as they were before the first
attempt; and nothing an attempt started outlives it (:class:`pilotfish.runtime.procs.
Containment`: the worker is a child subreaper, and when the attempt ends,
however it ends, every process it started, detached or not, is killed and
reaped before its result is sent). Where several attempts share a process
(Dask's threads), the directory and environment are put back only when no other
attempt runs.
"""

from __future__ import annotations

import _signal  # the C module behind `signal`: getsignal without enum conversion, 50x faster
import contextlib
import os
import pickle
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from ..wire import messages as _wire
from ..wire.messages import Envelope, Result, RunAttempt
from . import procs as _procs
from . import scratch as _scratch


def _dispositions() -> dict[int, Any]:
    """This process's current signal handlers, for those set from Python or by default."""
    out: dict[int, Any] = {}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            handler = _signal.getsignal(sig)
            if handler is not None:  # None: installed by C code; leave it alone
                out[int(sig)] = handler
    return out


#: What a fresh worker has (taken at import, before any user code ran).
_FRESH = _dispositions()


def fresh_worker() -> None:
    """This process became a fresh worker after importing this module (forked from the
    local master, whose own handlers it dropped): its dispositions now are the ones
    :func:`reset_signals` puts back."""
    global _FRESH
    _FRESH = _dispositions()


def reset_signals() -> None:
    """Put back the fresh worker's signal dispositions (SIGCHLD, SIGPIPE, SIGINT...)
    that an earlier task changed; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in _FRESH.items():
        if _signal.getsignal(sig) != handler:
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, handler)


_SHARED_PID: int | None = None  # the pid of a process that is also a client


def shared_process() -> None:
    """Say that this process is a client too (a ``Session`` lives here): attempts that
    run in it (``FakeBackend``, a Dask worker inside the client's process) share it with
    the user's own code, so nothing of the process is put back between attempts (its
    working directory, environment and ``sys.stdout`` are the user's to change) and
    containment ends only what an attempt's own thread started."""
    global _SHARED_PID
    _SHARED_PID = os.getpid()


class _Worker:
    """What this process looked like before its first attempt, and the containment of
    what its attempts start (one per process: a fork gets its own)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.shared = self.pid == _SHARED_PID
        self.contain = _procs.Containment(self.shared)
        self.cwd = os.getcwd()
        self.environ = dict(os.environ)
        # os.environ's own bytes mapping: comparing it is 20x faster than os.environ
        self._data: Any = getattr(os.environ, "_data", None)
        self._data = dict(self._data) if isinstance(self._data, dict) else None
        self.stdio: list[tuple[int, int, tuple[int, int]] | None] = []
        for fd in (0, 1, 2):
            try:
                st = os.fstat(fd)
                self.stdio.append((fd, os.dup(fd), (st.st_dev, st.st_ino)))  # close-on-exec
            except OSError:
                self.stdio.append(None)
        self.streams: list[Any] = [sys.stdin, sys.stdout, sys.stderr]

    def restore(self) -> None:
        """Put back what an earlier attempt changed: fds 0-2 (closed, or pointing
        elsewhere), ``sys.stdin``/``stdout``/``stderr``, the working directory and
        ``os.environ``. Call with no other attempt running in this process."""
        for saved in self.stdio:
            if saved is None:
                continue
            fd, copy, ident = saved
            try:
                st = os.fstat(fd)
                same = (st.st_dev, st.st_ino) == ident
            except OSError:
                same = False
            if not same:
                with contextlib.suppress(OSError):
                    os.dup2(copy, fd)
        for fd, name in enumerate(("stdin", "stdout", "stderr")):
            stream = self.streams[fd]
            if getattr(stream, "closed", False) and self.stdio[fd] is not None:
                # the task closed the stream itself: a fresh one on the same descriptor
                with contextlib.suppress(OSError, ValueError):
                    stream = self.streams[fd] = open(  # noqa: SIM115 - kept for the process
                        fd, "w" if fd else "r", buffering=1 if fd else -1, closefd=False
                    )
            if getattr(sys, name) is not stream:
                setattr(sys, name, stream)
        with contextlib.suppress(OSError):
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        data = getattr(os.environ, "_data", None)
        if (data != self._data) if self._data is not None else (os.environ != self.environ):
            os.environ.clear()
            os.environ.update(self.environ)

    def begin(self) -> int:
        token = self.contain.begin()
        if self.shared:
            return token
        if self.contain.alone():
            self.restore()
        reset_signals()
        return token


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()  # only ever taken here (never held across a fork)


def _this_worker() -> _Worker:
    global _WORKER
    w = _WORKER
    if w is None or w.pid != os.getpid() or w.shared != (w.pid == _SHARED_PID):
        # first attempt here, a fork of a worker, or a session started here since
        with _WORKER_LOCK:
            w = _WORKER
            if w is None or w.pid != os.getpid() or w.shared != (w.pid == _SHARED_PID):
                w = _WORKER = _Worker()
    return w


#: the client's ``__main__`` globals as this worker has seen them (data only, no code)
_MAIN_STATE: dict[str, Any] = {}
_CODE = (types.FunctionType, types.BuiltinFunctionType, type, types.ModuleType)


class _InMain:
    """``with _InMain(fn):`` around calls of ``fn``. If ``fn`` came by value from the
    client's ``__main__``, it gets the module-level data earlier calls on this worker left
    there (an initializer's ``global model``; a fresh unpickled copy would see only the
    client's values), and what it leaves is kept for later calls: what a worker that
    imported the script once (as multiprocessing's spawn does) would see. Any other
    ``fn``: nothing."""

    __slots__ = ("g",)

    def __init__(self, fn: Any) -> None:
        g = getattr(fn, "__globals__", None)
        main = sys.modules.get("__main__")
        by_value = (
            getattr(fn, "__module__", None) == "__main__"
            and isinstance(g, dict)
            and (main is None or g is not vars(main))
        )
        self.g: dict[str, Any] | None = g if by_value else None

    def __enter__(self) -> None:
        g = self.g
        if g is not None:
            for name, value in _MAIN_STATE.items():
                if not isinstance(g.get(name), _CODE):
                    g[name] = value

    def __exit__(self, *exc: object) -> None:
        g = self.g
        if g is not None:
            _MAIN_STATE.update(
                (k, v) for k, v in g.items() if not k.startswith("__") and not isinstance(v, _CODE)
            )


def call_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """One attempt of ``Session.map(..., chunksize=n)``: ``fn`` over up to n argument
    tuples, in order; each call has its own scratch directories (``_scratch.calls``)."""
    with _InMain(fn):
        return list(_scratch.calls(fn, chunk))


#: initializer call (its pickle) -> None once it ran here, or the Envelope of its failure
_INITIALIZED: dict[bytes, Envelope | None] = {}
_INIT_LOCK = threading.Lock()


def ensure_initialized(m: RunAttempt, worker: str, host: str) -> Envelope | None:
    """Run the session's ``initializer(*initargs)`` in this process if no attempt did
    yet (once per worker process, as ProcessPoolExecutor does, so a replacement worker
    runs it too). Its failure is kept: every attempt on this worker then fails
    ENVIRONMENT with the initializer's traceback, instead of running uninitialised.
    Where every attempt runs in a fresh fork (RADICAL-Pilot), it runs once per attempt."""
    if not m.init:
        return None
    try:
        return _INITIALIZED[m.init]
    except KeyError:
        pass
    with _INIT_LOCK:  # Dask runs attempts in threads: the first runs it, the rest wait
        if m.init in _INITIALIZED:
            return _INITIALIZED[m.init]
        fn: Any = None
        try:
            fn, args, kwargs = _wire.loads_call(m.init, ())
            with _InMain(fn):
                fn(*args, **kwargs)
            env = None
        except BaseException as e:
            name = getattr(fn, "__qualname__", None) or "initializer"
            env = _wire.envelope_for(
                e,
                "environment",
                message=(
                    f"the session's initializer {name}() raised on worker {worker} at host "
                    f"{host} (pid {os.getpid()}): {type(e).__name__}: {e}; no task runs on "
                    "a worker whose initializer failed (fix the initializer, or the "
                    "environment it needs, and resubmit)"
                ),
            )
        _INITIALIZED[m.init] = env
        return env


def _fail(env: Envelope) -> tuple[bool, bytes]:
    return False, pickle.dumps(env, _wire.PROTOCOL)


def _run(
    m: RunAttempt,
    worker: str,
    host: str,
    rundir: str,
    on_group: Callable[[int], None] | None,
    cancel: threading.Event | None,
) -> tuple[bool, bytes]:
    if m.init:
        env = ensure_initialized(m, worker, host)
        if env is not None:
            return _fail(env._replace(extra={**env.extra, "host": host}))
    if m.requires or m.programs:
        from .preflight import requirement_checks

        failed = [c for c in requirement_checks(m.requires, m.programs) if not c.ok]
        if failed:
            lines = "\n".join(f"  - {c.message()}" for c in failed)
            return _fail(
                Envelope(
                    "environment",
                    "pilotfish.EnvironmentMismatch",
                    f"task {m.key!r} cannot run on worker {worker}: its requirements are "
                    f"not met (Python {sys.executable}):\n{lines}",
                    "",
                    None,
                    {"host": host},
                )
            )
    if m.kind == "command":
        from .program_attempt import run_command_attempt

        return run_command_attempt(m, rundir, on_group, cancel)
    try:
        fn, args, kwargs = _wire.loads_call(m.payload, m.deps)
    except ImportError as e:
        return _fail(
            _wire.envelope_for(
                e,
                "environment",
                message=(
                    f"task {m.key!r} cannot be loaded on worker {worker} at host "
                    f"{host}: {type(e).__name__}: {e}. Python {sys.executable}; "
                    f"sys.path searched: {sys.path}"
                ),
            )
        )
    except BaseException as e:
        return _fail(_wire.envelope_for(e, "user_error"))
    # for scratch_dir() etc.; a successful attempt's scratch is removed unless kept
    token = _scratch.enter(rundir, m.key, m.attempt, m.lineage, "all" if m.keep else "failed")
    ok = False
    try:
        with _InMain(fn):
            value = fn(*args, **kwargs)
        ok = True
    except BaseException as e:
        return _fail(_wire.envelope_for(e, "user_error", skip_frames=1))
    finally:
        _scratch.leave(token, ok)
    del fn, args, kwargs
    try:
        return True, _wire.dumps_value(value)
    except BaseException as e:
        msg = (
            f"the result of task {m.key!r} could not be pickled ({type(value).__name__}): "
            f"{type(e).__name__}: {e}; return plain data (numbers, arrays, dicts), or write "
            "the object to a file in the task and return its path"
        )
        return _fail(_wire.envelope_for(_restated(e, msg), "user_error", message=msg))


def _restated(e: BaseException, msg: str) -> BaseException:
    """``e`` saying ``msg`` (what failed, for which task), of ``e``'s own type when one
    can be made from a message (TypeError, PicklingError), caused by ``e``; else ``e``."""
    try:
        new = type(e)(msg)
    except Exception:
        return e
    new.__cause__ = e
    return new.with_traceback(e.__traceback__)


def run_attempt(
    m: RunAttempt,
    *,
    worker: str,
    host: str,
    rundir: str,
    on_group: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Result:
    """Run ``m`` here and now; ``on_group(pgid)`` is told of a program's process group;
    setting ``cancel`` stops a program (its whole process group) early."""
    started = time.time()
    w = _this_worker()
    token = w.begin()
    try:
        ok, data = _run(m, worker, host, rundir, on_group, cancel)
    finally:
        w.contain.end(token)  # nothing it started outlives it, however it ended
    return Result(m.attempt, ok, data, worker, os.getpid(), started, time.time(), host)
