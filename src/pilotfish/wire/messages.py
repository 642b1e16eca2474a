"""Typed wire messages and payload packing shared by the client, master and workers.

Messages are ``NamedTuple`` s (typed, immutable, and cheap to pickle in
batches); a frame on a pipe is a pickled *list* of messages, so one write
carries many. Pipes are private to the process tree (no network listener),
so pickle is safe to use on them.

Payloads (the user's call, values, exceptions) are separate ``bytes`` made by
cloudpickle so that the master never unpickles user objects.

Dependencies travel as persistent ids: when a call is pickled on the client,
every ``Task`` found anywhere in its arguments is replaced by its index in the
task's dependency list; the worker's unpickler substitutes the (already
pickled) value of that dependency. One pass finds and encodes them all.

Exceptions travel losslessly: a user exception is rebuilt on the client as its
own type *without calling its* ``__init__`` (so ``__init__(self, a, b)`` is
no obstacle), with ``args``, ``__dict__``, notes, ``__cause__``/``__context__``
and the remote traceback (via tblib). When that is impossible, the envelope
still carries type name, message and complete traceback text, and the client
raises :class:`pilotfish.RemoteError`.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import os
import pickle
import re
import select
import socket
import struct
import sys
import threading
import traceback as _tb
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import cloudpickle
from tblib import Traceback

from ..core.ledger import Lost as Lost  # what a backend reports about an attempt
from ..core.ledger import Started as Started

PROTOCOL = pickle.HIGHEST_PROTOCOL

# --------------------------------------------------------------------------- messages


class Config(NamedTuple):
    """Sent once from a parent to a newly started master or worker."""

    sys_path: list[str]
    cwd: str
    workers: int
    heartbeat_interval: float
    heartbeat_timeout: float
    worker_python: str
    rundir: str
    prefetch: int
    name: str = ""
    versions: dict[str, str] | None = None  # the client's, for the workers' pre-flight
    preload: tuple[str, ...] = ()  # modules a worker imports as it starts (Session(preload=))
    links: bool = True  # the session links chains: a master keeps the latest values for them


class RunAttempt(NamedTuple):
    attempt: int
    key: str
    kind: str  # "call" | "command"
    payload: bytes
    deps: tuple[bytes, ...]
    timeout: float | None
    requires: tuple[str, ...] = ()  # modules with version specifiers, checked first
    programs: tuple[str, ...] = ()  # programs that must be on PATH
    #: the session's ``initializer`` call, pickled once and shared by every attempt (the
    #: pickle of a batch stores it once); run once per worker process (see execute)
    init: bytes = b""
    #: the task's place in submission order: a retry keeps its task's place, so backends
    #: run queued attempts by (order, attempt), not by attempt id alone
    order: int = 0
    #: ``(nonce,)`` or ``(nonce, previous attempt id, previous number)``: the session's
    #: random nonce makes this attempt's sandbox/scratch tag unique in the rundir; the
    #: previous attempt (lost, timed out, retry asked) is the one a retry may resume from
    #: (``resume_files``, ``pilotfish.previous_attempt_files()``); () from older clients
    lineage: tuple[Any, ...] = ()
    #: the task's name (its function's): a master estimates how long an attempt runs from
    #: earlier attempts of the same name, to hold more than ``prefetch`` short ones
    name: str = ""
    #: the session keeps every sandbox (``keep_sandboxes="all"``): a Python task's scratch
    #: directories too, after a success (see ``_scratch``)
    keep: bool = False
    #: workers where this task's earlier attempts were lost or timed out: send it elsewhere
    #: while another worker is there (a retry should not meet the same bad node)
    avoid: tuple[str, ...] = ()
    #: ``(position in deps, input attempt id)``: inputs still running when this attempt
    #: was sent (linked dispatch; only to a backend with ``links``): ``deps`` holds ``b""``
    #: there and the backend passes that attempt's value on (Dask: a task dependency)
    links: tuple[tuple[int, int], ...] = ()


class Unlinked(NamedTuple):
    """A backend could not run a linked attempt (see ``RunAttempt.links``): an input
    attempt it was linked to did not leave a value to take (it failed, was lost or
    cancelled, or its value went with its worker). Nothing ran; not charged."""

    attempt: int
    reason: str
    time: float


class PreflightFailed(NamedTuple):
    """A worker's start-up checks failed; it will not take attempts."""

    problems: tuple[str, ...]


