"""The backend protocol: how the session talks to whatever runs the attempts.

A backend is small on purpose (it must fit a local master, Dask's scheduler
and a RADICAL-Pilot raptor master alike)::

    start(sink)            begin; later call sink(list_of_events) from any thread
    submit([RunAttempt])   run these attempts (self-contained: payload + dependency values)
    cancel([attempt_id])   withdraw attempts not yet started (best effort)
    stop()                 orderly shutdown; leaves no process behind
    processes()            diagnostics: {"master": pid, "workers": [pids]}

Events a backend emits (all typed, from :mod:`pilotfish._wire` plus
:class:`MasterEvent`):

``Started``      the attempt was handed to a worker (it can no longer be cancelled)
``Result``       the attempt finished: pickled value, or an ``Envelope`` with the error
``Lost``         the attempt was lost with its worker, stopped by its timeout, or lost
                 with the master (category names which)
``WorkerEvent``  a worker started / was lost (exit code, signal, held attempts) / replaced
``MasterEvent``  the master (or scheduler) was lost / restarted
``Fatal``        the backend cannot run anything any more; every unfinished task fails

A backend never decides about retries, never sees the task graph and never
records anything: the workflow core and the journal live in the client.
Attempt ids are fencing tokens; a backend may deliver a late or duplicate
event for an attempt and the core will drop it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from .._wire import Fatal, Lost, Result, RunAttempt, Started, WorkerEvent

__all__ = [
    "Backend",
    "BackendEvent",
    "Fatal",
    "Lost",
    "MasterEvent",
    "Result",
    "RunAttempt",
    "Sink",
    "Started",
    "WorkerEvent",
]


class MasterEvent(NamedTuple):
    kind: str  # "started" | "lost" | "restarted"
    pid: int
    time: float
    returncode: int | None = None
    signal: str | None = None
    stderr_tail: str = ""
    message: str = ""


BackendEvent = Started | Result | Lost | WorkerEvent | MasterEvent | Fatal
Sink = Callable[[Sequence[Any]], None]


class Backend(Protocol):
    name: str

    def start(self, sink: Sink) -> None: ...

    def submit(self, attempts: Sequence[RunAttempt]) -> None: ...

    def cancel(self, attempts: Sequence[int]) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def processes(self) -> dict[str, Any]: ...
