"""The Dask workers as pilotfish sees them: joining, leaving, drained, none left.

:class:`Workers` turns the scheduler's ``add-worker`` / ``remove-worker`` events and
the start fence's ``drained`` messages into ledger events (``WorkerLost``, ``Bounce``,
``Drain``) and ``WorkerReport`` events, names each worker by its *place* (its nanny's
address when it has one, see :meth:`Workers.placed`), and decides what happens while no
usable worker is left: ``WorkerReport("gone")`` at once, attempts held back (parked)
while every worker left is drained, and after ``no_workers_timeout`` every attempt in
flight or queued ``RUNTIME_LOST`` (``Unrunnable``), as are new ones until a worker joins.
Batch jobs (which job a worker ran in, how it ended) are :mod:`.jobs`'.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from ... import cluster as _cluster
from ...core import ledger as L
from ...wire.messages import Lost, Result, WorkerReport
from .connection import Connection
from .flight import Flight
from .jobs import BatchJobs, describe_removal, nanny_answers

__all__ = ["Workers"]

log = logging.getLogger("pilotfish.dask")

GONE_KEPT = 20  # how many lost workers a "no worker left" message names at most


class Workers:
    """What pilotfish knows of the cluster's workers (guarded by ``flight.lock``):
    ``pids`` (address -> (pid, host)), ``place`` (address -> its place), ``drains``
    (``(kind, name, why)`` asked so far), the batch jobs, and, once no usable worker is
    left, since when (``gone_since``) and how they ended (``gone``); ``starved``: why
    attempts fail at once (no worker came back in time)."""

    def __init__(
        self,
        flight: Flight,
        conn: Connection,
        no_workers_timeout: float,
        stopping: threading.Event,
    ) -> None:
        self.flight = flight
        self.conn = conn
        self.no_workers_timeout = no_workers_timeout
        self._stopping = stopping
        self.jobs = BatchJobs()
        self.unreachable: dict[str, str] = {}  # worker address -> why the fence removed it
        self.pids: dict[str, tuple[int, str]] = {}
        self.place: dict[str, str] = {}
        self.drains: list[tuple[str, str, str]] = []
        self.gone: list[str] = []  # how the workers that left since the last live one ended
        self.gone_names: set[str] = set()  # their Dask worker names (cluster job names)
        self.gone_since: float | None = None  # monotonic: the last worker left
        self.starved = ""

    # ------------------------------------------------------------------ names
    def placed(self, ev: Any) -> Any:
        """``ev`` naming its worker by its place (see :mod:`pilotfish.backends.dask`)."""
        if not isinstance(ev, L.Started | Lost | Result) or not ev.worker:
            return ev
        place = self.place.get(ev.worker)
        if not place or place == ev.worker:
            return ev
        if not isinstance(ev, Lost) or place in ev.message:
            return ev._replace(worker=place)
        addr, msg = ev.worker, ev.message
        if addr in msg:
            msg = msg.replace(addr, f"{addr} (nanny {place})", 1)
        else:
            msg += f" (on Dask worker {addr}, nanny {place})"
        return ev._replace(worker=place, message=msg)

    def gone_text(self) -> str:
        more = len(self.gone) >= GONE_KEPT
        return "; ".join(self.gone) + (" (and maybe more)" if more else "") or "no reason known"

    def drained_text(self) -> str:
        """Every drain so far, with why and the tasks that showed it."""
        return "; ".join(why for _, _, why in self.drains) or "drained"

    def _then(self, fail: str) -> str:
        if self.no_workers_timeout == float("inf"):
            return "pilotfish waits for one (no_workers_timeout=inf)"
        return f"if none joins within no_workers_timeout={self.no_workers_timeout:g} s, {fail}"

    # ------------------------------------------------------------------ what workers say
    def on_worker_info(self, msg: dict[str, Any]) -> None:
        """A worker said which batch job it runs in (the :class:`.worker.WorkerJob`
        plugin)."""
        addr, job, name = str(msg.get("worker")), str(msg.get("job") or ""), str(msg.get("name"))
        with self.flight.lock:
            if msg.get("nanny"):
                self.place[addr] = str(msg["nanny"])
            self.jobs.of[addr] = (job, name)
            with contextlib.suppress(TypeError, ValueError):
                self.pids.setdefault(addr, (int(msg.get("pid", 0)), str(msg.get("host"))))
        self.jobs.learn(job)
        if job:
            log.info("pilotfish: Dask worker %s (%s) runs in SLURM job %s", addr, name, job)

    def on_drained(self, msg: dict[str, Any], events: list[Any], cancel: list[Any]) -> None:
        """The start fence drained a place (after every grant it made before): the ledger
        takes ``Drain`` for each worker there (what one held unstarted goes elsewhere)."""
        kind, name, why = str(msg.get("kind")), str(msg.get("name")), str(msg.get("why"))
        now = time.time()
        fl = self.flight
        with fl.lock:
            addrs = {str(a) for a in msg.get("workers") or ()}
            if kind == "worker":
                addrs |= {a for a, p in self.place.items() if p == name}
                addrs.add(name)
            else:
                addrs |= {a for a, (_, h) in self.pids.items() if h == name}
            led = fl.ledger
            for addr in sorted(addrs):
                items = {a: led.entries[a].item for a in led.held_by(addr)}
                fl.carry_out(led.handle(L.Drain(addr, why, now)), items, events, cancel)
            self.every_worker_drained_locked(events)
        log.info(
            "pilotfish: Dask %s %s drained (workers %s): no new attempts start there",
            kind,
            name,
            ", ".join(sorted(addrs)) or "none now",
        )

    def elsewhere(self, avoid: tuple[str, ...]) -> list[str]:
        """The live, undrained workers that are none of the places in ``avoid`` (worker
        addresses or the nanny places attempts are recorded under)."""
        fl = self.flight
        with fl.lock:
            return sorted(
                w
                for w in fl.live
                if w not in avoid
                and self.place.get(w, w) not in avoid
                and w not in fl.ledger.drained
            )

    def on_unreachable(self, msg: dict[str, Any]) -> None:
        """The fence found a worker that runs attempts unreachable and removes it: the
        removal that follows says why."""
        addr, silent = str(msg.get("worker", "")), msg.get("silent", "?")
        with self.flight.lock:
            self.unreachable[addr] = (
                f"unreachable: the scheduler heard nothing from it for {silent} s while it "
                f"ran attempts (heartbeat_timeout={self.conn.unreachable_after:g} s): a "
                "network partition, or its node froze or died; pilotfish removed it"
            )
        log.warning("pilotfish: Dask worker %s is unreachable (silent %s s)", addr, silent)

    # ------------------------------------------------------------------ joining, leaving
    def on_cluster(self, msg: dict[str, Any], events: list[Any], cancel: list[Any]) -> None:
        """The scheduler's ``add-worker`` or ``remove-worker`` event."""
        if msg.get("action") == "add-worker":
            self._on_added(str(msg.get("worker", "")), events)
        else:
            self._on_removed(msg, events, cancel)

    def _on_added(self, addr: str, events: list[Any]) -> None:
        fl = self.flight
        with fl.lock:
            fl.live.add(addr)
            if addr not in fl.ledger.drained:
                self.gone_since, self.starved = None, ""
                self.gone.clear()
                self.gone_names.clear()
                fl.unpark_locked()  # a worker that is not drained: send what waited
        events.append(WorkerReport("started", addr, 0, time.time()))

    def _on_removed(self, msg: dict[str, Any], events: list[Any], cancel: list[Any]) -> None:
        now = time.time()
        addr = str(msg.get("worker", ""))
        processing = set(msg.get("processing-tasks") or ())
        expected = bool(msg.get("expected"))
        # a worker in a batch job: how did the job end? (scontrol, ~10 ms; before the
        # lock, and before Dask's own rerun elsewhere could be taken for the cause)
        job, info = self.jobs.job_of(addr)
        # SLURM still calls the job RUNNING: does its nanny answer (the worker process
        # ended inside the job), or not (the node died or is cut off; SLURM tells only
        # after SlurmdTimeout)? A connect, up to NANNY_PROBE s, before the lock too
        answers: bool | None = None
        if info is not None and not info.ended and info.state != "COMPLETING":
            with self.flight.lock:
                nanny = self.place.get(addr, "")
            if nanny and nanny != addr:
                answers = nanny_answers(nanny)
        fl = self.flight
        with fl.lock:
            why_restart = fl.restarting.pop(addr, "")
            pid, host = self.pids.pop(addr, (0, ""))
            name = self.jobs.of.pop(addr, ("", ""))[1]
            fl.live.discard(addr)
            led = fl.ledger
            started = tuple(led.started_on(addr))
            cause = f"Dask's stimulus: {msg.get('stimulus_id', '?')}"
            drained = led.drained.get(addr)
            unreachable = self.unreachable.pop(addr, "")
            if unreachable:
                cause = unreachable
            elif why_restart:
                cause = f"pilotfish restarted it: {why_restart}"
            elif drained is not None:
                cause = f"pilotfish drained and retired it: {drained}"
            elif expected:
                cause += ", an expected removal (retired or restarted)"
            place = self.place.get(addr, addr)
            who = f"Dask worker {addr}{f' (nanny {place})' if place != addr else ''}"
            who += f" (pid {pid or '?'}){' at host ' + host if host else ''}"
            what, ended = describe_removal(who, cause, job, info, answers)
            kind = "lost" if started or not expected else "stopped"
            events.append(WorkerReport(kind, addr, pid, now, None, None, started, what))
            if ended:  # its job is over: the cluster may replace it
                self.gone.append(ended)
                if name:
                    self.gone_names.add(name)
            elif not self._stopping.is_set():
                still = f"; its SLURM job {job} is still {info.state}" if info else ""
                if info and answers is False:
                    still = (
                        f"; its SLURM job {job} is {info.state} as far as SLURM knows, but "
                        "its nanny does not answer (the node stopped answering?)"
                    )
                self.gone.append(f"{who} was removed ({cause}){still}")
            self._lost_locked(addr, what, processing, started, now, events, cancel)
            del self.gone[:-GONE_KEPT]
            # a cluster scaled down to nothing (retired: expected) is not "gone", unless
            # pilotfish retired it (drained)
            if fl.live and not fl.usable_locked():
                self.every_worker_drained_locked(events)
            elif not (
                fl.live
                or (expected and drained is None)
                or self._stopping.is_set()
                or self.gone_since
            ):
                self._all_gone_locked(now, events)

    def _lost_locked(
        self,
        addr: str,
        what: str,
        processing: set[Any],
        started: tuple[int, ...],
        now: float,
        events: list[Any],
        cancel: list[Any],
    ) -> None:
        """The ledger's side of a worker's removal: an attempt that finished there with its
        value not fetched is given back, then ``WorkerLost`` (every other started attempt
        was running there). Finished means its Dask future said so (``finished``, or
        ``lost``: a value in memory lost with its worker); a task missing from the
        worker's ``processing`` alone is not proof: a worker that closes gracefully
        (SIGTERM) gives its running tasks back to the scheduler before it leaves."""
        led = self.flight.ledger
        items = {a: led.entries[a].item for a in led.held_by(addr)}
        cmds: list[L.Command] = []
        for aid in started:
            e = led.entries[aid]
            status = str(getattr(e.item.fut, "status", ""))
            if e.item.dkey not in processing and status in ("finished", "lost"):
                ran = now - (e.started or now)
                why = (
                    f"{what}, while holding the unfetched result of task {e.key!r} "
                    f"(attempt id {aid}, after {ran:.2f} s)"
                )
                cmds += led.handle(L.Bounce(aid, why, now))
        cmds += led.handle(L.WorkerLost(addr, what, now))
        self.flight.carry_out(cmds, items, events, cancel)

    # ------------------------------------------------------------------ none left
    def _all_gone_locked(self, now: float, events: list[Any]) -> None:
        """The last worker left: say so at once, ask the cluster for replacement jobs."""
        self.gone_since = time.monotonic()
        address = self.conn.address
        made = _cluster.cluster_for(address)
        asked = made is not None and _cluster.request_replacements(made, set(self.gone_names))
        ended = self.gone_text()
        then = self._then("pilotfish fails the attempts in flight and queued as RUNTIME_LOST")
        msg = (
            f"no Dask worker is left in the cluster at {address}: {ended}. "
            + (
                "pilotfish asked the cluster for replacement jobs; "
                if asked
                else "A new worker must join (an adaptive cluster, e.g. "
                "pilotfish.cluster.slurm(), replaces lost jobs); "
            )
            + then
        )
        log.warning("pilotfish: %s", msg)
        events.append(WorkerReport("gone", "", 0, now, message=msg))

    def every_worker_drained_locked(self, events: list[Any]) -> None:
        """Every worker left in the cluster is drained: attempts are parked (sent when a
        usable worker joins); after ``no_workers_timeout`` they fail (:meth:`check`)."""
        if self.flight.usable_locked() or self.gone_since is not None or self._stopping.is_set():
            return
        self.gone_since = time.monotonic()
        then = self._then("the attempts in flight and queued fail RUNTIME_LOST")
        msg = (
            f"every Dask worker in the cluster at {self.conn.address} is drained "
            f"({self.drained_text()}); attempts wait for a worker that is not drained to "
            f"join; {then}"
        )
        log.warning("pilotfish: %s", msg)
        events.append(WorkerReport("gone", "", 0, time.time(), message=msg))

    def check(self, events: list[Any], cancel: list[Any]) -> None:
        """No worker for ``no_workers_timeout``: attempts in flight and queued fail."""
        since = self.gone_since
        fl = self.flight
        if since is None or self.starved or fl.driver.dead:
            return
        if time.monotonic() - since < self.no_workers_timeout:
            return
        address, timeout = self.conn.address, self.no_workers_timeout
        with fl.lock:
            if fl.usable_locked() or self.gone_since is None:
                return
            if fl.live or (self.drains and not self.gone):
                why = (
                    f"every Dask worker in the cluster at {address} was drained by "
                    f"pilotfish ({self.drained_text()}), and no worker that is not drained "
                    f"joined within no_workers_timeout={timeout:g} s"
                )
            else:
                ended = self.gone_text()
                why = (
                    f"no Dask worker joined the cluster at {address} within "
                    f"no_workers_timeout={timeout:g} s after the last one left ({ended})"
                )
            self.starved = why
            now = time.time()
            for e in list(fl.ledger.entries.values()):
                msg = f"task {e.key!r} (attempt id {e.attempt}): {why}"
                cmds = fl.ledger.handle(L.Unrunnable(e.attempt, "runtime_lost", msg, now))
                fl.carry_out(cmds, {e.attempt: e.item}, events, cancel)
            fl.drop_queued_locked()
        log.error("pilotfish: %s; the attempts in flight and queued fail (RUNTIME_LOST)", why)
