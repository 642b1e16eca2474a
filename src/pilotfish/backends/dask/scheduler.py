"""Losing the Dask scheduler, and getting it back.

:class:`SchedulerWatch` checks the client's connection from the event thread. A lost
connection is ``MasterReport("lost")`` and takes one restart from the driver's
:class:`~pilotfish.backends._driver.RestartBudget` (none left: ``Fatal`` at once). Back
within ``heartbeat_timeout``: the ledger's ``RuntimeLost`` (started attempts
``Lost(runtime_lost)``, the others resent under new Dask keys), a fresh start fence,
the plugins and drains installed again, ``MasterReport("restarted")``. Not back in time,
or the client gave up: ``RuntimeLost`` and ``Fatal(runtime_lost)``.

A link that stalls without breaking (a network cut between the client and the
scheduler, a frozen scheduler) closes nothing until Dask's TCP timeout: the start
fence's pulse (:mod:`.fence`) is then missing. Silent for ``silent_after`` seconds is
``MasterReport("silent")`` (attempts run on; their results wait on the workers), heard
again is ``MasterReport("answering")``, saying for how long it was silent; a link that
breaks is the lost connection above.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import dask

from ...core import ledger as L
from .._driver import Driver, carry_out
from ..base import MasterReport
from .connection import Connection
from .flight import Att, Flight
from .workers import Workers

__all__ = ["SchedulerWatch"]

log = logging.getLogger("pilotfish.dask")


class SchedulerWatch:
    """``conn_lost``: a Dask future said the connection was lost (Dask cancelled it),
    before the client's status may show it."""

    def __init__(
        self,
        flight: Flight,
        conn: Connection,
        workers: Workers,
        driver: Driver,
        hb_timeout: float,
        replay: Callable[[Any, list[Any], list[Any]], None],
    ) -> None:
        self.flight = flight
        #: handles one message of the session's topic (the backend's), for missed events
        self.replay = replay
        self.conn = conn
        self.workers = workers
        self.driver = driver
        self.hb_timeout = hb_timeout
        self.conn_lost = False
        #: the fence's pulse comes every ``conn.pulse_every`` s: silent this long is news
        self.silent_after = max(3.0, 3 * (conn.pulse_every or 1.0))
        self.last_heard = time.monotonic()
        self.silent_since: float | None = None  # reported silent, since (monotonic)

    def connection_lost(self) -> None:
        self.conn_lost = True

    def heard(self) -> None:
        """The scheduler's stream brought a message for this session (a pulse, a grant)."""
        self.last_heard = time.monotonic()

    def _link(self, events: list[Any]) -> None:
        """The connection is up: report a stall of the scheduler's stream, and its end."""
        now = time.monotonic()
        quiet = now - self.last_heard
        address = self.conn.address
        if self.silent_since is None and quiet > self.silent_after:
            self.silent_since = self.last_heard
            tcp = dask.config.get("distributed.comm.timeouts.tcp", "30s")
            msg = (
                f"the Dask scheduler at {address} has sent this client nothing for "
                f"{quiet:.1f} s (its pulse comes every {self.conn.pulse_every or 1.0:g} s): "
                "the network between them is cut, or the scheduler is frozen. Attempts run "
                "on and their results wait on the workers; if the connection breaks "
                f"(Dask's TCP timeout, {tcp}), pilotfish reconnects and retries what it lost"
            )
            log.warning("pilotfish: %s", msg)
            events.append(MasterReport("silent", self.conn.sched_pid, time.time(), message=msg))
        elif self.silent_since is not None and quiet <= self.silent_after:
            msg = (
                f"the Dask scheduler at {address} is heard again after "
                f"{now - self.silent_since:.1f} s of silence; the connection held, nothing "
                "was lost"
            )
            self.silent_since = None
            log.warning("pilotfish: %s", msg)
            events.append(MasterReport("answering", self.conn.sched_pid, time.time(), message=msg))

    def check(self, events: list[Any], cancel: list[Any]) -> None:
        if self.driver.dead or self.conn.client is None:
            return
        address = self.conn.address
        status = self.conn.client.status
        fl = self.flight
        if fl.lost_since is None:
            if status == "running" and not self.conn_lost:
                self._link(events)
                return
            with fl.lock:
                fl.lost_since = time.monotonic()
            events.append(
                MasterReport(
                    "lost",
                    self.conn.sched_pid,
                    time.time(),
                    message=f"lost the connection to the Dask scheduler at {address}",
                )
            )
            if not self.driver.budget.take():
                what = (
                    f"lost the connection to the Dask scheduler at {address} (it was "
                    "killed, crashed, or the network failed)"
                )
                again = "wait for it to return"
                self.fatal(f"{what}; {self.driver.budget.spent(again)}", events, cancel)
                return
        if status == "running":
            self._recovered(events, cancel)
        elif status in ("closed", "closing"):
            self.fatal(
                f"lost the connection to the Dask scheduler at {address} and the Dask "
                "client gave up reconnecting",
                events,
                cancel,
            )
        elif time.monotonic() - (fl.lost_since or 0.0) > self.hb_timeout:
            self.fatal(
                f"lost the connection to the Dask scheduler at {address}, and it did not "
                f"come back within heartbeat_timeout={self.hb_timeout:g} s",
                events,
                cancel,
            )

    def fatal(self, why: str, events: list[Any], cancel: list[Any]) -> None:
        """The scheduler is gone for good: started attempts are RUNTIME_LOST (the ledger
        says so); the others have nowhere to go, and ``Fatal`` fails them."""
        fl = self.flight
        with fl.lock:
            fatal = self.driver.fatal(why)
            cancel.extend(e.item.fut for e in fl.ledger.entries.values())
            # started: Lost(runtime_lost); the others are not sent again (dead): Fatal
            # fails them
            self._lost_locked(why, self.conn.sched_pid, {}, events, cancel)
            fl.drop_queued_locked()
        events.append(fatal)

    def _lost_locked(
        self,
        why: str,
        pid: int,
        items: dict[int, Att],
        events: list[Any],
        cancel: list[Any],
        unblamed: str = "",
    ) -> None:
        """``RuntimeLost`` for the ledger, carried out; its reports also name the Dask
        worker an attempt was running on."""
        led = self.flight.ledger
        where = {
            e.attempt: f"; it was running on Dask worker {e.worker} (pid {e.pid}) at host {e.host}"
            for e in led.started()
        }
        cmds = led.handle(
            L.RuntimeLost(
                why, time.time(), f"scheduler {self.conn.address}", pid, unblamed=unblamed
            )
        )
        carry_out(cmds, self.flight.step(items, events, cancel, where))

    def _replay(self, events: list[Any], cancel: list[Any]) -> None:
        """Handle what the scheduler published on the session's topic while the link was
        down: attempts granted meanwhile are started (then lost with the link, unblamed,
        if their result is not there too), small results delivered: what ran during the
        outage is recorded as it ran, not sent again as if it never started."""
        missed, whole = self.conn.missed_events()
        for msg in missed:
            self.replay(msg, events, cancel)
        if missed:
            log.info(
                "pilotfish: read %d events of this session published while the link to "
                "the Dask scheduler was down",
                len(missed),
            )
        if not whole:
            log.warning(
                "pilotfish: the Dask scheduler no longer has every event of this session "
                "from while the link was down: an attempt that started then may be sent "
                "again as if it had not"
            )

    def _recovered(self, events: list[Any], cancel: list[Any]) -> None:
        """The client is connected again: what the old scheduler had is gone."""
        conn, fl = self.conn, self.flight
        with contextlib.suppress(Exception):
            conn.subscribe()
        failed = conn.install_fence()
        if failed:
            self.fatal(failed, events, cancel)
            return
        conn.ship_plugins()
        with fl.lock:
            drains = [(conn.drain_op, d) for d in self.workers.drains]
        if drains:
            self.driver.nursery.start("pilotfish-dask-drain", conn.tell_fence, drains)
        unblamed = ""
        if conn.same_scheduler:  # the link broke, not the scheduler: Dask let go of our keys
            unblamed = f"the link to the Dask scheduler at {conn.address} broke"
            why = (
                f"the connection to the Dask scheduler at {conn.address} broke (a network "
                "outage: reconnected to the same scheduler, which had let go of this "
                f"session's tasks; {self.driver.budget.note()})"
            )
        else:
            why = (
                f"the connection to the Dask scheduler at {conn.address} was lost "
                f"(reconnected; {self.driver.budget.note()})"
            )
        if conn.same_scheduler:
            self._replay(events, cancel)
        old_pid = conn.sched_pid
        conn.refresh_scheduler_pid()
        with fl.lock:
            self.conn_lost = False
            fl.lost_since = None
            self.last_heard, self.silent_since = time.monotonic(), None
            items = {a: e.item for a, e in fl.ledger.entries.items()}
            # started: Lost(runtime_lost), not charged after a broken link; the others:
            # Resend, under new keys
            self._lost_locked(why, old_pid, items, events, cancel, unblamed)
        events.append(
            MasterReport(
                "restarted",
                conn.sched_pid,
                time.time(),
                message=f"reconnected to the Dask scheduler at {conn.address}",
            )
        )
