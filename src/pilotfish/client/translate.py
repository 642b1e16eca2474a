"""From what a backend says to what the workflow core and the user see.

The one place (httpx's rule: errors from below are translated once, at the
boundary) where backend events become core events, failure records, the
exceptions ``Task.result()`` raises, and public events::

    backend event (base.BackendEvent)   becomes
    ---------------------------------   ---------------------------------------------------
    Started                             wf.AttemptStarted (worker, host, pid)
    Result, ok                          the value, unpickled here -> wf.Succeeded
                                        (cannot be unpickled: wf.Failed USER_ERROR, RemoteError)
    Result with an Envelope             FailureRecord + the user's own exception (or
                                        RemoteError, CommandFailed, ...) -> wf.Failed
    Lost                                FailureRecord + WorkerLost / RuntimeLost /
                                        TaskTimeout -> wf.Failed
    WorkerReport                        pilotfish.WorkerEvent (attempt ids -> task keys)
    MasterReport                        pilotfish.MasterEvent
    Fatal                               wf.Abort
    Alive; probes (attempt id < 0)      not here: the session's Silence watch, _probes

An event about an attempt that is not the current attempt of a running task is
dropped here (logged) before anything is unpickled: the workflow core fences
it anyway. A failed attempt also asks the user's ``on_failure`` handler; its
``Retry`` or ``Fail`` becomes the core's override.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, assert_never

from ..backends.base import Fatal, Lost, MasterReport, Result, Started, Unlinked
from ..core import workflow as wf
from ..core.drain import DrainPolicy
from ..errors import (
    EXCEPTION_FOR,
    Category,
    DependencyFailed,
    FailureRecord,
    InvalidTask,
    PilotfishError,
    RemoteError,
)
from ..runtime.programs import CommandResult
from ..wire import messages as _wire
from .events import MasterEvent, WorkerEvent, WorkersGone
from .options import TaskOptions, check_retry

if TYPE_CHECKING:
    from .task import Task

log = logging.getLogger("pilotfish")

__all__ = ["Call", "Fail", "Reported", "Retry", "Translator", "drain_policy"]

#: the backend events the translator reads: every kind but ``Alive`` (the driver's)
Reported = Started | Result | Lost | Unlinked | _wire.WorkerReport | MasterReport | Fatal


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

    def __post_init__(self) -> None:
        check_retry(self.delay, self.args, self.kwargs)


@dataclasses.dataclass(frozen=True, slots=True)
class Fail:
    """Returned by ``on_failure``: stop, do not retry."""


OnFailure = Callable[[FailureRecord, Call], Retry | Fail | None]
#: what a backend event becomes: a core event, a public event, or nothing
Step = wf.Event | WorkerEvent | MasterEvent | WorkersGone | None


class Translator:
    """Backend events in, core or public events out (see the module docstring).

    It reads the core (which attempt is current) and the session's tasks, and keeps on
    each Task what the core does not hold: the value bytes of a success, and the
    exception of the last failure (raised by ``result()`` as the user's own type).
    """

    def __init__(
        self,
        core: wf.Workflow,
        tasks: Mapping[int, Task],
        by_key: Callable[[str], Task | None],
        *,
        host: str,
        clock: Callable[[], float],
        on_failure: OnFailure | None,
        repickle: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any],
        public_events: bool,
    ) -> None:
        self._core = core
        self._tasks = tasks
        self._by_key = by_key
        self._host = host
        self._clock = clock
        self._on_failure = on_failure
        self._repickle = repickle
        self._public = public_events

    # ------------------------------------------------------------------ events
    def event(self, ev: Reported) -> Step:
        """What ``ev`` becomes (probes and ``Alive`` are the driver's, never seen here)."""
        match ev:
            case Result():
                return self._result(ev)
            case Started():
                host = self._name(ev.host) or self._host
                return wf.AttemptStarted(ev.attempt, ev.time, self._name(ev.worker), host, ev.pid)
            case Lost():
                return self._lost(ev)
            case _wire.WorkerReport():
                return self._worker_report(ev) if self._public else None
            case MasterReport():
                if not self._public:
                    return None
                return MasterEvent(ev.kind, ev.pid, ev.time, ev.returncode, ev.signal, ev.message)
            case Fatal():
                return wf.Abort(Category(ev.category), ev.message, self._clock())
            case Unlinked():
                return wf.Unlinked(ev.attempt, ev.reason, ev.time)
            case _:
                assert_never(ev)

    def _worker_report(self, ev: _wire.WorkerReport) -> WorkerEvent | WorkersGone:
        if ev.kind == "gone":  # every worker left
            return WorkersGone(ev.time, ev.message)
        held = []
        for a in ev.held:
            tid = self._core.task_of(a)
            if tid is not None:
                held.append(self._core.key(tid))
        return WorkerEvent(
            ev.kind, ev.worker, ev.pid, ev.time, ev.returncode, ev.signal, tuple(held), ev.message
        )

    def _current(self, attempt: int, what: str) -> Task | None:
        """The task whose current, running attempt this is; else log the drop."""
        tid = self._core.owner(attempt)
        if tid is None:
            log.info("dropped %s event of attempt %s: not the current attempt", what, attempt)
            return None
        return self._tasks[tid]

    def _result(self, ev: Result) -> Step:
        t = self._current(ev.attempt, "result")
        if t is None:
            return None
        if not ev.ok:
            f, exc, retry, note = self._user_failure(t, ev)
            return self._failed(t, ev.attempt, f, exc, retry, note)
        try:
            value = pickle.loads(ev.data)
        except BaseException as e:  # even SystemExit: this runs on a backend's thread
            f = self._attempt_failure(
                t,
                Category.USER_ERROR,
                f"the result of task {t.key!r} could not be unpickled on the client: "
                f"{type(e).__name__}: {e}",
                worker=ev.worker,
                pid=ev.pid,
                exc_type=_wire.qualified_name(type(e)),
                traceback=_wire.format_exception(e),
            )
            exc = RemoteError(
                f.message, f, type_name=f.exc_type or "", remote_traceback=f.traceback or ""
            )
            return self._failed(t, ev.attempt, f, exc, False)
        t._value_bytes = _small(ev.data)
        t._pending_value = value
        note = value.note if isinstance(value, CommandResult) else None
        worker, host = self._name(ev.worker), self._name(ev.host) or self._host
        return wf.Succeeded(ev.attempt, ev.ended, worker, host, ev.pid, note)

    def _name(self, name: str | None) -> str | None:
        """One string object per worker or host name: each message brings its own copy,
        and every attempt record keeps one (issue 26: memory per held task)."""
        return sys.intern(name) if name and type(name) is str else name

    def _lost(self, ev: Lost) -> Step:
        t = self._current(ev.attempt, "lost")
        if t is None:
            return None
        cat = Category(ev.category)
        f = self._attempt_failure(
            t,
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
        return self._failed(t, ev.attempt, f, exc, False, unblamed=ev.unblamed)

    def _failed(
        self,
        t: Task,
        attempt: int,
        f: FailureRecord,
        exc: BaseException,
        retry: bool,
        note: str | None = None,
        unblamed: str = "",
    ) -> wf.Failed:
        t._last_exc, t._last_failure = exc, f
        override: wf.RetryOverride | wf.FailOverride | None = None
        if self._on_failure is not None and t._call is not None:
            override = self._ask_handler(t, f, exc)
        return wf.Failed(attempt, f, self._clock(), retry, override, note, unblamed)

    # ------------------------------------------------------------------ failures
    def exception_for(self, t: Task, f: FailureRecord) -> BaseException:
        """What ``t.result()`` raises for its final failure ``f``: the exception kept from
        the attempt (the user's own type), or one of ``f``'s category; a dependency
        failure has the root task's exception as ``__cause__``."""
        if t._last_failure is f and t._last_exc is not None:
            last: BaseException = t._last_exc
            return last
        if f.category is Category.DEPENDENCY_FAILED:
            exc: BaseException = DependencyFailed(f.message, f)
            root = self._by_key(f.root or "")
            if root is not None:
                cause = root._last_exc or (
                    self.exception_for(root, root.failure) if root.failure else None
                )
                exc.__cause__ = cause
            return exc
        return EXCEPTION_FOR.get(f.category, PilotfishError)(f.message, f)

    def _attempt_failure(
        self, t: Task, category: Category, message: str, **fields: Any
    ) -> FailureRecord:
        return FailureRecord(
            key=t.key,
            category=category,
            message=message,
            transient=category.transient,
            attempt=len(self._core.attempts(t._tid)),
            host=fields.pop("host", None) or self._host,
            time=self._clock(),
            **fields,
        )

    def _user_failure(
        self, t: Task, res: Result
    ) -> tuple[FailureRecord, BaseException, bool, str | None]:
        """A failed attempt's ``Envelope``: its record, its exception, whether the
        task asked for a retry (``retry_on``, ``retry_exit_codes``), and the attempt's
        note (what a program resumed from)."""
        env: _wire.Envelope = pickle.loads(res.data)
        env = env._replace(traceback=_wire.fix_dynamic_frames(env.traceback))
        number = len(self._core.attempts(t._tid))
        host = res.host or self._host
        category = Category(env.category)
        exc: BaseException | None = None
        if env.exc is not None and category is Category.USER_ERROR:
            try:
                exc = pickle.loads(env.exc)
            except BaseException as e:  # even SystemExit: this runs on a backend's thread
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
            staged=extra.get("staged"),
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
            if f.staged:
                exc.add_note(f"pilotfish: the attempt's files were {f.staged}")
        retry = False
        if category is Category.USER_ERROR:
            retry = t.options.matches(None if isinstance(exc, RemoteError) else exc, env.type_name)
        elif category is Category.COMMAND_FAILED:
            retry = bool(extra.get("retry_requested"))
        note = extra.get("note")
        return f, exc, retry, note if isinstance(note, str) else None

    # ------------------------------------------------------------------ on_failure
    def _ask_handler(
        self, t: Task, f: FailureRecord, exc: BaseException
    ) -> wf.RetryOverride | wf.FailOverride | None:
        """The user's ``on_failure`` decision as the core's override. A handler that
        raises fails the task with its exception (chained to the attempt's)."""
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
                    payload, deps = self._repickle(fn, tuple(new_args), dict(new_kwargs))
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


# --------------------------------------------------------------------------- draining
def drain_policy(value: Any) -> DrainPolicy | None:
    """``Session(drain_after=...)`` checked where it enters: None (off), an int (different
    tasks), a pair (tasks, window seconds) or a DrainPolicy."""
    try:
        return DrainPolicy.coerce(value)
    except (ValueError, TypeError) as e:
        raise InvalidTask(f"Session(drain_after={value!r}) is invalid: {e}") from None


_SMALL: dict[bytes, bytes] = {}  # pickles of None, True, small ints...: one object each


def _small(data: bytes) -> bytes:
    """``data``, or the equal bytes object already kept if it is a tiny pickle (a no-op's
    ``None`` is 4 bytes in a 37-byte object, kept per task for its dependents)."""
    if len(data) > 16:
        return data
    kept = _SMALL.get(data)
    if kept is None:
        if len(_SMALL) >= 4096:
            return data
        kept = _SMALL[data] = data
    return kept
