"""Stage on error, the worker's half: a failed attempt's stdout and stderr packed to
travel with its failure (:func:`pack_failure_files`).

A failure record names the sandbox's ``stdout.txt`` and ``stderr.txt`` by their paths
on the worker's host. Where sandboxes live on a disk the client cannot read (a node's
private scratch; the run directory only on the login node), those paths lead nowhere
where the user looks, and the message keeps only the last 20 lines of stderr. So a
failed program attempt's ``Envelope`` carries both files (``extra["shipped"]``), as
:class:`~pilotfish.wire.messages.ShippedFile` s, each up to :data:`SHIP_LIMIT` bytes;
of a longer one, its first and last halves (the program's first words and its last
ones, where the error is), the size of the cut stated.

The rule is one for every backend: the worker always ships on failure (it cannot know
what the client can read), bounded; the client writes the copies down only where it
cannot read the originals (``client/staging.py``). A successful attempt ships nothing.
Files are read as every sandbox file is (``runtime/files.py``): regular files only,
never in a way that blocks.
"""

from __future__ import annotations

import os

from ...wire.messages import ShippedFile
from ..files import open_regular

__all__ = ["SHIP_LIMIT", "pack_failure_files"]

#: bytes shipped of each of stdout and stderr with a failure (4 MiB)
SHIP_LIMIT = 4 * 1024 * 1024


def pack_failure_files(
    stdout_path: str | None, stderr_path: str | None, limit: int = SHIP_LIMIT
) -> tuple[ShippedFile, ...]:
    """The streams of a failed attempt (those named), each bounded by ``limit``."""
    return tuple(
        _stream(role, path, limit)
        for role, path in (("stdout", stdout_path), ("stderr", stderr_path))
        if path
    )


def _stream(role: str, path: str, limit: int) -> ShippedFile:
    """``path`` whole if it has at most ``limit`` bytes, else its first and last halves."""
    name = os.path.basename(path)
    try:
        with open_regular(path) as fh:
            data = fh.read(limit)
            if not fh.read(1):
                return ShippedFile(role, name, path, len(data), data)
            # longer: something may still write to it (a left-behind child); the size is
            # the one seen now
            size = max(os.fstat(fh.fileno()).st_size, len(data) + 1)
            half = limit // 2
            head = data[:half]
            del data
            fh.seek(max(size - (limit - half), half))
            return ShippedFile(role, name, path, size, head, fh.read(limit - half))
    except OSError as e:
        return ShippedFile(role, name, path, 0, b"", note=f"not read: {e.strerror or e}")
