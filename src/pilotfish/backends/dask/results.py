"""Turning the ends of Dask tasks into pilotfish's results.

A small result (up to :data:`.worker.EVENT_MAX` bytes pickled) comes with the task's
end on the session's event topic (:meth:`Results.on_result`), before Dask says the task
finished, and is never fetched. Larger values are gathered in batches
(:meth:`Results.collect`, :func:`fetch_values`): straight from the worker the start
fence granted the attempt to when it is on the client's host (no ``who_has`` round trip
to the scheduler first), else through Dask's ``Client.gather`` (also for keys that
worker no longer has). A future that did not finish is given back to the ledger
(``Bounce``: lost if it started, else sent again unblamed) or, when Dask could not run
the task at all, is an ENVIRONMENT error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import distributed
from distributed.utils_comm import gather_from_workers

from ...core import ledger as L
from ...wire import messages as _wire
from ...wire.messages import Result
from .connection import Connection
from .flight import Att, Flight
from .worker import InputMissing, NotStarted

if TYPE_CHECKING:
    from .workers import Workers

__all__ = ["Results", "fetch_values", "is_near"]

log = logging.getLogger("pilotfish.dask")

CONN_LOST = "scheduler-connection-lost"  # Dask's reason for cancelling on a lost connection


def fetch_values(
    client: Any, finished: list[tuple[str, Any]], holder: dict[str, str]
) -> tuple[list[Any], set[str]]:
    """The values of finished futures ``(dask key, future)``, in order, and the keys that
    came straight from their worker. A value whose worker is on this host (``holder``:
    Dask key -> the worker the start fence granted it to) is asked of that worker
    directly (one request per worker: no detour through the scheduler, and no
    ``who_has`` round trip to it first, as ``Client.gather(direct=True)`` makes). The
    others, and any that worker no longer has (moved, lost), come through
    ``Client.gather``: directly when all of them are near, else Dask's default."""
    got: dict[str, Any] = {}
    if holder:
        with contextlib.suppress(Exception):  # then all of them through Client.gather
            got = client.sync(
                gather_from_workers, {k: [w] for k, w in holder.items()}, rpc=client.rpc
            )[0]
    direct = set(got)
    rest = [f for k, f in finished if k not in got]
    if rest:
        near = all(f.key in holder for f in rest)
        values = client.gather(rest, direct=near or None)
        got.update(zip([f.key for f in rest], values, strict=True))
    return [got[k] for k, _ in finished], direct


def is_near(worker: str, host: str, here: str) -> bool:
    """Is ``worker`` (running at ``host``) surely reachable from this host, ``here``?"""
    h = worker.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    hit = worker.startswith("inproc://") or h in ("localhost", "::1")
    return hit or h.startswith("127.") or host == here


