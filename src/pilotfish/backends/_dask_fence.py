"""pilotfish's start fence on a Dask scheduler (a scheduler plugin).

Dask re-runs a task by itself when the worker running it dies (up to
``distributed.scheduler.allowed-failures`` times, 3 by default). For pilotfish
that would run an attempt's user code a second time, behind its retry policy's
back. So before a pilotfish task runs user code, its worker asks this plugin,
with one synchronous call to a handler the plugin adds to the scheduler
(``pilotfish_start_<token>_<n>``; it replaces the ``log_event`` round trip the
worker made anyway to report ``Started``). The request is granted when

* that Dask key was never granted before (to any worker), and
* the scheduler still has the task, processing on the worker that asks
  (not cancelled or released, not moved elsewhere after that worker was
  declared dead).

A grant is published on the session's event topic in the same handler, so the
client hears ``started`` before any later ``remove-worker`` event of that worker
(both travel on the scheduler's one stream to the client, in order). A refusal
is published too (the client counts and logs it) and the task returns without
running user code. A worker that died holding a task it had *not* started leaves
no grant behind, so Dask's rerun of that task elsewhere is granted (once).

A grant is dropped when the scheduler forgets the key, so the plugin's memory
is bounded by the keys the scheduler holds. Each (re)connection of a session
registers a plugin of its own (``n``): a task submitted before a reconnect asks
a handler that no longer exists and is refused.

This module imports only the standard library and ``distributed``: it is
pickled *by value* (cloudpickle) when registered, so the scheduler runs this
session's fence even where another version of pilotfish (or none) is installed;
that needs the client's Python version on the scheduler. (Dask itself unpickles
task graphs on the scheduler, so pilotfish's tasks need pilotfish importable
there anyway.)
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["StartFence"]


class StartFence(SchedulerPlugin):
    """Grants each Dask key of a pilotfish session to one worker, once (see module)."""

    idempotent = False

    def __init__(self, token: str, n: int, topic: str) -> None:
        self.name = f"pilotfish-fence-{token}-{n}"
        self.op = f"pilotfish_start_{token}_{n}"
        self.close_op = f"pilotfish_fence_close_{token}_{n}"
        self.topic = topic
        self.granted: dict[Any, str] = {}  # Dask key -> the worker it was granted to
        self.refused = 0
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers[self.op] = self.request
        scheduler.handlers[self.close_op] = self.remove

    def transition(self, key: Any, start: Any, finish: Any, *args: Any, **kwargs: Any) -> None:
        if finish == "forgotten" and self.granted:
            self.granted.pop(key, None)

    def decide(self, key: Any, worker: str) -> str:
        """Why ``worker`` may not start ``key`` ('' if it may)."""
        prev = self.granted.get(key)
        if prev is not None:
            if prev == worker:
                return f"it already started on this worker ({prev})"
            return (
                f"it already started on {prev}: this is Dask running it again "
                "(its worker was lost), which pilotfish's retry policy decides instead"
            )
        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return "the scheduler no longer has its Dask task (cancelled or released)"
        on = getattr(ts.processing_on, "address", None)
        if on != worker:
            where = f"processing on {on}" if on else f"in state {ts.state!r}"
            return f"the scheduler has its Dask task {where}, not on {worker}"
        return ""

    def request(
        self, key: Any, attempt: int, worker: str, pid: int, host: str, when: float
    ) -> dict[str, Any]:
        """The handler a worker calls before running user code; answers at once."""
        why = self.decide(key, worker)
        msg = {
            "op": "refused" if why else "started",
            "attempt": attempt,
            "key": key,
            "worker": worker,
            "pid": pid,
            "host": host,
            "time": when,
        }
        if why:
            self.refused += 1
            msg["reason"] = why
        else:
            self.granted[key] = worker
        self.scheduler.log_event(self.topic, msg)
        return {"granted": not why, "reason": why}

    def remove(self) -> int:
        """Uninstall (the session ended or reconnected); returns the number of refusals."""
        s = self.scheduler
        if s is not None:
            s.handlers.pop(self.op, None)
            s.handlers.pop(self.close_op, None)
            if s.plugins.get(self.name) is self:
                s.remove_plugin(self.name)
        self.granted.clear()
        return self.refused
