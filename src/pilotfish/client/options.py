"""Task options, their validation, the ``@pilotfish.task`` decorator, and the checks of
``Session(...)``'s own keywords."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar

from ..errors import InvalidTask
from ..runtime.programs import KEEP_SANDBOXES

P = ParamSpec("P")
R = TypeVar("R")

_UNSET: Any = object()


@dataclasses.dataclass(frozen=True, slots=True)
class TaskOptions:
    """Per-task options. ``retries`` is the budget for transient failures (worker lost,
    runtime lost, timeout) and for user exceptions matched by ``retry_on``; a user
    exception is never retried unless ``retry_on`` asks for it."""

    retries: int = 3
    retry_on: tuple[type[BaseException], ...] | bool = ()
    timeout: float | None = None
    #: how many of ``retries`` may follow a timeout (a hang tends to repeat: 4 x a 1-hour
    #: timeout is 4 hours before anyone hears); None: 1, or all ``retries`` for a program
    #: with ``resume_files`` (each retry continues from its checkpoint)
    timeout_retries: int | None = None
    #: journal its value (for resume)? None: as the session's ``journal_values`` says
    keep_result: bool | None = None
    key: str | None = None
    name: str | None = None
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate(self)

    def merged(self, **changes: Any) -> TaskOptions:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidTask(
                f"unknown task option(s) {sorted(unknown)}; valid options are "
                f"{[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **_normalise(changes))

    def matches(self, exc: BaseException | None, type_name: str | None = None) -> bool:
        """Does ``retry_on`` ask to retry this user exception?"""
        if self.retry_on is True:
            return True
        if not self.retry_on:
            return False
        if exc is not None:
            return isinstance(exc, self.retry_on)
        return type_name is not None and any(
            type_name in (t.__qualname__, f"{t.__module__}.{t.__qualname__}") for t in self.retry_on
        )

    def to_dict(self) -> dict[str, Any]:
        ro = self.retry_on
        return {
            "retries": self.retries,
            "retry_on": ro
            if isinstance(ro, bool)
            else [f"{t.__module__}.{t.__qualname__}" for t in ro],
            "timeout": self.timeout,
            "timeout_retries": self.timeout_retries,
            "keep_result": self.keep_result,
            "key": self.key,
            "name": self.name,
            "requires": list(self.requires),
        }


def _normalise(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    ro = d.get("retry_on")
    if ro is not None and not isinstance(ro, bool):
        if isinstance(ro, type):
            d["retry_on"] = (ro,)
        elif isinstance(ro, Iterable) and not isinstance(ro, str | bytes):
            d["retry_on"] = tuple(ro)
    if ro is None and "retry_on" in d:
        d["retry_on"] = ()
    req = d.get("requires")
    if isinstance(req, str):
        d["requires"] = (req,)
    elif req is not None:
        d["requires"] = tuple(req)
    return d


def validate(o: TaskOptions) -> None:
    if isinstance(o.retries, bool) or not isinstance(o.retries, int) or o.retries < 0:
        raise InvalidTask(f"task option retries={o.retries!r} is invalid: it must be an int >= 0")
    if not (o.keep_result is None or isinstance(o.keep_result, bool)):
        raise InvalidTask(
            f"task option keep_result={o.keep_result!r} is invalid: give True (journal its "
            "value: resume takes it), False (do not: resume runs it again) or None (the "
            "session's journal_values decides)"
        )
    tr = o.timeout_retries
    if tr is not None and (isinstance(tr, bool) or not isinstance(tr, int) or tr < 0):
        raise InvalidTask(
            f"task option timeout_retries={tr!r} is invalid: it must be an int >= 0 (how "
            "many timed-out attempts are retried), or None for the default"
        )
    if not isinstance(o.retry_on, bool):
        if not isinstance(o.retry_on, tuple):
            raise InvalidTask(
                f"task option retry_on={o.retry_on!r} is invalid: give an exception type, "
                "a tuple of exception types, or True for any user exception"
            )
        for t in o.retry_on:
            if not (isinstance(t, type) and issubclass(t, BaseException)):
                raise InvalidTask(
                    f"task option retry_on contains {t!r}, which is not an exception type; "
                    "give exception classes such as (OSError, ValueError), or True"
                )
    if o.timeout is not None and not _positive_seconds(o.timeout):
        raise InvalidTask(
            f"task option timeout={o.timeout!r} is invalid: give a finite number of "
            "seconds > 0, or None"
        )
    for name in ("key", "name"):
        v = getattr(o, name)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise InvalidTask(f"task option {name}={v!r} is invalid: it must be a non-empty str")
    for r in o.requires:
        if not isinstance(r, str) or not r.strip():
            raise InvalidTask(
                f"task option requires contains {r!r}; give requirement strings "
                "such as 'numpy>=1.26'"
            )


def _positive_seconds(v: object) -> bool:
    """A finite number > 0 (not a bool): inf and nan are mistakes, not "forever"."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_wait(fn: str, timeout: object, return_when: object = None) -> None:
    """``wait``/``as_completed``/``Session.map``: ``timeout`` seconds (a number, or None)
    and ``return_when`` (one of concurrent.futures' three constants), checked at the call
    rather than failing later inside concurrent.futures with an unrelated error."""
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or math.isnan(timeout)
    ):
        raise TypeError(
            f"pilotfish.{fn}(timeout={timeout!r}) is invalid: give a number of seconds, or None"
        )
    if return_when is not None and return_when not in (
        "FIRST_COMPLETED",
        "FIRST_EXCEPTION",
        "ALL_COMPLETED",
    ):
        raise ValueError(
            f"pilotfish.{fn}(return_when={return_when!r}) is invalid: give "
            "concurrent.futures.FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED"
        )


