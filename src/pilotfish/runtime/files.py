"""Reading files a task could have replaced: regular files only, never blocking.

A sandbox belongs to the task that ran in it: by the time pilotfish reads its
``stdout.txt``, ``stderr.txt``, an output or a checkpoint, the task may have swapped the
file for a FIFO (``open`` would wait forever for a writer), a device or a socket. Every
reader of such a file (the worker packaging an outcome, ``pilotfish show``, the HTML
report, a retry restoring checkpoints) opens it through :func:`open_regular`, the one
rule: open without blocking (``O_NONBLOCK``: a FIFO opens at once, with no writer), then
check the *open* file (``fstat``: no race with a swap after a check) and refuse anything
that is not a regular file with :class:`NotRegularFile` (an ``OSError``, so a caller's
"cannot read" path takes it).

Standard library only: workers import it before anything else of pilotfish.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["NotRegularFile", "open_regular", "read_tail"]


class NotRegularFile(OSError):
    """The path is a FIFO, a device, a socket or a directory: pilotfish does not read it."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return f"not a regular file (mode {mode:o})"


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for reading in binary mode, if it is a regular file (symlinks are
    followed; what is checked is the file finally opened). Never blocks. Raises
    :class:`NotRegularFile` for anything else, ``OSError`` when it cannot be opened."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"not read: it is {_kind(st.st_mode)}", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_tail(path: str | Path, limit: int) -> tuple[bytes, int, int]:
    """The last ``limit`` bytes of the regular file ``path``, its size and the offset they
    start at (0: the whole file). Never reads more than ``limit`` bytes; raises ``OSError``
    (:class:`NotRegularFile` included) when the file cannot be read."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        start = max(0, size - max(0, limit))
        fh.seek(start)
        return fh.read(max(0, limit)), size, start
