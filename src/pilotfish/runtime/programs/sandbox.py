"""Sandbox directories: their names, their making, finding them again, keeping them.

Every attempt gets its own directory (mode 0700) under ``rundir/sandboxes``.  A task
key never becomes a path (:func:`safe_dirname`); :func:`make_sandbox` creates a
directory no other attempt or run ever had, so a stale file cannot pass for an output
and no kept sandbox is ever reused or removed.  An attempt's *tag* in that name
(:func:`attempt_tags`, from its ``lineage``, :func:`make_lineage`) lets a retry or a
resumed run find the sandbox of the attempt it continues (:func:`find_sandbox`,
:func:`newest_sandbox`).  Whether a sandbox is kept is :func:`keeps_sandbox`'s rule;
the values ``keep_sandboxes`` may take are :data:`KEEP_SANDBOXES`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

#: the values of ``keep_sandboxes`` (``Session(...)`` and ``executable(...)``)
KEEP_SANDBOXES = ("failed", "all")


def safe_dirname(key: str, prefix_len: int = 40) -> str:
    """A short, filesystem-safe, collision-free directory name for a task key.

    A key never becomes a path as it is: ``".."``, ``"a/b"``, a NUL byte or a
    300-character key would climb out of the run directory, collide with
    another task's directory or fail.  The name is a readable prefix
    (letters, digits, ``._-``; other characters become ``_``; no leading dot)
    plus a hash of the *whole* key, so ``"a/b"`` and ``"a_b"`` differ.
    """
    raw = key.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(raw).hexdigest()[:16]
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in key)
    safe = safe[:prefix_len].lstrip(".") or "task"
    return f"{safe}-{digest}"


def _private_root(root: str | Path) -> Path:
    """Create ``root`` (mode 0700) if needed; refuse it if it is not a real directory."""
    root_path = Path(root).absolute()
    if not root_path.is_dir():
        root_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root_path, 0o700)
    if root_path.is_symlink() or not root_path.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, "not a real directory (a symlink or a file?)", str(root_path)
        )
    return root_path


def _clean_tag(tag: str) -> str:
    """A sandbox tag as it appears in a directory name (letters and digits, at most 40):
    the one form :func:`make_sandbox` names and :func:`find_sandbox` looks for."""
    return "".join(c for c in tag if c.isascii() and c.isalnum())[:40]


def make_sandbox(root: str | Path, name: str, tag: str = "") -> Path:
    """Create ``root`` (mode 0700) if needed and a new, unique sandbox dir inside it.

    The sandbox is named ``safe_dirname(name)`` plus a random suffix and is
    created with mode 0700 by ``mkdir``, which fails if the name exists
    (``tempfile.mkdtemp`` then tries another): no other attempt, session or
    process ever gets the same directory, so no stale file of an earlier run
    can be taken for an output and no kept sandbox is ever reused or removed.
    """
    clean_tag = _clean_tag(tag)
    prefix = safe_dirname(name) + (f".{clean_tag}" if clean_tag else "") + "."
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_private_root(root)))


def make_lineage(
    nonce: str,
    previous: tuple[int, int] | None = None,
    earlier: tuple[str, int, int | None, str] | None = None,
) -> tuple[Any, ...]:
    """``RunAttempt.lineage``: ``(nonce,)``; ``(nonce, previous id, previous number)`` for
    a retry that may resume from this session's attempt ``previous``; or ``(nonce,
    previous id, previous number or None, earlier nonce, how)`` for the first attempt of a
    resumed run that may continue an attempt of an earlier session (``earlier``: its
    nonce, id, number if known, and how it ended and was found, for the note). Workers
    that know only the first two forms read the third as a fresh start."""
    if previous is not None:
        return (nonce, previous[0], previous[1])
    if earlier is not None:
        e_nonce, e_id, e_number, how = earlier
        return (nonce, e_id, e_number, e_nonce, how)
    return (nonce,)


def attempt_tags(attempt: int, lineage: tuple[Any, ...]) -> tuple[str, str | None, int | None]:
    """This attempt's sandbox tag, and the tag and number of the attempt it may resume
    from (``RunAttempt.lineage``, see :func:`make_lineage`). The session's random nonce
    makes tags unique in a rundir shared by several runs (attempt ids restart at 1 in
    every session)."""
    tag, previous, number, _ = previous_attempt(attempt, lineage)
    return tag, previous, number


def previous_attempt(
    attempt: int, lineage: tuple[Any, ...]
) -> tuple[str, str | None, int | None, str | None]:
    """:func:`attempt_tags` and the earlier attempt as a note names it ("attempt 2",
    "attempt 2 of run 1 (interrupted when the client died)"), or None."""
    if not lineage:
        return f"a{attempt}", None, None, None
    nonce = _clean_tag(str(lineage[0]))[:10]
    tag = f"{nonce}a{attempt}"
    if len(lineage) < 3 or not isinstance(lineage[1], int) or isinstance(lineage[1], bool):
        return tag, None, None, None
    number = lineage[2] if isinstance(lineage[2], int) else None
    if len(lineage) >= 5 and isinstance(lineage[3], str) and isinstance(lineage[4], str):
        earlier = _clean_tag(lineage[3])[:10]
        which = (f"attempt {number} " if number is not None else "an attempt ") + lineage[4]
        return tag, f"{earlier}a{lineage[1]}", number, which
    if number is None:
        return tag, None, None, None
    return tag, f"{nonce}a{lineage[1]}", number, f"attempt {number}"


def from_earlier_run(lineage: tuple[Any, ...]) -> bool:
    """Does ``lineage`` name an attempt of an earlier session (see :func:`make_lineage`)?"""
    return len(lineage) >= 5 and isinstance(lineage[3], str)


def call_tag(tag: str, call: int | None) -> str:
    """The tag of call ``call`` of a ``map(chunksize=n)`` attempt: each call of a chunk has
    its own scratch directory (and finds its own in the previous attempt)."""
    return tag if call is None else f"{tag}c{call}"


def parse_tag(dirname: str, name: str) -> tuple[str, int] | None:
    """``(nonce, attempt id)`` of a sandbox :func:`make_sandbox` made for task ``name``
    with a tag from :func:`attempt_tags` (any call of a chunk), or None."""
    prefix = safe_dirname(name) + "."
    if not dirname.startswith(prefix):
        return None
    m = _TAG.fullmatch(dirname[len(prefix) :].partition(".")[0])
    return (m.group(1) or "", int(m.group(2))) if m else None


_TAG = re.compile(r"([0-9a-f]{8})?a([0-9]+)(?:c[0-9]+)?")


def keeps_sandbox(keep_sandboxes: str, ok: bool) -> bool:
    """The one rule for an attempt's sandbox or scratch directory: a failed (or lost)
    attempt's is kept (its retry and the user need it); a successful one's is removed
    unless ``keep_sandboxes="all"``."""
    return not ok or keep_sandboxes == "all"


def _our_dirs(root: str | Path, prefix: str) -> list[tuple[int, Path]]:
    """``(mtime, path)`` of the real directories of ours under ``root`` whose names
    start with ``prefix``: never a symlink, never one owned by someone else."""
    root_path = Path(root).absolute()
    found: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(root_path))
    except OSError:
        return found
    uid = os.getuid() if hasattr(os, "getuid") else None
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if e.is_symlink() or not e.is_dir(follow_symlinks=False):
            continue
        if uid is not None and st.st_uid != uid:
            continue  # not ours: never take files from it
        found.append((st.st_mtime_ns, Path(e.path)))
    return found


def find_sandbox(root: str | Path, name: str, tag: str) -> Path | None:
    """The sandbox :func:`make_sandbox` made for ``(name, tag)`` under ``root``, if it is
    there (same filesystem): a real directory of ours. The newest if an engine ran that
    attempt twice (each run got its own sandbox)."""
    found = _our_dirs(root, safe_dirname(name) + "." + _clean_tag(tag) + ".")
    return max(found)[1] if found else None


def sandbox_index(root: str | Path) -> dict[str, list[tuple[int, Path]]]:
    """Every real directory of ours under ``root`` by its task's :func:`safe_dirname`
    (``(mtime, path)``): one scan of the sandboxes directory for a whole resumed run."""
    index: dict[str, list[tuple[int, Path]]] = {}
    for mtime, path in _our_dirs(root, ""):
        m = _NAME.match(path.name)
        if m:
            index.setdefault(m.group(1), []).append((mtime, path))
    return index


_NAME = re.compile(r"(.*-[0-9a-f]{16})\.")


def newest_sandbox(
    root: str | Path, name: str, index: dict[str, list[tuple[int, Path]]] | None = None
) -> tuple[Path, str, int] | None:
    """The newest sandbox (or scratch directory) of task ``name`` under ``root`` made with
    an attempt's tag, and that attempt's ``(nonce, id)``: how a resumed run finds an
    attempt whose start the journal did not record. Only real directories of ours whose
    names start with the key's own :func:`safe_dirname` (a hash of the whole key).
    ``index``: :func:`sandbox_index` of ``root``, for many keys."""
    if index is None:
        entries = _our_dirs(root, safe_dirname(name) + ".")
    else:
        entries = index.get(safe_dirname(name), [])
    found = [
        (mtime, path, tag)
        for mtime, path in entries
        if (tag := parse_tag(path.name, name)) is not None
    ]
    if not found:
        return None
    _, path, (nonce, aid) = max(found, key=lambda f: (f[0], f[1]))
    return path, nonce, aid
