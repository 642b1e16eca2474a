"""Stage on error, the client's half: a failed attempt's stdout and stderr written into
the run directory when they cannot be read here (:func:`stage_failure`).

A failed program attempt's ``Envelope`` carries its ``stdout.txt`` and ``stderr.txt``,
bounded (``runtime/programs/ship.py``). Here, before the failure becomes a record, each
shipped file is compared with what this host sees at its path: the same file (a
regular file of the shipped size: the local backend, a shared filesystem) is left alone
and nothing is written, no duplicate. One that is not (a node's private disk: the path
does not exist here) is written to::

    RUNDIR/staged/NAME/stdout.txt, stderr.txt

``NAME`` is the sandbox's own unique name on the worker (as ``results/NAME``: the task
key's safe prefix, the attempt's tag, a random suffix). Directories are 0700 and files
0600 like the rest of the run directory, created anew (never through a link, never
over an existing file). A file cut on the worker has a line in its middle saying how
many bytes were cut. The record's ``stdout_path``/``stderr_path`` then name the
copies, ``sandbox`` and ``host`` still the originals, and its ``staged`` field says
where each came from and what was cut. The shipped bytes are dropped either way: the
record never holds them.

``PILOTFISH_STAGE_FAILURES=always`` (read here, in the client's environment) writes
the copies even of files this host can read (sandboxes on a shared scratch that is
purged; the tests); anything else means ``auto``, the rule above.

Runs in the backend's sink before the driver's lock is taken, on failed results only,
the same for every backend. It never raises: a copy that cannot be written is logged
and said in ``staged``, and that path keeps naming the original on the worker's host.
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

__all__ = ["STAGED_DIR", "STAGE_ENV", "stage_failure"]

#: the run directory's subdirectory of staged copies
STAGED_DIR = "staged"
#: the environment variable that asks for copies even of files readable here
STAGE_ENV = "PILOTFISH_STAGE_FAILURES"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,200}")


def stage_failure(res: _wire.Result, rundir: str | os.PathLike[str]) -> _wire.Result:
    """``res`` (a failed attempt's result) as the translator should see it: without the
    shipped bytes, and with the paths of the files this host cannot read replaced by
    their copies under ``rundir/staged`` (see the module)."""
    try:
        env = pickle.loads(res.data)
    except Exception:  # the translator says what is wrong with it
        return res
    if not isinstance(env, _wire.Envelope) or "shipped" not in env.extra:
        return res
    extra = dict(env.extra)
    shipped = [f for f in extra.pop("shipped") or () if isinstance(f, _wire.ShippedFile)]
    always = os.environ.get(STAGE_ENV, "auto").strip().lower() == "always"
    away = [f for f in shipped if f.role in ("stdout", "stderr")]
    if not always:
        away = [f for f in away if not _same_file_here(f)]
    if away:
        why = f"{STAGE_ENV}=always" if always else "not readable here"
        extra.update(_write(Path(rundir), res, extra, away, why))
    return res._replace(data=pickle.dumps(env._replace(extra=extra), _wire.PROTOCOL))


def _same_file_here(f: _wire.ShippedFile) -> bool:
    """Is ``f.path`` readable here as the file the worker read: a regular file of its
    size (at least: a left-behind child may still write to it)?"""
    try:
        st = os.stat(f.path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size >= f.size and os.access(f.path, os.R_OK)


def _write(
    rundir: Path,
    res: _wire.Result,
    extra: dict[str, Any],
    files: list[_wire.ShippedFile],
    why: str,
) -> dict[str, Any]:
    """Write ``files`` into a new ``rundir/staged/NAME``: the extra's new paths and its
    ``staged`` note; never raises (what was not written keeps its original path)."""
    host = res.host or extra.get("host") or "?"  # as the record names it
    where = f"sandbox {extra['sandbox']}" if extra.get("sandbox") else "its sandbox"
    try:
        dest = _new_dir(rundir, extra.get("sandbox"), res.attempt)
    except OSError as e:
        log.warning(
            "pilotfish: cannot stage the stdout/stderr of a failed attempt (%s on host %s) "
            "under %s: %s",
            where,
            host,
            rundir / STAGED_DIR,
            e,
        )
        return {
            "staged": f"not copied to {rundir / STAGED_DIR} ({e}): the files are in {where} "
            f"on host {host} only"
        }
    changed: dict[str, Any] = {}
    said: list[str] = []
    for f in files:
        target = dest / f"{f.role}.txt"
        if f.note and not f.head:
            said.append(f"{f.role}: {f.note} on host {host}")
            continue
        try:
            cut = _put(target, f, host)
        except OSError as e:
            log.warning(
                "pilotfish: cannot write %s (from %s on host %s): %s", target, f.path, host, e
            )
            said.append(f"{f.role}: not copied ({e}), only at {f.path} on host {host}")
            continue
        changed[f"{f.role}_path"] = str(target)
        if cut:
            said.append(f"{f.role}: {cut}")
    changed["staged"] = f"copied to {dest} from {where} on host {host} ({why})" + "".join(
        f"; {s}" for s in said
    )
    return changed


def _new_dir(rundir: Path, sandbox: object, attempt: int) -> Path:
    """``rundir/staged/NAME`` made anew (0700): NAME the sandbox's own unique name (or
    the attempt's id if that is not a plain name); another suffix if it exists."""
    root = rundir.absolute() / STAGED_DIR
    root.mkdir(mode=0o700, exist_ok=True)
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


def _put(target: Path, f: _wire.ShippedFile, host: str) -> str:
    """Write ``f``'s bytes to ``target`` (0600, created anew); what was cut, or ""."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o600)
    cut = f.size - len(f.head) - len(f.tail)
    with os.fdopen(fd, "wb") as fh:
        fh.write(f.head)
        if cut > 0:
            fh.write(
                f"\n[pilotfish: {cut:,} bytes cut here; this copy keeps the first "
                f"{len(f.head):,} and the last {len(f.tail):,} bytes of the {f.size:,} of "
                f"{f.path} on host {host}]\n".encode()
            )
        fh.write(f.tail)
    if cut > 0:
        return (
            f"{f.size:,} bytes on the worker, the copy keeps the first {len(f.head):,} and "
            f"the last {len(f.tail):,}, {cut:,} cut in between (marked)"
        )
    return ""
