"""Attempt timeouts on Dask: enforced from the client, measured from ``Started``.

Dask cannot stop a running thread, so an attempt past its ``timeout`` is
``Lost(timeout)`` (the ledger's ``TimePassed``), its Dask future cancelled, and, with
``timeout_restart=True``, its worker process ended (:func:`os._exit` with
:data:`EXIT_TIMEOUT`) so that its nanny starts a fresh one; a worker without a nanny is
left alone (the call runs on in its thread; its result is dropped).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from ...core import ledger as L
from .._driver import Driver, carry_out
from .connection import Connection
from .flight import Flight

__all__ = ["Timeouts"]

log = logging.getLogger("pilotfish.dask")

EXIT_TIMEOUT = 75  # exit status of a worker pilotfish ended to stop a timed-out call


class Timeouts:
    """Checked from the event thread at most every ``every`` seconds (:meth:`check`)."""

    def __init__(
        self,
        flight: Flight,
        conn: Connection,
        driver: Driver,
        every: float,
        stopping: threading.Event,
    ) -> None:
        self.flight = flight
        self.conn = conn
        self.driver = driver
        self.every = every
        self._stopping = stopping
        self._next_tick = 0.0

    def check(self, events: list[Any], cancel: list[Any]) -> None:
        now = time.time()
        if now < self._next_tick:
            return
        self._next_tick = now + min(self.every, 0.05)
        fl = self.flight
        if fl.timeout_restart:
            how = (
                "pilotfish cancelled its Dask task and ends that worker process so that its "
                "nanny starts a fresh one (a worker without a nanny is left alone: the call "
                "then runs on in its thread and its result is dropped)"
            )
        else:
            how = (
                "pilotfish cancelled its Dask task; Dask cannot stop a running thread, so the "
                "call runs on and its result is dropped"
            )
        with fl.lock:
            deadline = fl.ledger.next_deadline()
            if deadline is None or deadline > now:
                return
            items = {e.attempt: e.item for e in fl.ledger.started()}
            step = fl.step(items, events, cancel)  # expire(): cancel, and restart
            carry_out(fl.ledger.handle(L.TimePassed(now, how)), step)
        if step.restart:
            self.driver.nursery.start(
                "pilotfish-dask-restart", self._restart_workers, sorted(step.restart)
            )

    def _restart_workers(self, addrs: list[str]) -> None:
        """Stop a runaway call the only way Dask allows: end its worker process.

        Only workers with a nanny, which starts a fresh worker at once; ``restart_workers``
        would first wait seconds for the busy thread to finish.
        """
        c = self.conn.client
        try:
            info = c.scheduler_info()["workers"]
            nanny = [a for a in addrs if (info.get(a) or {}).get("nanny")]
            with self.flight.lock:
                for a in addrs:
                    if a not in nanny:
                        self.flight.restarting.pop(a, None)
            if nanny and not self._stopping.is_set():
                c.run(os._exit, EXIT_TIMEOUT, workers=nanny, on_error="ignore")
        except Exception as e:
            log.info("pilotfish: could not restart Dask workers %s: %s", addrs, e)
