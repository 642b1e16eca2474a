"""The radical backend's attempts in flight: each one's RP task, and the client's sweep.

An attempt the backend sent is an entry of its ledger (:mod:`pilotfish.core.ledger`:
queued at the master, or started on a worker) whose item is an :class:`Att`: the
``RunAttempt`` and the uid of the RP task it is under now. :class:`InFlight` holds
both the ledger and the uid -> attempt map, makes the RP tasks (a new uid each time an
attempt is sent, again or to a new master), and decides the client's sweep: which
attempts to ask the master about (:meth:`InFlight.due`) and which to send again on its
answer (:meth:`InFlight.sweep_answer`). :class:`Step` is the backend's hooks for the
ledger's commands.
"""

from __future__ import annotations

import base64
import pickle
from dataclasses import dataclass
from typing import Any

import radical.pilot as rp

from ...core import ledger as L
from ...wire.messages import RunAttempt

__all__ = ["Att", "InFlight", "Step"]


@dataclass(slots=True)
class Att:
    """The RP task of an attempt (a ledger entry's item): where it runs is the ledger's."""

    m: RunAttempt
    uid: str
    gen: int
    sent: float = 0.0  # when submitted (monotonic)
    asked: float = 0.0  # when a sweep last asked the master about it
    resent: int = 0  # how often the master did not receive it (each time waits twice as long)
    known: bool = False  # the master said it received it (a sweep asks no more)


class Step:
    """The RADICAL-Pilot backend's hooks for the ledger's commands
    (:func:`.._driver.carry_out`): ``events`` for the session; ``resend`` the attempts
    to send to the next master and ``stale`` their old RP task uids; ``withdrawn`` the
    uids of tasks to withdraw from the master (``items``: the attempts a command may
    name after the ledger let go of them)."""

    __slots__ = ("events", "items", "resend", "stale", "withdrawn")

    def __init__(self, events: list[Any], items: dict[int, Att] | None = None) -> None:
        self.events = events
        self.items = items or {}
        self.resend: list[RunAttempt] = []
        self.stale: list[str] = []
        self.withdrawn: list[str] = []

    def report(self, msg: L.Started | L.Lost) -> None:
        self.events.append(msg)

    def send(self, items: tuple[Any, ...], resend: bool) -> None:
        # Resend (the master is lost): never started, so sent again unblamed. The
        # client-side ledger never requeues (its workers are the master's business)
        self.resend.extend(att.m for att in items)
        self.stale.extend(att.uid for att in items)

    def withdraw(self, worker: str, attempt: int) -> None:
        att = self.items.get(attempt)
        if att is not None:
            self.withdrawn.append(att.uid)

    def kill_groups(self, worker: str, pgids: tuple[int, ...]) -> None:
        pass  # never asked: no Group events here (the raptor master kills those groups)

    def expire(
        self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...], key: str = ""
    ) -> None:
        pass  # never asked: no TimePassed here (RP's task timeout and the raptor worker stop it)


class InFlight:
    """The attempts the current master has (see the module docstring). Not locked
    itself: the backend changes it under its own lock."""

    def __init__(self, token: str, resend_after: float) -> None:
        self._token = token
        self._resend_after = resend_after
        # the attempts the master has: queued, or started (which worker, pid, host)
        self.ledger = L.Ledger()
        self._by_uid: dict[str, int] = {}  # RP task uid -> attempt id
        self._n = 0

    def clear(self) -> list[L.Entry]:
        """Nothing in flight any more: what was (the master and its tasks are gone)."""
        gone = list(self.ledger.entries.values())
        self.ledger = L.Ledger()
        self._by_uid.clear()
        return gone

    def task(self, a: RunAttempt, master_uid: str, gen: int, now: float) -> tuple[Att, Any]:
        """A new RP task (a new uid) for attempt ``a`` on master ``master_uid`` of
        generation ``gen``, sent at monotonic ``now``."""
        self._n += 1
        tag = a.attempt if a.attempt > 0 else f"p{-a.attempt}"  # probes: < 0
        uid = f"pf.{self._token}.{tag}.{self._n}"
        self._by_uid[uid] = a.attempt
        td = rp.TaskDescription(
            {
                "uid": uid,
                "mode": rp.TASK_FUNCTION,
                "function": "pilotfish_run",
                "args": [base64.b64encode(pickle.dumps(a, 5)).decode("ascii")],
                "raptor_id": master_uid,
            }
        )
        if a.kind == "call" and a.timeout:
            td.timeout = float(a.timeout)
        return Att(a, uid, gen, now), td

    def entry(self, uid: str) -> L.Entry | None:
        """The ledger entry of the attempt RP task ``uid`` is for, while it is (None once
        the attempt ended, was cancelled, or was sent again under another uid)."""
        aid = self._by_uid.get(uid)
        e = self.ledger.get(aid) if aid is not None else None
        return e if e is not None and e.item.uid == uid else None

    def attempt(self, uid: str) -> int | None:
        return self._by_uid.get(uid)

    def pop(self, uid: str) -> L.Entry | None:
        """The attempt of RP task ``uid`` has ended: out of the ledger (None if it was
        not in flight: cancelled by us, or already reported lost)."""
        aid = self._by_uid.pop(uid, None)
        e = self.ledger.get(aid) if aid is not None else None
        if e is None or e.item.uid != uid:
            return None
        # the master fenced it; a result may come before we heard that it started
        end = L.Finish(e.worker, e.attempt) if e.where == "started" else L.Revoke((e.attempt,))
        self.ledger.handle(end)
        return e

    def grace(self, att: Att) -> float:
        """How long ``att`` may be on its way to the master: ``resend_after``, twice as
        long for each time it was sent again (an RP that slow is not taken as lossy for
        ever)."""
        return float(self._resend_after * 2 ** min(att.resent, 5))

    def due(self, gen: int, up: float, now: float) -> list[Att]:
        """The attempts to ask the master of generation ``gen`` (up since ``up``) about
        at monotonic ``now`` (at most 1,000), marked as asked: not started, not confirmed
        by it, and on their way longer than their :meth:`grace` (since it was up)."""
        due = [
            e.item
            for e in self.ledger.entries.values()
            if e.where == "queued"
            and not e.item.known
            and e.item.gen == gen
            and now - max(e.item.sent, e.item.asked, up) > self.grace(e.item)
        ][:1000]
        for att in due:
            att.asked = now
        return due

    def sweep_answer(
        self, known: set[str], withdrawn: set[str], master_uid: str, gen: int, now: float
    ) -> tuple[list[RunAttempt], list[Any], list[str]]:
        """The master has the tasks ``known`` and took ``withdrawn`` as lost on the way:
        the attempts to send again, their new RP tasks, and the old uids."""
        again: list[RunAttempt] = []
        tds: list[Any] = []
        old: list[str] = []
        for uid in known | withdrawn:
            e = self.entry(uid)
            if e is None:
                continue  # ended, cancelled, or sent again already
            if uid not in withdrawn:
                e.item.known = True
                continue
            if e.where != "queued":
                continue  # cannot be: the master started what it never received
            att, td = self.task(e.item.m, master_uid, gen, now)
            att.resent = e.item.resent + 1
            self._by_uid.pop(uid, None)
            self.ledger.handle(L.Renamed(e.attempt, att))
            again.append(att.m)
            tds.append(td)
            old.append(uid)
        return again, tds, old
