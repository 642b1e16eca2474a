"""Handing attempts to Dask: the submitter thread, in batches.

``DaskBackend.submit`` only registers an attempt (:meth:`.flight.Flight.queue_locked`);
the :class:`Submitter`'s thread hands everything pending to Dask with one
``Client.map`` per batch (one graph update on the scheduler per batch, not per
attempt), each attempt as one Dask task (:func:`.worker.attempt_on_worker`) under a
unique key, ``pure=False``, ``retries=0``. An attempt cancelled, lost or stopped before
its Dask future exists is skipped, or its late future cancelled.

A *linked* attempt (``RunAttempt.links``: its inputs were still running when it was
dispatched) is a Dask task that depends on its inputs' tasks: their futures are its
``inputs`` argument, so Dask's scheduler runs it where their values are once they are
done, as it chains any graph. It is handed over after them (in rounds, within a batch);
one whose input attempt has no future any more (it ended, was lost, or was sent again
and is not yet handed over) is not submitted: the session is told ``Unlinked`` and sends
it again once its inputs are DONE. Each batch's futures
are watched from the client's event loop (one hand-over per batch): their ends reach
the backend's stimulus queue as ``("done", future, dask key, attempt id)``.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from distributed.client import done_callback as _done_callback

from ...wire.messages import RunAttempt
from .connection import Connection
from .flight import Att, Flight
from .worker import attempt_on_worker

__all__ = ["Submitter", "gather_delay"]

log = logging.getLogger("pilotfish.dask")

#: the least time a Dask task takes end to end (a no-op: ~1 ms), and the longest the
#: submitter lets attempts gather while Dask's workers have a backlog (gather_delay)
TASK_MIN = 0.001
GATHER_MAX = 0.02


def gather_delay(pending: Sequence[Att], in_flight: int, started: int, live: int) -> float:
    """How long to let more pending attempts gather before handing them to Dask: each
    ``Client.map`` is one graph update, whose fixed cost on the scheduler (a hand-off
    to a thread among it) outweighs a few attempts' own, and a dependency chain's next
    steps arrive one by one. Only while Dask holds so many attempts that have not
    started that its workers stay busy meanwhile: a quarter of that backlog's run time
    at :data:`TASK_MIN` per attempt, at most :data:`GATHER_MAX`. Never for a retry or
    a resend.

    ``pending``: the attempts not yet handed to Dask; ``in_flight``: every attempt in
    the ledger (pending ones too); ``started``: those running; ``live``: the workers."""
    if not pending:
        return 0.0
    if any(a.resubmits or len(a.m.lineage) > 1 for a in pending):
        return 0.0
    backlog = in_flight - started - len(pending)
    slots = max(started, live, 1)
    delay = min(GATHER_MAX, backlog / slots * TASK_MIN / 4)
    return delay if delay >= 0.001 else 0.0


def _watch_futures(loop: Any, items: list[tuple[Any, str, int]], put: Callable[..., None]) -> None:
    """On the Dask client's event loop: put ``("done", future, dkey, attempt)`` once each
    future is done. What ``Future.add_done_callback`` does, without its per-future wake-up
    of the loop from another thread and hop through Dask's callback thread."""
    for f, dkey, aid in items:
        loop.add_callback(_done_callback, f, functools.partial(_report_done, put, dkey, aid))


def _report_done(put: Callable[..., None], dkey: str, aid: int, fut: Any) -> None:
    put(("done", fut, dkey, aid))


