"""Stage on error, the client's half: a failed attempt's files written into the run
directory when they cannot be read here (:func:`stage_failure`).

A failed program attempt's ``Envelope`` carries its stdout, stderr and existing outputs,
bounded (``runtime/programs/ship.py``). Here, before the failure becomes a record, each
shipped file is compared with what this host sees at its path: the same file (it
exists, a regular file of the shipped size: local backend, a shared filesystem) is left
alone and nothing is written, no duplicate. One that is not (the worker's own disk: it
does not exist here, or it is another file) is written to::

    RUNDIR/staged/NAME/stdout.txt, stderr.txt, outputs/<declared name>

``NAME`` is the sandbox's own unique name (as ``results/NAME``), directories 0700 and
files 0600 like the rest of the run directory, created anew (never through a link,
never over an existing file). The record's ``stdout_path``/``stderr_path`` then name
the copies, and its ``staged`` field says where the originals are (host, sandbox) and
what was cut. The shipped bytes are dropped either way: the record never holds them.

Runs in the backend's sink before the driver's lock is taken (the writing of a large
stderr holds up no one), on failed results only; it never raises (a copy that cannot be
written is said in ``staged``, and the paths keep naming the originals).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from ..wire import messages as _wire

log = logging.getLogger("pilotfish")

__all__ = ["STAGED_DIR", "stage_failure"]

#: the run directory's subdirectory of staged copies
STAGED_DIR = "staged"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,200}")


def stage_failure(res: _wire.Result, rundir: str | os.PathLike[str]) -> _wire.Result:
    """``res`` (a failed attempt's result) as the translator should see it: without the
    shipped bytes, and with the paths of the files this host cannot read replaced by
    their copies under ``rundir/staged`` (see the module)."""
    try:
        env = pickle.loads(res.data)
    except Exception:  # the translator says what is wrong with it
        return res
    if not isinstance(env, _wire.Envelope) or not env.extra.get("shipped"):
        return res
    extra = dict(env.extra)
    shipped = [f for f in extra.pop("shipped") if isinstance(f, _wire.ShippedFile)]
    away = [f for f in shipped if not _same_file_here(f)]
    if any(not f.note for f in away):  # else nothing to copy, only notes
        try:
            extra.update(_write(Path(rundir), res.attempt, extra, away))
        except OSError as e:
            log.warning("pilotfish: cannot stage the files of attempt %s: %s", res.attempt, e)
            extra["staged"] = (
                f"the attempt's files are on host {extra.get('host') or res.host} and could "
                f"not be copied to {Path(rundir).absolute() / STAGED_DIR}: {e}"
            )
    data = pickle.dumps(env._replace(extra=extra), _wire.PROTOCOL)
    return res._replace(data=data)


def _same_file_here(f: _wire.ShippedFile) -> bool:
    """Is ``f.path`` readable here as the file the worker read: a regular file of its
    size?"""
    try:
        st = os.stat(f.path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == f.size


def _write(
    rundir: Path, attempt: int, extra: dict[str, Any], files: list[_wire.ShippedFile]
) -> dict[str, Any]:
    """Write ``files`` into a new ``rundir/staged/NAME``: the extra's new paths and note."""
    host = extra.get("host") or "?"
    dest = _new_dir(rundir, extra.get("sandbox"), attempt)
    changed: dict[str, Any] = {}
    said: list[str] = []
    for f in files:
        target = _target(dest, f)
        if target is None:
            said.append(f"output {f.name!r}: not copied (not a plain relative name)")
            continue
        if f.note and not f.head:
            said.append(f"{_what(f)}: {f.note}")
            continue
        cut = _put(target, f, host)
        if f.role in ("stdout", "stderr"):
            changed[f"{f.role}_path"] = str(target)
        if cut:
            said.append(f"{_what(f)}: {cut}")
    where = f"sandbox {extra['sandbox']}" if extra.get("sandbox") else "its sandbox"
    changed["staged"] = (
        f"copied to {dest} from host {host}, where the originals are in {where} "
        "(not readable here)" + "".join(f"; {s}" for s in said)
    )
    return changed


def _what(f: _wire.ShippedFile) -> str:
    return f"output {f.name}" if f.role == "output" else f.name


def _new_dir(rundir: Path, sandbox: object, attempt: int) -> Path:
    """``rundir/staged/NAME`` made anew (0700): NAME the sandbox's own unique name (or
    the attempt's id if that is not a plain name); another suffix if it exists."""
    root = rundir.absolute() / STAGED_DIR
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if root.is_symlink() or not root.is_dir():
        raise NotADirectoryError(f"{root} is not a real directory")
    name = os.path.basename(str(sandbox or ""))
    if not _SAFE_NAME.fullmatch(name):
        name = f"attempt-{attempt}"
    try:
        (root / name).mkdir(mode=0o700)
        return root / name
    except FileExistsError:
        return Path(tempfile.mkdtemp(prefix=name + ".", dir=root))


def _target(dest: Path, f: _wire.ShippedFile) -> Path | None:
    """Where ``f`` is written under ``dest``: a stream by its role, an output under
    ``outputs/`` by its declared name, which must be plain and relative (edges trust
    nothing); None if it is not."""
    if f.role in ("stdout", "stderr"):
        return dest / f"{f.role}.txt"
    name = os.path.normpath(f.name) if f.name else ""
    parts = Path(name).parts
    if not parts or os.path.isabs(name) or ".." in parts or "\0" in name:
        return None
    return dest / "outputs" / name


def _put(target: Path, f: _wire.ShippedFile, host: str) -> str:
    """Write ``f``'s bytes to ``target`` (0600, created anew); what was cut, or ""."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags | os.O_CLOEXEC, 0o600)
    cut = f.size - len(f.head) - len(f.tail)
    with os.fdopen(fd, "wb") as fh:
        fh.write(f.head)
        if f.tail or cut > 0:
            fh.write(
                f"\n[pilotfish: {cut:,} bytes cut here; this copy keeps the first "
                f"{len(f.head):,} and the last {len(f.tail):,} bytes of the {f.size:,} of "
                f"{f.path} on host {host}]\n".encode()
            )
            fh.write(f.tail)
    if cut > 0:
        return (
            f"{f.size:,} bytes, more than the {len(f.head) + len(f.tail):,} shipped: the "
            f"copy keeps the first {len(f.head):,} and the last {len(f.tail):,}, "
            f"{cut:,} cut in between (marked)"
        )
    return ""
