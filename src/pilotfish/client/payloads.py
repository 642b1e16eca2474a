"""What a task sends to a worker: its call (or program template), pickled at submit.

Every :class:`~pilotfish.Task` found in the arguments becomes a dependency,
pickled as its index in the dependency list (see :mod:`pilotfish.wire.messages`); a Task
of another session is refused. What cannot be pickled is refused by ``submit``
itself with an :class:`~pilotfish.InvalidTask` that names the culprit (the
callable, argument 2, keyword ``data``), never by a worker later.

A task's automatic key is ``name-digest``; the digest must be the same in every
process (``pilotfish resume`` finds DONE tasks by key). Pickles of ints, floats,
strings, bytes, lists and tuples are, so calls made only of those (and of Tasks)
hash their payload as pilotfish always did (old journals still resume). Anything
else is hashed in a canonical form (:func:`canonical_digest`): sets and
frozensets sorted, dicts sorted by key, dataclasses (even from ``__main__``) by
type name and fields by name, enums by name, functions by module, name and code.
A call holding an object with no canonical form falls back to its payload and is
marked: if resume does not find it, it says which task and why.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import pathlib
import pickle
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from cloudpickle.cloudpickle import _should_pickle_by_reference

from ..errors import InvalidTask
from ..wire import messages as _wire
from .keyed import Keyed
from .settled import Member, SettledFound, SettledTasks

if TYPE_CHECKING:
    from .session import Session, Task

__all__ = ["call_digest", "call_key_digest", "canonical_digest", "pickle_call"]


def pickle_call(
    obj: Any,
    session: Session,
    task_type: type[Task],
    what: str | None = None,
    found: SettledFound | None = None,
) -> tuple[bytes, list[Task]]:
    """Pickle ``obj`` (a ``(fn, args, kwargs)`` call, or a program template described by
    ``what``) for ``session``; returns the payload and the Tasks it depends on. ``found``
    collects the ``pilotfish.settled`` groups in it (see :mod:`.settled`)."""
    deps: list[Task] = []
    index: dict[int, int] = {}

    def dep(x: Task) -> int:
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

    def ref(x: Any) -> int | None:
        if isinstance(x, task_type):
            i = dep(x)
            if found is not None:
                found.plain.add(i)
            return i
        if isinstance(x, Member):
            return dep(x.task)
        if isinstance(x, SettledTasks):
            if what is not None or found is None:
                raise InvalidTask(
                    f"pilotfish.settled() is for the arguments of a Python call (submit), "
                    f"not {what or 'here'}: pass the tasks themselves"
                )
            found.groups.append((tuple(dep(t) for t in x.tasks), x.need()))
        return None

    if what is None and _plain_call(obj):
        try:  # the same bytes as cloudpickle's (so the same keys), 4x faster
            return pickle.dumps(obj, _wire.PROTOCOL), deps
        except Exception:
            pass  # cloudpickle below says what is wrong
    try:
        return _wire.dumps_call(obj, ref), deps
    except InvalidTask:
        raise
    except Exception as e:
        if what is not None:
            raise InvalidTask(f"cannot submit {what}: {type(e).__name__}: {e}") from e
        fn, args, kwargs = obj
        raise InvalidTask(_explain_unpicklable(fn, args, kwargs, ref, e)) from e


_SIMPLE = (int, float, str, bytes, bool, type(None))
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)


def _plain_call(obj: Any) -> bool:
    """``(fn, args, kwargs)`` that the standard pickler writes exactly as cloudpickle would:
    a function importable by name (not from ``__main__``, nor registered to travel by
    value) and only scalar arguments (no Tasks, no containers)."""
    try:
        fn, args, kwargs = obj
    except (TypeError, ValueError):
        return False
    if type(fn) not in _FUNCTIONS or not all(type(a) in _SIMPLE for a in args):
        return False
    if kwargs and not all(type(v) in _SIMPLE for v in kwargs.values()):
        return False
    if type(fn) is types.BuiltinFunctionType:  # pow, os.getpid: a module's own builtins
        return isinstance(fn.__self__, types.ModuleType)
    return bool(_should_pickle_by_reference(fn))


def call_digest(payload: bytes, deps: Sequence[Task], stamps: Iterable[str] = ()) -> str:
    """The hash in a task's key: its payload, its dependencies' keys, and ``stamps``
    (a program's input files: see :func:`pilotfish.client.programs.input_stamps`)."""
    digest = hashlib.blake2b(payload, digest_size=6)
    for d in deps:
        digest.update(d.key.encode())
    for s in stamps:
        digest.update(s.encode())
    return digest.hexdigest()


def call_key_digest(
    call: tuple[Any, tuple[Any, ...], dict[str, Any]], payload: bytes, deps: Sequence[Task]
) -> tuple[str, str | None]:
    """The digest in the automatic key of ``call`` = ``(fn, args, kwargs)``, and why it may
    differ in another process (None when it is stable: see the module docstring)."""
    _fn, args, kwargs = call
    if _simple(args) and all(_simple(v) for v in kwargs.values()):
        return call_digest(payload, deps), None
    try:
        digest = canonical_digest(call)
    except _Unstable as e:
        where = "the callable"
        for label, part in [
            *((f"argument {i}", a) for i, a in enumerate(args)),
            *((f"keyword argument {k!r}", v) for k, v in kwargs.items()),
        ]:
            try:
                canonical_digest(part)
            except _Unstable:
                where = label
                break
        return call_digest(payload, deps), f"{where} holds {e}"
    h = hashlib.blake2b(digest.encode(), digest_size=6)
    for d in deps:
        h.update(d.key.encode())
    return h.hexdigest(), None


def _simple(x: Any) -> bool:
    """True if the pickle of ``x`` is the same in every process (Tasks are persistent ids)."""
    t = type(x)
    if t in _SIMPLE:
        return True
    if t is list or t is tuple:
        return all(_simple(v) for v in x)
    return isinstance(x, Keyed)


class _Unstable(Exception):
    """An object with no canonical form; the message says which."""


def canonical_digest(obj: Any) -> str:
    """A hash of ``obj`` that is the same in every process (and every PYTHONHASHSEED) for
    the types listed in the module docstring; raises ``_Unstable`` naming any other."""
    out: list[bytes] = []
    _canon(obj, out, 0)
    return hashlib.blake2b(b"".join(out), digest_size=16).hexdigest()


def _tagged(tag: bytes, data: bytes, out: list[bytes]) -> None:
    out.append(tag + len(data).to_bytes(8, "little") + data)


def _sub(obj: Any, depth: int) -> bytes:
    out: list[bytes] = []
    _canon(obj, out, depth + 1)
    return b"".join(out)


def _canon(x: Any, out: list[bytes], depth: int) -> None:
    if depth > 200:
        raise _Unstable("an argument nested more than 200 levels deep")
    t = type(x)
    name = f"{t.__module__}.{t.__qualname__}".encode(errors="surrogateescape")
    if x is None or t is bool:
        _tagged(b"N" if x is None else b"B", b"1" if x else b"0", out)
    elif isinstance(x, enum.Enum):
        _tagged(b"E", name + b":" + x.name.encode(errors="surrogateescape"), out)
    elif t is int or t is float or t is complex:
        _tagged(b"I" if t is int else b"F", name + b":" + repr(x).encode(), out)
    elif isinstance(x, str):
        _tagged(b"S", name + b":" + x.encode(errors="surrogatepass"), out)
    elif isinstance(x, bytes | bytearray):
        _tagged(b"Y", name + b":" + bytes(x), out)
    elif isinstance(x, Keyed):
        _tagged(b"K", x.key.encode(errors="surrogatepass"), out)  # its key is stable
    elif t in (list, tuple) or (isinstance(x, list | tuple) and not hasattr(x, "__dict__")):
        _tagged(b"L", name + b"".join(_sub(v, depth) for v in x), out)
    elif isinstance(x, set | frozenset):
        _tagged(b"T", name + b"".join(sorted(_sub(v, depth) for v in x)), out)
    elif isinstance(x, dict) and t.__module__ in ("builtins", "collections"):
        items = sorted(_sub(k, depth) + _sub(v, depth) for k, v in x.items())
        _tagged(b"D", name + b"".join(items), out)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = sorted(
            f.name.encode() + _sub(getattr(x, f.name), depth) for f in dataclasses.fields(x)
        )
        _tagged(b"C", name + b"".join(fields), out)
    elif isinstance(x, pathlib.PurePath):
        _tagged(b"P", name + b":" + str(x).encode(errors="surrogateescape"), out)
    elif isinstance(x, types.FunctionType | types.BuiltinFunctionType | type):
        _tagged(b"X", _canon_callable(x, depth), out)
    elif isinstance(x, types.CodeType):
        _tagged(b"O", _canon_code(x, depth), out)
    elif isinstance(x, functools.partial):
        _tagged(b"Q", _sub((x.func, x.args, x.keywords), depth), out)
    elif isinstance(x, types.MethodType):
        _tagged(b"M", _sub(x.__self__, depth) + _sub(x.__func__, depth), out)
    else:
        raise _Unstable(
            f"an object of type {t.__module__}.{t.__qualname__}, which has no canonical form"
        )


def _by_reference(x: Any) -> bool:
    """True if pickle stores ``x`` as module + name (it is importable as such)."""
    module, qualname = getattr(x, "__module__", None), getattr(x, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return False
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj is x


def _canon_callable(x: Any, depth: int) -> bytes:
    ref = f"{getattr(x, '__module__', '')}.{getattr(x, '__qualname__', '')}".encode(
        errors="surrogateescape"
    )
    owner = getattr(x, "__self__", None)
    if isinstance(x, types.BuiltinFunctionType) and not isinstance(owner, types.ModuleType):
        return ref + _sub(owner, depth)  # a bound method of a builtin object
    if _by_reference(x) or not isinstance(x, types.FunctionType):
        return ref  # a class (its instances carry their fields), a builtin, an import
    parts = [ref, _sub(x.__code__, depth), _sub(x.__defaults__, depth)]
    parts.append(_sub(x.__kwdefaults__, depth))
    try:
        cells = tuple(c.cell_contents for c in x.__closure__ or ())
    except ValueError:  # an empty cell: a closure not yet complete
        raise _Unstable(f"function {x.__qualname__} has an unset closure variable") from None
    parts.append(_sub(cells, depth))
    return b"".join(parts)


def _canon_code(c: types.CodeType, depth: int) -> bytes:
    return b"".join(
        [
            c.co_code,
            _sub(c.co_consts, depth),
            _sub(c.co_names, depth),
            _sub(c.co_varnames, depth),
            _sub(c.co_freevars, depth),
        ]
    )


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