class Results:
    """Delivers what Dask's futures and the result events bring. ``on_conn_lost``: a
    future was cancelled because the scheduler connection was lost (the scheduler watch
    decides); ``fetched``: a test hook (:class:`.backend.DaskHooks`)."""

    def __init__(
        self,
        flight: Flight,
        conn: Connection,
        workers: Workers,
        on_conn_lost: Callable[[], None],
        fetched: Callable[[list[str], set[str]], None] | None = None,
    ) -> None:
        self.flight = flight
        self.conn = conn
        self.workers = workers
        self._on_conn_lost = on_conn_lost
        self._fetched = fetched
        self._near: dict[str, bool] = {}  # worker address -> on this host (gather directly)
        self._host = _wire.host_name()

    def _is_near(self, worker: str, host: str) -> bool:
        hit = self._near.get(worker)
        if hit is None:
            hit = self._near[worker] = is_near(worker, host, self._host)
        return hit

    def on_result(self, msg: dict[str, Any], events: list[Any], cancel: list[Any]) -> None:
        """A worker sent a small result with its Dask task's end (see
        :func:`.worker.attempt_on_worker`): delivered now, as if fetched; its future's end
        is then ignored. One for an attempt pilotfish withdrew, lost or sent again under
        another Dask key is ignored here (its future's end decides, as without it)."""
        try:
            res = Result(*msg["result"])
        except Exception:
            return  # then its future brings it
        fl = self.flight
        with fl.lock:
            e = fl.ledger.get(res.attempt)
            if e is not None and e.item.dkey == str(msg.get("key")):
                self._deliver_locked(e.item, res, events, cancel)

    def collect(
        self, done: list[tuple[Any, str, int]], events: list[Any], cancel: list[Any]
    ) -> None:
        """Futures that ended ``(future, dask key, attempt id)``: their values fetched in
        one batch and delivered, or what ended them handled."""
        finished: list[tuple[Att, Any]] = []
        other: list[tuple[Att, Any, str]] = []
        holder: dict[str, str] = {}  # Dask key -> the worker on this host that ran it
        fl = self.flight
        with fl.lock:
            for fut, dkey, aid in done:
                e = fl.ledger.get(aid)
                if e is None or e.item.dkey != dkey:
                    continue  # withdrawn, lost or resubmitted under a new key meanwhile
                status = fut.status
                if status == "finished":
                    finished.append((e.item, fut))
                    if e.where == "started" and self._is_near(e.worker, e.host):
                        holder[dkey] = e.worker
                else:
                    other.append((e.item, fut, status))
        for att, fut, status in other:
            self._on_unfinished(att, fut, status, events, cancel)
        if not finished:
            return
        try:
            values, direct = fetch_values(
                self.conn.client, [(a.dkey, f) for a, f in finished], holder
            )
            pairs = list(zip([a for a, _ in finished], values, strict=True))
            if self._fetched is not None:
                self._fetched([a.dkey for a, _ in finished], direct)
        except Exception:  # one by one; a result lost with its worker fails its attempt
            pairs = []
            for att, fut in finished:
                if fut.status == "finished":
                    with contextlib.suppress(Exception):
                        pairs.append((att, fut.result(timeout=5)))
                        continue
                self._on_unfinished(att, fut, fut.status, events, cancel)
        with fl.lock:
            for att, res in pairs:
                self._deliver_locked(att, res, events, cancel)

    def _deliver_locked(self, att: Att, res: Any, events: list[Any], cancel: list[Any]) -> None:
        fl = self.flight
        e = fl.ledger.get(att.m.attempt)
        if e is None or e.item is not att:
            return
        if isinstance(res, NotStarted):
            self._not_started_locked(att, e, res, events, cancel)
            return
        if isinstance(res, InputMissing):
            fl.unlink_locked(att, res.reason, events, cancel)
            return
        if not isinstance(res, Result):
            fl.env_error_locked(att, TypeError(f"unexpected task result {res!r}"), events)
            return
        cmds: list[L.Command] = []
        if e.where == "queued":  # its `started` message was missed: the result proves it
            cmds += fl.start_granted_locked(
                L.Start(res.worker, e.attempt, res.pid, res.host, res.started)
            )
        cmds += fl.ledger.handle(L.Finish(res.worker, e.attempt))
        out = fl.carry_out(cmds, {e.attempt: att}, events, cancel)
        if out.accepted:
            events.append(res)
        else:
            log.info(
                "pilotfish: dropped the result of attempt %s from Dask worker %s: %s",
                e.attempt,
                res.worker,
                out.reasons(),
            )

    def _not_started_locked(
        self, att: Att, e: L.Entry, res: NotStarted, events: list[Any], cancel: list[Any]
    ) -> None:
        """The start fence refused the task's run: nothing ran."""
        fl = self.flight
        now = time.time()
        if e.where == "started":
            # Dask ran its task again (the fence refused: nothing ran) and our future
            # now holds that, so the started run's result cannot arrive through it
            why = (
                f"Dask ran its task again on {res.worker}, where pilotfish's start fence "
                "refused it (user code did not run there), so the result of the run "
                f"that started cannot reach the client"
            )
        else:  # never started: given back, sent again unblamed
            why = f"pilotfish's start fence refused it on Dask worker {res.worker}: "
            why += res.reason
        refused_drained = res.drained and e.where != "started"
        if refused_drained and res.worker not in fl.ledger.drained:
            # a worker of a drained place that joined after the drain (a nanny's restart)
            dcmds = fl.ledger.handle(L.Drain(res.worker, res.reason, now))
            fl.carry_out(dcmds, {}, events, cancel)
        fl.bounce_locked(att, why, now, events, cancel, refused_drained)
        if refused_drained:
            self.workers.every_worker_drained_locked(events)

    def _on_unfinished(
        self, att: Att, fut: Any, status: str, events: list[Any], cancel: list[Any]
    ) -> None:
        if att.m.links and status != "cancelled" and self._unlink(att, status, events, cancel):
            return
        if status == "cancelled":
            self._on_cancelled(att, fut, events, cancel)
        elif status == "error":
            self._on_error(att, fut, events, cancel)
        else:  # "lost"/"pending": Dask lost the result with its worker and recomputes
            with self.flight.lock:
                self.flight.bounce_locked(
                    att,
                    "the Dask worker that held its result was lost before the client could "
                    "fetch it",
                    time.time(),
                    events,
                    cancel,
                )

    def _on_cancelled(self, att: Att, fut: Any, events: list[Any], cancel: list[Any]) -> None:
        reason = ""
        try:
            fut.result(timeout=5)
        except BaseException as e:
            reason = str(getattr(e, "reason", "") or e)
        if CONN_LOST in reason:
            self._on_conn_lost()  # the scheduler watch decides: lost or resubmitted
            return
        if att.m.links and self._unlink(att, "cancelled", events, cancel):
            return
        with self.flight.lock:
            self.flight.bounce_locked(
                att,
                f"its Dask task was cancelled by someone else ({reason})",
                time.time(),
                events,
                cancel,
            )

    def _unlink(self, att: Att, status: str, events: list[Any], cancel: list[Any]) -> bool:
        """A linked attempt's Dask task ended ``status`` before it started: Dask does
        that when a task it depends on is cancelled, lost or failed (the input attempt
        was withdrawn or lost). Unlinked, not sent again with the same links; True if so
        (False: it had started, and its loss is handled as any other)."""
        why = f"its Dask task was {status} before it started (a task it depends on was"
        with self.flight.lock:
            return self.flight.unlink_locked(
                att, f"{why} withdrawn, lost or failed)", events, cancel
            )

    def _on_error(self, att: Att, fut: Any, events: list[Any], cancel: list[Any]) -> None:
        try:
            exc = fut.exception(timeout=5)
        except BaseException as e:
            exc = e
        if isinstance(exc, distributed.KilledWorker) or type(exc).__name__ == "KilledWorker":
            last = ""
            with contextlib.suppress(Exception):
                last = f" (last on worker {exc.last_worker.address})"
            with self.flight.lock:
                self.flight.bounce_locked(
                    att,
                    f"Dask gave up on its task after workers died running it{last}",
                    time.time(),
                    events,
                    cancel,
                )
            return
        if exc is None:
            exc = RuntimeError(f"Dask future ended with status {fut.status!r}")
        with self.flight.lock:
            self.flight.env_error_locked(att, exc, events)
