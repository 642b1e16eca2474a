"""Scratch directories for Python tasks, and the previous attempt's (checkpoint-aware retry).

A program names ``resume_files`` and its retry starts with them; a Python task asks::

    @pilotfish.task(retries=3, timeout=3600)
    def simulate(seed):
        prev = pilotfish.previous_attempt_files()      # Path or None
        state = load(prev / "state.pkl") if prev and (prev / "state.pkl").exists() else init()
        out = pilotfish.scratch_dir()                  # this attempt's own directory
        for step in ...:
            ...
            save(state, out / "state.pkl")             # write-then-rename: never partial
        return result

``scratch_dir()`` is this attempt's directory under ``rundir/sandboxes`` (created
on first use, mode 0700, never reused: :func:`pilotfish.runtime.programs.make_sandbox`,
named by the attempt's unique tag). ``previous_attempt_files()`` is the directory
of the task's earlier attempt that was lost (worker killed), timed out, or failed
with an exception its ``retry_on`` retries, if that attempt made one and it is on
a filesystem this worker sees (local backend, Dask LocalCluster, a shared
filesystem); else None. It is read in place, not copied: files the task trusts
should be written whole (write to a temporary name, then ``os.replace``).

Each call of a ``map(chunksize=n)`` attempt has its own directories: ``scratch_dir()``
and ``previous_attempt_files()`` inside call i are call i's (tag ``...c{i}``), so the
retry of a chunk finds each call's checkpoint in that call, never another's.

The scratch directories of a successful attempt are removed when it succeeds, unless
the session keeps sandboxes (``keep_sandboxes="all"``); a failed or lost attempt's are
kept (its retry reads them): the rule of program sandboxes,
:func:`pilotfish.runtime.programs.keeps_sandbox`. On ``resume``, the first attempt of a task an
earlier run's death interrupted reads that attempt's directory
(:func:`pilotfish.runtime.programs.make_lineage`); it is left in place.

The attempt is known through a context variable set by
:func:`pilotfish.runtime.execute.run_attempt` around the user's call, so it is
right in threads (Dask) and processes alike; outside a task both raise.
"""

from __future__ import annotations

import contextvars
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .programs import call_tag, find_sandbox, keeps_sandbox, make_sandbox, previous_attempt

__all__ = ["calls", "enter", "leave", "previous_attempt_files", "scratch_dir"]


class _Attempt:
    """The running attempt, as little as possible (this is on every call's path)."""

    __slots__ = ("call", "dir", "keep", "key", "lineage", "made", "number", "rundir")

    def __init__(
        self, rundir: str, key: str, number: int, lineage: tuple[object, ...], keep: str
    ) -> None:
        self.rundir, self.key, self.number, self.lineage = rundir, key, number, lineage
        self.keep = keep
        self.dir: Path | None = None
        self.call: int | None = None  # the call of a chunk running now (map(chunksize=n))
        self.made: list[Path] = []  # every scratch directory this attempt made

    @property
    def root(self) -> Path:
        return Path(self.rundir) / "sandboxes"


_CURRENT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "pilotfish_attempt", default=None
)


def enter(
    rundir: str, key: str, attempt: int, lineage: tuple[object, ...], keep: str = "failed"
) -> contextvars.Token[_Attempt | None]:
    """A Python task's user code starts (the worker's side); :func:`leave` after it.
    ``keep``: the session's ``keep_sandboxes``."""
    return _CURRENT.set(_Attempt(rundir, key, attempt, lineage, keep))


def leave(token: contextvars.Token[_Attempt | None], ok: bool = False) -> None:
    """The user's code returned (``ok``) or raised: a successful attempt's scratch
    directories are removed unless kept (:func:`pilotfish.runtime.programs.keeps_sandbox`)."""
    a = _CURRENT.get()
    _CURRENT.reset(token)
    if a is not None and a.made and not keeps_sandbox(a.keep, ok):
        for d in a.made:
            shutil.rmtree(d, ignore_errors=True)


def calls(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> Iterator[Any]:
    """``fn(*args)`` for each call of a chunk, each with its own scratch and previous-attempt
    directories (call i's)."""
    a = _CURRENT.get()
    for i, args in enumerate(chunk):
        if a is not None:
            a.call, a.dir = i, None
        yield fn(*args)


def _current(what: str) -> _Attempt:
    a = _CURRENT.get()
    if a is None:
        raise RuntimeError(
            f"pilotfish.{what}() is for code running as a pilotfish task (on a worker); "
            "it was called outside one"
        )
    return a


def scratch_dir() -> Path:
    """This attempt's own directory (created on first call): write checkpoints here."""
    a = _current("scratch_dir")
    if a.dir is None:
        tag, _, _, _ = previous_attempt(a.number, a.lineage)
        a.dir = make_sandbox(a.root, a.key, call_tag(tag, a.call))
        a.made.append(a.dir)
    return a.dir


def previous_attempt_files() -> Path | None:
    """The scratch directory of this task's earlier attempt that was lost, timed out or
    asked for a retry (or, on resume, was interrupted by the client's death), or None
    (first attempt, it made none, or it is not reachable from this host)."""
    a = _current("previous_attempt_files")
    _, previous, _, _ = previous_attempt(a.number, a.lineage)
    if previous is None:
        return None
    return find_sandbox(a.root, a.key, call_tag(previous, a.call))
