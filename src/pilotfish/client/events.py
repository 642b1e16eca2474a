"""Typed events delivered to ``Session(on_event=...)``.

Public and stable (``pilotfish.TaskEvent``, ``WorkerEvent``, ``MasterEvent``,
``HostDrained``, ``WorkersGone``). The
session makes ``TaskEvent`` from the workflow core's transitions; ``WorkerEvent`` and
``MasterEvent`` are what :mod:`pilotfish.client.translate` makes of a backend's
``WorkerReport`` and ``MasterReport`` (attempt ids become task keys).
"""

from __future__ import annotations

import dataclasses

from ..core.states import State
from ..errors import FailureRecord


@dataclasses.dataclass(frozen=True, slots=True)
class TaskEvent:
    """A task changed state (``start`` -> ``finish``); ``attempt`` is the attempt number;
    ``failure`` the task's :class:`pilotfish.FailureRecord` when it became FAILED."""

    key: str
    name: str
    start: State
    finish: State
    time: float
    attempt: int | None = None
    failure: FailureRecord | None = None


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
    """The master (or scheduler) ``started``, was ``lost`` or ``restarted``; or its link
    to this client went ``silent`` (nothing heard for a while, the connection still open:
    a network cut, a frozen scheduler) and later is ``answering`` again. ``message`` says
    which, where, and for how long."""

    kind: str
    pid: int
    time: float
    returncode: int | None = None
    signal: str | None = None
    message: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class HostDrained:
    """A worker or host was drained (``kind`` is ``"worker"`` or ``"host"``): attempts of
    several different tasks (``keys``) failed there (WORKER_LOST, ENVIRONMENT, TIMEOUT)
    within ``Session(drain_after=...)``'s window. No new attempts go there, and those
    attempts were not charged to the tasks' retry budgets. ``reason`` says it all."""

    kind: str
    name: str
    host: str | None
    time: float
    reason: str
    keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class WorkersGone:
    """Every worker left (on a batch system: every worker job was cancelled, preempted
    or hit its walltime). Replacements are asked for at once; if none joins within the
    backend's ``no_workers_timeout``, unfinished attempts fail RUNTIME_LOST. ``message``
    names the workers (jobs) and why they ended."""

    time: float
    message: str
