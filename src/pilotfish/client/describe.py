"""What a task is called and a short description of its call, for people (issue 25).

:func:`task_name` names a task after the function a library's wrapper holds (scipy's
and emcee's ``_FunctionWrapper`` keep it in ``.f``, :class:`functools.partial` in
``.func``, a decorator's wrapper in ``__wrapped__``), not after the wrapper.
:func:`describe_call` and :func:`describe_argv` make the bounded text the journal keeps
in a task row's ``call`` column (``pilotfish show KEY``, ``failures --json``): a Python
call as ``name(arg reprs...)``, each repr cut to :data:`ARG_MAX` characters; a program
as its argv, shell-quoted. Never longer than :data:`CALL_MAX`, never failing: a
``__repr__`` that raises shows as ``<TypeName object>``.
"""

from __future__ import annotations

import functools
import os
import reprlib
import shlex
from collections.abc import Callable, Iterable
from typing import Any

from .keyed import Keyed

__all__ = ["ARG_MAX", "CALL_MAX", "describe_argv", "describe_call", "task_name", "unwrap"]

ARG_MAX = 40  # characters of one argument's repr
CALL_MAX = 200  # characters of the whole description
_UNWRAP_MAX = 8  # wrappers looked through, at most (a wrapper may wrap itself)


def unwrap(fn: Any) -> Any:
    """The user's function inside a library's wrapper: ``functools.partial`` (``.func``),
    scipy's and emcee's ``_FunctionWrapper`` (``.f``), or anything with ``__wrapped__``;
    ``fn`` itself when it wraps nothing."""
    for _ in range(_UNWRAP_MAX):
        inner: Any
        try:
            if isinstance(fn, functools.partial):
                inner = fn.func
            elif type(fn).__name__ == "_FunctionWrapper" and callable(getattr(fn, "f", None)):
                inner = getattr(fn, "f", None)
            else:
                inner = getattr(fn, "__wrapped__", None)
        except Exception:  # a wrapper whose attributes raise: it is what it is
            return fn
        if inner is None or inner is fn or not callable(inner):
            return fn
        fn = inner
    return fn


def task_name(fn: Any) -> str:
    """The name of a task running ``fn``: the qualified name of the function it wraps
    (:func:`unwrap`), else of ``fn``, else its type's name."""
    inner = unwrap(fn)
    for obj in (inner, fn):
        try:
            name = getattr(obj, "__qualname__", None)
        except Exception:  # an object whose attributes raise
            continue
        if isinstance(name, str) and name:
            return name
    return type(inner).__name__


class _Repr(reprlib.Repr):
    """reprlib, bounded per argument; a Task shows as ``<its key>``; a ``__repr__`` that
    raises as ``<TypeName object>``."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxstring = ARG_MAX
        self.maxother = ARG_MAX
        self.maxlong = ARG_MAX
        self.maxlist = self.maxtuple = self.maxset = self.maxdict = 4
        self.maxfrozenset = self.maxdeque = self.maxarray = 4

    def repr1(self, x: Any, level: int) -> str:
        # a session's Task by its type (Keyed), not by its type's name as reprlib's
        # repr_<name> methods would: a user's own class named Task is not one
        if isinstance(x, Keyed):
            return f"<{x.key}>"
        return super().repr1(x, level)

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            s = repr(x)
        except Exception:
            return f"<{type(x).__name__} object>"
        if not isinstance(s, str):
            return f"<{type(x).__name__} object>"
        return s if len(s) <= ARG_MAX else s[: ARG_MAX - 1] + "…"


_REPR = _Repr()
_SIMPLE = (int, float, bool, type(None))


def _arg(x: Any) -> str:
    if type(x) in _SIMPLE:
        s = repr(x)
        return s if len(s) <= ARG_MAX else s[: ARG_MAX - 1] + "…"
    try:
        return _REPR.repr(x)
    except Exception:  # reprlib itself tripped (a container whose len() raises, ...)
        return f"<{type(x).__name__} object>"


def _bounded(text: str) -> str:
    return text if len(text) <= CALL_MAX else text[: CALL_MAX - 1] + "…"


def describe_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``name(arg, ..., k=v)`` of a Python call, bounded (see the module docstring); a
    ``functools.partial``'s own arguments first."""
    try:
        for _ in range(_UNWRAP_MAX):
            if not isinstance(fn, functools.partial):
                break
            args, kwargs = (*fn.args, *args), {**fn.keywords, **kwargs}
            fn = fn.func
        parts = [_arg(a) for a in args[:16]]
        if len(args) > 16:
            parts.append(f"... {len(args) - 16} more")
        parts += [f"{k}={_arg(v)}" for k, v in list(kwargs.items())[:16]]
        if len(kwargs) > 16:
            parts.append(f"... {len(kwargs) - 16} more")
        return _bounded(f"{task_name(fn)}({', '.join(parts)})")
    except Exception:
        return _bounded(f"{type(fn).__name__}(...)")


def describe_argv(argv: Iterable[Any]) -> str:
    """A program's argv as one shell-quoted line, bounded: each element cut to 80
    characters, a Task (a value not known yet) as ``<its key>``."""
    try:
        parts = []
        for a in argv:
            if isinstance(a, Keyed):  # a Task: its value is not known yet
                s = f"<{a.key}>"
            elif isinstance(a, str | os.PathLike):
                s = shlex.quote(os.fsdecode(os.fspath(a)))
            else:
                s = shlex.quote(str(a))
            parts.append(s if len(s) <= 80 else s[:79] + "…")
            if sum(map(len, parts)) > CALL_MAX:
                break
        return _bounded(" ".join(parts))
    except Exception:
        return "(argv not shown)"
