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

**Reservations (the start without a round trip).** A worker on the scheduler's own
host whose pilotfish is ready for it (it said so on the fence's own topic, see
:class:`.worker.Reservations`) is not asked to call the handler: when the scheduler hands
it a key of this session that was never granted (the plugin's ``transition`` to
``processing``), the fence sends it a *reservation* (``pilotfish_reserve``: the key and
the scheduler's ``run_id`` for this hand-over) on the scheduler's stream to it, ahead of
the ``compute-task`` message it precedes. The worker, at start, takes the reservation
that matches its task's ``run_id`` and publishes ``started`` itself, on its own stream to
the scheduler, written into the socket before user code runs; the fence records the
grant when that event passes through the scheduler (:meth:`log_event`). So the scheduler
still hears every start before it hears of that worker's end (both on the worker's one
stream, in order), and a start is still published to the client before the worker's
removal. A task Dask moves without a transition (work stealing) has a new ``run_id`` and
no reservation: it asks. A drain or the fence's removal revokes the reservations it
sent; a start that took its reservation just before cannot be undone, and the attempt
runs (its result is accepted as any granted one's): a drained worker holding a
reservation is retired only once that key has left it. Only workers on the scheduler's
host get reservations: across hosts a connection reset could lose the bytes of a
``started`` written just before a process died, and a network partition could hide
one, so those workers ask and wait for the answer.

**Draining.** The client drains a worker (several different tasks failed there) by
calling the fence's ``pilotfish_fence_drain_<token>_<n>`` handler with the worker's
*place*: its nanny's address (stable while the nanny restarts the worker process
under a new address), or its own address when it has no nanny; or a host name
(the ``host`` a worker sends with its requests). From then on a start request from
a worker of that place is refused ("drained"), and that worker is retired
(``Scheduler.retire_workers(close_workers=True)``: no new Dask tasks, its data moved
elsewhere, then it and its nanny are closed), as is a worker of that place that joins
later (its nanny restarted it before the retirement). A worker that runs attempts
when it is drained gets no new Dask tasks at once (its status on the scheduler is
``closing_gracefully``) and is retired when they end: they are not killed with it.
The drain is published on the session's topic (``op: drained``, naming the workers
it matched) in the same handler, so the client sees every grant made before it first.

**Unreachable workers.** With ``unreachable_after`` (the session's
``heartbeat_timeout``), the fence watches the workers that run attempts it granted: one
the scheduler has not heard from (``WorkerState.last_seen``: Dask workers heartbeat
about every second) for that long, while the scheduler itself runs, is unreachable (a
network partition, a frozen node). The fence publishes ``op: unreachable`` naming it and
how long it was silent, then removes it from the scheduler (``remove_worker``, not
closing it: it cannot be reached), so the client loses its attempts and retries them at
once, instead of after Dask's own worker TTL (5 minutes by default). A worker that comes
back is told by the scheduler that it is unknown and closes (its nanny starts a fresh
one), and its late result is refused by the client's ledger. A call that holds the GIL
for that long also stops its worker's heartbeats: give such work a longer
``heartbeat_timeout``.

**The link to the client.** With ``pulse_every``, the fence publishes ``op: pulse``
on the session's topic that often: it travels on the scheduler's one stream to the
client, as the grants and results do, so a client that hears nothing for a few pulses
knows that stream is stalled (a network cut between client and scheduler, a frozen
scheduler) long before the TCP connection times out.

**Missed events.** The scheduler keeps the last :data:`TOPIC_KEEP` events of the
session's topic (the fence lengthens Dask's log of 1000): a client whose link broke reads
there, once reconnected, the grants and small results published while it was cut off, so
that an attempt that ran meanwhile is recorded as started (and, if its result is there,
done) instead of sent again as if it never ran.

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

import asyncio
import collections
import contextlib
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["StartFence", "dask_key", "is_session_key"]

#: events the scheduler keeps of a session's topic (Dask keeps 1000 of each topic): after
#: a broken link, the client reads the grants and small results it missed from there
TOPIC_KEEP = 100_000


def dask_key(task_key: str, attempt: int, token: str, n: int) -> str:
    """The Dask key of attempt ``attempt`` (of task ``task_key``) of session ``token``,
    handed to Dask for the ``n``-th time (0: the first); :func:`is_session_key` reads it."""
    tail = f"-r{n}" if n else ""
    return f"pilotfish-{task_key}-a{attempt}-{token}{tail}"