def check_retry(delay: object, args: object, kwargs: object) -> None:
    """``pilotfish.Retry(delay=, args=, kwargs=)``, checked when it is made."""
    if not _positive_seconds(delay) and delay != 0:
        raise TypeError(
            f"pilotfish.Retry(delay={delay!r}) is invalid: give a finite number of seconds >= 0"
        )
    if args is not None and not isinstance(args, tuple | list):
        raise TypeError(
            f"pilotfish.Retry(args={args!r}) is invalid: give a tuple of arguments, or None"
        )
    if kwargs is not None and not (
        isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)
    ):
        raise TypeError(
            f"pilotfish.Retry(kwargs={kwargs!r}) is invalid: give a dict of keyword "
            "arguments (str keys), or None"
        )


def check_rundir(rundir: object) -> str:
    """``Session(rundir=...)``: a non-empty str or os.PathLike without NUL bytes."""
    if not isinstance(rundir, str | os.PathLike):
        raise InvalidTask(
            f"Session(rundir={rundir!r}) is invalid: give a directory path (str or Path)"
        )
    path = os.fspath(rundir)
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidTask(
            f"Session(rundir={rundir!r}) is invalid: give a non-empty str path without NUL bytes"
        )
    return path


def check_session_args(
    workers: int | None,
    poison_after: int,
    hb_interval: float,
    hb_timeout: float,
    max_restarts: int,
    workers_name: str = "workers",
) -> None:
    """``Session(...)``'s numeric keywords, each rejected with the rule it breaks."""

    def bad(name: str, value: Any, need: str) -> InvalidTask:
        return InvalidTask(f"Session({name}={value!r}) is invalid: {need}")

    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise bad(
            workers_name,
            workers,
            f"{workers_name} must be greater than 0 (an int, or None for one per CPU)",
        )
    if not isinstance(poison_after, int) or poison_after < 1:
        raise bad("poison_after", poison_after, "give an int >= 1")
    if not _positive_seconds(hb_interval):
        raise bad("heartbeat_interval", hb_interval, "give a finite number of seconds > 0")
    if not _positive_seconds(hb_timeout) or hb_timeout <= hb_interval:
        raise bad(
            "heartbeat_timeout", hb_timeout, "give a finite number of seconds > heartbeat_interval"
        )
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise bad("max_master_restarts", max_restarts, "give an int >= 0")


def check_session_choices(initializer: Any, journal_values: Any, keep_sandboxes: Any) -> int | None:
    """``Session(...)``'s other keywords, each rejected with what to give instead. Returns
    the journal's value limit: None (every DONE value), 0 (none) or a size in bytes."""
    if initializer is not None and not callable(initializer):
        raise InvalidTask(
            f"Session(initializer={initializer!r}) is invalid: give a callable, run once "
            "in every worker before its first task"
        )
    if not isinstance(journal_values, bool) and (
        not isinstance(journal_values, int) or journal_values < 0
    ):
        raise InvalidTask(
            f"Session(journal_values={journal_values!r}) is invalid: give True (journal "
            "every DONE task's value, for resume), False (none: resume reruns every "
            "task), or a size in bytes (values up to it; larger ones rerun on resume)"
        )
    if keep_sandboxes not in KEEP_SANDBOXES:
        raise InvalidTask(
            f"Session(keep_sandboxes={keep_sandboxes!r}) is invalid: give 'failed' or 'all'"
        )
    return None if journal_values is True else 0 if journal_values is False else journal_values


def str_list(items: Iterable[str], what: str) -> tuple[str, ...]:
    """A list of non-empty strings (modules, programs), or InvalidTask naming ``what``."""
    if isinstance(items, str) or not all(isinstance(x, str) and x.strip() for x in items):
        raise InvalidTask(f"{what}={items!r} must be a list of non-empty strings")
    return tuple(items)


def make_options(base: TaskOptions | None = None, **kw: Any) -> TaskOptions:
    base = base or TaskOptions()
    kw = {k: v for k, v in kw.items() if v is not _UNSET}
    return base.merged(**kw) if kw else base


class TaskFunction(Generic[P, R]):
    """A function with pilotfish task options; calling it still calls the function."""

    def __init__(self, fn: Callable[P, R], options: TaskOptions) -> None:
        if not callable(fn):
            raise InvalidTask(f"@pilotfish.task needs a callable, got {fn!r}")
        self.fn = fn
        self.task_options = options
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def options(self, **changes: Any) -> TaskFunction[P, R]:
        """A copy with some options changed: ``simulate.options(retries=0)``."""
        return TaskFunction(self.fn, self.task_options.merged(**changes))

    def __repr__(self) -> str:
        return f"<pilotfish task {getattr(self.fn, '__qualname__', self.fn)!r} {self.task_options}>"

    def __reduce__(self) -> Any:
        return (TaskFunction, (self.fn, self.task_options))


def task(fn: Callable[P, R] | None = None, /, **options: Any) -> Any:
    """Give a function task options: ``@pilotfish.task(retries=2, retry_on=(OSError,))``.

    Options: ``retries``, ``retry_on``, ``timeout``, ``key``, ``name``, ``requires``
    (see :class:`TaskOptions`). Invalid or unknown options raise
    :class:`pilotfish.InvalidTask` naming the option.
    """
    opts = make_options(**options)
    if fn is not None:
        return TaskFunction(fn, opts)

    def deco(f: Callable[P, R]) -> TaskFunction[P, R]:
        return TaskFunction(f, opts)

    return deco
