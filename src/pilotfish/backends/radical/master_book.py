"""The raptor master's bookkeeping, without RADICAL-Pilot: ledger, queue, arrivals, workers.

:class:`MasterBook` is everything :class:`pilotfish.backends.radical.master.PilotfishMaster`
knows about tasks and workers, and every rule it applies to them (see that module's
docstring for why each exists): which tasks are its own, the claim and start fences,
the results it accepts, the tasks it pushes again on RP's queue (lost in transit,
unclaimed while a worker is idle), the client's sweep and cancel, a lost worker's
tasks. The master is the RP component around it: it turns RP's callbacks and requests
into calls of this book, and the book asks it to act through a :class:`MasterPort`
(put tasks on RP's queue, cancel or fail them, publish a start, log). Tests build a
book with a port that records, and no pilot.

The ledger (:mod:`pilotfish.core.ledger`, keyed by the number at the end of a task's
uid, see :func:`attempt_id`) answers every event with commands, and the book carries
them out with the backends' one runner, :func:`pilotfish.core.ledger.carry_out`, through
:class:`_Step`: a command the ledger gains and the master does not handle is a mypy
error, not a silently skipped one.

Loaded inside the pilot by :mod:`.master` (absolute imports only, like it).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from pilotfish.backends.radical.arrivals import Arrivals, attempt_id
from pilotfish.core import ledger as L

__all__ = ["IDLE_GRACE", "MasterBook", "MasterPort", "client_worker_uids"]

_TRANSIT_GRACE = 1.0  # s after a later task was claimed, an unclaimed one is taken as lost
IDLE_GRACE = 3.0  # s a task may wait unclaimed on the queue while a worker holds nothing

Task = dict[str, Any]  # RP's record of a task, as the master gets it


def client_worker_uids(master_uid: str, n: int) -> list[str]:
    """The RP task uids of the ``n`` workers the client submits together with the
    master ``master_uid`` (so they start while the master does); RP names the ones the
    master submits itself (replacements) ``<master>.worker.NNNN``."""
    return [f"{master_uid}.worker.c{i:04d}" for i in range(n)]


class MasterPort(Protocol):
    """What the book asks RADICAL-Pilot to do (called without the book's lock)."""

    def push(self, tasks: list[Task]) -> None:
        """Put these tasks (back) on RP's queue for the workers."""

    def cancel(self, tasks: list[Task]) -> None:
        """Have RP cancel these tasks (never run here)."""

    def fail(self, task: Task, info: dict[str, Any], code: int) -> None:
        """Advance ``task`` to FAILED with ``info`` as its return value."""

    def publish_start(self, uid: str, info: dict[str, Any]) -> None:
        """Tell the client that task ``uid`` runs now, where (``info``)."""

    def kill_groups(self, pgids: tuple[int, ...]) -> None:
        """Kill these program process groups (their worker is gone)."""

    def log(self, msg: str) -> None:
        """A line in the master's log."""


class _Step:
    """The master's hooks for the ledger's commands (:func:`pilotfish.core.ledger.carry_out`),
    collected under the book's lock and acted on after it: ``lost`` the reports of running
    tasks lost with their worker, ``requeued`` the tasks to put back on RP's queue,
    ``withdrawn`` the tasks taken back, ``pgids`` the process groups to kill. ``items``:
    the tasks a command may name after the ledger let go of them."""

    __slots__ = ("items", "lost", "pgids", "requeued", "withdrawn")

    def __init__(self, items: dict[int, Task] | None = None) -> None:
        self.items = items or {}
        self.lost: list[L.Lost] = []
        self.requeued: list[Task] = []
        self.withdrawn: list[Task] = []
        self.pgids: list[int] = []

    def report(self, msg: L.Started | L.Lost) -> None:
        if isinstance(msg, L.Lost):
            self.lost.append(msg)
        # a Started is published by MasterBook.start itself, with the master's pid and host

    def send(self, items: tuple[Any, ...], resend: bool) -> None:
        # Requeue (a lost worker's held tasks, or a drained start): back on RP's queue.
        # Resend never comes: no RuntimeLost here (the master is the runtime)
        self.requeued.extend(items)

    def withdraw(self, worker: str, attempt: int) -> None:
        task = self.items.get(attempt)
        if task is not None:
            self.withdrawn.append(task)

    def kill_groups(self, worker: str, pgids: tuple[int, ...]) -> None:
        self.pgids.extend(pgids)

    def expire(
        self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...], key: str = ""
    ) -> None:
        pass  # never asked: no TimePassed here (RP's task timeout and the worker stop it)


