"""Typed events delivered to ``Session(on_event=...)``.

Public and stable (``pilotfish.TaskEvent``, ``WorkerEvent``, ``MasterEvent``). The
session makes ``TaskEvent`` from the workflow core's transitions; ``WorkerEvent`` and
``MasterEvent`` are what :mod:`pilotfish._translate` makes of a backend's
``WorkerReport`` and ``MasterReport`` (attempt ids become task keys).
"""

from __future__ import annotations

import dataclasses

from .core.states import State


@dataclasses.dataclass(frozen=True, slots=True)
class TaskEvent:
    """A task changed state (``start`` -> ``finish``); ``attempt`` is the attempt number."""

    key: str
    name: str
    start: State
    finish: State
    time: float
    attempt: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerEvent:
    """A worker ``started``, was ``lost`` (exit code, signal, the tasks it held),
    ``replaced`` (a new worker starts in its place), ``stopped`` (orderly), or
    ``start_failed``."""

    kind: str
    worker: str
    pid: int
    time: float
    returncode: int | None = None
    signal: str | None = None
    held: tuple[str, ...] = ()
    message: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class MasterEvent:
    """The master (or scheduler) ``started``, was ``lost`` or ``restarted``."""

    kind: str
    pid: int
    time: float
    returncode: int | None = None
    signal: str | None = None
    message: str = ""