class Submitter:
    """The thread that hands pending attempts to Dask. ``put``: the backend's stimulus
    queue; ``before_batch``: a test hook (:class:`.backend.DaskHooks`)."""

    def __init__(
        self,
        flight: Flight,
        conn: Connection,
        rundir: str,
        put: Callable[[tuple[Any, ...]], None],
        stopping: threading.Event,
        before_batch: Callable[[list[RunAttempt]], None] | None = None,
        elsewhere: Callable[[tuple[str, ...]], list[str]] | None = None,
    ) -> None:
        self.flight = flight
        #: the live workers that are none of these places (a retry's ``avoid``)
        self._elsewhere_of = elsewhere
        self.conn = conn
        self.rundir = rundir
        self._put = put
        self._stopping = stopping
        self._before_batch = before_batch
        self._newest_order = 0  # the latest task (submission order) handed to Dask

    def run(self) -> None:
        """Hand pending attempts to Dask, many per ``Client.map`` (one graph update each)."""
        fl = self.flight
        while True:
            fl.wake.wait()
            delay = self._delay()
            if delay:
                self._stopping.wait(delay)
            fl.wake.clear()
            with fl.lock:
                if fl.stopped:
                    return
                batch = [a for a in fl.pending if fl.current(a)]
                fl.pending = []
                fence = self.conn.fence_op
            if batch:
                try:
                    self._submit_batch(batch, fence)
                except Exception as e:  # never strand an attempt: report it lost
                    log.exception("pilotfish: could not submit attempts to Dask")
                    why = f"the Dask client could not submit it: {type(e).__name__}: {e}"
                    failed: list[Any] = []
                    with fl.lock:
                        for a in batch:
                            if fl.current(a) and a.fut is None:
                                fl.give_up_locked(a, "runtime_lost", why, failed)
                    if failed:
                        self._put(("emit", failed))  # from the event thread, in order

    def _delay(self) -> float:
        fl = self.flight
        with fl.lock:
            if fl.stopped:
                return 0.0
            started = len(fl.ledger.started())
            return gather_delay(fl.pending, len(fl.ledger), started, len(fl.live))

    def _submit_batch(self, batch: list[Att], fence: str) -> None:
        if self._before_batch is not None:
            self._before_batch([a.m for a in batch])
        # Retries keep their place: an attempt of a task submitted before the newest one
        # already handed over (a retry, or a resend) goes ahead of Dask's FIFO order
        # (linked attempts go after the inputs they depend on: _submit_linked)
        newest = self._newest_order
        ahead: list[Att] = []
        fresh: list[Att] = []
        linked: list[Att] = []
        for a in batch:
            (linked if a.m.links else ahead if 0 < a.m.order < newest else fresh).append(a)
        self._newest_order = max(newest, max((a.m.order for a in batch), default=0))
        futs = self._hand(ahead, fence, 1) + self._hand(fresh, fence, 0)
        self._handed_over(ahead + fresh, futs)
        if linked:
            self._submit_linked(linked, fence)

    def _hand(
        self, atts: list[Att], fence: str, priority: int, inputs: list[list[Any]] | None = None
    ) -> list[Any]:
        """The Dask futures of ``atts`` (``inputs``: each linked one's input futures), in
        order: a retry that should go elsewhere submitted alone, restricted; the rest in
        one ``Client.map``."""
        where = {id(a): self._elsewhere(a) for a in atts if a.m.avoid}
        bulk = [k for k, a in enumerate(atts) if not where.get(id(a))]
        picked = None if inputs is None else [inputs[k] for k in bulk]
        mapped = iter(self._map([atts[k] for k in bulk], fence, priority, picked))
        return [
            self._submit_elsewhere(a, where[id(a)], fence, None if inputs is None else inputs[k])
            if where.get(id(a))
            else next(mapped)
            for k, a in enumerate(atts)
        ]

    def _handed_over(self, batch: list[Att], futs: list[Any]) -> None:
        """Record the futures of ``batch`` and watch them; cancel those whose attempt was
        cancelled, lost or stopped while it was submitted."""
        late = []
        fl = self.flight
        with fl.lock:
            for a, f in zip(batch, futs, strict=True):
                if fl.current(a):
                    a.fut = f
                else:  # cancelled, lost or stopped while we submitted it
                    late.append(f)
        watch = [(f, a.dkey, a.m.attempt) for a, f in zip(batch, futs, strict=True) if a.fut is f]
        if watch:  # one hand-over to the client's event loop per batch
            loop = self.conn.client.loop
            loop.add_callback(_watch_futures, loop, watch, self._put)
        self.conn.cancel(late)

    def _submit_linked(self, linked: list[Att], fence: str) -> None:
        """Hand over linked attempts, each with its inputs' futures, in rounds: one
        whose inputs are in this batch goes after them (a chain is one round per link).
        One whose input has no future and is not in this batch is ``Unlinked``."""
        fl = self.flight
        while linked:
            ready: list[tuple[Att, list[Any]]] = []
            later: list[Att] = []
            events: list[Any] = []
            cancel: list[Any] = []
            here = {a.m.attempt for a in linked}
            with fl.lock:
                for a in linked:
                    if not fl.current(a):
                        continue
                    inputs = [fl.input_future_locked(aid) for _, aid in a.m.links]
                    gone = [aid for (_, aid), f in zip(a.m.links, inputs, strict=True) if f is None]
                    if not gone:
                        ready.append((a, inputs))
                    elif all(aid in here for aid in gone):
                        later.append(a)
                    else:
                        why = f"its input attempt {gone[0]} was no longer in flight at Dask"
                        fl.unlink_locked(a, why, events, cancel)
                if not ready:  # what waited for an input of this batch that was not sent
                    for a in later:
                        fl.unlink_locked(a, "its input was not handed to Dask", events, cancel)
                    later = []
            if events:
                self._put(("emit", events))
            self.conn.cancel(cancel)
            if ready:
                atts = [a for a, _ in ready]
                self._handed_over(atts, self._hand(atts, fence, 0, [i for _, i in ready]))
            linked = later

    def _elsewhere(self, a: Att) -> list[str]:
        """Where a retry goes: the live workers that are not where its task's earlier
        attempts were lost or timed out ([]: no restriction)."""
        if not a.m.avoid or self._elsewhere_of is None:
            return []
        return self._elsewhere_of(a.m.avoid)

    def _submit_elsewhere(
        self, a: Att, others: list[str], fence: str, inputs: list[Any] | None = None
    ) -> Any:
        """A retry goes to another worker while one is there (a preference, with
        ``allow_other_workers``: if they all leave, any worker will do), so one bad node
        does not get the same task again and again."""
        return self.conn.client.submit(
            attempt_on_worker,
            a.m,
            a.dkey,
            fence,
            self.rundir,
            self.conn.topic,
            self.flight.timeout_restart,
            *([inputs] if inputs is not None else []),
            key=a.dkey,
            pure=False,
            retries=0,
            workers=others,
            allow_other_workers=True,
            priority=1,
        )

    def _map(
        self, batch: list[Att], fence: str, priority: int, inputs: list[list[Any]] | None = None
    ) -> list[Any]:
        if not batch:
            return []
        n = len(batch)
        keys = [a.dkey for a in batch]
        extra = [inputs] if inputs is not None else []  # a linked attempt's input futures
        futs: list[Any] = self.conn.client.map(
            attempt_on_worker,
            [a.m for a in batch],
            keys,
            [fence] * n,
            [self.rundir] * n,
            [self.conn.topic] * n,
            [self.flight.timeout_restart] * n,
            *extra,
            key=keys,
            pure=False,
            retries=0,
            batch_size=None,
            priority=priority,
        )
        return futs