class CancelAttempt(NamedTuple):
    attempt: int


class Withdrawn(NamedTuple):
    """A worker dropped a prefetched attempt that was cancelled before it started."""

    attempt: int


class Shutdown(NamedTuple):
    reason: str = ""


class DrainWorker(NamedTuple):
    """Client -> master: worker ``name`` was drained (several different tasks failed
    there); it takes no more work, finishes what it holds and is replaced."""

    name: str
    why: str


class Hello(NamedTuple):
    """A master or worker finished starting; ``pid`` and ``host`` identify it."""

    pid: int
    host: str
    name: str
    workers: tuple[int, ...] = ()


class Result(NamedTuple):
    """An attempt finished. ``ok``: ``data`` is the pickled value, else an :class:`Envelope`."""

    attempt: int
    ok: bool
    data: bytes
    worker: str
    pid: int
    started: float
    ended: float
    host: str = ""


class WorkerReport(NamedTuple):
    """What a backend reports about a worker's life; the session turns it into the public
    :class:`pilotfish.WorkerEvent` (``held`` attempt ids become task keys)."""

    kind: str  # "started" | "lost" | "replaced" | "stopped" | "start_failed" | "gone"
    worker: str
    pid: int
    time: float
    returncode: int | None = None
    signal: str | None = None
    held: tuple[int, ...] = ()
    message: str = ""


class Heartbeat(NamedTuple):
    """A master or worker is alive (process to process; never reaches the session)."""

    time: float


class CommandGroup(NamedTuple):
    """A worker started a program in its own process group ``pgid`` for ``attempt``."""

    attempt: int
    pgid: int


class Fatal(NamedTuple):
    """The master cannot go on (e.g. no worker can start); ``category`` is a Category value."""

    category: str
    message: str


class Goodbye(NamedTuple):
    """Sent right before an orderly exit, so it is never mistaken for a crash."""

    reason: str = ""


class Envelope(NamedTuple):
    """A failed attempt as the worker saw it."""

    category: str  # Category value
    type_name: str
    message: str
    traceback: str
    exc: bytes | None  # the pickled exception, when it could be pickled
    extra: dict[str, Any]  # returncode, signal, paths, ...


class ShippedFile(NamedTuple):
    """The stdout or stderr file of a failed program attempt, carried in its
    ``Envelope`` (``extra["shipped"]``) for a client that cannot read the worker's disk
    (stage on error: ``runtime/programs/ship.py`` packs, ``client/staging.py`` writes).

    ``head + tail`` is what was kept of the ``size`` bytes the file had: all of it when
    ``tail`` is empty and ``len(head) == size``; else the middle was cut. ``note`` says
    why nothing was kept (the file could not be read on the worker)."""

    role: str  # "stdout" | "stderr"
    name: str  # the file's name in the sandbox
    path: str  # where it is on the worker's host
    size: int
    head: bytes
    tail: bytes = b""
    note: str = ""


# --------------------------------------------------------------------------- framing


_HEADER = struct.Struct("!Q")  # a frame: 8-byte big-endian length, then the pickled list
_READ_SIZE = 1 << 18


