"""One run at a time per run directory: the lock a session holds for its life.

A session (any backend, with or without a journal: the run directory also holds its
sandboxes and results) takes an exclusive ``flock`` on ``RUNDIR/session.lock`` before
it opens the journal, and keeps it until it is shut down. The kernel releases it when
the process dies however it dies (SIGKILL, OOM), so a lock left by a dead process never
blocks anyone; on NFSv4 ``flock`` is a byte-range lock the server holds for the client's
lease. After locking, the holder writes who it is (host, pid, since when, argv) into the
file, and a refused session names it::

    Session(rundir=R) ---- flock(R/session.lock, LOCK_EX | LOCK_NB) ----+--> ok: write holder
                                                                        +--> busy: RundirBusy
                                                                             naming the holder

Only this process holds the lock: the file is opened close-on-exec (a worker, master or
program started with ``exec`` never has it), and a child made by ``fork`` alone closes
its copy at once (``os.register_at_fork``), so a worker that outlives a SIGKILLed client
does not keep the run directory locked. The lock file is never read by the lock itself:
the holder text is only shown, after it is checked. Readers (``pilotfish status``,
``failures``, ``show``, ``report``) take no lock: they work while a run is going.

A session whose journal is not ``RUNDIR/journal.db`` also locks ``JOURNAL.lock`` beside
it, so two sessions never write one journal either.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from .schema import JournalError, read_only_error

__all__ = ["LOCK_NAME", "RundirBusy", "RundirLock", "hold", "release"]

LOCK_NAME = "session.lock"

_held: set[int] = set()  # this process's lock fds: a forked child closes its copies


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's reference only: the parent keeps its lock
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RundirBusy(JournalError):
    """Another session (in this process or another, on this host or another) holds the
    run directory; the message names it."""


def _holder(fd: int) -> str:
    """Who holds the lock, as the file says (written by another process: checked)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return "another process (it has not written its name yet)"
    pid, host, since = data.get("pid"), data.get("host"), data.get("since")
    who = f"pid {pid}" if isinstance(pid, int) else "a process"
    if isinstance(host, str):
        who += f" on host {host[:100]!r}"
    if isinstance(since, int | float):
        who += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    argv = data.get("argv")
    if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
        cmd = " ".join(argv)
        who += f" ({cmd[:200]}{'…' if len(cmd) > 200 else ''})"
    if isinstance(pid, int) and pid == os.getpid():
        who += ": a session of this very process, not yet shut down"
    return who


class RundirLock:
    """An exclusive lock on one file, held until :meth:`release` (or the process ends)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, what: str) -> RundirLock:
        """Lock ``path`` (created 0600 if need be) or raise: :class:`RundirBusy` naming the
        holder, or a :class:`JournalError` saying why the file cannot be locked.
        ``what`` names the thing guarded in messages ("the run directory R")."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                why = f"cannot open {path.name} there for writing: {e.strerror}"
                raise read_only_error(path.parent, why) from e
            if e.errno == errno.ELOOP:
                raise JournalError(
                    f"{path} is a symbolic link: pilotfish locks {what} with a file of its "
                    "own there; remove the link"
                ) from e
            raise JournalError(
                f"cannot open {what} ({path}: {e.strerror or e}); check the path"
            ) from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RundirBusy(
                        f"{what} is in use by another pilotfish session: {_holder(fd)}. One "
                        "run at a time per run directory: wait for it to end (`pilotfish "
                        "status` reads it meanwhile), or choose another run directory "
                        "(--rundir / Session(rundir=...))"
                    ) from None
                raise JournalError(
                    f"cannot lock {what} ({path}: {e.strerror or e}); pilotfish runs one "
                    "session at a time per run directory and needs a file system with "
                    "locks (flock): choose a run directory on one"
                ) from e
            me = {
                "pid": os.getpid(),
                "host": os.uname().nodename,
                "since": time.time(),
                "argv": [str(a) for a in sys.argv],
            }
            with contextlib.suppress(OSError):  # who holds it is for messages only
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        _held.add(fd)
        return cls(path, fd)

    def __del__(self) -> None:  # a backstop: a lock whose owner is gone is released
        self.release()

    def release(self) -> None:
        """Unlock (the holder text goes with it). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held.discard(fd)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            # unlocked explicitly: a copy of the open file that some process may still
            # have (a child between fork and exec) must not keep the lock after we are done
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def hold(rundir: str | os.PathLike[str], journal: Path | None) -> list[RundirLock]:
    """The locks a session holds: its run directory's, and a journal's kept elsewhere."""
    rundir = Path(rundir)
    locks = [RundirLock.acquire(rundir / LOCK_NAME, f"the run directory {rundir}")]
    try:
        if journal is not None and journal.parent.resolve() != rundir.resolve():
            locks.append(RundirLock.acquire(Path(str(journal) + ".lock"), f"the journal {journal}"))
    except BaseException:
        release(locks)
        raise
    return locks


def release(locks: list[RundirLock]) -> None:
    for lock in locks:
        lock.release()
