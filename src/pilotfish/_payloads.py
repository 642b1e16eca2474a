"""What a task sends to a worker: its call (or program template), pickled at submit.

Every :class:`~pilotfish.Task` found in the arguments becomes a dependency,
pickled as its index in the dependency list (see :mod:`pilotfish._wire`); a Task
of another session is refused. What cannot be pickled is refused by ``submit``
itself with an :class:`~pilotfish.InvalidTask` that names the culprit (the
callable, argument 2, keyword ``data``), never by a worker later.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import _wire
from .errors import InvalidTask

if TYPE_CHECKING:
    from ._session import Session, Task

__all__ = ["call_digest", "pickle_call"]


def pickle_call(
    obj: Any, session: Session, task_type: type[Task], what: str | None = None
) -> tuple[bytes, list[Task]]:
    """Pickle ``obj`` (a ``(fn, args, kwargs)`` call, or a program template described by
    ``what``) for ``session``; returns the payload and the Tasks it depends on."""
    deps: list[Task] = []
    index: dict[int, int] = {}

    def ref(x: Any) -> int | None:
        if isinstance(x, task_type):
            if x._session is not session:
                raise InvalidTask(
                    f"argument {x!r} is a Task of another Session; a task can only "
                    "depend on tasks of its own session (pass its .result() instead)"
                )
            i = index.get(x._tid)
            if i is None:
                i = index[x._tid] = len(deps)
                deps.append(x)
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


def call_digest(payload: bytes, deps: Sequence[Task], stamps: Iterable[str] = ()) -> str:
    """The hash in a task's key: its payload, its dependencies' keys, and ``stamps``
    (a program's input files: see :func:`pilotfish._programs.input_stamps`)."""
    digest = hashlib.blake2b(payload, digest_size=6)
    for d in deps:
        digest.update(d.key.encode())
    for s in stamps:
        digest.update(s.encode())
    return digest.hexdigest()


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