class MasterBook:
    """See the module docstring. ``token``: the client's (its tasks' uids carry it);
    ``uid``: the master's RP uid (tasks name it as their ``raptor_id``); ``clock``: the
    monotonic clock of every grace period (tests pass their own).

    Public state, read by the master and by tests, changed only under ``lock``:
    ``ledger``, ``workers`` (worker uid -> record: ``state``, ``pid``, ``host``, ...),
    ``env_problem`` (a failed pre-flight: every task fails), ``up`` (RP registered the
    master's queue), ``stopping``."""

    def __init__(
        self,
        port: MasterPort,
        *,
        token: str = "",
        uid: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port = port
        self.token = token
        self.uid = uid
        self.clock = clock
        self.lock = threading.RLock()
        self.ledger = L.Ledger()  # every task it received, until finished or lost
        self.workers: dict[str, dict[str, Any]] = {}  # worker uid -> record
        self.env_problem = ""
        self.up = False  # registered with RP's scheduler: tasks can arrive
        self.stopping = False
        self._doomed: list[Task] = []  # to fail: pre-flight failed
        # unclaimed task uid -> its place on RP's queue, in push order (RP queue plumbing:
        # a task can vanish between the queue and a worker that dies before claiming it)
        self._pushed: dict[str, int] = {}
        self._seq = 0
        self._claims: deque[tuple[float, int]] = deque()  # (when, place) of claims
        self._claimed_upto = 0  # a task placed before this is lost if still unclaimed
        self._push_time: dict[str, float] = {}  # unclaimed task uid -> when pushed
        self._repushed: dict[str, int] = {}  # task uid -> pushed again for idle workers
        self._arrivals = Arrivals(clock)  # what the client's sweep asks about
        #: the places the client drained: ("worker", uid) or ("host", name) -> why
        self.drains: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ queries
    def entry(self, uid: str) -> L.Entry | None:
        """The ledger entry of task ``uid``: its key and its full uid."""
        with self.lock:
            e = self.ledger.get(attempt_id(uid))
            return e if e is not None and e.item.get("uid") == uid else None

    def on_queue(self) -> list[str]:
        """The uids of the tasks on RP's queue, unclaimed, in the order they were put there."""
        with self.lock:
            return list(self._pushed)

    def mark_up(self) -> None:
        """RP registered the master's queue: tasks arrive from now on."""
        with self.lock:
            self.up = True
            self._arrivals.last = self.clock()

    # ------------------------------------------------------------------ workers
    def add_workers(self, uids: list[str], now: float) -> None:
        """Workers RP is starting for this master."""
        with self.lock:
            for uid in uids:
                self.workers[uid] = {
                    "uid": uid,
                    "pid": 0,
                    "host": "",
                    "state": "starting",
                    "t0": now,
                }

    def hello(self, wid: str, pid: int, host: str, problems: list[str]) -> bool:
        """A worker is up (``problems``: its failed pre-flight checks); False: it must
        take no task. A failed pre-flight fails every task, now and later."""
        with self.lock:
            w = self.workers.setdefault(wid, {"uid": wid, "t0": time.time()})
            w.update(pid=pid, host=host, state="ready" if not problems else "preflight_failed")
            w["busy_at"] = self.clock()  # idle from now on, as far as we know
            if self.drains:  # a worker on a drained host: drained at once (then stopped)
                self._drain_matching_locked()
            doomed: list[Task] = []
            if problems and not self.env_problem:
                lines = "\n".join(f"  - {p}" for p in problems)
                self.env_problem = (
                    f"pre-flight checks failed on RADICAL-Pilot raptor worker {wid} "
                    f"(pid {pid}, host {host}):\n{lines}"
                )
                doomed = [e.item for e in self.ledger.entries.values()]
                self.ledger = L.Ledger()
                self._unpushed(list(self._pushed))
        self._fail_environment(doomed)
        return not problems

    # ------------------------------------------------------------------ draining
    def _drained_by(self, wid: str, w: dict[str, Any]) -> tuple[str, str] | None:
        """The drain that covers worker ``wid`` (lock held): (kind, why), or None."""
        why = self.drains.get(("worker", wid))
        if why is not None:
            return "worker", why
        why = self.drains.get(("host", str(w.get("host") or "")))
        return ("host", why) if why is not None else None

    def drain(self, kind: str, name: str, why: str) -> list[str]:
        """The client drained a worker (``kind="worker"``, its uid) or a host: no task
        starts there from now on, and what its workers merely hold goes back on RP's
        queue, unblamed (the ledger's ``Drain``). Returns the workers to stop now: those
        that run nothing; one that runs tasks is stopped when they end
        (:meth:`idle_drained`). A worker that joins later on a drained host is drained
        when it says hello."""
        with self.lock:
            self.drains[(kind, name)] = why
            step = self._drain_matching_locked()
            stop = self._idle_drained_locked()
        if step.requeued and not self.stopping:
            self.port.log(f"drained {kind} {name}: requeue {[t['uid'] for t in step.requeued]}")
            self.port.push(step.requeued)
        return stop

    def _drain_matching_locked(self) -> _Step:
        step = _Step()
        for wid, w in self.workers.items():
            if w.get("drained") or w.get("state") in ("lost", "stopped"):
                continue
            by = self._drained_by(wid, w)
            if by is None:
                continue
            w["drained"] = by
            L.carry_out(self.ledger.handle(L.Drain(wid, by[1], time.time())), step)
        self._push(step.requeued)
        return step

    def _idle_drained_locked(self) -> list[str]:
        out = []
        for wid, w in self.workers.items():
            if (
                w.get("drained")
                and not w.get("stop_asked")
                and w.get("state") not in ("lost", "stopped")
                and not self.ledger.started_on(wid)
            ):
                w["stop_asked"] = True
                out.append(wid)
        return out

    def idle_drained(self) -> list[str]:
        """Drained workers that run nothing any more, each once: the master stops them."""
        with self.lock:
            return self._idle_drained_locked()

    def replace_lost(self, w: dict[str, Any]) -> bool:
        """Is a replacement started for this lost worker's record? Not for one drained
        with its host: RP would likely place the new one there too."""
        by = w.get("drained")
        return not (by and by[0] == "host")

    def lose_worker(self, wid: str) -> tuple[str, dict[str, Any]] | None:
        """Mark worker ``wid`` lost: (its state before, a copy of its record), or None
        if it is unknown, or lost or stopped already (nothing more to do)."""
        with self.lock:
            w = self.workers.get(wid)
            if w is None or w.get("state") in ("lost", "stopped"):
                return None
            was = str(w.get("state"))
            w["state"] = "lost"
            return was, dict(w)

    def worker_gone(
        self, wid: str, what: str, code: int | None, sig: str | None, tail: str, err_path: str
    ) -> None:
        """The ledger's rule for a lost worker (``what`` says how it ended): the tasks it
        ran fail (``"pilotfish": "worker_lost"``), their program groups are killed, the
        tasks it merely held go back on RP's queue, unblamed."""
        with self.lock:
            if wid in self.workers:
                self.workers[wid]["why"] = what  # the client's ping answer says it
            w = dict(self.workers.get(wid) or {})
            tasks = {a: self.ledger.entries[a].item for a in self.ledger.started_on(wid)}
            step = _Step()
            L.carry_out(
                self.ledger.handle(L.WorkerLost(wid, what, time.time(), code, sig, tail)), step
            )
            self._push(step.requeued)
            stopping = self.stopping
        if step.pgids:
            self.port.kill_groups(tuple(step.pgids))
        if step.requeued and not stopping:
            self.port.log(f"requeue {[t['uid'] for t in step.requeued]} after {wid} was lost")
            self.port.push(step.requeued)
        for lost in step.lost:
            task = tasks.get(lost.attempt)
            if task is None:
                continue
            info = {
                "pilotfish": "worker_lost",
                "worker": wid,
                "pid": int(w.get("pid") or 0),
                "host": w.get("host") or "",
                "returncode": code,
                "signal": sig,
                "stderr_tail": tail,
                "stderr_path": err_path,
                "message": f"{lost.message}; its stderr: {err_path}",
            }
            self.port.fail(task, info, code if isinstance(code, int) and code > 0 else 1)

    def stop(self) -> None:
        """The client stops the master: no task is pushed again, no worker replaced."""
        with self.lock:
            self.stopping = True
            for w in self.workers.values():
                if w.get("state") != "lost":
                    w["state"] = "stopped"

    # ------------------------------------------------------------------ tasks
    def _mine(self, task: Task) -> bool:
        """A task meant for this master: its raptor_id is ours and its uid carries our
        client's token (RP's scheduler may deliver a dead master's tasks to our queue)."""
        uid = str(task.get("uid") or "")
        rid = (task.get("description") or {}).get("raptor_id")
        if rid and self.uid is not None and rid != self.uid:
            return False
        return not self.token or uid.startswith(f"pf.{self.token}.")

    def request(self, tasks: list[Task]) -> list[Task]:
        """Tasks RP delivered to this master: those it keeps (for RP's queue). Not its
        own, or withdrawn by a sweep: cancelled, never run."""
        keep: list[Task] = []
        refuse: list[Task] = []
        with self.lock:
            problem = self.env_problem
            for t in tasks:
                uid = str(t.get("uid") or "")
                if not self._mine(t) or uid in self._arrivals.tomb:
                    refuse.append(t)
                elif uid in self._arrivals.seen:
                    continue  # delivered twice: the first copy is the one in flight
                elif (e := self.ledger.get(attempt_id(uid))) is not None:
                    self.port.log(f"refused {uid}: its number is {e.item.get('uid')}'s")
                    refuse.append(t)
                else:
                    keep.append(t)
            self._arrivals.arrived([t["uid"] for t in keep])
            if not problem:
                entries = tuple((attempt_id(t["uid"]), t["uid"], t, None) for t in keep)
                self.ledger.handle(L.Enqueue(entries))
                self._push(keep)
            else:
                # a state published from here does not reach the client (RP 1.103): let
                # RP submit them, then fail them through the result path (the watch)
                self._doomed.extend(keep)
        if refuse:
            which = [(t.get("uid"), (t.get("description") or {}).get("raptor_id")) for t in refuse]
            self.port.log(f"cancelled tasks not meant for this master, or withdrawn: {which}")
            self.port.cancel(refuse)
        return keep

    def claim(self, wid: str, uids: list[str]) -> list[str]:
        """A worker took these tasks off the queue: it holds those still queued here.

        Not its own: a task this master never took (another master's, delivered to our
        queue by a stale RP socket), one held already (a copy pushed again), or one that
        is no longer in flight. A worker declared lost holds nothing: what it took goes
        back on the queue."""
        back: list[Task] = []
        with self.lock:
            w = self.workers.get(wid)
            # a drained worker holds nothing either: what it took goes back too
            lost = w is not None and (w.get("state") == "lost" or bool(w.get("drained")))
            ids: dict[int, str] = {}
            for u in uids:
                e = self.entry(u)
                if e is None or e.where != "queued":
                    continue
                if lost:
                    back.append(e.item)
                else:
                    ids[e.attempt] = u
            out = L.carry_out(self.ledger.handle(L.Hold(wid, tuple(ids))) if ids else [], _Step())
            dropped = {c.attempt for c in out.dropped}
            mine = [u for i, u in ids.items() if i not in dropped]
            now = self.clock()
            if w is not None and mine:
                w["busy_at"] = now
            for uid in mine:
                self._push_time.pop(uid, None)
                self._repushed.pop(uid, None)
                place = self._pushed.pop(uid, None)
                if place is not None:
                    self._claims.append((now, place))
            self._push(back)
            stopping = self.stopping
        if back and not stopping:
            took = [t["uid"] for t in back]
            self.port.log(f"lost or drained worker {wid} took {took}: pushed again")
            self.port.push(back)
        return mine

    def start(self, wid: str, uid: str, master: tuple[int, str]) -> bool:
        """A worker asks to run a task it holds (the start fence), just before it forks
        the task's process; granted, the start is published with where it runs and
        ``master`` (the master's pid and host)."""
        with self.lock:
            w = self.workers.get(wid) or {}
            if w.get("state") == "lost":
                return False
            e = self.entry(uid)
            if e is None:
                self.port.log(f"refused start of {uid} on {wid}: not one of this master's tasks")
                return False
            pid, host = int(w.get("pid") or 0), str(w.get("host") or "")
            step = _Step()
            out = L.carry_out(
                self.ledger.handle(L.Start(wid, e.attempt, pid, host, time.time())), step
            )
            self._push(step.requeued)
        if step.requeued:  # its worker is drained: another worker takes it
            self.port.push(step.requeued)
        if out.refused:
            self.port.log(f"refused start of {uid} on {wid}: {out.reasons()}")
            return False
        info = {
            "worker": wid,
            "pid": pid,
            "host": host,
            "time": time.time(),
            "master_pid": master[0],
            "master_host": master[1],
        }
        self.port.publish_start(uid, info)
        return True

    def group(self, uid: str, pgid: int) -> None:
        """A program of task ``uid`` runs in process group ``pgid``."""
        with self.lock:
            e = self.entry(uid)
            if e is not None and e.worker:
                L.carry_out(self.ledger.handle(L.Group(e.worker, e.attempt, int(pgid))), _Step())

    def results(self, tasks: list[Task]) -> list[Task]:
        """Of these results, those to deliver: each from the worker that holds its task,
        once."""
        mine: list[Task] = []
        with self.lock:
            for t in tasks:
                uid = str(t.get("uid"))
                if self.entry(uid) is None:
                    self.port.log(f"dropped a result for {uid}: not in flight")
                    continue
                cmds = self.ledger.handle(L.Finish(str(t.get("worker")), attempt_id(uid)))
                out = L.carry_out(cmds, _Step())
                if out.accepted:
                    mine.append(t)
                else:
                    self.port.log(f"dropped a result for {uid}: {out.reasons()}")
        return mine

    def cancel(self, uids: list[str]) -> list[str]:
        """The client withdraws these tasks: those that had not started are cancelled."""
        with self.lock:
            items = {e.attempt: e.item for u in uids if (e := self.entry(str(u)))}
            step = _Step(items)
            L.carry_out(self.ledger.handle(L.Revoke(tuple(items))), step)
            self._unpushed([t["uid"] for t in step.withdrawn])
        if step.withdrawn:
            self.port.cancel(step.withdrawn)
        return [t["uid"] for t in step.withdrawn if t]

    def fail_doomed(self) -> None:
        """Fail the tasks that arrived after a pre-flight failed (see :meth:`request`)."""
        with self.lock:
            doomed, self._doomed = self._doomed, []
        self._fail_environment(doomed)

    def _fail_environment(self, tasks: list[Task]) -> None:
        for t in tasks:
            self.port.fail(t, {"pilotfish": "environment", "message": self.env_problem}, 78)

    # ------------------------------------------------------------------ RP's queue
    def _push(self, tasks: list[Task]) -> None:
        """Record tasks as (back) on RP's queue (lock held); the caller puts them there."""
        now = self.clock()
        for t in tasks:
            self._pushed.pop(t["uid"], None)
            self._seq += 1
            self._pushed[t["uid"]] = self._seq
            self._push_time[t["uid"]] = now

    def _unpushed(self, uids: list[str]) -> None:
        """These tasks are off the queue for good (lock held)."""
        for uid in uids:
            self._pushed.pop(uid, None)
            self._push_time.pop(uid, None)
            self._repushed.pop(uid, None)

    def lost_in_transit(self) -> list[Task]:
        """Unclaimed tasks placed before one claimed more than a grace period ago: the
        queue is FIFO, so they went to a worker that died before claiming. Recorded as
        pushed again; the caller puts them on RP's queue."""
        with self.lock:
            limit = self.clock() - _TRANSIT_GRACE
            while self._claims and self._claims[0][0] < limit:
                self._claimed_upto = max(self._claimed_upto, self._claims.popleft()[1])
            lost, stale = [], []
            for uid, place in self._pushed.items():
                if place >= self._claimed_upto:
                    break
                e = self.entry(uid)
                if e is not None and e.where == "queued":
                    lost.append(e.item)
                else:  # ended (or started) without a claim of ours: nothing to push
                    stale.append(uid)
            self._unpushed(stale)
            self._push(lost)
            return lost

    def unclaimed_while_idle(self, now: float) -> list[Task]:
        """Tasks on the queue, unclaimed for ``IDLE_GRACE`` (then twice as long, ...)
        while a ready worker held nothing for as long: a worker waiting on RP's queue
        takes a task within milliseconds, so these went astray (a worker took them and
        died before its claim, a stale socket took them). Recorded as pushed again (the
        claim drops whichever copy comes second); the caller puts them on RP's queue."""
        with self.lock:
            for w in self.workers.values():
                if self.ledger.count(w["uid"]):
                    w["busy_at"] = now
            idle_since = [
                float(w.get("busy_at") or now)
                for w in self.workers.values()
                if w.get("state") == "ready" and not self.ledger.count(w["uid"])
            ]
            if not idle_since or now - min(idle_since) < IDLE_GRACE:
                return []
            idle_for = now - min(idle_since)
            lost, stale = [], []
            for uid, pushed in self._push_time.items():
                wait = IDLE_GRACE * 2 ** min(self._repushed.get(uid, 0), 5)
                if now - pushed < wait or idle_for < wait:
                    continue
                e = self.entry(uid)
                if e is not None and e.where == "queued":
                    lost.append(e.item)
                else:
                    stale.append(uid)
            self._unpushed(stale)
            for t in lost:
                self._repushed[t["uid"]] = self._repushed.get(t["uid"], 0) + 1
            self._push(lost)
            return lost

    # ------------------------------------------------------------------ the client's sweep
    def sweep(self, uids: list[str], graces: list[float]) -> dict[str, list[str]] | None:
        """Of these tasks (the client's, submitted a while ago and not seen to start):
        ``known``, those this master received; ``gone``, those it takes as lost on the
        way: a task the client sent later (a higher number) arrived the task's grace
        period ago, or nothing arrived for that long. Those are withdrawn at once, under
        the same lock as :meth:`request`, so one that arrives after all is cancelled and
        the client may send it again under a new uid. The others may still be on their
        way. None while RP has not registered our queue (tasks wait for that in RP's
        scheduler)."""
        with self.lock:
            if not self.up:
                return None
            known, gone = self._arrivals.sweep(uids, graces)
        if gone:
            self.port.log(f"sweep: never received {gone}: withdrawn, the client sends them again")
        return {"known": known, "gone": gone}
