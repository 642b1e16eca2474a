"""The attempts a Dask session has in flight, and where each can go next.

:class:`Flight` owns the shared attempt ledger (:class:`pilotfish.core.ledger.Ledger`,
whose entries' ``item`` is an :class:`Att`: one attempt's Dask key and future), the
attempts waiting to be handed to Dask (``pending``) or held back while every worker is
drained (``parked``), and the one lock that guards all of it. The other pieces of the
backend (submitter, results, workers, scheduler watch, timeouts) change the ledger
only through it, with ``lock`` held (methods named ``..._locked``): ``events`` are what
the session is told, ``cancel`` the Dask futures to cancel once the lock is released.

:class:`Step` is the backend's answer to each of the ledger's commands (the hooks of
:func:`pilotfish.backends._driver.carry_out`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from ...core import ledger as L
from ...wire.messages import Lost, RunAttempt, Unlinked
from .._driver import Driver, Outcome, carry_out, environment_result
from .fence import dask_key

__all__ = ["Att", "Flight", "Step"]

#: how often an attempt is sent again unblamed (a new Dask key) before it is given up
MAX_RESUBMITS = 10


@dataclass(slots=True, eq=False)
class Att:
    """A ledger entry's ``item``: the Dask plumbing of one attempt (its Dask key and
    future). A resubmission gets a new one, with a new key."""

    m: RunAttempt
    dkey: str
    fut: Any = None
    resubmits: int = 0


class Step:
    """The Dask backend's hooks for the ledger's commands (:func:`._driver.carry_out`),
    for one step of the event thread (lock held): ``events`` for the session, ``cancel``
    the Dask futures to cancel afterwards, ``restart`` the workers to end (timeouts).
    ``items``: the attempts the commands may name (one the ledger let go of is no longer
    in it); ``where``: text to add to their ``Lost`` reports."""

    __slots__ = ("cancel", "events", "flight", "items", "restart", "where")

    def __init__(
        self,
        flight: Flight,
        items: dict[int, Att],
        events: list[Any],
        cancel: list[Any],
        where: dict[int, str] | None = None,
    ) -> None:
        self.flight, self.items, self.events, self.cancel = flight, items, events, cancel
        self.where = where
        self.restart: set[str] = set()

    def report(self, msg: L.Started | L.Lost) -> None:
        if isinstance(msg, Lost):
            att = self.items.get(msg.attempt)
            if att is not None:  # Dask may still be rerunning it: not any more
                self.cancel.append(att.fut)
            if self.where and msg.attempt in self.where:
                msg = msg._replace(message=msg.message + self.where[msg.attempt])
        self.events.append(msg)

    def send(self, items: tuple[Any, ...], resend: bool) -> None:
        for it in items:  # requeued or resent alike: under a new Dask key, unblamed
            self.flight.resubmit_locked(it, self.cancel)

    def withdraw(self, worker: str, attempt: int) -> None:
        att = self.items.get(attempt)
        if att is not None:
            self.cancel.append(att.fut)

    def kill_groups(self, worker: str, pgids: tuple[int, ...]) -> None:
        pass  # never asked: no Group events (a Dask worker's programs have no master)

    def expire(
        self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...], key: str = ""
    ) -> None:
        att = self.items.get(attempt)
        if att is None:
            return
        self.cancel.append(att.fut)
        if self.flight.timeout_restart:
            self.restart.add(worker)
            self.flight.restarting[worker] = (
                f"task {att.m.key!r} exceeded its timeout of {att.m.timeout:g} s"
            )


class Flight:
    """Every attempt in flight, what Dask's signals mean for it (the ledger), and the
    queues to Dask. ``lock`` guards every attribute; ``live`` (the worker addresses in
    the cluster now) and ``lost_since`` (monotonic time the scheduler connection was
    lost; None: connected) are kept here because they decide where an attempt goes."""

    def __init__(self, driver: Driver, token: str, timeout_restart: bool) -> None:
        self.lock = threading.Lock()
        self.driver = driver
        self.token = token
        self.timeout_restart = timeout_restart
        self.ledger = L.Ledger(max_returns=MAX_RESUBMITS)
        self.pending: list[Att] = []  # in the ledger, not yet handed to Dask
        self.parked: list[Att] = []  # held back while every worker is drained
        self.wake = threading.Event()  # the submitter has pending attempts
        self.live: set[str] = set()
        self.lost_since: float | None = None
        self.stopped = False
        self.restarting: dict[str, str] = {}  # worker address -> why we restarted it

    def dkey(self, a: RunAttempt, n: int) -> str:
        """The Dask key of attempt ``a``'s ``n``-th submission (the start fence knows its
        session's keys by it)."""
        return dask_key(a.key, a.attempt, self.token, n)

    def current(self, att: Att) -> bool:
        e = self.ledger.entries.get(att.m.attempt)
        return e is not None and e.item is att

    def in_flight(self) -> int:
        """How many attempts are in the ledger or still waiting to be handed to Dask."""
        with self.lock:
            return len(set(self.ledger.entries) | {a.m.attempt for a in self.pending})

    def usable_locked(self) -> bool:
        """Is a worker in the cluster that pilotfish has not drained?"""
        drained = self.ledger.drained
        return any(a not in drained for a in self.live)

    def queue_locked(self, att: Att) -> None:
        """A new attempt: parked while every worker is drained, else pending (unless the
        scheduler is lost: then the ledger resends it when it is back)."""
        if self.live and not self.usable_locked():
            self.parked.append(att)
        elif self.lost_since is None:
            self.pending.append(att)

    def unpark_locked(self) -> None:
        """A worker that is not drained joined: send what waited."""
        if self.parked:
            self.pending.extend(a for a in self.parked if self.current(a))
            self.parked.clear()
            self.wake.set()

    def drop_queued_locked(self) -> None:
        self.pending.clear()
        self.parked.clear()

    def step(
        self,
        items: dict[int, Att],
        events: list[Any],
        cancel: list[Any],
        where: dict[int, str] | None = None,
    ) -> Step:
        return Step(self, items, events, cancel, where)

    def carry_out(
        self, cmds: list[L.Command], items: dict[int, Att], events: list[Any], cancel: list[Any]
    ) -> Outcome:
        """Carry out the ledger's commands (:class:`Step`); ``items``: the attempts they
        may name (an attempt the ledger let go of is no longer in it)."""
        return carry_out(cmds, Step(self, items, events, cancel))

    def start_granted_locked(self, ev: L.Start) -> list[L.Command]:
        """The ledger's commands for a start the scheduler's fence granted: recorded even
        on a worker the client drained meanwhile (the fence, not yet told or told just
        after the start, let it run: a drain after a grant does not undo it)."""
        drained = self.ledger.drained.pop(ev.worker, None)
        try:
            return self.ledger.handle(ev)
        finally:
            if drained is not None:
                self.ledger.drained[ev.worker] = drained

    def resubmit_locked(self, old: Att, cancel: list[Any]) -> None:
        """The ledger sends ``old`` again (it never started): a new Dask key, unblamed."""
        if not self.current(old):
            return
        cancel.append(old.fut)
        n = old.resubmits + 1  # names its next Dask key (the ledger counts what counts)
        new = Att(old.m, self.dkey(old.m, n), resubmits=n)
        self.ledger.handle(L.Renamed(old.m.attempt, new))
        if self.live and not self.usable_locked():  # sent when a usable worker joins
            self.parked.append(new)
        elif self.lost_since is None and not self.driver.dead:  # else resent when back
            self.pending.append(new)
            self.wake.set()

    def give_up_locked(self, att: Att, category: str, why: str, events: list[Any]) -> None:
        """An attempt that never started cannot be run: it leaves the ledger, lost."""
        why = f"task {att.m.key!r} (attempt id {att.m.attempt}): {why}"
        cmds = self.ledger.handle(L.Unrunnable(att.m.attempt, category, why, time.time()))
        self.carry_out(cmds, {}, events, [])  # its Dask future, if any, ends by itself

    def bounce_locked(
        self,
        att: Att,
        why: str,
        now: float,
        events: list[Any],
        cancel: list[Any],
        drained: bool = False,
    ) -> None:
        """Dask gave ``att`` back: lost if it started, else sent again unblamed."""
        e = self.ledger.get(att.m.attempt)
        if e is None or e.item is not att:
            return
        where = ""
        if e.where == "started":
            where = f"; it ran on Dask worker {e.worker} (pid {e.pid}) at host {e.host}"
        msg = f"task {e.key!r} (attempt id {e.attempt}) was lost: {why}{where}"
        cmds = self.ledger.handle(L.Bounce(e.attempt, msg, now, drained))
        self.carry_out(cmds, {e.attempt: att}, events, cancel)

    def unlink_locked(self, att: Att, why: str, events: list[Any], cancel: list[Any]) -> bool:
        """A linked attempt that cannot take its inputs' values (see
        :mod:`pilotfish.backends.base`): it leaves the ledger unrun, and the session is
        told (``Unlinked``: it waits for its inputs to be DONE); True if so. One that
        started runs on (False): its end decides."""
        e = self.ledger.get(att.m.attempt)
        if e is None or e.item is not att or e.where == "started":
            return False
        self.ledger.handle(L.Revoke((e.attempt,)))
        if att.fut is not None:
            cancel.append(att.fut)
        events.append(Unlinked(att.m.attempt, f"task {att.m.key!r}: {why}", time.time()))
        return True

    def input_future_locked(self, attempt: int) -> Any:
        """The Dask future of in-flight attempt ``attempt`` (None: not in flight, or not
        handed to Dask yet): what a linked attempt depends on."""
        e = self.ledger.get(attempt)
        return None if e is None else e.item.fut

    def env_error_locked(self, att: Att, exc: BaseException, events: list[Any]) -> None:
        """Dask could not run the task: an ENVIRONMENT error, not retried."""
        e = self.ledger.get(att.m.attempt)
        if e is None or e.item is not att:
            return
        if e.where == "started":
            self.ledger.handle(L.Finish(e.worker, e.attempt))
        else:  # it failed before it reached the start fence (e.g. pilotfish not importable)
            self.ledger.handle(L.Revoke((e.attempt,)))  # (a queued one: no command back)
        message = (
            f"Dask could not run task {att.m.key!r} (attempt id {att.m.attempt})"
            f"{' on worker ' + e.worker if e.worker else ''}: "
            f"{type(exc).__name__}: {exc}. Is pilotfish (the same version as on the "
            "client) installed in the environment of the Dask workers and scheduler?"
        )
        events.append(environment_result(att.m.attempt, message, e, exc))
