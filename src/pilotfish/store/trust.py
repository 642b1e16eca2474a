"""Which files pilotfish loads pickles from: only the user's own, private ones.

Pickles are trusted only from files the user owns and nobody else can write
(:func:`check_private`): resume refuses a run directory, journal or value file
that is owned by someone else or writable by group or others (whoever can write
it could make resume run their code). An existing run directory of the user's
that is group/other-writable is tightened to 0700 with a logged warning
(:func:`secure_rundir`); one owned by someone else, or a shared sticky directory
such as ``/tmp``, is refused.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from .schema import JournalError

log = logging.getLogger("pilotfish")


def loose(st: os.stat_result) -> str | None:
    """Why a file or directory with this stat cannot be trusted, or None."""
    uid = os.getuid()
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by you (uid {uid})"
    if st.st_mode & 0o022:
        who = " and ".join(
            w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit
        )
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def refuse(path: Path | str, what: str, problem: str) -> JournalError:
    """The one message refusing to load pickles from ``path`` (see :func:`loose`)."""
    return JournalError(
        f"refusing to load pickles from {what} {path}: it {problem}. Whoever can write it "
        "could make pilotfish run their code. If you trust its contents, make it yours "
        f"and private (`chown $(id -u) '{path}'` and `chmod go-w '{path}'`), or start "
        "a new run without resume (another --rundir)."
    )


def check_private(path: Path | str, what: str) -> None:
    """Raise :class:`JournalError` unless ``path`` is owned by the user and not writable by
    group or others (checked with ``stat``, following symlinks)."""
    problem = loose(os.stat(path))
    if problem is not None:
        raise refuse(path, what, problem)


def read_private(path: Path, what: str) -> bytes:
    """The bytes of ``path``, checked on the open file (no symlink, owned by the user,
    not writable by others), so a file swapped in after a check is never read."""
    check_private(path.parent, "the directory of")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if os.path.islink(path):
            raise refuse(path, what, "is a symbolic link") from e
        raise
    with os.fdopen(fd, "rb") as f:
        problem = loose(os.fstat(f.fileno()))
        if problem is not None:
            raise refuse(path, what, problem)
        return f.read()


def secure_rundir(path: Path | str) -> None:
    """Make an existing run directory private, or refuse it (see the module docstring)."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise JournalError(
            f"the run directory {path} is owned by uid {st.st_uid}, not by you (uid "
            f"{os.getuid()}); pilotfish keeps pickles there, so it must be yours: choose "
            "another rundir (the default is ./.pilotfish)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        if mode & stat.S_ISVTX:
            raise JournalError(
                f"the run directory {path} is a shared directory (mode {mode:04o}, sticky); "
                "pilotfish keeps pickles there, so choose a directory of your own as rundir"
            )
        try:
            os.chmod(path, mode & 0o700)
        except OSError as e:
            raise JournalError(
                f"the run directory {path} is writable by others (mode {mode:04o}) and "
                f"cannot be made private ({e.strerror or e}); pilotfish keeps pickles "
                f"there: `chmod go-w '{path}'` or choose another rundir"
            ) from e
        log.warning(
            "pilotfish: the run directory %s was writable by others (mode %04o); made it "
            "private (mode %04o), since pilotfish loads pickles from it",
            path,
            mode,
            mode & 0o700,
        )