class Channel:
    """A framed pipe endpoint (one end of a Unix socket pair) carrying lists of messages.

    Writers are thread-safe (``send`` writes a whole frame under a lock). The reader
    side is one thread's: ``recv`` reads whatever the peer has written in one system
    call and returns the messages of *every* complete frame in it, so a peer that wrote
    several frames while this side was busy costs one wake-up, not one per frame.

    ``queue``/``flush`` are the non-blocking way to write, for a process that must never
    wait on a peer that is busy (the local master writing to a worker running a long
    task): what the socket does not take now stays in ``backlog`` until ``flush``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._fd = sock.fileno()
        self._wlock = threading.Lock()
        self._rbuf = bytearray()
        self._out = bytearray()  # queued, not yet written (queue/flush)
        self._chunk = bytearray(_READ_SIZE)
        self._view = memoryview(self._chunk)

    @classmethod
    def pair(cls) -> tuple[Channel, int]:
        """A parent channel and the raw fd of the child's end (pass it with ``pass_fds``).

        A Unix socket pair: duplex, private to the two processes, not a listener.
        """
        a, b = socket.socketpair()
        return cls(a), b.detach()

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self._fd

    @staticmethod
    def frame(msgs: Sequence[Any]) -> bytes:
        data = pickle.dumps(msgs if type(msgs) is list else list(msgs), PROTOCOL)
        return _HEADER.pack(len(data)) + data

    def send(self, msgs: Sequence[Any]) -> None:
        """Write one frame; blocks until the socket took all of it."""
        data = self.frame(msgs)
        with self._wlock:
            self.sock.sendall(data)

    # -- non-blocking writes (single-threaded users) ------------------------------------
    @property
    def backlog(self) -> int:
        return len(self._out)

    def queue(self, msgs: Sequence[Any]) -> bool:
        """Write one frame without ever blocking; True if all of it is written, else the
        rest waits for :meth:`flush` (call it when the socket is writable)."""
        self._out += self.frame(msgs)
        return self.flush()

    def flush(self) -> bool:
        out = self._out
        while out:
            try:
                n = self.sock.send(out, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            del out[:n]
        return True

    # -- reading (one thread) -----------------------------------------------------------
    def _take(self) -> list[Any] | None:
        """The messages of every complete frame read so far, or None if there is none."""
        buf = self._rbuf
        size = _HEADER.size
        out: list[Any] | None = None
        pos = 0
        end = len(buf)
        while end - pos >= size:
            (n,) = _HEADER.unpack_from(buf, pos)
            if end - pos - size < n:
                break
            msgs = pickle.loads(memoryview(buf)[pos + size : pos + size + n])
            pos += size + n
            if out is None:
                out = msgs
            else:
                out.extend(msgs)
        if pos:
            del buf[:pos]
        return out

    def recv(self) -> list[Any]:
        """Block until at least one frame is complete; return the messages of all complete
        frames. Raises EOFError when the peer is gone."""
        while True:
            msgs = self._take()
            if msgs is not None:
                return msgs
            self._read(0)

    def recv_nowait(self) -> list[Any]:
        """The messages already written by the peer, without blocking ([] if none)."""
        msgs = self._take()
        if msgs is not None:
            return msgs
        try:
            self._read(socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return []
        return self._take() or []

    def poll(self) -> bool:
        """True if a complete frame is buffered or the peer wrote something (or left)."""
        if self._has_frame():
            return True
        r, _, _ = select.select([self._fd], [], [], 0)
        return bool(r)

    def _has_frame(self) -> bool:
        buf = self._rbuf
        if len(buf) < _HEADER.size:
            return False
        size: int = _HEADER.unpack_from(buf, 0)[0]
        return len(buf) - _HEADER.size >= size

    def _read(self, flags: int) -> None:
        buf = self._rbuf
        if len(buf) >= _HEADER.size:  # a large frame: read the rest of it at once
            want = _HEADER.size + _HEADER.unpack_from(buf, 0)[0] - len(buf)
            if want > _READ_SIZE:
                chunk = self.sock.recv(want, flags)
                if not chunk:
                    raise EOFError("the peer closed the channel")
                buf += chunk
                return
        # into one reused buffer: a fresh 256 KB bytes per read would cost an mmap
        n = self.sock.recv_into(self._chunk, _READ_SIZE, flags)
        if not n:
            raise EOFError("the peer closed the channel")
        buf += self._view[:n]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------- calls


class _CallPickler(cloudpickle.Pickler):  # type: ignore[misc]
    def __init__(self, f: io.BytesIO, ref: Callable[[Any], int | None]) -> None:
        super().__init__(f, protocol=PROTOCOL)
        self._ref = ref

    def persistent_id(self, obj: Any) -> int | None:
        return self._ref(obj)


def dumps_call(obj: Any, ref: Callable[[Any], int | None]) -> bytes:
    """Pickle ``obj`` with cloudpickle; ``ref(x)`` returns a dependency index for Tasks."""
    f = io.BytesIO()
    _CallPickler(f, ref).dump(obj)
    return f.getvalue()


class _CallUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BytesIO, deps: Sequence[bytes]) -> None:
        super().__init__(f)
        self._deps = deps
        self._cache: dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        i = int(pid)
        if i not in self._cache:
            self._cache[i] = pickle.loads(self._deps[i])
        return self._cache[i]


def loads_call(payload: bytes, deps: Sequence[bytes]) -> Any:
    if not deps:  # no persistent ids in it: the C unpickler alone
        return pickle.loads(payload)
    return _CallUnpickler(io.BytesIO(payload), deps).load()


_PLAIN_VALUES = frozenset({type(None), bool, int, float, str, bytes})


def dumps_value(value: Any) -> bytes:
    if type(value) in _PLAIN_VALUES:  # what cloudpickle would write, 10x faster
        return pickle.dumps(value, PROTOCOL)
    data: bytes = cloudpickle.dumps(value, protocol=PROTOCOL)
    return data


# --------------------------------------------------------------------------- exceptions


_DYNAMIC = "<dynamic-code>"
_DYN_RE = re.compile(r'File "<dynamic-code>", line (\d+), in (\S+)\n')


def _main_filename(name: str) -> str | None:
    """cloudpickle hides the file of functions sent by value (``__main__``);
    find it again on the client, where that ``__main__`` lives."""
    main = sys.modules.get("__main__")
    obj = getattr(main, name, None) if main is not None else None
    obj = getattr(obj, "fn", obj)  # a @pilotfish.task function
    code = getattr(obj, "__code__", None)
    return code.co_filename if code is not None else getattr(main, "__file__", None)


def fix_dynamic_frames(text: str) -> str:
    """Put back real file names (and source lines) in a traceback text from a worker."""

    def sub(m: re.Match[str]) -> str:
        lineno, name = int(m.group(1)), m.group(2)
        fn = _main_filename(name)
        if fn is None:
            return m.group(0)
        line = linecache.getline(fn, lineno).strip()
        return f'File "{fn}", line {lineno}, in {name}\n' + (f"    {line}\n" if line else "")

    return _DYN_RE.sub(sub, text) if _DYNAMIC in text else text


def _fix_tb_dict(tb: dict[str, Any] | None) -> None:
    while tb is not None:
        code = tb.get("tb_frame", {}).get("f_code", {})
        if code.get("co_filename") == _DYNAMIC:
            fn = _main_filename(code.get("co_name", ""))
            if fn:
                code["co_filename"] = fn
        tb = tb.get("tb_next")


def _rebuild_exc(
    cls: type[BaseException],
    args: tuple[Any, ...],
    state: dict[str, Any] | None,
    cause: BaseException | None,
    context: BaseException | None,
    suppress: bool,
    tb: dict[str, Any] | None,
) -> BaseException:
    exc: BaseException = cls.__new__(cls, *args)
    exc.args = args
    if state:
        exc.__dict__.update(state)
    exc.__cause__ = cause
    exc.__context__ = context
    exc.__suppress_context__ = suppress
    if tb is not None:
        try:
            _fix_tb_dict(tb)
            exc = exc.with_traceback(Traceback.from_dict(tb).as_traceback())
        except Exception:  # a traceback we cannot rebuild must not lose the exception
            pass
    return exc


class _ExcPickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException) and not isinstance(obj, type):
            tb = Traceback(obj.__traceback__).as_dict() if obj.__traceback__ else None
            state = getattr(obj, "__dict__", None)
            return (
                _rebuild_exc,
                (
                    type(obj),
                    obj.args,
                    dict(state) if state else None,
                    obj.__cause__,
                    obj.__context__,
                    obj.__suppress_context__,
                    tb,
                ),
            )
        return super().reducer_override(obj)


def dumps_exception(exc: BaseException) -> bytes:
    f = io.BytesIO()
    _ExcPickler(f, protocol=PROTOCOL).dump(exc)
    return f.getvalue()


def qualified_name(t: type) -> str:
    mod = t.__module__
    return t.__qualname__ if mod in ("builtins", "__main__") else f"{mod}.{t.__qualname__}"


def format_exception(exc: BaseException, skip: int = 0) -> str:
    """Complete traceback text of ``exc`` and its chain; drop ``skip`` leading frames."""
    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    return "".join(_tb.format_exception(type(exc), exc, tb))


def envelope_for(
    exc: BaseException,
    category: str,
    *,
    skip_frames: int = 0,
    message: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Envelope:
    """Package ``exc``; never raises (a failure to pickle leaves ``exc=None``)."""
    if skip_frames and exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
        exc = exc.with_traceback(exc.__traceback__.tb_next)
    text = format_exception(exc)
    try:
        data: bytes | None = dumps_exception(exc)
    except BaseException as e:
        data = None
        text += f"\n(pilotfish: the exception could not be pickled: {type(e).__name__}: {e})\n"
    try:
        msg = str(exc) if message is None else message
    except Exception:
        msg = f"<str() of {type(exc).__name__} failed>"
    return Envelope(category, qualified_name(type(exc)), msg, text, data, extra or {})


def host_name() -> str:
    return os.uname().nodename
