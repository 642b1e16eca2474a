"""The RADICAL-Pilot raptor backend: pilotfish's semantics on an RP pilot.

``Session(backend="radical", workers=N)`` starts an RP session, a pilot
(``resource="local.localhost"`` by default), pilotfish's raptor master
(:mod:`pilotfish.backends.radical.master`, a subclass of RP's ``raptor.Master``) and
N pilotfish raptor workers (:mod:`pilotfish.backends.radical.worker`), and ends all of
it on ``stop()``. ``pilot=`` an existing ``rp.Pilot`` reuses it (then only the master
and its workers belong to the backend; the pilot is the caller's).

Every attempt is one raptor function task calling ``PilotfishWorker.pilotfish_run``
with the pickled ``RunAttempt`` (base64) as its argument; it runs
:func:`pilotfish.runtime.execute.run_attempt`, which never raises, and returns the
pickled ``Result``. So user exceptions, unpicklable results, programs (with
pilotfish sandboxes and complete stdout/stderr files) behave as on every backend.

How RP's signals become pilotfish events:

=================================================  ==================================
RP                                                 pilotfish
=================================================  ==================================
function task DONE, ``return_value`` = Result      ``Result``
FAILED with ``return_value["pilotfish"] ==         ``Lost(worker_lost)`` (the master
"worker_lost"`` (advanced by our master)           saw the worker die: exit code,
                                                   signal, stderr tail)
FAILED, ``"environment"`` (worker pre-flight)      ``Result`` with an ENVIRONMENT error
FAILED with RP's ``TimeoutError``                  ``Lost(timeout)``
FAILED otherwise (RP could not call us)            ``Result`` with an ENVIRONMENT error
master ping answer names the task's worker         ``Started``; worker changes:
                                                   ``WorkerReport``
master task final, or no ping answer within        every in-flight attempt
``heartbeat_timeout``                              ``Lost(runtime_lost)``; a new master
                                                   (``MasterReport("restarted")``) up to
                                                   ``max_master_restarts``, else
                                                   ``Fatal(runtime_lost)``
pilot final                                        ``Lost(runtime_lost)`` + ``Fatal``
=================================================  ==================================

No attempt waits forever for a message RP lost: an attempt submitted at least
``resend_after`` seconds ago (counted from when the master was up) and not seen to
start is asked about (``pilotfish_sweep``, after a ping, each attempt at most once per
``resend_after``); the master answers which of them it has and which it takes as lost
on the way (see :mod:`.master`), and withdraws those (cancelled if they arrive later).
They are sent again under new uids, unblamed (the ledger's Resend rule, here for one
attempt). The master itself pushes again a task that waits unclaimed on its queue
while a worker is idle, and the claim and start fences drop the second copy: no
attempt is lost, none runs twice.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import pickle
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import radical.pilot as rp
    import radical.utils as ru
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        f"backend='radical' needs RADICAL-Pilot, which cannot be imported ({e}); "
        "install it with: pip install 'pilotfish[radical]'"
    ) from e

from ...core import ledger as L
from ...runtime.preflight import client_versions
from ...runtime.procs import create_time
from ...wire import messages as _wire
from ...wire.messages import RunAttempt, WorkerReport
from .._driver import Driver, Stimuli, carry_out, runtime_lost
from ..base import MasterReport, Pulse, Sink
from .plumbing import (
    Reaper,
    bounded,
    end_pids,
    ensure_venv_env,
    master_details,
    pilot_details,
    raptor_rpc,
    token_pids,
    with_token,
)
from .task_events import final_events

__all__ = ["RadicalBackend"]

log = logging.getLogger("pilotfish.radical")

_HERE = Path(__file__).resolve().parent
_EXECUTING = rp.AGENT_EXECUTING
_FINAL = frozenset(rp.FINAL)


@dataclass(slots=True)
class _Att:
    """The RP task of an attempt (a ledger entry's item): where it runs is the ledger's."""

    m: RunAttempt
    uid: str
    gen: int
    sent: float = 0.0  # when submitted (monotonic)
    asked: float = 0.0  # when a sweep last asked the master about it
    resent: int = 0  # how often the master did not receive it (each time waits twice as long)
    known: bool = False  # the master said it received it (a sweep asks no more)


class _Step:
    """The RADICAL-Pilot backend's hooks for the ledger's commands
    (:func:`.._driver.carry_out`): ``events`` for the session; ``resend`` the attempts
    to send to the next master and ``stale`` their old RP task uids; ``withdrawn`` the
    uids of tasks to withdraw from the master (``items``: the attempts a command may
    name after the ledger let go of them)."""

    __slots__ = ("events", "items", "resend", "stale", "withdrawn")

    def __init__(self, events: list[Any], items: dict[int, _Att] | None = None) -> None:
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

    def expire(self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...]) -> None:
        pass  # never asked: no TimePassed here (RP's task timeout and the raptor worker stop it)


class RadicalBackend:
    """Runs attempts as raptor function tasks; see the module docstring.

    Still ~700 lines (over the ~400 guide): it owns the client's view of the current
    master (pid, liveness, pings, sweeps, its loss and replacement) besides submission
    and the event thread; those share the ledger, the uid map and the master generation
    under one lock. The RP plumbing (:mod:`.plumbing`) and the task-state table
    (:mod:`.task_events`) are out already; the master's record is the next piece to
    take out."""

    name = "radical"
    drains_by_default = False  # not until the raptor master can drain (see drain())
    #: the files RP loads pilotfish's raptor master (class ``PilotfishMaster``) and
    #: workers (class ``PilotfishWorker``) from, inside the pilot: a subclass may name
    #: files with subclasses of them (the tests' fault injection does)
    master_file = str(_HERE / "master.py")
    worker_file = str(_HERE / "worker.py")

    def __init__(
        self,
        workers: int | None = None,
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_master_restarts: int = 3,
        rundir: str = ".pilotfish",
        pilot: Any = None,
        task_manager: Any = None,
        resource: str = "local.localhost",
        cores: int | None = None,
        runtime: int = 60,
        pilot_options: dict[str, Any] | None = None,
        start_timeout: float = 300.0,
        named_env: str | None = "rp",
        ping_timeout: float | None = None,
        resend_after: float | None = None,
    ) -> None:
        self.workers = workers or max(1, (os.cpu_count() or 2) - 1)
        self.hb_interval = heartbeat_interval
        self.hb_timeout = heartbeat_timeout
        self.ping_timeout = ping_timeout or max(heartbeat_interval, heartbeat_timeout / 2)
        # an attempt not seen to start this long after it was sent (and the master was
        # up) is asked about: sent again if the master never received it
        self.resend_after = resend_after or max(10.0, heartbeat_timeout)
        self.max_restarts = max_master_restarts
        self.rundir = str(Path(rundir).resolve())
        self.resource = resource
        self.cores = cores or (self.workers + 3)
        self.runtime = runtime
        self.pilot_options = dict(pilot_options or {})
        self.start_timeout = start_timeout
        self.named_env = named_env
        self._own_pilot = pilot is None
        self._pilot: Any = pilot
        self._session: Any = pilot.session if pilot is not None else None
        self._pmgr: Any = None
        self._tmgr: Any = task_manager
        self._own_tmgr = task_manager is None
        self._master: Any = None
        self._master_pid = 0
        self._master_created = 0.0  # the master's creation time (this host only)
        self._master_seen_running: float | None = None
        self._master_submitted = 0.0
        self._master_up_at: float | None = None  # the master said its queue is registered
        self._last_answer: float | None = None
        self._gen = 0
        self._token = uuid.uuid4().hex[:8]
        self._lock = threading.RLock()
        # threads, sink, restart budget, dead or not: the backends' kit
        self._driver = Driver("RADICAL-Pilot", max_master_restarts)
        self._stopping = self._driver.stopping
        self._pulse = Pulse(heartbeat_interval / 2)
        # what the event thread handles: ("submit", attempts), ("cancel", ids),
        # ("task", task, state), ("pilot", pilot, state), ("ping"|"sweep", gen, answer)
        tick = max(0.02, min(0.1, heartbeat_interval / 4))
        self._q: Stimuli[tuple[Any, ...]] = Stimuli(self._on_stimuli, tick)
        # the attempts the master has: queued, or started (which worker, pid, host)
        self._ledger = L.Ledger()
        self._by_uid: dict[str, int] = {}  # RP task uid -> attempt id
        self._workers_seen: dict[str, list[Any]] = {}
        self._running: dict[str, str] = {}
        self._stopped = False
        # worker pids on this host -> creation time: only that process is ever ended
        self._known_pids: dict[int, float] = {}
        self._n = 0
        # bound methods are new objects on every access; RP unregisters by id()
        self._task_cb_fn = self._task_cb
        self._reaper = Reaper()
        self._host = _wire.host_name()
        self._master_local = False
        self._pilot_cb_fn = self._pilot_cb

    # ------------------------------------------------------------------ protocol
    def start(self, sink: Sink) -> None:
        self._driver.sink = sink
        try:
            self._start_reaper()
            self._start_rp()
        except BaseException as e:
            why = f"could not start RADICAL-Pilot ({self.resource}): {type(e).__name__}: {e}"
            log.exception("pilotfish: %s", why)
            self._emit([self._driver.fatal(why)])
            self.stop()
            return
        self._q.start(self._driver.nursery, "pilotfish-rp-events")
        self._driver.nursery.start("pilotfish-rp-ping", self._ping_loop)

    def submit(self, attempts: Sequence[RunAttempt]) -> None:
        self._q.put(("submit", tuple(attempts)))

    def cancel(self, attempts: Sequence[int]) -> None:
        self._q.put(("cancel", tuple(attempts)))

    def processes(self) -> dict[str, Any]:
        with self._lock:
            ws = {w: v for w, v in self._workers_seen.items() if v[0] in ("ready", "starting")}
            # attempt id -> pid of the raptor worker running it
            held = {e.attempt: e.pid for e in self._ledger.started() if e.pid}
            return {
                "master": self._master_pid or None,
                "workers": sorted(int(v[1]) for v in ws.values() if v[1]),
                "worker_names": {w: int(v[1]) for w, v in ws.items()},
                "held": held,
                "pilot": getattr(self._pilot, "uid", None),
                "master_task": getattr(self._master, "uid", None),
            }

    def drain(self, name: str, kind: str = "worker", why: str = "") -> None:
        """Not supported yet on RADICAL-Pilot: the raptor workers are the pilot's, and the
        ledger that would refuse them work runs inside the raptor master, which has no
        drain request yet. The place stays in use; the session has journaled the drain."""
        log.warning(
            "pilotfish: RADICAL-Pilot cannot drain %s %s yet; it stays in use (%s)", kind, name, why
        )

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._ledger = L.Ledger()
            self._by_uid.clear()
        self._stopping.set()
        self._q.close()
        self._driver.nursery.stop(timeout)  # events, ping, and RPC and cancel helpers
        t0 = time.monotonic()
        pids = self._rp_pids()
        self._stop_master()
        log.info("pilotfish: master stopped in %.2f s", time.monotonic() - t0)
        if self._own_tmgr:
            bounded(lambda: self._tmgr and self._tmgr.close(), 15, "tmgr.close")
        elif self._tmgr is not None:  # RP finds a callback by id(): the very same object
            with contextlib.suppress(Exception):
                self._tmgr.unregister_callback(self._task_cb_fn)
        if not self._own_pilot and self._pilot is not None:
            with contextlib.suppress(Exception):
                self._pilot.unregister_callback(self._pilot_cb_fn)
        if self._own_pilot:
            bounded(
                lambda: self._session and self._session.close(download=False),
                max(30.0, timeout),
                "session.close",
            )
            pids |= token_pids(self._token, str(getattr(self._session, "uid", "") or ""))
        end_pids(pids)
        self._reaper.stop()
        log.info("pilotfish: RADICAL-Pilot backend stopped in %.2f s", time.monotonic() - t0)

    # ------------------------------------------------------------------ start-up
    def _start_rp(self) -> None:
        own = self._pilot is None
        if own:
            ensure_venv_env()
            self._session = rp.Session()
            # the reaper ends the session's RP processes (client components, bridges,
            # agent) by their session id, and the token's processes only when they are
            # of this session
            self._reaper.tell(f"session {self._session.uid}")
            self._pmgr = with_token(self._token, lambda: rp.PilotManager(self._session))
            pd = {
                "resource": self.resource,
                "cores": self.cores,
                "runtime": self.runtime,
                "exit_on_error": False,
            }
            pd.update(self.pilot_options)
            self._pilot = self._pmgr.submit_pilots(rp.PilotDescription(pd))
            self._pilot.wait([rp.PMGR_ACTIVE, *rp.FINAL], timeout=self.start_timeout)
            if self._pilot.state != rp.PMGR_ACTIVE:
                raise RuntimeError(
                    f"pilot {self._pilot.uid} is {self._pilot.state} after "
                    f"{self.start_timeout:g} s; {pilot_details(self._pilot)}"
                )
        self._pilot.register_callback(self._pilot_cb_fn)
        if self._tmgr is None:  # an RP pilot can belong to one TaskManager only
            self._tmgr = rp.TaskManager(self._session)
            self._tmgr.add_pilots(self._pilot)
        self._tmgr.register_callback(self._task_cb_fn)
        self._start_master()

    def _cfg(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "heartbeat_interval": self.hb_interval,
            "worker_file": self.worker_file,
            "named_env": self.named_env,
            "versions": client_versions(),
            "rundir": self.rundir,
            "cwd": os.getcwd(),
            "sys_path": [p for p in sys.path if p],
            "worker_env": {},
            "token": self._token,  # the master takes only its own client's tasks
        }

    def _start_master(self) -> None:
        td = rp.TaskDescription(
            {
                "mode": rp.RAPTOR_MASTER,
                "raptor_class": "PilotfishMaster",
                "raptor_file": self.master_file,
                "environment": {
                    "PILOTFISH_RP_CFG": base64.b64encode(json.dumps(self._cfg()).encode()).decode()
                },
            }
        )
        if self.named_env:
            td.named_env = self.named_env
        with self._lock:
            self._gen += 1
            self._master_pid = 0
            self._master_created = 0.0
            self._master_seen_running = None
            self._master_up_at = None
            self._last_answer = None
            self._workers_seen = {}
            self._running = {}
            self._master_submitted = time.monotonic()
        self._master = self._tmgr.submit_raptors([td], self._pilot.uid)[0]

    # ------------------------------------------------------------------ RP callbacks
    def _task_cb(self, task: Any, state: str) -> None:
        # RP calls this for every state a task passes (~15 per task); only these two
        # kinds mean anything here (see _on_task): the others would wake the event
        # thread for nothing
        if state == _EXECUTING or state in _FINAL:
            self._q.put(("task", task, state))

    def _pilot_cb(self, pilots: Any, state: str | None = None) -> None:
        """RP calls a pilot's own callbacks with ``[pilot]`` (no state), the pilot
        manager's with ``(pilot, state)``."""
        for pilot in ru.as_list(pilots):
            st = state or pilot.state
            if st in rp.FINAL:
                self._q.put(("pilot", pilot, st))

    # ------------------------------------------------------------------ event thread
    def _emit(self, events: list[Any]) -> None:
        if not self._stopped:
            self._driver.emit(events)

    def _on_stimuli(self, items: list[tuple[Any, ...]]) -> None:
        """One step of the event thread (:class:`.._driver.Stimuli`): what piled up, in
        order (submissions in batches), then the master's watch; a crash here is the
        driver's ``Fatal``."""
        events: list[Any] = []
        batch: list[RunAttempt] = []
        for it in items:
            kind = it[0]
            if kind == "submit":
                batch.extend(it[1])
                continue
            if batch:
                self._submit_now(batch, events)
                batch = []
            if kind == "task":
                self._on_task(it[1], it[2], events)
            elif kind == "pilot":
                self._on_pilot(it[1], it[2], events)
            elif kind == "cancel":
                self._on_cancel(it[1])
            elif kind == "ping":
                self._on_ping(it[1], it[2], events)
            elif kind == "sweep":
                self._on_sweep(it[1], it[2], events)
        if batch:
            self._submit_now(batch, events)
        self._check_master(events)
        if not self._driver.dead:  # this thread bounds the silence itself (_check_master)
            events.extend(self._pulse.beat())
        self._emit(events)

    def _submit_now(self, attempts: list[RunAttempt], events: list[Any]) -> None:
        if self._driver.dead:
            events.extend(self._driver.refuse(a) for a in attempts)
            return
        tds = []
        with self._lock:
            for a in attempts:
                att, td = self._task(a)
                self._ledger.handle(L.Enqueue(((a.attempt, a.key, att, a.timeout),)))
                tds.append(td)
        self._send(attempts, tds, events)

    def _task(self, a: RunAttempt) -> tuple[_Att, Any]:
        """A new RP task (a new uid) for attempt ``a`` on the current master (lock held)."""
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
                "raptor_id": self._master.uid,
            }
        )
        if a.kind == "call" and a.timeout:
            td.timeout = float(a.timeout)
        return _Att(a, uid, self._gen, time.monotonic()), td

    def _send(self, attempts: Sequence[RunAttempt], tds: list[Any], events: list[Any]) -> None:
        try:
            self._tmgr.submit_tasks(tds)
        except Exception as e:
            why = f"RADICAL-Pilot refused the tasks: {type(e).__name__}: {e}"
            with self._lock:
                for a in attempts:
                    self._ledger.handle(L.Revoke((a.attempt,)))
            events.extend(runtime_lost(a, why) for a in attempts)

    def _on_sweep(self, gen: int, ans: dict[str, Any], events: list[Any]) -> None:
        """The master's answer to a sweep: ``gone`` it takes as lost on the way (and
        withdrew, so they cannot run), ``known`` it has. The withdrawn ones are sent
        again under new uids, unblamed; their old RP tasks are cancelled."""
        if gen != self._gen or self._driver.dead or self._stopping.is_set():
            return
        withdrawn = {str(u) for u in ans.get("gone") or ()}
        known = {str(u) for u in ans.get("known") or ()}
        again: list[RunAttempt] = []
        tds: list[Any] = []
        old: list[str] = []
        with self._lock:
            for uid in known | withdrawn:
                aid = self._by_uid.get(uid)
                e = self._ledger.get(aid) if aid is not None else None
                if e is None or e.item.uid != uid:
                    continue  # ended, cancelled, or sent again already
                if uid not in withdrawn:
                    e.item.known = True
                    continue
                if e.where != "queued":
                    continue  # cannot be: the master started what it never received
                att, td = self._task(e.item.m)
                att.resent = e.item.resent + 1
                self._by_uid.pop(uid, None)
                self._ledger.handle(L.Renamed(e.attempt, att))
                again.append(att.m)
                tds.append(td)
                old.append(uid)
        if not tds:
            return
        log.warning(
            "pilotfish: the raptor master %s never received %s (sent %.0f s ago or more); "
            "sent again as %s",
            self._master.uid,
            old,
            self.resend_after,
            [td.uid for td in tds],
        )
        self._send(again, tds, events)
        self._cancel_rp_tasks(old)

    def _cancel_rp_tasks(self, uids: list[str]) -> None:
        """Have RP forget tasks we no longer wait for (in the background: best effort)."""
        tmgr = self._tmgr

        def run() -> None:
            with contextlib.suppress(Exception):
                tmgr.cancel_tasks(uids)

        if uids and tmgr is not None:
            self._driver.nursery.start("pilotfish-rp-cancel", run)

    def _on_cancel(self, ids: Sequence[int]) -> None:
        with self._lock:
            step = _Step([], {i: e.item for i in ids if (e := self._ledger.get(i))})
            carry_out(self._ledger.handle(L.Revoke(tuple(ids))), step)
        if step.withdrawn and self._master is not None:
            self._async_rpc("pilotfish_cancel", uids=step.withdrawn)

    def _pop(self, uid: str) -> L.Entry | None:
        """The attempt of RP task ``uid`` has ended: out of the ledger (None if it was
        not in flight: cancelled by us, or already reported lost)."""
        with self._lock:
            aid = self._by_uid.pop(uid, None)
            e = self._ledger.get(aid) if aid is not None else None
            if e is None or e.item.uid != uid:
                return None
            # the master fenced it; a result may come before we heard that it started
            end = L.Finish(e.worker, e.attempt) if e.where == "started" else L.Revoke((e.attempt,))
            self._ledger.handle(end)
            return e

    def _on_task(self, task: Any, state: str, events: list[Any]) -> None:
        uid = task.uid
        if self._master is not None and uid == self._master.uid:
            if state == rp.AGENT_EXECUTING and self._master_seen_running is None:
                self._master_seen_running = time.monotonic()
            if state in rp.FINAL:
                self._master_lost(f"its RP task {uid} reached state {state}", task, events)
            return
        if state == rp.AGENT_EXECUTING:
            self._on_started(task, events)
            return
        if state not in rp.FINAL:
            return
        e = self._pop(uid)
        if e is None:
            return  # cancelled by us, or a late result for an attempt already reported lost
        events.extend(final_events(task, state, e))

    def _note_master(self, pid: int, host: str, now: float, events: list[Any]) -> None:
        """The master's pid, from a ping answer or a task's start (lock held)."""
        if self._master_pid or not pid:
            return
        self._master_pid = pid
        # pids are ended by us only on this host (a cluster's nodes have their own), and
        # only while they are this process: its creation time, read when first told
        self._master_local = host == self._host
        created = create_time(pid) if self._master_local else None
        self._master_created = created or 0.0
        if created:
            self._reaper.reap(pid, created)
        events.append(
            MasterReport(
                "started",
                pid,
                now,
                message=f"pilotfish raptor master {self._master.uid} on pilot {self._pilot.uid}",
            )
        )

    def _note_worker_pid(self, pid: int, host: str) -> None:
        """A worker pid on this host: ended by stop() and by the reaper, only while it is
        the process with the creation time read now, when first told (lock held)."""
        if not pid or host != self._host or pid in self._known_pids:
            # a pid seen before keeps its first creation time: if it is another process
            # by now, it is spared (rather than a worker missed: the token ends those)
            return
        created = create_time(pid)
        if created is None:
            return  # gone already: nothing to end, and a later process is not it
        self._reaper.reap(pid, created)
        self._known_pids[pid] = created

    def _on_started(self, task: Any, events: list[Any]) -> None:
        """Our master published where the task runs (worker, pid, host) as it started."""
        md = (task.description or {}).get("metadata") or {}
        info = md.get("pilotfish") if isinstance(md, dict) else None
        if not isinstance(info, dict):
            return
        with self._lock:
            aid = self._by_uid.get(task.uid)
            if aid is None:
                return
            worker, pid = str(info.get("worker") or ""), int(info.get("pid") or 0)
            host = str(info.get("host") or "")
            started: list[Any] = []
            cmds = self._ledger.handle(
                L.Start(worker, aid, pid, host, float(info.get("time") or time.time()))
            )
            if not carry_out(cmds, _Step(started)).granted:
                return  # already known to run (a ping told us first), or not in flight
            now = time.time()
            # the master and the worker are up (a ping may not have told us yet)
            self._note_master(
                int(info.get("master_pid") or 0), str(info.get("master_host") or ""), now, events
            )
            if worker and (self._workers_seen.get(worker) or [None])[0] != "ready":
                self._workers_seen[worker] = ["ready", pid, host]
                events.append(WorkerReport("started", worker, pid, now))
                self._note_worker_pid(pid, host)
        events.extend(started)

    # ------------------------------------------------------------------ master and pilot
    def _on_pilot(self, pilot: Any, state: str, events: list[Any]) -> None:
        if self._driver.dead or self._stopping.is_set():
            return
        details = pilot_details(self._pilot)
        why = f"the RADICAL-Pilot pilot {pilot.uid} reached state {state}; {details}"
        self._fatal(why, events)

    def _check_master(self, events: list[Any]) -> None:
        if self._driver.dead or self._master is None:
            return
        now = time.monotonic()
        with self._lock:
            last = self._last_answer
            running = self._master_seen_running
        if last is not None:
            if now - last > self.hb_timeout:
                self._master_lost(
                    f"it stopped answering (no ping answer for {now - last:.1f} s, "
                    f"heartbeat_timeout={self.hb_timeout:g} s)",
                    None,
                    events,
                )
        elif running is not None and now - running > max(60.0, self.hb_timeout):
            self._master_lost("it never answered a ping after it started", None, events)
        else:
            # a first master waits for the pilot's slots; a replacement for one that was
            # lost should come up quickly, or the pilot itself is in trouble
            limit = self.start_timeout
            if self._driver.budget.used:
                limit = min(limit, max(60.0, 6 * self.hb_timeout))
            if now - self._master_submitted > limit:
                self._master_lost(f"it did not start within {limit:g} s", None, events)

    def _master_lost(self, why: str, task: Any, events: list[Any]) -> None:
        if self._driver.dead or self._stopping.is_set():
            return
        old = self._master
        sbox, err = master_details(task or old)
        pid = self._master_pid
        lost = f"the pilotfish raptor master {old.uid} (pid {pid or '?'}) was lost: {why}; "
        lost += f"master sandbox: {sbox}"
        what = lost + (f"; its stderr (tail):\n{err}" if err.strip() else "")
        with self._lock:
            # the ledger's rule: started attempts are lost with it, the others are sent
            # again (unblamed) to the next master
            cmds = self._ledger.handle(
                L.RuntimeLost(lost, time.time(), "", pid, None, None, err.strip())
            )
            self._by_uid.clear()
            to_end = {
                int(v[1]): self._known_pids[int(v[1])]
                for v in self._workers_seen.values()
                if v[1] and v[2] == self._host and int(v[1]) in self._known_pids
            }
            if pid and self._master_local and self._master_created:
                to_end[pid] = self._master_created
        events.append(MasterReport("lost", pid, time.time(), stderr_tail=err, message=what))
        step = _Step(events)
        carry_out(cmds, step)
        resend, stale = step.resend, step.stale
        # not started: nothing ran, so they wait in the ledger's place for the next master
        self._ledger = L.Ledger()
        # end what is left of the old master and its workers
        bounded(lambda: self._tmgr.cancel_tasks([old.uid]), 10, "cancel master")
        # its unstarted tasks are sent again: RP's scheduler, which keeps the tasks of a
        # master until its queue registers, must not hand them to anyone
        self._cancel_rp_tasks(stale)
        end_pids(to_end, grace=0.5)
        pilot_ok = self._pilot is not None and self._pilot.state == rp.PMGR_ACTIVE
        if not pilot_ok or not self._driver.budget.take():
            reason = (
                self._driver.budget.spent("start another master")
                if pilot_ok
                else f"the pilot is {self._pilot.state}"
            )
            self._fatal(f"{what}; {reason}", events, resend)
            return
        try:
            self._start_master()
        except Exception as e:
            self._fatal(f"{what}; a new master could not be started: {e!r}", events, resend)
            return
        events.append(
            MasterReport(
                "restarted",
                0,
                time.time(),
                message=f"started master {self._master.uid} ({self._driver.budget.note()})",
            )
        )
        if resend:
            self._submit_now(resend, events)

    def _fatal(self, why: str, events: list[Any], unsent: Sequence[RunAttempt] = ()) -> None:
        with self._lock:
            fatal = self._driver.fatal(why)
            gone = list(self._ledger.entries.values())
            self._ledger = L.Ledger()
            self._by_uid.clear()
        events.extend(runtime_lost(e.item.m, why, entry=e) for e in gone)
        events.extend(runtime_lost(m, why) for m in unsent)
        events.append(fatal)

    # ------------------------------------------------------------------ pings (rpc)
    def _rpc(self, cmd: str, timeout: float, **kwargs: Any) -> Any:
        return raptor_rpc(self._pilot, self._master, cmd, timeout, **kwargs)

    def _async_rpc(self, cmd: str, **kwargs: Any) -> None:
        def run() -> None:
            with contextlib.suppress(Exception):
                self._rpc(cmd, self.ping_timeout, **kwargs)

        self._driver.nursery.start("pilotfish-rp-rpc", run)

    def _ping_loop(self) -> None:
        while not self._stopping.wait(self.hb_interval):
            if self._driver.dead:
                return
            gen = self._gen
            if self._master_seen_running is None:
                continue
            try:
                ans = self._rpc("pilotfish_ping", self.ping_timeout)
            except Exception:
                continue
            if isinstance(ans, dict):
                self._q.put(("ping", gen, ans))
            self._sweep(gen)

    def _grace(self, att: _Att) -> float:
        """How long ``att`` may be on its way to the master: ``resend_after``, twice as
        long for each time it was sent again (an RP that slow is not taken as lossy for
        ever)."""
        return float(self.resend_after * 2 ** min(att.resent, 5))

    def _sweep(self, gen: int) -> None:
        """Ask the master about attempts sent ``resend_after`` ago (since it was up) that
        have not started and that it has not confirmed yet (see ``_on_sweep``)."""
        now = time.monotonic()
        with self._lock:
            up = self._master_up_at
            if up is None or gen != self._gen or self._driver.dead:
                return
            due = [
                e.item
                for e in self._ledger.entries.values()
                if e.where == "queued"
                and not e.item.known
                and e.item.gen == gen
                and now - max(e.item.sent, e.item.asked, up) > self._grace(e.item)
            ][:1000]
            for att in due:
                att.asked = now
        if not due:
            return
        try:
            ans = self._rpc(
                "pilotfish_sweep",
                self.ping_timeout,
                uids=[att.uid for att in due],
                graces=[self._grace(att) for att in due],
            )
        except Exception:
            return
        if isinstance(ans, dict):
            self._q.put(("sweep", gen, ans))

    def _on_ping(self, gen: int, ans: dict[str, Any], events: list[Any]) -> None:
        if gen != self._gen or self._driver.dead:
            return
        now = time.time()
        with self._lock:
            self._last_answer = time.monotonic()
            if ans.get("up") and self._master_up_at is None:
                self._master_up_at = self._last_answer
            self._note_master(int(ans.get("pid") or 0), str(ans.get("host") or ""), now, events)
            old = self._workers_seen
            new = {w: list(v) for w, v in (ans.get("workers") or {}).items()}
            self._workers_seen = new
            self._running = dict(ans.get("running") or {})
            for wid, (state, pid, host) in new.items():
                if state in ("ready", "starting"):  # a lost worker's pid may be reused
                    self._note_worker_pid(int(pid or 0), host)
                before = (old.get(wid) or [None])[0]
                if state == before:
                    continue
                if state == "ready":
                    events.append(WorkerReport("started", wid, int(pid), now))
                elif state == "lost":
                    events.append(WorkerReport("lost", wid, int(pid), now, message="worker lost"))
                elif state == "preflight_failed":
                    events.append(
                        WorkerReport(
                            "start_failed", wid, int(pid), now, message=ans.get("env_problem", "")
                        )
                    )
            for uid, wid in self._running.items():
                aid = self._by_uid.get(uid)
                e = self._ledger.get(aid) if aid is not None else None
                if e is None or e.where == "started" or e.item.uid != uid:
                    continue
                _, pid, host = new.get(wid) or ["", 0, ""]
                carry_out(
                    self._ledger.handle(L.Start(wid, e.attempt, int(pid), host, now)), _Step(events)
                )

    # ------------------------------------------------------------------ teardown
    def _start_reaper(self) -> None:
        """A watcher that ends our RP processes if this client dies without stop()."""
        self._reaper.start()
        if self._own_pilot:
            self._reaper.tell(f"token {self._token}")

    def _stop_master(self) -> None:
        if self._master is None or (self._driver.dead and self._master.state in rp.FINAL):
            return
        # a master that never answered is still starting (or hung): RP cancels its task,
        # and its workers end themselves once it is gone
        with contextlib.suppress(Exception):
            if self._master.state not in rp.FINAL and self._last_answer is not None:
                self._rpc("stop", 5.0)
        bounded(lambda: self._tmgr.cancel_tasks([self._master.uid]), 10, "cancel master")

    def _rp_pids(self) -> dict[int, float]:
        """The master's and workers' pids on this host, with their creation times."""
        with self._lock:
            pids = dict(self._known_pids)
            if self._master_pid and self._master_local and self._master_created:
                pids[self._master_pid] = self._master_created
        return pids
