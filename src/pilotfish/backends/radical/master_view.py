"""The radical backend's view of its current raptor master, from the client's side.

What the client knows of the master it runs its tasks on (the master's own bookkeeping,
inside the pilot, is :mod:`.master_book`): its RP task and generation, its pid (and
whether this host may end it), when it was submitted, seen running, up and last heard
from, the workers its pings name and the worker pids this host may end. From these:
the ``MasterReport("started")`` and ``WorkerReport`` events, whether the master has
been silent too long (:meth:`MasterView.silence`), and the pids to end when it is lost
or stopped. The loss itself and the new master are the backend's (they involve the
ledger and RP).
"""

from __future__ import annotations

from typing import Any

import radical.pilot as rp

from ...runtime.procs import create_time
from ...wire.messages import WorkerReport
from ..base import MasterReport
from .plumbing import Reaper

__all__ = ["MasterView"]


class MasterView:
    """The client's record of the current master (see the module docstring).

    Not locked itself: the backend reads and changes it under its own lock, with its
    ledger and uid map. A new master starts a new generation (:meth:`renew`): answers
    to pings of an older one are the backend's to drop (``gen``)."""

    def __init__(self, reaper: Reaper, host: str, hb_timeout: float, start_timeout: float) -> None:
        self._reaper = reaper
        self._host = host  # this host: pids are ended by us only here
        self._hb_timeout = hb_timeout
        self._start_timeout = start_timeout
        self.task: Any = None  # the master's RP task (None before the first)
        self.gen = 0
        self.pid = 0
        self._created = 0.0  # the master's creation time (this host only)
        self._local = False
        self._pilot_uid = ""
        self.submitted = 0.0
        self.seen_running: float | None = None
        self.up_at: float | None = None  # the master said its queue is registered
        self.last_answer: float | None = None
        # worker name -> [state, pid, host], from the last ping answer
        self.workers: dict[str, list[Any]] = {}
        self.running: dict[str, str] = {}  # RP task uid -> worker name, ditto
        # worker pids on this host -> creation time: only that process is ever ended
        self._known_pids: dict[int, float] = {}
        # the RP uids of the workers submitted with this master, and those of them seen
        # final: uid -> [uid, state, exit code], sent with every ping (the master may have
        # missed RP's state update: it came before the master listened)
        self.worker_uids: set[str] = set()
        self.worker_tasks: list[Any] = []  # their RP tasks
        self.ended: dict[str, list[Any]] = {}

    def renew(self, pilot_uid: str, now: float) -> None:
        """A new master is being submitted (monotonic ``now``): a new generation, nothing
        known of it yet (the worker pids of the old one stay known: stop() ends them)."""
        self.gen += 1
        self.pid = 0
        self._created = 0.0
        self._local = False
        self._pilot_uid = pilot_uid
        self.seen_running = None
        self.up_at = None
        self.last_answer = None
        self.workers = {}
        self.running = {}
        self.worker_uids = set()
        self.worker_tasks = []
        self.ended = {}
        self.submitted = now

    def task_state(self, state: str, now: float) -> None:
        """The master's RP task reached ``state`` (monotonic ``now``)."""
        if state == rp.AGENT_EXECUTING and self.seen_running is None:
            self.seen_running = now

    def note_master(self, pid: int, host: str, now: float) -> MasterReport | None:
        """The master's pid, from a ping answer or a task's start: the report the first
        time it is told."""
        if self.pid or not pid:
            return None
        self.pid = pid
        # pids are ended by us only on this host (a cluster's nodes have their own), and
        # only while they are this process: its creation time, read when first told
        self._local = host == self._host
        created = create_time(pid) if self._local else None
        self._created = created or 0.0
        if created:
            self._reaper.reap(pid, created)
        uid = getattr(self.task, "uid", "?")
        return MasterReport(
            "started", pid, now, message=f"pilotfish raptor master {uid} on pilot {self._pilot_uid}"
        )

    def note_worker_pid(self, pid: int, host: str) -> None:
        """A worker pid on this host: ended by stop() and by the reaper, only while it is
        the process with the creation time read now, when first told."""
        if not pid or host != self._host or pid in self._known_pids:
            # a pid seen before keeps its first creation time: if it is another process
            # by now, it is spared (rather than a worker missed: the token ends those)
            return
        created = create_time(pid)
        if created is None:
            return  # gone already: nothing to end, and a later process is not it
        self._reaper.reap(pid, created)
        self._known_pids[pid] = created

    def worker_ready(self, worker: str, pid: int, host: str, now: float) -> WorkerReport | None:
        """A task's start names its worker: the report if no ping said it is ready yet."""
        if not worker or (self.workers.get(worker) or [None])[0] == "ready":
            return None
        self.workers[worker] = ["ready", pid, host]
        self.note_worker_pid(pid, host)
        return WorkerReport("started", worker, pid, now)

    def answer(self, ans: dict[str, Any], mono: float, now: float) -> list[Any]:
        """A ping answer (at monotonic ``mono``, wall-clock ``now``): the master's and its
        workers' reports; ``workers`` and ``running`` are the answer's now."""
        events: list[Any] = []
        self.last_answer = mono
        if ans.get("up") and self.up_at is None:
            self.up_at = mono
        report = self.note_master(int(ans.get("pid") or 0), str(ans.get("host") or ""), now)
        if report is not None:
            events.append(report)
        old = self.workers
        new = {w: list(v) for w, v in (ans.get("workers") or {}).items()}
        self.workers = new
        self.running = dict(ans.get("running") or {})
        for wid, (state, pid, host, *why) in new.items():
            if state in ("ready", "starting"):  # a lost worker's pid may be reused
                self.note_worker_pid(int(pid or 0), host)
            before = (old.get(wid) or [None])[0]
            if state == before:
                continue
            if state == "ready":
                events.append(WorkerReport("started", wid, int(pid), now))
            elif state == "lost":
                msg = str(why[0]) if why and why[0] else "worker lost"
                events.append(WorkerReport("lost", wid, int(pid), now, message=msg))
            elif state == "preflight_failed":
                events.append(
                    WorkerReport(
                        "start_failed", wid, int(pid), now, message=ans.get("env_problem", "")
                    )
                )
        return events

    def silence(self, now: float, replacement: bool) -> str | None:
        """Why the master counts as lost at monotonic ``now`` for want of an answer (None
        if it does not); ``replacement``: it replaced a lost one."""
        last, running = self.last_answer, self.seen_running
        if last is not None:
            if now - last > self._hb_timeout:
                return (
                    f"it stopped answering (no ping answer for {now - last:.1f} s, "
                    f"heartbeat_timeout={self._hb_timeout:g} s)"
                )
            return None
        if running is not None and now - running > max(60.0, self._hb_timeout):
            return "it never answered a ping after it started"
        # a first master waits for the pilot's slots; a replacement for one that was
        # lost should come up quickly, or the pilot itself is in trouble
        limit = self._start_timeout
        if replacement:
            limit = min(limit, max(60.0, 6 * self._hb_timeout))
        if now - self.submitted > limit:
            return f"it did not start within {limit:g} s"
        return None

    def _master_pid(self) -> dict[int, float]:
        if self.pid and self._local and self._created:
            return {self.pid: self._created}
        return {}

    def pids(self) -> dict[int, float]:
        """The master's and every known worker's pids on this host, with their creation
        times (what stop() ends)."""
        return {**self._known_pids, **self._master_pid()}

    def lost_pids(self) -> dict[int, float]:
        """What is left of a lost master on this host: it and the workers its last ping
        answer named, with their creation times."""
        to_end = {
            int(v[1]): self._known_pids[int(v[1])]
            for v in self.workers.values()
            if v[1] and v[2] == self._host and int(v[1]) in self._known_pids
        }
        to_end.update(self._master_pid())
        return to_end

    def processes(self) -> dict[str, Any]:
        """The master's and its live workers' part of ``processes()``."""
        ws = {w: v for w, v in self.workers.items() if v[0] in ("ready", "starting")}
        return {
            "master": self.pid or None,
            "workers": sorted(int(v[1]) for v in ws.values() if v[1]),
            "worker_names": {w: int(v[1]) for w, v in ws.items()},
        }
