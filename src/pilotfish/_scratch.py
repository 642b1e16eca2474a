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
on first use, mode 0700, never reused: :func:`pilotfish.commands.make_sandbox`,
named by the attempt's unique tag). ``previous_attempt_files()`` is the directory
of the task's earlier attempt that was lost (worker killed), timed out, or failed
with an exception its ``retry_on`` retries, if that attempt made one and it is on
a filesystem this worker sees (local backend, Dask LocalCluster, a shared
filesystem); else None. It is read in place, not copied: files the task trusts
should be written whole (write to a temporary name, then ``os.replace``).

The attempt is known through a context variable set by
:func:`pilotfish.backends.execute.run_attempt` around the user's call, so it is
right in threads (Dask) and processes alike; outside a task both raise.
"""

from __future__ import annotations

import contextvars
from pathlib import Path

from .commands import attempt_tags, find_sandbox, make_sandbox

__all__ = ["enter", "leave", "previous_attempt_files", "scratch_dir"]


class _Attempt:
    """The running attempt, as little as possible (this is on every call's path)."""

    __slots__ = ("dir", "key", "lineage", "number", "rundir")

    def __init__(self, rundir: str, key: str, number: int, lineage: tuple[object, ...]) -> None:
        self.rundir, self.key, self.number, self.lineage = rundir, key, number, lineage
        self.dir: Path | None = None

    @property
    def root(self) -> Path:
        return Path(self.rundir) / "sandboxes"


_CURRENT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "pilotfish_attempt", default=None
)


def enter(
    rundir: str, key: str, attempt: int, lineage: tuple[object, ...]
) -> contextvars.Token[_Attempt | None]:
    """A Python task's user code starts (the worker's side); :func:`leave` after it."""
    return _CURRENT.set(_Attempt(rundir, key, attempt, lineage))


def leave(token: contextvars.Token[_Attempt | None]) -> None:
    _CURRENT.reset(token)


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
        tag, _, _ = attempt_tags(a.number, a.lineage)
        a.dir = make_sandbox(a.root, a.key, tag)
    return a.dir


def previous_attempt_files() -> Path | None:
    """The scratch directory of this task's earlier attempt that was lost, timed out or
    asked for a retry, or None (first attempt, it made none, or it is not reachable
    from this host)."""
    a = _current("previous_attempt_files")
    _, previous, _ = attempt_tags(a.number, a.lineage)
    if previous is None:
        return None
    return find_sandbox(a.root, a.key, previous)