def is_session_key(key: Any, token: str) -> bool:
    """Is ``key`` a Dask key :func:`dask_key` made for session ``token``?"""
    if not (isinstance(key, str) and key.startswith("pilotfish-")):
        return False
    head, sep, n = key.rpartition("-r")
    return (head if sep and n.isdigit() else key).endswith(f"-{token}")


def _ip(address: str) -> str:
    """The host part of a worker's address (``tcp://10.0.0.5:4000`` -> ``10.0.0.5``)."""
    return address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


class StartFence(SchedulerPlugin):
    """Grants each Dask key of a pilotfish session to one worker, once (see module)."""

    idempotent = False

    def __init__(
        self,
        token: str,
        n: int,
        topic: str,
        unreachable_after: float | None = None,
        pulse_every: float | None = None,
    ) -> None:
        self.name = f"pilotfish-fence-{token}-{n}"
        self.op = f"pilotfish_start_{token}_{n}"
        self.close_op = f"pilotfish_fence_close_{token}_{n}"
        self.drain_op = f"pilotfish_fence_drain_{token}_{n}"
        self.topic = topic
        self.granted: dict[Any, str] = {}  # Dask key -> the worker it was granted to
        self.refused = 0
        self.scheduler: Any = None
        self.drained: dict[tuple[str, str], str] = {}  # (kind, place) -> why
        self.hosts: dict[str, str] = {}  # worker address -> the host it said it runs on
        self.retiring: set[str] = set()  # worker addresses we asked the scheduler to retire
        self.waiting: set[str] = set()  # drained workers to retire when their attempts end
        self._tasks: set[Any] = set()  # retire_workers calls in progress
        self.unreachable_after = unreachable_after
        self.pulse_every = pulse_every
        self.removed: set[str] = set()  # workers removed as unreachable
        self._watch: Any = None
        self.token = token
        #: same-host workers that take reservations (they said so on ``self.op``'s topic)
        self.ready: set[str] = set()
        self.reserved = 0  # reservations sent
        #: the worker each key's latest reservation went to (dropped when it is forgotten):
        #: a drained worker holding one is not retired before that key leaves it
        self.reserved_for: dict[Any, str] = {}
        self.asked = 0  # start requests answered (the round trip)

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        with contextlib.suppress(Exception):  # keep the topic's log long enough to replay
            log = scheduler.events[self.topic]
            if (log.maxlen or 0) < TOPIC_KEEP:
                scheduler.events[self.topic] = collections.deque(log, maxlen=TOPIC_KEEP)
        scheduler.handlers[self.op] = self.request
        scheduler.handlers[self.close_op] = self.remove
        scheduler.handlers[self.drain_op] = self.drain
        if self.unreachable_after or self.pulse_every:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        every = min(1.0, (self.unreachable_after or 4.0) / 4, self.pulse_every or 1.0)
        last_pulse = 0.0
        while True:
            await asyncio.sleep(every)
            now = time.time()
            if self.pulse_every and now - last_pulse >= self.pulse_every:
                last_pulse = now
                with contextlib.suppress(Exception):
                    self.scheduler.log_event(self.topic, {"op": "pulse", "time": now})
            if self.unreachable_after:
                for addr, silent in self.unreachable(now):
                    await self._remove_unreachable(addr, silent)

    def unreachable(self, now: float) -> list[tuple[str, float]]:
        """Workers running attempts we granted, silent for longer than
        ``unreachable_after`` (each once), with how long they have been silent."""
        out = []
        after = self.unreachable_after or 0.0
        for addr, ws in list((getattr(self.scheduler, "workers", None) or {}).items()):
            silent = now - float(getattr(ws, "last_seen", now))
            if after and silent > after and addr not in self.removed and self.busy(addr):
                out.append((addr, silent))
        return out

    async def _remove_unreachable(self, addr: str, silent: float) -> None:
        self.removed.add(addr)
        msg = {
            "op": "unreachable",
            "worker": addr,
            "host": self.hosts.get(addr) or _ip(addr),
            "silent": round(silent, 2),
        }
        with contextlib.suppress(Exception):
            self.scheduler.log_event(self.topic, msg)
        with contextlib.suppress(Exception):
            done = self.scheduler.remove_worker(
                address=addr, stimulus_id=f"pilotfish-unreachable-{self.name}", close=False
            )
            if asyncio.iscoroutine(done):
                await done

    def transition(self, key: Any, start: Any, finish: Any, *args: Any, **kwargs: Any) -> None:
        if finish == "processing" and self.ready:
            self.reserve(key)
        if self.waiting and start == "processing":  # a drained worker's attempt ended?
            w = self.granted.get(key) or self.reserved_for.get(key)
            if w in self.waiting and not self.busy(w):
                self.waiting.discard(w)
                self.retire([w])
        if finish == "forgotten":
            if self.granted:
                self.granted.pop(key, None)
            if self.reserved_for:
                self.reserved_for.pop(key, None)

    def reserve(self, key: Any) -> None:
        """The scheduler just handed ``key`` to a worker: reserve its start there if it is
        one of this session's keys, never granted, on a ready worker that is not drained
        (the reservation goes ahead of the ``compute-task`` message on the same stream)."""
        if not is_session_key(key, self.token):
            return  # another session's, or not pilotfish's
        if key in self.granted:
            return  # Dask runs it again: the worker must ask (and is refused)
        ts = self.scheduler.tasks.get(key)
        addr = getattr(getattr(ts, "processing_on", None), "address", None)
        run_id = getattr(ts, "run_id", None)
        if addr not in self.ready or run_id is None:
            return
        if self.drained and self.is_drained(addr, self.hosts.get(addr) or _ip(addr)):
            return
        bs = (getattr(self.scheduler, "stream_comms", None) or {}).get(addr)
        if bs is None:
            return
        with contextlib.suppress(Exception):  # a closed stream: the worker is going
            bs.send({"op": "pilotfish_reserve", "fence": self.op, "key": key, "run_id": run_id})
            self.reserved += 1
            self.reserved_for[key] = addr

    def revoke(self, workers: Any) -> None:
        """Void this fence's reservations held by ``workers`` (a drain, the fence's end)."""
        comms = getattr(self.scheduler, "stream_comms", None) or {}
        for w in list(workers):
            bs = comms.get(w)
            if bs is not None:
                with contextlib.suppress(Exception):
                    bs.send({"op": "pilotfish_reserve", "fence": self.op, "revoke": True})

    def log_event(self, topic: str, msg: Any) -> None:
        """Every event the scheduler publishes passes here: a worker's ``ready`` on the
        fence's own topic, and a reserved ``started`` on the session's (the grant)."""
        if not isinstance(msg, dict):
            return
        if topic == self.topic:
            if msg.get("op") == "started" and msg.get("reserved"):
                key, worker = msg.get("key"), str(msg.get("worker", ""))
                self.granted.setdefault(key, worker)
                if msg.get("host"):
                    self.hosts[worker] = str(msg["host"])
        elif topic == self.op and msg.get("op") == "ready":
            worker = str(msg.get("worker", ""))
            sched = str(getattr(self.scheduler, "address", "") or "")
            known = worker in (getattr(self.scheduler, "workers", None) or {})
            if known and sched and _ip(worker) == _ip(sched):
                self.ready.add(worker)

    def remove_worker(self, scheduler: Any = None, worker: str = "", **kwargs: Any) -> None:
        self.waiting.discard(worker)
        self.ready.discard(worker)

    def add_worker(self, scheduler: Any = None, worker: str = "") -> None:
        """A nanny restarted a drained worker (same nanny, new address), or a worker joined
        on a drained host: the client is told (it sends that worker nothing) and it is
        retired."""
        if not (self.drained and worker):
            return
        why = self.is_drained(worker, self.hosts.get(worker) or _ip(worker))
        if why:
            place = self.place(worker)
            kind = "worker" if ("worker", place) in self.drained else "host"
            name = place if kind == "worker" else (self.hosts.get(worker) or _ip(worker))
            msg = {"op": "drained", "kind": kind, "name": name, "workers": [worker], "why": why}
            with contextlib.suppress(Exception):
                self.scheduler.log_event(self.topic, msg)
            self.retire([worker])

    def place(self, worker: str) -> str:
        """The worker's place: its nanny's address (the same across the worker processes
        the nanny starts), else its own address."""
        ws = (getattr(self.scheduler, "workers", None) or {}).get(worker)
        return str(getattr(ws, "nanny", None) or worker)

    def is_drained(self, worker: str, host: str) -> str:
        """Why ``worker`` (at ``host``) is drained ('' if it is not)."""
        return self.drained.get(("worker", self.place(worker))) or self.drained.get(
            ("host", host), ""
        )

    def decide(self, key: Any, worker: str, host: str = "") -> str:
        """Why ``worker`` may not start ``key`` ('' if it may)."""
        if self.drained:
            why = self.is_drained(worker, host)
            if why:
                self.retire([worker])
                return f"worker {self.place(worker)} is drained ({why})"
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
        self.asked += 1
        if host:
            self.hosts[worker] = host
        why = self.decide(key, worker, host)
        msg = {
            "op": "refused" if why else "started",
            "attempt": attempt,
            "key": key,
            "worker": worker,
            "pid": pid,
            "host": host,
            "time": when,
        }
        drained = bool(why) and self.is_drained(worker, host) != ""
        if why:
            self.refused += 1
            msg["reason"] = why
            if drained:
                msg["drained"] = True
        else:
            self.granted[key] = worker
            place = self.place(worker)
            if place != worker:  # the client names the worker by its place
                msg["place"] = place
        self.scheduler.log_event(self.topic, msg)
        return {"granted": not why, "reason": why, "drained": drained}

    def drain(self, kind: str, place: str, why: str) -> list[str]:
        """Drain a worker place (``kind="worker"``) or a host: refuse starts there from
        now on and retire its workers. Returns (and publishes) the workers it matched."""
        self.drained[(kind, place)] = why
        workers = sorted(
            a
            for a in (getattr(self.scheduler, "workers", None) or {})
            if (kind == "worker" and self.place(a) == place)
            or (kind == "host" and place in (self.hosts.get(a), _ip(a)))
        )
        msg = {"op": "drained", "kind": kind, "name": place, "workers": workers, "why": why}
        self.scheduler.log_event(self.topic, msg)
        self.revoke(workers)
        self.retire(workers)
        return workers

    def busy(self, worker: str) -> bool:
        """Does ``worker`` run user code we let start, or may it start some without asking
        (a key processing there that we granted it, or reserved for it)?"""
        ws = (getattr(self.scheduler, "workers", None) or {}).get(worker)
        granted, reserved = self.granted, self.reserved_for
        return any(
            granted.get(ts.key) == worker or reserved.get(ts.key) == worker
            for ts in getattr(ws, "processing", ())
        )

    def retire(self, workers: list[str]) -> None:
        """Retire ``workers`` (once each, in the background): at once if they run no
        attempt; else the scheduler gives them no new tasks now, and they are retired
        when the attempts they run end (:meth:`transition`), not killed with them."""
        new = [w for w in workers if w not in self.retiring and w not in self.waiting]
        if not new or self.scheduler is None:
            return
        for w in [w for w in new if self.busy(w)]:
            new.remove(w)
            self.waiting.add(w)
            with contextlib.suppress(Exception):  # scheduler side only: it runs on
                self.scheduler.handle_worker_status_change(
                    "closing_gracefully", w, stimulus_id=f"pilotfish-drain-{self.name}"
                )
        if not new:
            return
        self.retiring.update(new)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the scheduler's loop (a test): refusing is enough
            return
        t = loop.create_task(self._retire(new))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _retire(self, workers: list[str]) -> None:
        # if it fails, the worker stays drained: its starts are refused all the same
        with contextlib.suppress(Exception):
            await self.scheduler.retire_workers(
                workers=workers,
                close_workers=True,
                remove=True,
                stimulus_id=f"pilotfish-drain-{self.name}",
            )
        # not retired (Dask could not move its data: the only worker left holds results
        # the client has not released yet): the next start it asks for (refused) tries again
        still = getattr(self.scheduler, "workers", None) or {}
        self.retiring.difference_update(w for w in workers if w in still)

    def remove(self) -> int:
        """Uninstall (the session ended or reconnected); returns the number of refusals."""
        s = self.scheduler
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if s is not None:
            self.revoke(self.ready)
            self.ready.clear()
            s.handlers.pop(self.op, None)
            s.handlers.pop(self.close_op, None)
            s.handlers.pop(self.drain_op, None)
            if s.plugins.get(self.name) is self:
                s.remove_plugin(self.name)
        self.granted.clear()
        self.reserved_for.clear()
        return self.refused
