"""The backend protocol: how the session talks to whatever runs the attempts.

A backend is small on purpose (it must fit a local master, Dask's scheduler
and a RADICAL-Pilot raptor master alike)::

    start(sink)            begin; later call sink(list_of_events) from any thread
    submit([RunAttempt])   run these attempts (self-contained: payload + dependency values)
    cancel([attempt_id])   withdraw attempts not yet started (best effort)
    stop()                 orderly shutdown; leaves no process behind
    processes()            diagnostics: {"master": pid, "workers": [pids]}

Events a backend emits (:data:`BackendEvent`, all typed; the attempt reports come
from :mod:`pilotfish.core.ledger`, which every backend uses to produce them):

``Started``       the attempt was granted to a worker and its user code starts
                  (it can no longer be cancelled)
``Result``        the attempt finished: pickled value, or an ``Envelope`` with the error
``Lost``          the attempt was lost with its worker, stopped by its timeout, or lost
                  with the master (category names which)
``WorkerReport``  a worker started / was lost (exit code, signal, held attempts) /
                  was replaced / stopped
``MasterReport``  the master (or scheduler) started / was lost / restarted
``Fatal``         the backend cannot run anything any more; every unfinished task fails
``Unlinked``      a linked attempt could not take its input's value: nothing ran (only
                  from a backend with ``links``, below)
``Alive``         optional: the backend is working (see below)

**Alive (optional).** A backend that sends ``Alive`` promises to send *some* event
at least every ``heartbeat_interval`` while it works, even when no attempt starts
or ends for hours. From its first ``Alive`` on, the session holds it to that:
when ``Session.shutdown(wait=True)`` is waiting for attempts and the backend has
been silent for longer than the session's ``heartbeat_timeout`` (plus one
``heartbeat_interval`` of grace, so that a backend which detects the same silence
itself speaks first), the session stops waiting and fails the unfinished tasks
with RUNTIME_LOST. A backend that never sends ``Alive`` is never timed out this
way (it must report every loss itself). Every backend here sends it: the local one
while its master answers, Dask and RADICAL-Pilot from their event threads (which
bound the scheduler's or master's silence themselves, :class:`Pulse`), the fake
unless told not to.

**Links (optional).** A backend whose class says ``links = True`` passes values between
attempts itself: the session then dispatches a task whose inputs are still running,
*linked* to their attempts (``RunAttempt.links``; the rules are the core's,
:attr:`pilotfish.core.workflow.Workflow.links`). The backend runs it once those attempts
succeeded, with their values, or reports ``Unlinked`` without running it. The local
backend does (its master sees every result and queues a linked attempt with its inputs'
values: :mod:`pilotfish.backends._links`), and so does Dask (a linked attempt is a Dask
task that depends on its inputs' tasks, so Dask's scheduler chains them); both take
``links=False`` to turn it off. RADICAL-Pilot and the fake backend get only DONE inputs'
values.

**Probes.** Attempts with a *negative* id are probes (pre-flight checks, see
:mod:`pilotfish.client.probes`): a backend runs them like any attempt and reports their
``Result`` or ``Lost``; the session routes those to the waiting probe, never to
the workflow core.

A backend never decides about retries, never sees the task graph and never
records anything: the workflow core and the journal live in the client.
Attempt ids are fencing tokens; a backend may deliver a late or duplicate
event for an attempt and the core will drop it.

**The kit.** :mod:`pilotfish.backends._driver` is what every client-side backend
is built from: a stimulus queue with one consumer thread, the threads it owns (one
that crashes is one ``Fatal``), the one runner of the attempt ledger's commands (a
command a backend has no hook for is a type error, not a silent no-op), the
``max_master_restarts`` budget and its messages, and the reports for attempts a
backend cannot run.

:class:`pilotfish.backends.fake.FakeBackend` is the reference implementation
in a few hundred lines, in-process, for tests.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from ..wire.messages import Fatal, Lost, Result, RunAttempt, Started, Unlinked, WorkerReport

__all__ = [
    "Alive",
    "Backend",
    "BackendEvent",
    "Fatal",
    "Lost",
    "MasterReport",
    "Pulse",
    "Result",
    "RunAttempt",
    "Sink",
    "Started",
    "Unlinked",
    "WorkerReport",
]


class MasterReport(NamedTuple):
    """What a backend reports about its master (or scheduler); the session turns it
    into the public :class:`pilotfish.MasterEvent`."""

    kind: str  # "started" | "lost" | "restarted" | "silent" | "answering"
    pid: int
    time: float
    returncode: int | None = None
    signal: str | None = None
    stderr_tail: str = ""
    message: str = ""


class Alive(NamedTuple):
    """The backend is working (its master or scheduler answers); see the module docstring."""

    time: float


class Pulse:
    """Paces ``Alive``: ``beat()`` gives one at most every ``interval`` seconds, for an
    event thread that runs and bounds its master's or scheduler's silence itself."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = float("-inf")

    def beat(self) -> list[Alive]:
        now = _time.monotonic()
        if now - self._last < self.interval:
            return []
        self._last = now
        return [Alive(_time.time())]


BackendEvent = Started | Result | Lost | Unlinked | WorkerReport | MasterReport | Fatal | Alive
Sink = Callable[[Sequence[BackendEvent]], None]


class Backend(Protocol):
    name: str
    #: draining is on unless ``Session(drain_after=None)`` (a backend whose workers may
    #: be on many hosts, and that can retire a drained one); else off unless asked
    drains_by_default: bool

    def start(self, sink: Sink) -> None: ...

    def submit(self, attempts: Sequence[RunAttempt]) -> None: ...

    def cancel(self, attempts: Sequence[int]) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def processes(self) -> dict[str, Any]: ...

    def drain(self, name: str, kind: str = "worker", why: str = "") -> None:
        """The session drained ``name`` (a worker, or a host with ``kind="host"``; see
        :mod:`pilotfish.core.drain`): send it no new attempts and retire or replace it.
        Never blocks. A backend that cannot drain ``kind`` says so in its docstring and
        leaves the place in use (the session has logged the drain)."""
        ...
