"""DaskBackend: pilotfish's backend protocol (:mod:`..base`) on a Dask cluster.

What it means (the mapping of Dask's signals to pilotfish's events, the start fence,
draining, batch jobs, the limits) is the package's docstring, :mod:`pilotfish.backends.dask`.
Here: the protocol's methods, the event thread, and the collaborators it wires together,
each the owner of one concern:

* :class:`.flight.Flight`: the attempt ledger, the queues to Dask, the one lock;
* :class:`.connection.Connection`: the client, the start fence, the plugins;
* :class:`.submit.Submitter`: the thread that hands attempts to Dask in batches;
* :class:`.results.Results`: Dask futures and result events into results;
* :class:`.workers.Workers`: workers joining, leaving, drained, none left;
* :class:`.scheduler.SchedulerWatch`: losing the scheduler, and getting it back;
* :class:`.timeouts.Timeouts`: attempts past their ``timeout``.

Everything Dask says reaches one queue (:class:`.._driver.Stimuli`), whose one consumer
thread (:meth:`DaskBackend._on_stimuli`) hands it to the collaborator it concerns, then
runs the timers, cancels the futures pilotfish no longer wants, and emits the events.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core import ledger as L
from ...errors import InvalidTask
from ...wire.messages import RunAttempt, WorkerReport
from .._driver import Driver, Stimuli, runtime_lost
from .._links import check_links
from ..base import MasterReport, Pulse, Sink
from .connection import Connection
from .flight import MAX_RESUBMITS, Att, Flight
from .results import Results
from .scheduler import SchedulerWatch
from .submit import Submitter
from .timeouts import Timeouts
from .workers import Workers

__all__ = ["DaskBackend", "DaskHooks"]

log = logging.getLogger("pilotfish.dask")


@dataclass
class DaskHooks:
    """Test seams of the Dask backend (``DaskBackend(hooks=DaskHooks(...))``): each is
    called from one of the backend's threads when set. They observe, or delay; they never
    change what the backend decides.

    ``before_batch(attempts)``: the submitter is about to hand these attempts to Dask
    (one ``Client.map``); it waits while the hook runs. ``fetched(keys, direct)``: the
    values of these Dask keys were fetched from the workers (not brought by the session's
    event topic); ``direct``: those that came straight from the worker that ran them."""

    before_batch: Callable[[list[RunAttempt]], None] | None = None
    fetched: Callable[[list[str], set[str]], None] | None = None


def _check_options(address: str | None, client: Any, security: Any) -> None:
    if client is None and not address:
        raise InvalidTask(
            "backend='dask' needs a running Dask scheduler: pass address='tcp://HOST:PORT' "
            "(e.g. LocalCluster().scheduler_address, or the scheduler of a "
            "dask_jobqueue.SLURMCluster) or client=<a distributed.Client>; pilotfish "
            "never starts a Dask cluster itself"
        )
    if client is not None and address and address != getattr(client.scheduler, "address", ""):
        raise InvalidTask(
            f"backend='dask': address={address!r} and client= (connected to "
            f"{getattr(client.scheduler, 'address', '?')!r}) disagree; pass one of them"
        )
    if security is not None and type(security).__name__ != "Security":
        raise InvalidTask(
            f"backend='dask': security={security!r} is invalid: give a "
            "distributed.Security (the TLS credentials of the scheduler), or leave it out"
        )


class DaskBackend:
    """Runs attempts as Dask tasks; see :mod:`pilotfish.backends.dask` for the event
    mapping. ``hooks``: test seams (:class:`DaskHooks`)."""

    name = "dask"
    drains_by_default = True  # workers on many nodes; a drained one is retired

    def __init__(
        self,
        workers: int | None = None,
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_master_restarts: int = 3,
        rundir: str = ".pilotfish",
        address: str | None = None,
        client: Any = None,
        timeout_restart: bool = True,
        ship_sys_path: bool = True,
        connect_timeout: float = 30.0,
        no_workers_timeout: float | None = None,
        security: Any = None,
        hooks: DaskHooks | None = None,
        preload: Iterable[str] = (),
        links: bool = True,
    ) -> None:
        _check_options(address, client, security)
        #: chains go to Dask linked (see :mod:`pilotfish.backends.base`): a task whose
        #: inputs still run is a Dask task depending on theirs, and Dask's scheduler
        #: chains them; ``links=False``: each is sent once its inputs are DONE
        self.links = check_links("dask", links)
        self.security = security
        self.workers = workers  # the cluster decides its size; kept for diagnostics
        self.hb_interval = heartbeat_interval
        self.hb_timeout = heartbeat_timeout
        self.max_restarts = max_master_restarts
        self.rundir = str(Path(rundir).resolve())
        self.timeout_restart = timeout_restart
        self.ship_sys_path = ship_sys_path
        self.connect_timeout = connect_timeout
        self.no_workers_timeout = (
            heartbeat_timeout if no_workers_timeout is None else no_workers_timeout
        )
        self.hooks = hooks or DaskHooks()
        #: this session's id on the cluster: in its Dask keys, event topic, plugin names
        self.token = uuid.uuid4().hex[:8]
        # threads, sink, restart budget, dead or not: the backends' kit
        self._driver = d = Driver("Dask", max_master_restarts)
        self._stopping = d.stopping
        self._tick = max(0.01, min(0.1, heartbeat_interval / 4))
        self._pulse = Pulse(heartbeat_interval / 2)
        # everything the event thread handles: ("fence"|"cluster", msg), ("cancel", ids),
        # ("emit", events), ("done", future, dask key, attempt id)
        self._q: Stimuli[tuple[Any, ...]] = Stimuli(self._on_stimuli, self._tick)
        self._flight = fl = Flight(d, self.token, timeout_restart)
        self._conn = conn = Connection(
            address or "",
            client,
            security,
            max(connect_timeout, heartbeat_timeout),
            ship_sys_path,
            self.token,
            fl.lock,
            self._q.put,
        )
        conn.unreachable_after = heartbeat_timeout
        conn.preload = tuple(preload)
        conn.pulse_every = heartbeat_interval
        self._workers = Workers(fl, conn, self.no_workers_timeout, d.stopping)
        self._sched = SchedulerWatch(
            fl, conn, self._workers, d, heartbeat_timeout, replay=self._on_fence
        )
        self._results = Results(
            fl, conn, self._workers, self._sched.connection_lost, self.hooks.fetched
        )
        self._submitter = Submitter(
            fl,
            conn,
            self.rundir,
            self._q.put,
            d.stopping,
            self.hooks.before_batch,
            elsewhere=self._workers.elsewhere,
        )
        self._timeouts = Timeouts(fl, conn, d, self._tick, d.stopping)
        self._refused = 0  # start requests the fence refused (Dask's own reruns, ...)

    @property
    def address(self) -> str:
        """The Dask scheduler's address (as the client names it once connected)."""
        return self._conn.address

    @property
    def topic(self) -> str:
        """The session's Dask event topic (the start fence's and the workers' messages)."""
        return self._conn.topic

    def in_flight(self) -> int:
        """How many attempts the backend holds (in its ledger, or not yet handed to
        Dask): 0 once every attempt was reported on, withdrawn or given up."""
        return self._flight.in_flight()

    # ------------------------------------------------------------------ protocol
    def start(self, sink: Sink) -> None:
        self._driver.sink = sink
        conn = self._conn
        why = conn.connect()
        if why:
            self._die("runtime_lost", why)
            return
        conn.subscribe()
        why = conn.install_fence()
        if why:
            self._die("environment", why)
            return
        self._sched.heard()  # the fence's pulse starts now
        conn.ship_plugins()
        self._workers.jobs.from_cluster(conn.address)
        workers: list[str] = []
        with contextlib.suppress(Exception):
            info = conn.client.scheduler_info()["workers"]
            workers = sorted(info)
            self._workers.place.update(
                (a, str(w["nanny"])) for a, w in info.items() if w.get("nanny")
            )
        with self._flight.lock:
            self._flight.live.update(workers)
        now = time.time()
        events: list[Any] = [
            MasterReport("started", conn.sched_pid, now, message=f"Dask scheduler {conn.address}")
        ]
        events += [WorkerReport("started", w, 0, now) for w in workers]
        self._emit(events)
        self._q.start(self._driver.nursery, "pilotfish-dask")
        self._driver.nursery.start("pilotfish-dask-submit", self._submitter.run)

    def _die(self, category: str, why: str) -> None:
        """The backend cannot start: every attempt fails with ``why``."""
        with self._flight.lock:
            fatal = self._driver.fatal(why, category)
        self._emit([fatal])
        self._q.start(self._driver.nursery, "pilotfish-dask")

    def submit(self, attempts: Sequence[RunAttempt]) -> None:
        lost: list[Any] = []
        self._workers.jobs.warn(attempts)
        fl, pid = self._flight, self._conn.sched_pid
        with fl.lock:
            starved = self._workers.starved
            new = []
            for a in attempts:
                if self._driver.dead or fl.stopped:
                    lost.append(self._driver.refuse(a, worker="scheduler", pid=pid))
                    continue
                if starved and not fl.usable_locked():
                    lost.append(runtime_lost(a, starved, worker="scheduler"))
                    continue
                att = Att(a, fl.dkey(a, 0))
                new.append((a.attempt, a.key, att, a.timeout))
                fl.queue_locked(att)
            fl.ledger.handle(L.Enqueue(tuple(new)))
            if fl.pending:
                fl.wake.set()
        if lost:
            self._q.put(("emit", lost))

    def cancel(self, attempts: Sequence[int]) -> None:
        self._q.put(("cancel", tuple(attempts)))

    def drain(self, name: str, kind: str = "worker", why: str = "") -> None:
        """The session drained worker place ``name`` (or host ``name``, ``kind="host"``):
        the start fence refuses every later start there and retires its workers (see
        :mod:`pilotfish.backends.dask`). Never blocks: the scheduler is told from a thread."""
        if kind not in ("worker", "host"):
            raise ValueError(f"drain kind={kind!r}: 'worker' or 'host'")
        d = (kind, name, why or "drained by pilotfish: several different tasks failed there")
        drains = self._workers.drains
        with self._flight.lock:
            if self._flight.stopped or d[:2] in {x[:2] for x in drains}:
                return
            drains.append(d)
            op = self._conn.drain_op
        self._driver.nursery.start("pilotfish-dask-drain", self._conn.tell_fence, [(op, d)])

    def processes(self) -> dict[str, Any]:
        with self._flight.lock:
            jobs = {a: j for a, (j, _) in self._workers.jobs.of.items() if j}
        out: dict[str, Any] = {
            "master": None,
            "scheduler": self._conn.address,
            "scheduler_pid": self._conn.sched_pid or None,
            "workers": [],
            "worker_addresses": {},
            # Dask's own reruns of a started attempt (and other stray starts) that the
            # start fence refused: their user code did not run
            "refused_starts": self._refused,
            # batch jobs: worker address -> SLURM job id (what the worker reported)
            "worker_jobs": jobs,
        }
        pids = self._conn.worker_pids()
        if pids:
            out["worker_addresses"] = pids
            out["workers"] = sorted(int(p) for p in pids.values())
        return out

    def stop(self, timeout: float = 10.0) -> None:
        fl = self._flight
        with fl.lock:
            if fl.stopped:
                return
            fl.stopped = True
            # the session is closing: what is in flight is abandoned, not reported
            futs = [e.item.fut for e in fl.ledger.entries.values() if e.item.fut is not None]
            fl.ledger = L.Ledger(max_returns=MAX_RESUBMITS)
            fl.drop_queued_locked()
        self._stopping.set()
        fl.wake.set()
        self._q.close()
        self._driver.nursery.stop(timeout)  # the event thread, the submitter, helpers
        self._conn.close(futs, timeout)

    # ------------------------------------------------------------------ event thread
    def _on_stimuli(self, items: list[tuple[Any, ...]]) -> None:
        """One step of the event thread (:class:`.._driver.Stimuli`): what piled up, in
        order, then the timers; a crash here is the driver's ``Fatal``."""
        events: list[Any] = []
        cancel: list[Any] = []
        done: list[tuple[Any, str, int]] = []
        for it in items:
            kind = it[0]
            if kind == "done":
                done.append((it[1], it[2], it[3]))
                continue
            if done:  # keep the order of results and worker losses
                self._results.collect(done, events, cancel)
                done = []
            if kind == "fence":
                self._on_fence(it[1], events, cancel)
            elif kind == "cluster":
                self._workers.on_cluster(it[1], events, cancel)
            elif kind == "cancel":
                self._on_cancel(it[1], cancel)
            elif kind == "emit":
                events.extend(it[1])
        if done:
            self._results.collect(done, events, cancel)
        self._timeouts.check(events, cancel)
        self._sched.check(events, cancel)
        self._workers.check(events, cancel)
        self._conn.cancel(cancel)
        if not self._driver.dead:  # this thread bounds the silence itself (SchedulerWatch)
            events.extend(self._pulse.beat())
        self._emit(events)

    def _emit(self, events: Sequence[Any]) -> None:
        if self._driver.sink is not None and events:
            if self._workers.place:
                events = [self._workers.placed(e) for e in events]
            try:
                self._driver.emit(events)
            except Exception:
                log.exception("pilotfish: the session failed to take backend events")

    def _on_cancel(self, ids: Sequence[int], cancel: list[Any]) -> None:
        fl = self._flight
        with fl.lock:
            items = {a: e.item for a in ids if (e := fl.ledger.get(a)) is not None}
            fl.carry_out(fl.ledger.handle(L.Revoke(tuple(ids))), items, [], cancel)

    def _on_fence(self, msg: Any, events: list[Any], cancel: list[Any]) -> None:
        """A message on the session's topic: the start fence granted (``started``) or
        refused a worker's request, or drained a place; a worker said which job it runs
        in; a worker sent a small result."""
        if not isinstance(msg, dict):
            return
        self._sched.heard()
        op = msg.get("op")
        if op == "pulse":
            return
        if op == "worker":
            self._workers.on_worker_info(msg)
        elif op == "unreachable":
            self._workers.on_unreachable(msg)
        elif op == "drained":
            self._workers.on_drained(msg, events, cancel)
        elif op == "result":
            self._results.on_result(msg, events, cancel)
        elif op == "refused":
            self._refused += 1
            log.info(
                "pilotfish: the start fence refused attempt %s (Dask key %s) on Dask worker "
                "%s (pid %s, host %s); its user code did not run there: %s",
                int(msg.get("attempt", 0)),
                str(msg.get("key")),
                str(msg.get("worker")),
                int(msg.get("pid", 0)),
                str(msg.get("host")),
                msg.get("reason"),
            )
        elif op == "started":
            self._on_started(msg, events, cancel)

    def _on_started(self, msg: dict[str, Any], events: list[Any], cancel: list[Any]) -> None:
        """The start fence granted a worker's request: the ledger's ``Start``."""
        aid, dkey = int(msg.get("attempt", 0)), str(msg.get("key"))
        worker, pid, host = str(msg.get("worker")), int(msg.get("pid", 0)), str(msg.get("host"))
        # when the worker asked, by the worker's clock: the attempt's end is the worker's
        # too (its Result), so a duration never mixes two hosts' clocks
        now = float(msg.get("time") or time.time())
        fl = self._flight
        with fl.lock:
            self._workers.pids[worker] = (pid, host)
            if msg.get("place"):
                self._workers.place[worker] = str(msg["place"])
            e = fl.ledger.get(aid)
            if e is None:
                log.info(
                    "pilotfish: attempt %s (Dask key %s) started on Dask worker %s after "
                    "pilotfish withdrew it or gave it up; its result will be dropped",
                    aid,
                    dkey,
                    worker,
                )
                return
            att = e.item
            cmds = fl.start_granted_locked(L.Start(worker, aid, pid, host, now))
            out = fl.carry_out(cmds, {aid: att}, events, cancel)
            for c in out.refused:
                log.warning(
                    "pilotfish: Dask started attempt %s (Dask key %s) on %s although %s; "
                    "its result will be dropped",
                    aid,
                    dkey,
                    worker,
                    c.reason,
                )
            if out.granted and att.dkey != dkey:
                # it started under a key pilotfish had replaced (the fence refuses the new
                # one): its result will not reach us through the future we hold
                fl.bounce_locked(
                    att,
                    f"it started under Dask key {dkey}, which pilotfish had already "
                    "replaced, so its result cannot be collected",
                    now,
                    events,
                    cancel,
                )
