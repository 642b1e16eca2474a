"""Stage on error, the worker's half: a failed attempt's files packed to travel with
its failure (:func:`pack_failure_files`).

A failure record names the sandbox's ``stdout.txt``, ``stderr.txt`` and outputs by their
paths on the worker's host. Where sandboxes live on a disk the client cannot read (a
node's private scratch; the run directory only on the login node), those paths lead
nowhere where the user looks. So a failed program attempt's ``Envelope`` carries what
it can of them, as :class:`~pilotfish.wire.messages.ShippedFile` s:

* ``stdout.txt`` and ``stderr.txt``, each up to ``limit`` bytes (:data:`SHIP_LIMIT`);
  of a longer one, its first and last halves (the program's first words and its last
  ones, where the error is), the size of the cut stated;
* the declared outputs that exist (a directory: its regular files, links not followed),
  whole, while they fit in ``limit`` bytes together; one that does not fit is named with
  its size and not sent (a cut output is no output).

The client writes them down only if it cannot read the originals as they are
(``client/staging.py``). Only failures pay: a successful attempt ships nothing.
Files are read as every sandbox file is (``runtime/files.py``): regular files only,
never in a way that blocks.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...wire.messages import ShippedFile
from ..files import open_regular
from .spec import CommandSpec, program_cwd
from .staging import find_outputs

__all__ = ["MAX_SHIPPED_FILES", "SHIP_LIMIT", "pack_failure_files"]

#: bytes shipped of each stream, and of all outputs together, with a failure
SHIP_LIMIT = 64 * 1024 * 1024
#: output files (inside directory outputs too) named in one failure, at most
MAX_SHIPPED_FILES = 1000


def pack_failure_files(
    spec: CommandSpec,
    box: str | os.PathLike[str],
    stdout_path: str | None,
    stderr_path: str | None,
    limit: int = SHIP_LIMIT,
) -> tuple[ShippedFile, ...]:
    """The streams (those named) and the existing declared outputs of the failed attempt
    of ``spec`` that ran in sandbox ``box``, bounded by ``limit`` (see the module)."""
    files = [
        _stream(role, path, limit)
        for role, path in (("stdout", stdout_path), ("stderr", stderr_path))
        if path
    ]
    files.extend(_outputs(spec, Path(box), limit))
    return tuple(files)


def _stream(role: str, path: str, limit: int) -> ShippedFile:
    """``path`` whole if it has at most ``limit`` bytes, else its first and last halves."""
    name = os.path.basename(path)
    try:
        with open_regular(path) as fh:
            data = fh.read(limit)
            if not fh.read(1):
                return ShippedFile(role, name, path, len(data), data)
            # longer: something may still write to it (containment ends after this);
            # the size is the one seen now
            size = max(os.fstat(fh.fileno()).st_size, len(data) + 1)
            half = limit // 2
            head = data[:half]
            del data
            fh.seek(size - (limit - half))
            return ShippedFile(role, name, path, size, head, fh.read(limit - half))
    except OSError as e:
        return ShippedFile(role, name, path, 0, b"", note=f"not read: {e.strerror or e}")


def _outputs(spec: CommandSpec, box: Path, limit: int) -> list[ShippedFile]:
    """The declared outputs that exist inside the sandbox, whole while they fit."""
    found, _, _ = find_outputs(spec.outputs, program_cwd(spec, box), box)
    out: list[ShippedFile] = []
    left = limit
    for name, path in found.items():
        for rel, fpath in _files_of(name, path):
            if len(out) >= MAX_SHIPPED_FILES:
                note = (
                    f"not shipped, nor any file after it: at most {MAX_SHIPPED_FILES} "
                    "output files are"
                )
                out.append(ShippedFile("output", rel, fpath, 0, b"", note=note))
                return out
            shipped = _output(rel, fpath, left, inner=fpath != path)
            left -= len(shipped.head)
            out.append(shipped)
    return out


def _output(rel: str, path: str, left: int, *, inner: bool) -> ShippedFile:
    """One output file, whole if it fits in ``left`` bytes. A link inside an output
    directory is named, never followed (it may lead anywhere); a declared output that is
    a link was checked to resolve inside the sandbox (``find_outputs``)."""
    if inner and os.path.islink(path):
        return ShippedFile("output", rel, path, 0, b"", note="not shipped: a symbolic link")
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > left:
                note = (
                    f"not shipped: {size} bytes, more than the {left} bytes left of what "
                    "a failure ships of its outputs"
                )
                return ShippedFile("output", rel, path, size, b"", note=note)
            data = fh.read(left)
            return ShippedFile("output", rel, path, len(data), data)
    except OSError as e:
        return ShippedFile("output", rel, path, 0, b"", note=f"not read: {e.strerror or e}")


def _files_of(name: str, path: str) -> list[tuple[str, str]]:
    """``(name, path)`` of an output file, or of each file inside an output directory
    (by name, at most one more than :data:`MAX_SHIPPED_FILES`)."""
    if not os.path.isdir(path):
        return [(name, path)]
    files: list[tuple[str, str]] = []
    for top, dirs, names in os.walk(path):
        dirs.sort()
        for n in sorted(names):
            full = os.path.join(top, n)
            files.append((os.path.normpath(os.path.join(name, os.path.relpath(full, path))), full))
            if len(files) > MAX_SHIPPED_FILES:
                return files
    return files
