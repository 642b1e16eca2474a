"""pilotfish's raptor master (runs inside the pilot; loaded by path by RADICAL-Pilot).

RADICAL-Pilot loads this file with ``ru.load_class(path, "PilotfishMaster")``, so it
uses absolute imports only. Which task is queued, held by which worker or running is the
shared attempt ledger's (:mod:`pilotfish.core.ledger`, keyed by the number at the end of
the task's uid); this master turns RP's signals into ledger events:

* every task it received (``request_cb``) until it is finished or advanced by us;
* which worker *holds* which task: a worker claims the bulk of tasks it took from RP's
  shared queue (``pilotfish_claim``) as soon as it has them;
* which held task is *running*: the worker asks before it forks the process for one
  (``pilotfish_start``); the master then publishes the task's AGENT_EXECUTING state
  with the worker's name, pid and host in ``description.metadata["pilotfish"]``, so
  the client knows at once where the attempt runs (RP alone reports AGENT_EXECUTING
  only together with the result);
* each worker's pid, host and pre-flight result (``pilotfish_hello``).

When a worker fails or is cancelled (its RP state update, with its exit code) or its
process is gone (polled; RP's update is awaited for a second so the exit code is
known), the master advances exactly the tasks it was *running* to FAILED, with the
worker's exit code, signal and the tail of its stderr in the task's ``return_value`` (a
dict with ``"pilotfish": "worker_lost"``), kills their program process groups, puts the
tasks it merely *held* back on the queue (not blamed), and starts a replacement
worker. A task can also vanish between RP's queue and a worker that dies before it
claims it: the queue is first-in first-out, so a task still unclaimed a second after a
task pushed later was claimed is pushed again. A claim is the fence, so a duplicate on
the queue is dropped by whoever takes it second. A result is accepted only from the
worker that holds the task, once: a late result for a task already advanced or
requeued is dropped.

Every ledger key is the number at the end of a task's uid, unique among the tasks of
one client backend only; so the master takes only tasks meant for it (their
``raptor_id`` is this master and their uid carries its client's token) and fences
every claim, start, result and process group by the task's full uid as well. RP's
agent scheduler keeps a ZMQ push socket to every master that registered and never
drops it when a master is killed; RP picks the lowest free port for every queue, so
that socket reconnects to a later master's queue on the same port and delivers the dead
master's tasks there (observed: another client's tasks 2..7 arrived at a new master,
task 2 of the new client took the place of the foreign task 2 in the ledger and was
dropped as "already finished" when its worker claimed it: it waited forever). Such a
task is cancelled here, never run.

Two backstops find a task that is lost on the way nevertheless:

* a task pushed on the queue more than ``_IDLE_GRACE`` ago and still unclaimed while a
  ready worker held nothing all that time is pushed again (then after twice as long,
  and so on); the claim drops the copy that comes second;
* the client asks (``pilotfish_sweep``) about the tasks it submitted a while ago that
  it has not seen start; the master answers, atomically with its request callback,
  which of them it has, and which it takes as lost on the way and *withdraws*: if one
  arrives later it is cancelled, not run. Lost means not received although a task the
  client sent later (a higher number) arrived a grace period ago (RP's way to the
  master is first-in first-out), or nothing arrived for a grace period: a slow RP, with
  thousands of tasks on their way, is not mistaken for a lossy one. The client sends the
  withdrawn ones again under new uids, so no task waits forever for a message RP lost,
  and none runs twice.

Pre-flight (:func:`pilotfish.runtime.preflight.worker_checks`) runs here when the master
starts and on every worker when it starts. If it fails, every task (queued, held or
later) fails with an ENVIRONMENT error (``"pilotfish": "environment"``) and no
(replacement) worker is started.

The client pings the master through RP's raptor rpc (``pilotfish_ping``): the answer
names the master's pid, its workers and the running tasks; ``pilotfish_cancel``
withdraws tasks that are not running.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import json
import os
import signal
import threading
import time
from collections import deque
from typing import Any

import radical.pilot as rp
import radical.pilot.states as rps
import radical.utils as ru
from radical.pilot import constants as rpc_const
from radical.pilot.raptor import Master

from pilotfish.core import ledger as L

_CFG_VAR = "PILOTFISH_RP_CFG"
_MASTER_VAR = "PILOTFISH_RP_MASTER"
_TAIL = 4000
_GONE_GRACE = 1.0  # s to wait for RP's state update (with the exit code) of a vanished worker
_TRANSIT_GRACE = 1.0  # s after a later task was claimed, an unclaimed one is taken as lost
_IDLE_GRACE = 3.0  # s a task may wait unclaimed on the queue while a worker holds nothing
_ARRIVALS_KEPT = 1800.0  # s of task arrivals a client's sweep may ask about


def _tail(path: str, n: int = _TAIL) -> str:
    """The last ``n`` bytes of a worker's stderr file in RP's sandbox, which a task could
    have replaced with a FIFO: read only if it is a regular file, never blocking."""
    from pilotfish.runtime.files import read_tail

    try:
        return read_tail(path, n)[0].decode("utf-8", "replace")
    except OSError:
        return ""


def _host() -> str:
    from pilotfish.wire import messages as _wire

    return _wire.host_name()


def _pid_alive(pid: int) -> bool:
    try:
        import psutil

        p = psutil.Process(pid)
        return bool(p.status() != psutil.STATUS_ZOMBIE)
    except Exception:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


# how bash reports a child that a signal ended ("<script>: line 68: 26327 Killed  <cmd>")
_SHELL_SIGNALS = {
    "Killed": signal.SIGKILL,
    "Terminated": signal.SIGTERM,
    "Segmentation fault": signal.SIGSEGV,
    "Aborted": signal.SIGABRT,
    "Bus error": signal.SIGBUS,
    "Hangup": signal.SIGHUP,
    "Interrupt": signal.SIGINT,
    "Floating point exception": signal.SIGFPE,
    "Illegal instruction": signal.SIGILL,
}


def _shell_reported_exit(stderr_tail: str, pid: int) -> int | None:
    """RP runs a worker under a bash script, which writes to the worker's stderr file how
    a signal ended it: RP's own state update (with the exit code) may come late, or not
    reach the master at all."""
    import re

    words = "|".join(re.escape(w) for w in _SHELL_SIGNALS)
    found = re.findall(rf"\b{pid}\s+({words})\b", stderr_tail)
    return 128 + int(_SHELL_SIGNALS[found[-1]]) if found else None


def _exit_status(exit_code: Any) -> tuple[int | None, str, str | None]:
    """(returncode, 'was killed by signal SIGKILL (-9)', 'SIGKILL') from RP's exit code.

    RP starts a worker through a shell, which reports a signal N as exit code 128+N."""
    from pilotfish.core.ledger import describe_exit

    if not isinstance(exit_code, int):
        return None, "exit status unknown", None
    rc = exit_code
    if rc > 128 and (rc - 128) in {s.value for s in signal.Signals}:
        rc = -(rc - 128)
    how, sig = describe_exit(rc)
    return exit_code, how, sig


def _aid(uid: str) -> int:
    """The ledger id of a task: the client numbers every task it submits
    (``pf.TOKEN.TAG.N``), so ``N`` is unique among this master's tasks."""
    try:
        return int(str(uid).rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return hash(uid)  # not one of ours: never matches a ledger entry


class PilotfishMaster(Master):  # type: ignore[misc]
    def __init__(self) -> None:
        self._pf_cfg: dict[str, Any] = json.loads(
            base64.b64decode(os.environ.get(_CFG_VAR) or "e30=")
        )
        self._pf_lock = threading.RLock()
        self._pf_ledger = L.Ledger()  # every task it received, until finished or lost
        # unclaimed task uid -> its place on RP's queue, in push order (RP queue plumbing:
        # a task can vanish between the queue and a worker that dies before claiming it)
        self._pf_pushed: dict[str, int] = {}
        self._pf_seq = 0
        self._pf_claims: deque[tuple[float, int]] = deque()  # (when, place) of claims
        self._pf_claimed_upto = 0  # a task placed before this is lost if still unclaimed
        self._pf_push_time: dict[str, float] = {}  # unclaimed task uid -> when pushed
        self._pf_repushed: dict[str, int] = {}  # task uid -> pushed again for idle workers
        # every task uid this master received (a client's sweep asks about the others),
        # and those it withdrew, unreceived, for a sweep: cancelled if they come later
        self._pf_seen: set[str] = set()
        self._pf_tomb: set[str] = set()
        self._pf_up = False  # registered with RP's scheduler: tasks can arrive
        # when the highest task number received so far went up, and to what (a sweep
        # asks what had arrived a grace period ago); older than _ARRIVALS_KEPT: settled
        self._pf_arrival_times: list[float] = []
        self._pf_arrival_tops: list[int] = []
        self._pf_settled = 0
        self._pf_last_arrival = time.monotonic()
        self._pf_top = 0
        self._pf_token = str(self._pf_cfg.get("token") or "")
        self._pf_test: dict[str, Any] = dict(self._pf_cfg.get("test_hooks") or {})
        self._pf_workers: dict[str, dict[str, Any]] = {}  # worker uid -> record
        self._pf_env_problem = ""
        self._pf_doomed: list[dict[str, Any]] = []  # to fail: pre-flight failed
        self._pf_stopping = False
        self._pf_preflight()  # before RP's init: tasks arrive as soon as it registers
        super().__init__()
        self._pf_up = True
        self._pf_last_arrival = time.monotonic()
        if self._pf_env_problem:
            self._pf_log(self._pf_env_problem)
        ts = self._task_service
        ts.register_request("pilotfish_hello", self._pf_hello)
        ts.register_request("pilotfish_claim", self._pf_claim)
        ts.register_request("pilotfish_start", self._pf_start)
        ts.register_request("pilotfish_group", self._pf_group)
        self.register_rpc_handler("raptor_rpc", self._raptor_rpc, rpc_addr=self.uid)
        threading.Thread(target=self._pf_watch, name="pilotfish-watch", daemon=True).start()
        if not self._pf_env_problem:
            self._pf_start_workers(int(self._pf_cfg.get("workers") or 1))

    def _pf_preflight(self) -> None:
        try:
            from pilotfish.runtime.preflight import worker_checks
            from pilotfish.wire import messages as _wire

            checks = worker_checks(self._pf_cfg.get("versions") or {}, self._pf_cfg["rundir"])
            problems = [c.message() for c in checks if not c.ok]
            host = _wire.host_name()
        except Exception as e:
            problems, host = [f"pre-flight could not run: {type(e).__name__}: {e}"], "?"
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            self._pf_env_problem = (
                "pre-flight checks failed in the pilotfish raptor master "
                f"{os.environ.get('RP_TASK_ID', '?')} "
                f"(pid {os.getpid()}, host {host}); no worker was started:\n{lines}"
            )

    # -- workers ----------------------------------------------------------------
    def _pf_start_workers(self, n: int) -> None:
        if n <= 0 or self._pf_stopping:
            return
        env = {"PILOTFISH_RP_CFG": os.environ.get(_CFG_VAR, "{}"), _MASTER_VAR: self._pf_me()}
        env.update(self._pf_cfg.get("worker_env") or {})
        tds = []
        for _ in range(n):
            td = rp.TaskDescription(
                {
                    "mode": rp.RAPTOR_WORKER,
                    "raptor_class": "PilotfishWorker",
                    "raptor_file": self._pf_cfg["worker_file"],
                    "environment": env,
                }
            )
            if self._pf_cfg.get("named_env"):
                td.named_env = self._pf_cfg["named_env"]
            tds.append(td)
        uids = self.submit_workers(tds)
        with self._pf_lock:
            for uid in uids:
                self._pf_workers[uid] = {
                    "uid": uid,
                    "pid": 0,
                    "host": "",
                    "state": "starting",
                    "t0": time.time(),
                }

    @staticmethod
    def _pf_me() -> str:
        """'host pid create_time': a worker on this host ends itself when we are gone."""
        import psutil

        return f"{_host()} {os.getpid()} {psutil.Process().create_time()!r}"

    def _pf_log(self, msg: str) -> None:
        path = os.path.join(os.environ.get("RP_TASK_SANDBOX", "."), "pilotfish-master.log")
        with contextlib.suppress(Exception), open(path, "a") as f:
            f.write(f"{time.time():.3f} {msg}\n")

    def _pf_hello(self, wid: str, pid: int, host: str, problems: list[str]) -> bool:
        self._pf_log(f"hello {wid} pid {pid} host {host} problems {problems}")
        with self._pf_lock:
            w = self._pf_workers.setdefault(wid, {"uid": wid, "t0": time.time()})
            w.update(pid=pid, host=host, state="ready" if not problems else "preflight_failed")
            w["busy_at"] = time.monotonic()  # idle from now on, as far as we know
            if problems and not self._pf_env_problem:
                lines = "\n".join(f"  - {p}" for p in problems)
                self._pf_env_problem = (
                    f"pre-flight checks failed on RADICAL-Pilot raptor worker {wid} "
                    f"(pid {pid}, host {host}):\n{lines}"
                )
                doomed = [e.item for e in self._pf_ledger.entries.values()]
                self._pf_ledger = L.Ledger()
                self._pf_unpushed(list(self._pf_pushed))
            else:
                doomed = []
        for t in doomed:
            self._pf_fail(t, {"pilotfish": "environment", "message": self._pf_env_problem}, 78)
        return not problems

    def _pf_entry(self, uid: str) -> L.Entry | None:
        """The ledger entry of task ``uid``: its key and its full uid (lock held)."""
        e = self._pf_ledger.get(_aid(uid))
        return e if e is not None and e.item.get("uid") == uid else None

    def _pf_claim(self, wid: str, uids: list[str]) -> list[str]:
        """A worker took these tasks off the queue: it holds those still queued here.

        Not its own: a task this master never took (another master's, delivered to our
        queue by a stale RP socket), one held already (a copy pushed again), or one that
        is no longer in flight. A worker declared lost holds nothing: what it took goes
        back on the queue."""
        back: list[dict[str, Any]] = []
        with self._pf_lock:
            w = self._pf_workers.get(wid)
            lost = w is not None and w.get("state") == "lost"
            ids: dict[int, str] = {}
            for u in uids:
                e = self._pf_entry(u)
                if e is None or e.where != "queued":
                    continue
                if lost:
                    back.append(e.item)
                else:
                    ids[e.attempt] = u
            cmds = self._pf_ledger.handle(L.Hold(wid, tuple(ids))) if ids else []
            dropped = {c.attempt for c in cmds if isinstance(c, L.Ignored)}
            mine = [u for i, u in ids.items() if i not in dropped]
            now = time.monotonic()
            if w is not None and mine:
                w["busy_at"] = now
            for uid in mine:
                self._pf_push_time.pop(uid, None)
                self._pf_repushed.pop(uid, None)
                place = self._pf_pushed.pop(uid, None)
                if place is not None:
                    self._pf_claims.append((now, place))
            self._pf_push(back)
            stopping = self._pf_stopping
        if back and not stopping:
            self._pf_log(f"lost worker {wid} took {[t['uid'] for t in back]}: pushed again")
            self._req_put.put(back)
        return mine

    def _pf_push(self, tasks: list[dict[str, Any]]) -> None:
        """Record tasks as (back) on RP's queue (lock held); the caller puts them there."""
        now = time.monotonic()
        for t in tasks:
            self._pf_pushed.pop(t["uid"], None)
            self._pf_seq += 1
            self._pf_pushed[t["uid"]] = self._pf_seq
            self._pf_push_time[t["uid"]] = now

    def _pf_lost_in_transit(self) -> list[dict[str, Any]]:
        """Unclaimed tasks placed before one claimed more than a grace period ago (lock
        held): the queue is FIFO, so they went to a worker that died before claiming."""
        limit = time.monotonic() - _TRANSIT_GRACE
        while self._pf_claims and self._pf_claims[0][0] < limit:
            self._pf_claimed_upto = max(self._pf_claimed_upto, self._pf_claims.popleft()[1])
        lost, stale = [], []
        for uid, place in self._pf_pushed.items():
            if place >= self._pf_claimed_upto:
                break
            e = self._pf_entry(uid)
            if e is not None and e.where == "queued":
                lost.append(e.item)
            else:  # ended (or started) without a claim of ours: nothing to push
                stale.append(uid)
        self._pf_unpushed(stale)
        self._pf_push(lost)
        return lost

    def _pf_unpushed(self, uids: list[str]) -> None:
        """These tasks are off the queue for good (lock held)."""
        for uid in uids:
            self._pf_pushed.pop(uid, None)
            self._pf_push_time.pop(uid, None)
            self._pf_repushed.pop(uid, None)

    def _pf_unclaimed_while_idle(self, now: float) -> list[dict[str, Any]]:
        """Tasks on the queue, unclaimed for ``_IDLE_GRACE`` (then twice as long, ...)
        while a ready worker held nothing for as long (lock held): a worker waiting on
        RP's queue takes a task within milliseconds, so these went astray (a worker took
        them and died before its claim, a stale socket took them). Pushed again; the
        claim drops whichever copy comes second."""
        idle_since = [
            float(w.get("busy_at") or now)
            for w in self._pf_workers.values()
            if w.get("state") == "ready" and not self._pf_ledger.count(w["uid"])
        ]
        if not idle_since or now - min(idle_since) < _IDLE_GRACE:
            return []
        idle_for = now - min(idle_since)
        lost, stale = [], []
        for uid, pushed in self._pf_push_time.items():
            wait = _IDLE_GRACE * 2 ** min(self._pf_repushed.get(uid, 0), 5)
            if now - pushed < wait or idle_for < wait:
                continue
            e = self._pf_entry(uid)
            if e is not None and e.where == "queued":
                lost.append(e.item)
            else:
                stale.append(uid)
        self._pf_unpushed(stale)
        for t in lost:
            self._pf_repushed[t["uid"]] = self._pf_repushed.get(t["uid"], 0) + 1
        self._pf_push(lost)
        return lost

    def _pf_start(self, wid: str, uid: str, pid: int) -> bool:
        """A worker asks to run a task it holds (the start fence), just before it forks
        the task's process (``pid`` is the worker's own)."""
        with self._pf_lock:
            w = self._pf_workers.get(wid) or {}
            if w.get("state") == "lost":
                return False
            if self._pf_entry(uid) is None:
                self._pf_log(f"refused start of {uid} on {wid}: not one of this master's tasks")
                return False
            cmds = self._pf_ledger.handle(
                L.Start(wid, _aid(uid), int(w.get("pid") or 0), w.get("host") or "", time.time())
            )
            refused = [c for c in cmds if isinstance(c, L.Refused)]
            if refused:
                self._pf_log(f"refused start of {uid} on {wid}: {refused[0].reason}")
                return False
            info = {
                "worker": wid,
                "pid": int(w.get("pid") or 0),
                "host": w.get("host") or "",
                "time": time.time(),
                "master_pid": os.getpid(),
                "master_host": _host(),
            }
        update = {
            "uid": uid,
            "type": "task",
            "state": rps.AGENT_EXECUTING,
            "description": {"metadata": {"pilotfish": info}},
            "$all": True,  # publish these fields, not just the state
        }
        try:
            self.advance([update], publish=True, push=False)
        except Exception:
            self._log.exception("pilotfish: could not publish the start of %s", uid)
        return True

    def _pf_group(self, uid: str, pgid: int) -> bool:
        with self._pf_lock:
            e = self._pf_entry(uid)
            if e is not None and e.worker:
                self._pf_ledger.handle(L.Group(e.worker, e.attempt, int(pgid)))
        return True

    def _pf_watch(self) -> None:
        """Backstop for RP's state updates: a worker whose process is gone is lost."""
        while not self._term.is_set():
            time.sleep(0.25)
            now = time.monotonic()
            gone = []
            with self._pf_lock:
                for w in self._pf_workers.values():
                    if not w.get("pid") or w.get("state") not in ("ready", "preflight_failed"):
                        continue
                    if _pid_alive(int(w["pid"])):
                        self._pf_check_stopped(w, now)
                        continue
                    w.setdefault("gone_at", now)
                    if now - w["gone_at"] >= _GONE_GRACE:
                        gone.append(w["uid"])
            for wid in gone:
                self._pf_worker_lost(wid, None, "its process is gone")
            with self._pf_lock:
                doomed, self._pf_doomed = self._pf_doomed, []
            for t in doomed:
                self._pf_fail(t, {"pilotfish": "environment", "message": self._pf_env_problem}, 78)
            with self._pf_lock:
                for w in self._pf_workers.values():
                    if self._pf_ledger.count(w["uid"]):
                        w["busy_at"] = now
                lost = [] if self._pf_stopping else self._pf_lost_in_transit()
                idle = [] if self._pf_stopping else self._pf_unclaimed_while_idle(now)
            if lost:
                self._pf_log(
                    f"lost on the way to a worker, pushed again: {[t['uid'] for t in lost]}"
                )
                self._req_put.put(lost)
            if idle:
                self._pf_log(
                    f"unclaimed while a worker was idle, pushed again: {[t['uid'] for t in idle]}"
                )
                self._req_put.put(idle)

    def _pf_check_stopped(self, w: dict[str, Any], now: float) -> None:
        """A worker the kernel shows stopped (SIGSTOP, a debugger, a suspended job) for a
        heartbeat interval runs nothing and answers nothing: it is killed as hung, and then
        lost like any dead worker (lock held). The local master's rule, from /proc."""
        from pilotfish.runtime.procs import proc_sample

        sample = proc_sample(int(w["pid"]))
        if sample is None or sample[0] not in ("T", "t"):
            w.pop("stopped_at", None)
            return
        since = w.setdefault("stopped_at", now)
        interval = float(self._pf_cfg.get("heartbeat_interval") or 1.0)
        if now - since < interval or w.get("hung"):
            return
        w["hung"] = (
            f"its process was stopped (kernel state {sample[0]!r}: SIGSTOP, a debugger or a "
            f"suspended job) for {now - since:.1f} s; declared hung and killed"
        )
        self._pf_log(f"worker {w['uid']} (pid {w['pid']}) {w['hung']}")
        with contextlib.suppress(OSError):
            os.kill(int(w["pid"]), signal.SIGKILL)

    def _state_cb(self, topic: str, msg: Any) -> bool:
        with contextlib.suppress(Exception):
            if msg.get("cmd") == "update":
                for thing in ru.as_list(msg.get("arg")):
                    uid, state = thing.get("uid"), thing.get("state")
                    if uid in self._pf_workers and state in rps.FINAL:
                        self._pf_worker_lost(uid, thing.get("exit_code"), f"RP state {state}")
        return super()._state_cb(topic, msg)  # type: ignore[no-any-return]

    def _pf_worker_lost(self, wid: str, exit_code: Any, why: str) -> None:
        self._pf_log(f"worker lost? {wid} exit {exit_code}: {why}")
        with self._pf_lock:
            w = self._pf_workers.get(wid)
            if w is None or w.get("state") in ("lost", "stopped"):
                return
            was = w.get("state")
            w["state"] = "lost"
            stopping = self._pf_stopping
            if w.get("hung"):  # we killed it: say why, and how
                why, exit_code = w["hung"], -9
        err_path = os.path.join(self._sbox, f"{wid}.err")
        tail = _tail(err_path)
        if exit_code is None and w.get("pid"):
            exit_code = _shell_reported_exit(tail, int(w["pid"]))
        code, how, sig = _exit_status(exit_code)
        what = (
            f"RADICAL-Pilot raptor worker {wid} (pid {w.get('pid') or '?'}, host "
            f"{w.get('host') or '?'}) was lost: {why}" + (f"; it {how}" if code is not None else "")
        )
        with self._pf_lock:
            tasks = {a: self._pf_ledger.entries[a].item for a in self._pf_ledger.started_on(wid)}
            cmds = self._pf_ledger.handle(
                L.WorkerLost(wid, what, time.time(), code, sig, tail[-2000:])
            )
            running, held = [], []
            for c in cmds:
                if isinstance(c, L.KillGroups):
                    for pg in c.pgids:
                        with contextlib.suppress(OSError):
                            os.killpg(pg, signal.SIGKILL)
                elif isinstance(c, L.Requeue):
                    held = list(c.items)
                elif isinstance(c, L.Report) and isinstance(c.msg, L.Lost):
                    running.append(c.msg)
            self._pf_push(held)
        if held and not stopping:
            self._pf_log(f"requeue {[t['uid'] for t in held]} after {wid} was lost")
            self._req_put.put(held)
        for lost in running:
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
                "stderr_tail": tail[-2000:],
                "stderr_path": err_path,
                "message": f"{lost.message}; its stderr: {err_path}",
            }
            self._pf_fail(task, info, code if isinstance(code, int) and code > 0 else 1)
        if not stopping and was != "preflight_failed" and not self._pf_env_problem:
            self._pf_start_workers(1)

    def _pf_fail(self, task: dict[str, Any], info: dict[str, Any], code: int) -> None:
        task["exit_code"] = code or 1
        task["return_value"] = info
        task["stdout"] = ""
        task["stderr"] = info.get("stderr_tail", "")
        task["exception"] = f"pilotfish: {info.get('pilotfish')}"
        task["exception_detail"] = info.get("message", "")
        task["target_state"] = rps.FAILED
        try:
            Master._result_cb(self, [task])
        except Exception:
            self._log.exception("pilotfish: could not advance %s", task.get("uid"))

    # -- tasks ------------------------------------------------------------------
    def _pf_mine(self, task: dict[str, Any]) -> bool:
        """A task meant for this master: its raptor_id is ours and its uid carries our
        client's token (RP's scheduler may deliver a dead master's tasks to our queue)."""
        uid = str(task.get("uid") or "")
        rid = (task.get("description") or {}).get("raptor_id")
        if rid and rid != getattr(self, "_uid", rid):
            return False
        return not self._pf_token or uid.startswith(f"pf.{self._pf_token}.")

    def request_cb(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keep: list[dict[str, Any]] = []
        refuse: list[dict[str, Any]] = []  # not ours, or withdrawn: cancelled, never run
        drop = {int(n) for n in self._pf_test.get("master_drops") or ()}
        with self._pf_lock:
            problem = self._pf_env_problem
            for t in tasks:
                uid = str(t.get("uid") or "")
                if not self._pf_mine(t) or uid in self._pf_tomb:
                    refuse.append(t)
                elif uid in self._pf_seen:
                    continue  # delivered twice: the first copy is the one in flight
                elif (e := self._pf_ledger.get(_aid(uid))) is not None:
                    self._pf_log(f"refused {uid}: its number is {e.item.get('uid')}'s")
                    refuse.append(t)
                elif _aid(uid) in drop:  # test hook: a request lost on its way here
                    self._pf_log(f"test hook: dropped the request for {uid}")
                else:
                    self._pf_seen.add(uid)
                    keep.append(t)
            if keep:
                self._pf_arrived(max(_aid(t["uid"]) for t in keep))
            if not problem:
                self._pf_ledger.submit((_aid(t["uid"]), t["uid"], t, None) for t in keep)
                self._pf_push(keep)
        if refuse:
            which = [(t.get("uid"), (t.get("description") or {}).get("raptor_id")) for t in refuse]
            self._pf_log(f"cancelled tasks not meant for this master, or withdrawn: {which}")
            with contextlib.suppress(Exception):
                self.advance(refuse, rps.CANCELED, publish=True, push=False)
        if problem:
            # a state published from here does not reach the client (RP 1.103): let RP
            # submit them, then fail them through the result path (the watch thread)
            with self._pf_lock:
                self._pf_doomed.extend(keep)
        return keep

    def _result_cb(self, tasks: Any) -> None:
        mine = []
        with self._pf_lock:
            for t in ru.as_list(tasks):
                uid = t.get("uid")
                if self._pf_entry(str(uid)) is None:
                    self._log.info("pilotfish: dropped a result for %s: not in flight", uid)
                    continue
                (c,) = self._pf_ledger.handle(L.Finish(str(t.get("worker")), _aid(uid)))
                if isinstance(c, L.Accept):
                    mine.append(t)
                else:
                    self._log.info("pilotfish: dropped a result for %s: %s", uid, c)
        if mine:
            super()._result_cb(mine)

    def _pf_shutdown(self) -> None:
        pids = [int(w.get("pid") or 0) for w in self._pf_workers.values()]
        for pid in pids:  # RP's worker_terminate is a request; make sure
            if pid:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
        # a worker still starting has no pid yet: have RP's agent cancel every worker task
        # (and such a worker ends itself when this master is gone)
        with contextlib.suppress(Exception):
            self.publish(
                rpc_const.CONTROL_PUBSUB,
                {"cmd": "cancel_tasks", "arg": {"uids": list(self._pf_workers)}},
            )
        self.stop()

    # -- rpc from the client ---------------------------------------------------------
    def _pf_arrived(self, top: int) -> None:
        """Tasks of ours arrived, numbered up to ``top`` (lock held)."""
        now = self._pf_last_arrival = time.monotonic()
        if top > self._pf_top:
            self._pf_top = top
            self._pf_arrival_times.append(now)
            self._pf_arrival_tops.append(top)
        old = bisect.bisect_left(self._pf_arrival_times, now - _ARRIVALS_KEPT)
        if old:
            self._pf_settled = self._pf_arrival_tops[old - 1]
            del self._pf_arrival_times[:old], self._pf_arrival_tops[:old]

    def _pf_top_at(self, when: float) -> int:
        """The highest task number of ours received at ``when`` or before (lock held)."""
        i = bisect.bisect_right(self._pf_arrival_times, when)
        return self._pf_arrival_tops[i - 1] if i else self._pf_settled

    def _pf_sweep(self, uids: list[str], graces: list[float]) -> dict[str, list[str]] | None:
        """Of these tasks (the client's, submitted a while ago and not seen to start):
        ``known``, those this master received; ``gone``, those it takes as lost on the
        way: a task the client sent later (a higher number) arrived the task's grace
        period ago, or nothing arrived for that long. Those are withdrawn at once, under
        the same lock as ``request_cb``, so one that arrives after all is cancelled and
        the client may send it again under a new uid. The others may still be on their
        way. None while RP has not registered our queue (tasks wait for that in RP's
        scheduler)."""
        if not self._pf_up:
            return None
        now = time.monotonic()
        known, gone = [], []
        with self._pf_lock:
            for u, g in zip(uids, graces, strict=False):
                if u in self._pf_seen:
                    known.append(u)
                elif now - self._pf_last_arrival >= g or _aid(u) < self._pf_top_at(now - g):
                    gone.append(u)
            self._pf_tomb.update(gone)
        if gone:
            self._pf_log(f"sweep: never received {gone}: withdrawn, the client sends them again")
        return {"known": known, "gone": gone}

    def _raptor_rpc(self, *args: Any, **kwargs: Any) -> Any:
        cmd = kwargs.get("raptor_cmd")
        if cmd == "pilotfish_ping":
            with self._pf_lock:
                return {
                    "pid": os.getpid(),
                    "host": _host(),
                    "time": time.time(),
                    "workers": {
                        w["uid"]: [w.get("state"), int(w.get("pid") or 0), w.get("host") or ""]
                        for w in self._pf_workers.values()
                    },
                    "running": {e.item["uid"]: e.worker for e in self._pf_ledger.started()},
                    "env_problem": self._pf_env_problem,
                    "up": self._pf_up,
                }
        if cmd == "pilotfish_sweep":
            uids = [str(u) for u in kwargs.get("uids") or ()]
            graces = [float(g) for g in kwargs.get("graces") or ()]
            return self._pf_sweep(uids, graces + [10.0] * (len(uids) - len(graces)))
        if cmd == "pilotfish_cancel":
            uids = kwargs.get("uids") or []
            with self._pf_lock:
                items = {e.attempt: e.item for u in uids if (e := self._pf_entry(str(u)))}
                cmds = self._pf_ledger.handle(L.Revoke(tuple(items)))
                gone = [items[c.attempt] for c in cmds if isinstance(c, L.Withdraw)]
                self._pf_unpushed([t["uid"] for t in gone])
            if gone:
                self.advance(gone, rps.CANCELED, publish=True, push=False)
            return [t["uid"] for t in gone if t]
        if cmd == "stop":
            with self._pf_lock:
                self._pf_stopping = True
                for w in self._pf_workers.values():
                    if w.get("state") != "lost":
                        w["state"] = "stopped"
            # answer at once: RP's Component.stop() joins threads for seconds
            threading.Thread(target=self._pf_shutdown, name="pilotfish-stop", daemon=True).start()
            return True
        return super()._raptor_rpc(*args, **kwargs)
