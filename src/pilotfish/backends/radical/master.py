"""pilotfish's raptor master (runs inside the pilot; loaded by path by RADICAL-Pilot).

RADICAL-Pilot loads this file with ``ru.load_class(path, "PilotfishMaster")``, so it
uses absolute imports only. On top of RP's raptor ``Master`` it keeps its own record:

* every task it received (``request_cb``) until it is finished or advanced by us;
* which worker holds which task: a worker claims a task (synchronous request on the
  master's task service) before it runs it, so a worker's death names its tasks;
* each worker's pid, host and pre-flight result (``pilotfish_hello``).

When a worker fails or is cancelled (its RP state update) or its process is gone
(polled), the master advances exactly the tasks it held to FAILED, with the worker's
exit code and the tail of its stderr in the task's ``return_value`` (a dict with
``"pilotfish": "worker_lost"``), kills their program process groups, and starts a
replacement worker. A late result for a task already advanced is dropped (fencing).
If pre-flight fails on a worker, every task (queued, held or later) fails with an
ENVIRONMENT error (``"pilotfish": "environment"``) and no replacement is started.

The client pings the master through RP's raptor rpc (``pilotfish_ping``): the answer
names the master's pid and its workers, and ``pilotfish_cancel`` withdraws unclaimed
tasks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import radical.pilot as rp
import radical.pilot.states as rps
import radical.utils as ru
from radical.pilot import constants as rpc_const
from radical.pilot.raptor import Master

_CFG_VAR = "PILOTFISH_RP_CFG"
_TAIL = 4000


def _tail(path: str, n: int = _TAIL) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


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


class PilotfishMaster(Master):  # type: ignore[misc]
    def __init__(self) -> None:
        self._pf_cfg: dict[str, Any] = json.loads(
            base64.b64decode(os.environ.get(_CFG_VAR) or "e30=")
        )
        self._pf_lock = threading.RLock()
        self._pf_tasks: dict[str, dict[str, Any]] = {}  # task uid -> task dict
        self._pf_owner: dict[str, str] = {}  # task uid -> worker uid
        self._pf_groups: dict[str, int] = {}  # task uid -> program process group
        self._pf_workers: dict[str, dict[str, Any]] = {}  # worker uid -> record
        self._pf_env_problem = ""
        self._pf_stopping = False
        super().__init__()
        ts = self._task_service
        ts.register_request("pilotfish_hello", self._pf_hello)
        ts.register_request("pilotfish_claim", self._pf_claim)
        ts.register_request("pilotfish_group", self._pf_group)
        self.register_rpc_handler("raptor_rpc", self._raptor_rpc, rpc_addr=self.uid)
        threading.Thread(target=self._pf_watch, name="pilotfish-watch", daemon=True).start()
        self._pf_start_workers(int(self._pf_cfg.get("workers") or 1))

    # -- workers ----------------------------------------------------------------
    def _pf_start_workers(self, n: int) -> None:
        if n <= 0 or self._pf_stopping:
            return
        env = {"PILOTFISH_RP_CFG": os.environ.get(_CFG_VAR, "{}")}
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

    def _pf_log(self, msg: str) -> None:
        path = os.path.join(self._sbox, "pilotfish-master.log")
        with contextlib.suppress(Exception), open(path, "a") as f:
            f.write(f"{time.time():.3f} {msg}\n")

    def _pf_hello(self, wid: str, pid: int, host: str, problems: list[str]) -> bool:
        self._pf_log(f"hello {wid} pid {pid} host {host} problems {problems}")
        with self._pf_lock:
            w = self._pf_workers.setdefault(wid, {"uid": wid, "t0": time.time()})
            w.update(pid=pid, host=host, state="ready" if not problems else "preflight_failed")
            if problems and not self._pf_env_problem:
                lines = "\n".join(f"  - {p}" for p in problems)
                self._pf_env_problem = (
                    f"pre-flight checks failed on RADICAL-Pilot raptor worker {wid} "
                    f"(pid {pid}, host {host}):\n{lines}"
                )
                doomed = list(self._pf_tasks.values())
                self._pf_tasks.clear()
                self._pf_owner.clear()
            else:
                doomed = []
        for t in doomed:
            self._pf_fail(t, {"pilotfish": "environment", "message": self._pf_env_problem}, 78)
        return not problems

    def _pf_claim(self, wid: str, uid: str) -> bool:
        with self._pf_lock:
            w = self._pf_workers.get(wid)
            if uid not in self._pf_tasks or (w is not None and w.get("state") == "lost"):
                return False
            self._pf_owner[uid] = wid
            if w is not None:
                w["busy_since"] = time.time()
            return True

    def _pf_group(self, uid: str, pgid: int) -> bool:
        with self._pf_lock:
            if uid in self._pf_tasks:
                self._pf_groups[uid] = int(pgid)
        return True

    def _pf_watch(self) -> None:
        """Backstop for RP's state updates: a worker whose process is gone is lost."""
        while not self._term.is_set():
            time.sleep(0.25)
            with self._pf_lock:
                gone = [
                    w["uid"]
                    for w in self._pf_workers.values()
                    if w.get("pid")
                    and w.get("state") in ("ready", "preflight_failed")
                    and not _pid_alive(int(w["pid"]))
                ]
            for wid in gone:
                self._pf_worker_lost(wid, None, "its process is gone")

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
            held = [u for u, o in self._pf_owner.items() if o == wid]
            tasks = []
            for u in held:
                del self._pf_owner[u]
                t = self._pf_tasks.pop(u, None)
                pg = self._pf_groups.pop(u, None)
                if pg:
                    with contextlib.suppress(OSError):
                        os.killpg(pg, signal.SIGKILL)
                if t is not None:
                    tasks.append(t)
            stopping = self._pf_stopping
        err_path = os.path.join(self._sbox, f"{wid}.err")
        tail = _tail(err_path)
        sig = None
        if isinstance(exit_code, int) and exit_code < 0:
            sig = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else None
        elif isinstance(exit_code, int) and exit_code > 128:
            with contextlib.suppress(ValueError):
                sig = signal.Signals(exit_code - 128).name
        info = {
            "pilotfish": "worker_lost",
            "worker": wid,
            "pid": int(w.get("pid") or 0),
            "host": w.get("host") or "",
            "returncode": exit_code if isinstance(exit_code, int) else None,
            "signal": sig,
            "stderr_tail": tail[-2000:],
            "stderr_path": err_path,
            "message": (
                f"RADICAL-Pilot raptor worker {wid} (pid {w.get('pid') or '?'}, host "
                f"{w.get('host') or '?'}) was lost ({why}"
                + (f", exit code {exit_code}" if exit_code is not None else "")
                + (f", {sig}" if sig else "")
                + f"); its stderr: {err_path}"
            ),
        }
        self._pf_events_lost = getattr(self, "_pf_events_lost", 0) + 1
        for t in tasks:
            self._pf_fail(t, dict(info), exit_code if isinstance(exit_code, int) else 1)
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
    def request_cb(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keep = []
        with self._pf_lock:
            problem = self._pf_env_problem
            for t in tasks:
                if not problem:
                    self._pf_tasks[t["uid"]] = t
                    keep.append(t)
        if problem:
            for t in tasks:
                self._pf_fail(t, {"pilotfish": "environment", "message": problem}, 78)
        return keep

    def _result_cb(self, tasks: Any) -> None:
        mine = []
        with self._pf_lock:
            for t in ru.as_list(tasks):
                uid = t.get("uid")
                if uid in self._pf_tasks:
                    del self._pf_tasks[uid]
                    self._pf_owner.pop(uid, None)
                    self._pf_groups.pop(uid, None)
                    mine.append(t)
                else:
                    self._log.info("pilotfish: dropped a late result for %s", uid)
        if mine:
            super()._result_cb(mine)

    # -- rpc from the client ---------------------------------------------------------
    def _raptor_rpc(self, *args: Any, **kwargs: Any) -> Any:
        cmd = kwargs.get("raptor_cmd")
        if cmd == "pilotfish_ping":
            with self._pf_lock:
                return {
                    "pid": os.getpid(),
                    "time": time.time(),
                    "workers": {
                        w["uid"]: [w.get("state"), int(w.get("pid") or 0), w.get("host") or ""]
                        for w in self._pf_workers.values()
                    },
                    "claimed": dict(self._pf_owner),
                    "env_problem": self._pf_env_problem,
                }
        if cmd == "pilotfish_cancel":
            uids = kwargs.get("uids") or []
            gone = []
            with self._pf_lock:
                for u in uids:
                    if u in self._pf_tasks and u not in self._pf_owner:
                        gone.append(self._pf_tasks.pop(u))
            if gone:
                self.advance(gone, rps.CANCELED, publish=True, push=False)
            return [t["uid"] for t in gone]
        if cmd == "stop":
            with self._pf_lock:
                self._pf_stopping = True
                for w in self._pf_workers.values():
                    if w.get("state") != "lost":
                        w["state"] = "stopped"
            pids = [int(w.get("pid") or 0) for w in self._pf_workers.values()]
            # a worker still starting has no pid yet: have RP's agent cancel every worker task
            with contextlib.suppress(Exception):
                self.publish(
                    rpc_const.CONTROL_PUBSUB,
                    {"cmd": "cancel_tasks", "arg": {"uids": list(self._pf_workers)}},
                )
            self.stop()
            for pid in pids:  # RP's worker_terminate is a request; make sure
                if pid:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGTERM)
            return True
        return super()._raptor_rpc(*args, **kwargs)
