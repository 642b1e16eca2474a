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

(Slightly over the size guide: the master's record, the attempts in flight and the
pilot's lifecycle are modules of their own; what is left is RP's callbacks and the
client's side of each rpc.)
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
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
from ...wire import messages as _wire
from ...wire.messages import RunAttempt
from .._driver import Driver, Stimuli, carry_out, runtime_lost
from ..base import MasterReport, Pulse, Sink
from .in_flight import InFlight, Step
from .master_book import client_worker_uids
from .master_view import MasterView
from .pilot_lease import PilotLease
from .plumbing import (
    Reaper,
    bounded,
    cancel_launched,
    end_pids,
    master_details,
    pilot_details,
    raptor_rpc,
    token_pids,
)
from .task_events import final_events, wakes

__all__ = ["RadicalBackend"]

log = logging.getLogger("pilotfish.radical")

_HERE = Path(__file__).resolve().parent


class RadicalBackend:
    """Runs attempts as raptor function tasks; see the module docstring.

    Still ~500 lines (over the ~400 guide): what is left is the event thread's handling
    of each stimulus (submission, cancel, task and pilot states, ping and sweep answers)
    and the master's loss and replacement, which change the attempts in flight
    (:mod:`.in_flight`) and the view of the master (:mod:`.master_view`) together under
    one lock, and call RP (:mod:`.pilot_lease`, :mod:`.plumbing`); split further, each
    half would need the other's lock and state."""

    name = "radical"
    drains_by_default = True  # a pilot may span nodes; the raptor master drains
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
        preload: Iterable[str] = (),
    ) -> None:
        self.preload = tuple(preload)  # every raptor worker imports them as it starts
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
        # the RP session, pilot and task manager, and the callbacks RP calls there
        self._rp = PilotLease(pilot, task_manager, self._task_cb, self._pilot_cb)
        self._token = uuid.uuid4().hex[:8]
        self._lock = threading.RLock()
        self._drains: list[tuple[str, str, str]] = []  # (kind, name, why), oldest first
        # threads, sink, restart budget, dead or not: the backends' kit
        self._driver = Driver("RADICAL-Pilot", max_master_restarts)
        self._stopping = self._driver.stopping
        self._pulse = Pulse(heartbeat_interval / 2)
        # what the event thread handles: ("submit", attempts), ("cancel", ids),
        # ("task", task, state), ("pilot", pilot, state), ("ping"|"sweep", gen, answer)
        tick = max(0.02, min(0.1, heartbeat_interval / 4))
        self._q: Stimuli[tuple[Any, ...]] = Stimuli(self._on_stimuli, tick)
        # the attempts the master has, each one's RP task (under self._lock)
        self._fl = InFlight(self._token, self.resend_after)
        self._stopped = False
        self._reaper = Reaper()
        # the current master: its task, pid, pings, workers (under self._lock)
        self._mv = MasterView(self._reaper, _wire.host_name(), heartbeat_timeout, start_timeout)

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
            return {
                **self._mv.processes(),
                # attempt id -> pid of the raptor worker running it
                "held": {e.attempt: e.pid for e in self._fl.ledger.started() if e.pid},
                "pilot": getattr(self._rp.pilot, "uid", None),
                "master_task": getattr(self._mv.task, "uid", None),
            }

    @property
    def pilot(self) -> Any:
        """The ``rp.Pilot`` the backend runs on (its own, or the ``pilot=`` given; None
        before ``start()`` if its own)."""
        return self._rp.pilot

    @property
    def token(self) -> str:
        """The backend's token: in the environment of the RP processes it started (see
        :func:`.plumbing.with_token`), and in every RP task uid it submits."""
        return self._token

    def drain(self, name: str, kind: str = "worker", why: str = "") -> None:
        """Drain a raptor worker (its uid) or a host: the master refuses it new tasks and
        puts back on RP's queue what it merely holds; a drained worker is stopped once it
        runs nothing, and replaced unless its host was drained. A master started later
        (a restart) is given every drain so far in its configuration."""
        with self._lock:
            self._drains.append((kind, name, why))
            up = self._mv.task is not None
        if up:
            self._async_rpc("pilotfish_drain", kind=kind, name=name, why=why)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._fl.clear()
        self._stopping.set()
        self._q.close()
        self._driver.nursery.stop(timeout)  # events, ping, and RPC and cancel helpers
        t0 = time.monotonic()
        with self._lock:
            # the master's and workers' pids on this host, with their creation times
            pids = self._mv.pids()
        self._stop_master()
        log.info("pilotfish: master stopped in %.2f s", time.monotonic() - t0)
        sid = self._rp.close(timeout)
        if self._rp.own_pilot:
            pids |= token_pids(self._token, sid)
        end_pids(pids)
        self._reaper.stop()
        log.info("pilotfish: RADICAL-Pilot backend stopped in %.2f s", time.monotonic() - t0)

    # ------------------------------------------------------------------ start-up
    def _start_rp(self) -> None:
        pd = {
            "resource": self.resource,
            "cores": self.cores,
            "runtime": self.runtime,
            "exit_on_error": False,
        }
        pd.update(self.pilot_options)
        self._rp.open(self._token, self._reaper, pd, self.start_timeout)
        self._start_master()

    def master_config(self) -> dict[str, Any]:
        """The configuration (JSON) the raptor master is started with, and passes on to
        its workers: a subclass may change it (the tests claim a pilotfish version the
        pilot does not have)."""
        return {
            "workers": self.workers,
            # all of them submitted by the client, with the master (see _start_master)
            "client_workers": self.workers,
            "heartbeat_interval": self.hb_interval,
            "worker_file": self.worker_file,
            "named_env": self.named_env,
            "versions": client_versions(),
            "rundir": self.rundir,
            "cwd": os.getcwd(),
            "sys_path": [p for p in sys.path if p],
            "preload": list(self.preload),
            "worker_env": {},
            "token": self._token,  # the master takes only its own client's tasks
            "drains": [list(d) for d in self._drains],  # a restarted master keeps them
        }

    def _start_master(self) -> None:
        """Submit a master and, at once, its workers: they start while it does (RP's
        raptor worker registers with its master once both are up), instead of after it
        (as the ones it submits itself, the replacements of lost workers)."""
        config = self.master_config()
        cfg = base64.b64encode(json.dumps(config).encode()).decode()
        td = rp.TaskDescription(
            {
                "mode": rp.RAPTOR_MASTER,
                "raptor_class": "PilotfishMaster",
                "raptor_file": self.master_file,
                "environment": {"PILOTFISH_RP_CFG": cfg},
            }
        )
        if self.named_env:
            td.named_env = self.named_env
        with self._lock:
            self._mv.renew(self._rp.pilot.uid, time.monotonic())
        task = self._rp.tmgr.submit_raptors([td], self._rp.pilot.uid)[0]
        uids = client_worker_uids(task.uid, int(config.get("client_workers") or 0))
        with self._lock:
            self._mv.task = task
            self._mv.worker_uids = set(uids)
        env = {"PILOTFISH_RP_CFG": cfg, **(config.get("worker_env") or {})}
        workers = task.submit_workers([self._worker_td(uid, task.uid, env) for uid in uids])
        with self._lock:
            self._mv.worker_tasks = list(workers)

    def _worker_td(self, uid: str, master: str, env: dict[str, str]) -> Any:
        """One of the workers submitted with ``master``: as the master would submit it,
        in its sandbox."""
        td = rp.TaskDescription(
            {
                "mode": rp.RAPTOR_WORKER,
                "uid": uid,
                "raptor_class": "PilotfishWorker",
                "raptor_file": self.worker_file,
                "environment": dict(env),
                "sandbox": master,  # relative to the pilot's sandbox: the master's
                "pilot": self._rp.pilot.uid,
            }
        )
        if self.named_env:
            td.named_env = self.named_env
        return td

    # ------------------------------------------------------------------ RP callbacks
    def _task_cb(self, task: Any, state: str) -> None:
        # RP calls this for every state a task passes (~15 per task); only these two
        # kinds mean anything here (see _on_task): the others would wake the event
        # thread for nothing
        if wakes(state):
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
                att, td = self._fl.task(a, self._mv.task.uid, self._mv.gen, time.monotonic())
                self._fl.ledger.handle(L.Enqueue(((a.attempt, a.key, att, a.timeout),)))
                tds.append(td)
        self._send(attempts, tds, events)

    def _send(self, attempts: Sequence[RunAttempt], tds: list[Any], events: list[Any]) -> None:
        try:
            self._rp.tmgr.submit_tasks(tds)
        except Exception as e:
            why = f"RADICAL-Pilot refused the tasks: {type(e).__name__}: {e}"
            with self._lock:
                for a in attempts:
                    self._fl.ledger.handle(L.Revoke((a.attempt,)))
            events.extend(runtime_lost(a, why) for a in attempts)

    def _on_sweep(self, gen: int, ans: dict[str, Any], events: list[Any]) -> None:
        """The master's answer to a sweep: ``gone`` it takes as lost on the way (and
        withdrew, so they cannot run), ``known`` it has. The withdrawn ones are sent
        again under new uids, unblamed; their old RP tasks are cancelled."""
        if gen != self._mv.gen or self._driver.dead or self._stopping.is_set():
            return
        withdrawn = {str(u) for u in ans.get("gone") or ()}
        known = {str(u) for u in ans.get("known") or ()}
        with self._lock:
            again, tds, old = self._fl.sweep_answer(
                known, withdrawn, self._mv.task.uid, self._mv.gen, time.monotonic()
            )
        if not tds:
            return
        log.warning(
            "pilotfish: the raptor master %s never received %s (sent %.0f s ago or more); "
            "sent again as %s",
            self._mv.task.uid,
            old,
            self.resend_after,
            [td.uid for td in tds],
        )
        self._send(again, tds, events)
        self._cancel_rp_tasks(old)

    def _cancel_workers(self, tasks: list[Any]) -> None:
        """End the workers submitted with a lost master (in the background: each once RP
        launched it, see :func:`.plumbing.cancel_launched`)."""
        tmgr = self._rp.tmgr
        if tasks and tmgr is not None:
            self._driver.nursery.start(
                "pilotfish-rp-cancel", lambda: cancel_launched(tmgr, list(tasks))
            )

    def _cancel_rp_tasks(self, uids: list[str]) -> None:
        """Have RP forget tasks we no longer wait for (in the background: best effort)."""
        tmgr = self._rp.tmgr

        def run() -> None:
            with contextlib.suppress(Exception):
                tmgr.cancel_tasks(uids)

        if uids and tmgr is not None:
            self._driver.nursery.start("pilotfish-rp-cancel", run)

    def _on_cancel(self, ids: Sequence[int]) -> None:
        with self._lock:
            step = Step([], {i: e.item for i in ids if (e := self._fl.ledger.get(i))})
            carry_out(self._fl.ledger.handle(L.Revoke(tuple(ids))), step)
        if step.withdrawn and self._mv.task is not None:
            self._async_rpc("pilotfish_cancel", uids=step.withdrawn)

    def _on_task(self, task: Any, state: str, events: list[Any]) -> None:
        uid = task.uid
        with self._lock:
            master = self._mv.task
            if master is not None and uid == master.uid:
                self._mv.task_state(state, time.monotonic())
            if uid in self._mv.worker_uids:  # the master is told with the next ping
                if state in rp.FINAL:
                    self._mv.ended[uid] = [uid, state, task.exit_code]
                return
        if master is not None and uid == master.uid:
            if state in rp.FINAL:
                self._master_lost(f"its RP task {uid} reached state {state}", task, events)
            return
        if state == rp.AGENT_EXECUTING:
            self._on_started(task, events)
            return
        if state not in rp.FINAL:
            return
        with self._lock:
            e = self._fl.pop(uid)
        if e is None:
            return  # cancelled by us, or a late result for an attempt already reported lost
        events.extend(final_events(task, state, e))

    def _on_started(self, task: Any, events: list[Any]) -> None:
        """Our master published where the task runs (worker, pid, host) as it started."""
        md = (task.description or {}).get("metadata") or {}
        info = md.get("pilotfish") if isinstance(md, dict) else None
        if not isinstance(info, dict):
            return
        with self._lock:
            aid = self._fl.attempt(task.uid)
            if aid is None:
                return
            worker, pid = str(info.get("worker") or ""), int(info.get("pid") or 0)
            host = str(info.get("host") or "")
            started: list[Any] = []
            cmds = self._fl.ledger.handle(
                L.Start(worker, aid, pid, host, float(info.get("time") or time.time()))
            )
            if not carry_out(cmds, Step(started)).granted:
                return  # already known to run (a ping told us first), or not in flight
            now = time.time()
            # the master and the worker are up (a ping may not have told us yet)
            mpid, mhost = int(info.get("master_pid") or 0), str(info.get("master_host") or "")
            reports = [
                self._mv.note_master(mpid, mhost, now),
                self._mv.worker_ready(worker, pid, host, now),
            ]
        events.extend(r for r in reports if r is not None)
        events.extend(started)

    # ------------------------------------------------------------------ master and pilot
    def _on_pilot(self, pilot: Any, state: str, events: list[Any]) -> None:
        if self._driver.dead or self._stopping.is_set():
            return
        details = pilot_details(self._rp.pilot)
        why = f"the RADICAL-Pilot pilot {pilot.uid} reached state {state}; {details}"
        self._fatal(why, events)

    def _check_master(self, events: list[Any]) -> None:
        if self._driver.dead or self._mv.task is None:
            return
        with self._lock:
            why = self._mv.silence(time.monotonic(), bool(self._driver.budget.used))
        if why is not None:
            self._master_lost(why, None, events)

    def _master_lost(self, why: str, task: Any, events: list[Any]) -> None:
        if self._driver.dead or self._stopping.is_set():
            return
        old = self._mv.task
        sbox, err = master_details(task or old)
        pid = self._mv.pid
        lost = f"the pilotfish raptor master {old.uid} (pid {pid or '?'}) was lost: {why}; "
        lost += f"master sandbox: {sbox}"
        what = lost + (f"; its stderr (tail):\n{err}" if err.strip() else "")
        with self._lock:
            # the ledger's rule: started attempts are lost with it, the others are sent
            # again (unblamed) to the next master
            cmds = self._fl.ledger.handle(
                L.RuntimeLost(lost, time.time(), "", pid, None, None, err.strip())
            )
            # not started: nothing ran, so they wait in the ledger's place for the next master
            self._fl.clear()
            to_end = self._mv.lost_pids()
        events.append(MasterReport("lost", pid, time.time(), stderr_tail=err, message=what))
        step = Step(events)
        carry_out(cmds, step)
        resend, stale = step.resend, step.stale
        # end what is left of the old master and its workers
        bounded(lambda: self._rp.tmgr.cancel_tasks([old.uid]), 10, "cancel master")
        self._cancel_workers(self._mv.worker_tasks)
        # its unstarted tasks are sent again: RP's scheduler, which keeps the tasks of a
        # master until its queue registers, must not hand them to anyone
        self._cancel_rp_tasks(stale)
        end_pids(to_end, grace=0.5)
        pilot_ok = self._rp.active()
        if not pilot_ok or not self._driver.budget.take():
            reason = (
                self._driver.budget.spent("start another master")
                if pilot_ok
                else f"the pilot is {self._rp.pilot.state}"
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
                message=f"started master {self._mv.task.uid} ({self._driver.budget.note()})",
            )
        )
        if resend:
            self._submit_now(resend, events)

    def _fatal(self, why: str, events: list[Any], unsent: Sequence[RunAttempt] = ()) -> None:
        with self._lock:
            fatal = self._driver.fatal(why)
            gone = self._fl.clear()
        events.extend(runtime_lost(e.item.m, why, entry=e) for e in gone)
        events.extend(runtime_lost(m, why) for m in unsent)
        events.append(fatal)

    # ------------------------------------------------------------------ pings (rpc)
    def _rpc(self, cmd: str, timeout: float, **kwargs: Any) -> Any:
        return raptor_rpc(self._rp.pilot, self._mv.task, cmd, timeout, **kwargs)

    def _async_rpc(self, cmd: str, **kwargs: Any) -> None:
        def run() -> None:
            with contextlib.suppress(Exception):
                self._rpc(cmd, self.ping_timeout, **kwargs)

        self._driver.nursery.start("pilotfish-rp-rpc", run)

    def _ping_loop(self) -> None:
        while not self._stopping.wait(self.hb_interval):
            if self._driver.dead:
                return
            with self._lock:
                gen, running = self._mv.gen, self._mv.seen_running
            if running is None:
                continue
            with self._lock:
                ended = list(self._mv.ended.values())
            try:
                ans = self._rpc("pilotfish_ping", self.ping_timeout, ended=ended)
            except Exception:
                continue
            if isinstance(ans, dict):
                self._q.put(("ping", gen, ans))
            self._sweep(gen)

    def _sweep(self, gen: int) -> None:
        """Ask the master about attempts sent ``resend_after`` ago (since it was up) that
        have not started and that it has not confirmed yet (see ``_on_sweep``)."""
        now = time.monotonic()
        with self._lock:
            up = self._mv.up_at
            if up is None or gen != self._mv.gen or self._driver.dead:
                return
            due = self._fl.due(gen, up, now)
        if not due:
            return
        try:
            ans = self._rpc(
                "pilotfish_sweep",
                self.ping_timeout,
                uids=[att.uid for att in due],
                graces=[self._fl.grace(att) for att in due],
            )
        except Exception:
            return
        if isinstance(ans, dict):
            self._q.put(("sweep", gen, ans))

    def _on_ping(self, gen: int, ans: dict[str, Any], events: list[Any]) -> None:
        if gen != self._mv.gen or self._driver.dead:
            return
        now = time.time()
        with self._lock:
            events.extend(self._mv.answer(ans, time.monotonic(), now))
            # what the answer says has started: known here now, if not already
            for uid, wid in self._mv.running.items():
                e = self._fl.entry(uid)
                if e is None or e.where == "started":
                    continue
                _, pid, host, *_ = self._mv.workers.get(wid) or ["", 0, ""]
                start = L.Start(wid, e.attempt, int(pid), host, now)
                carry_out(self._fl.ledger.handle(start), Step(events))

    # ------------------------------------------------------------------ teardown
    def _start_reaper(self) -> None:
        """A watcher that ends our RP processes if this client dies without stop()."""
        self._reaper.start()
        if self._rp.own_pilot:
            self._reaper.tell(f"token {self._token}")

    def _stop_master(self) -> None:
        master = self._mv.task
        if master is None:
            return
        # a master that never answered is still starting (or hung): RP cancels its task
        with contextlib.suppress(Exception):
            if master.state not in rp.FINAL and self._mv.last_answer is not None:
                self._rpc("stop", 5.0)
        # and the workers submitted with it (one still starting has no pid to end, and
        # may never hear of a master that is gone)
        cancel_launched(self._rp.tmgr, [master, *self._mv.worker_tasks])
