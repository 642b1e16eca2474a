"""pilotfish's raptor worker (runs inside the pilot; loaded by path by RADICAL-Pilot).

RADICAL-Pilot loads this file with ``ru.load_class(path, "PilotfishWorker")``, so it
uses absolute imports only. It is RP's ``DefaultWorker`` (one forked process per task)
with these changes:

* pre-flight (:func:`pilotfish.preflight.worker_checks`) runs before the worker takes
  any task; the result goes to the master with the worker's pid in ``pilotfish_hello``;
* a bulk of tasks taken from RP's shared queue is *claimed* from the master at once
  (``pilotfish_claim``), so the master knows which worker holds which task; a task the
  master no longer has (cancelled, already claimed elsewhere) is dropped;
* the forked per-task process asks the master before it runs the task
  (``pilotfish_start``): the master then knows the task is *running* (not just
  queued in this worker) and tells the client at once; a task the master withdrew in
  the meantime is not run;
* the per-task process runs the call in a child of its own and always reports: a
  result, a timeout, or, when that child died without one (segfault, ``os._exit``,
  SIGKILL), a ``"pilotfish": "task_process_lost"`` record with its exit status. RP's
  own ``DefaultWorker`` reports nothing in that case and the task waits forever;
* every process RP forks per task dies with its parent (``PR_SET_PDEATHSIG``), and a
  program's process group is reported to the master, which kills it if the worker dies;
* a second result for the same task process (the child reported and then died) is
  dropped instead of crashing RP's result thread;
* ``pilotfish_run(blob)`` is the one function every task calls: it runs a pickled
  :class:`~pilotfish._wire.RunAttempt` through :func:`pilotfish.backends.execute.run_attempt`
  (which never raises) and returns the pickled ``Result``, base64-encoded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import traceback
from typing import Any

import radical.utils as ru
from radical.pilot import TASK_FUNCTION, TASK_METHOD
from radical.pilot.raptor import DefaultWorker

_CFG_VAR = "PILOTFISH_RP_CFG"
_MASTER_VAR = "PILOTFISH_RP_MASTER"


def _die_with_master() -> None:
    """End this worker when its master (on this host) is gone: RP's worker waits for
    its registration forever if the master died first, and keeps running otherwise
    until RP's agent notices (it may not, when the master was killed)."""
    import time

    from pilotfish import _wire
    from pilotfish._procs import alive

    try:
        host, pid, created = os.environ[_MASTER_VAR].split()
        master = (int(pid), float(created))
    except (KeyError, ValueError):
        return
    if host != _wire.host_name():
        return
    while alive(*master) is not None:
        time.sleep(0.5)
    os._exit(70)


def _cfg() -> dict[str, Any]:
    return json.loads(base64.b64decode(os.environ.get(_CFG_VAR) or "e30="))  # type: ignore[no-any-return]


def _client_path(cfg: dict[str, Any]) -> None:
    paths = [p for p in cfg.get("sys_path", []) if isinstance(p, str)]
    sys.path[:] = paths + [p for p in sys.path if p not in paths]


class PilotfishWorker(DefaultWorker):  # type: ignore[misc]
    def __init__(self, raptor_id: str) -> None:
        threading.Thread(
            target=_die_with_master, name="pilotfish-master-watch", daemon=True
        ).start()
        cfg = _cfg()
        _client_path(cfg)
        from pilotfish import _wire
        from pilotfish.preflight import worker_checks

        self._pf_cfg = cfg
        self._pf_host = _wire.host_name()
        try:
            checks = worker_checks(cfg.get("versions") or {}, cfg.get("rundir") or ".")
            self._pf_problems = [c.message() for c in checks if not c.ok]
        except Exception as e:  # pragma: no cover - defensive
            self._pf_problems = [f"pre-flight could not run: {type(e).__name__}: {e}"]
        self._pf_lock = threading.Lock()
        self._pf_client: Any = None
        self._pf_said_hello = False
        super().__init__(raptor_id)
        self._pf_hello()

    # -- talking to the master (its task service, request/reply) ---------------
    def _pf_request(self, cmd: str, *args: Any) -> Any:
        with self._pf_lock:
            if self._pf_client is None:
                self._pf_client = ru.zmq.Client(url=self._ts_addr)
            return self._pf_client.request(cmd, *args)

    def _pf_hello(self) -> None:
        if self._pf_said_hello:
            return
        self._pf_request(
            "pilotfish_hello", self._uid, os.getpid(), self._pf_host, list(self._pf_problems)
        )
        self._pf_said_hello = True

    def _request_cb(self, tasks: Any) -> None:
        tasks = ru.as_list(tasks)
        uids = [t["uid"] for t in tasks]
        try:
            self._pf_hello()
            mine = set(self._pf_request("pilotfish_claim", self._uid, uids))
        except Exception:
            self._log.exception("pilotfish: claim failed for %s", uids)
            mine = set(uids)  # let RP run them; the master's record decides about results
        for task in tasks:
            if task["uid"] in mine:
                super()._request_cb([task])
            else:
                self._log.info("pilotfish: master withdrew %s", task["uid"])

    def _result_cb(self, result: Any) -> None:
        task = result[0]
        with self._plock:
            known = task.get("pid") in self._pool
            if known and task.get("pf_withdrawn"):
                del self._pool[task["pid"]]
        if not known:  # a second result from one task process: the first one counts
            self._log.info("pilotfish: dropped a second result for %s", task.get("uid"))
            return
        if task.get("pf_withdrawn"):
            self._dealloc(task)
            return
        super()._result_cb(result)

    # -- the per-task process ------------------------------------------------------
    def _dispatch(self, task: Any, env: Any) -> None:  # runs in a process forked per task
        from pilotfish.backends.local.worker import die_with_parent

        die_with_parent()
        task["pid"] = os.getpid()
        os.environ.update({k: str(v) for k, v in env.items()})
        os.environ.update({k: str(v) for k, v in (task.get("environment") or {}).items()})
        os.environ["PILOTFISH_RP_TS"] = str(self._ts_addr)
        os.environ["PILOTFISH_RP_TASK"] = str(task["uid"])
        try:
            self._pf_run_task(task)
        except BaseException as e:  # report, whatever happened
            self._pf_put(task, exc=(repr(e), traceback.format_exc()), err=f"dispatch failed: {e}")
        finally:
            with contextlib.suppress(Exception):
                self._result_queue.close()
                self._result_queue.join_thread()
            os._exit(0)

    def _pf_put(
        self,
        task: Any,
        *,
        out: Any = None,
        err: Any = None,
        ret: int = 1,
        val: Any = None,
        exc: Any = (None, None),
    ) -> None:
        self._result_queue.put([task, out, err, ret, val, list(exc)])

    def _pf_run_task(self, task: Any) -> None:
        uid = task["uid"]
        try:
            c = ru.zmq.Client(url=self._ts_addr)
            go = c.request("pilotfish_start", self._uid, uid, os.getpid())
            c.close()
        except Exception:
            self._log.exception("pilotfish: start request failed for %s", uid)
            go = True  # run it; the master's record decides about its result
        if not go:
            task["pf_withdrawn"] = True
            self._pf_put(task)
            return
        sent = mp.Value("b", 0, lock=False)
        # a program's process group, set by pilotfish_run in the child (shared memory)
        self._pf_pgid = mp.Value("i", 0, lock=False)
        child = mp.Process(target=self._pf_child, args=(task, sent), daemon=True)
        child.start()
        tout = task["description"].get("timeout") or None
        child.join(timeout=tout)
        if not sent.value and self._pf_pgid.value:  # the child died or hangs: its program too
            with contextlib.suppress(OSError):
                os.killpg(self._pf_pgid.value, signal.SIGKILL)
        if child.is_alive():
            child.kill()
            child.join()
            if not sent.value:
                self._pf_put(
                    task,
                    err=f"timeout (>{tout})",
                    val={"pilotfish": "timeout", "timeout": tout, "pid": child.pid},
                    exc=('TimeoutError("task timed out")', None),
                )
            return
        if sent.value:
            return
        from pilotfish.backends.local.dispatch import describe_exit

        how, sig = describe_exit(child.exitcode)
        msg = (
            f"the process running task {uid} (pid {child.pid}, in RADICAL-Pilot raptor "
            f"worker {self._uid} on host {self._pf_host}) {how} before it returned a result"
        )
        self._pf_put(
            task,
            err=msg,
            val={
                "pilotfish": "task_process_lost",
                "worker": self._uid,
                "pid": child.pid,
                "host": self._pf_host,
                "returncode": child.exitcode,
                "signal": sig,
                "message": msg,
            },
            exc=(f"pilotfish: {msg}", None),
        )

    def _pf_child(self, task: Any, sent: Any) -> None:  # the call's own process
        from pilotfish.backends.local.worker import die_with_parent

        die_with_parent()
        with contextlib.suppress(Exception):
            import setproctitle

            setproctitle.setproctitle(f"pilotfish.rp.task.{task['uid']}")
        out = err = val = None
        ret = 1
        exc: Any = (None, None)
        try:
            sbox = task["task_sandbox_path"]
            ru.rec_makedir(sbox)
            os.chdir(sbox)
            mode = task["description"]["mode"]
            dispatcher = self.get_dispatcher(mode)
            if mode in (TASK_FUNCTION, TASK_METHOD):
                out, err, ret, val, exc = asyncio.run(dispatcher(task))
            else:
                out, err, ret, val, exc = dispatcher(task)
        except Exception as e:
            exc = (repr(e), traceback.format_exc())
        self._pf_put(task, out=out, err=err, ret=ret, val=val, exc=exc)
        self._result_queue.close()
        self._result_queue.join_thread()  # the result is in the pipe before we say so
        sent.value = 1

    # -- the function every pilotfish task calls --------------------------------
    def pilotfish_run(self, blob: str) -> str:
        from pilotfish.backends.execute import run_attempt

        cfg = self._pf_cfg
        cwd = cfg.get("cwd")
        if cwd:
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        m = pickle.loads(base64.b64decode(blob))
        uid = os.environ.get("PILOTFISH_RP_TASK", "")

        def on_group(pgid: int) -> None:
            slot = getattr(self, "_pf_pgid", None)
            if slot is not None:
                slot.value = pgid
            try:
                c = ru.zmq.Client(url=os.environ["PILOTFISH_RP_TS"])
                c.request("pilotfish_group", uid, pgid)
                c.close()
            except Exception:
                pass

        res = run_attempt(
            m,
            worker=self._uid,
            host=self._pf_host,
            rundir=cfg.get("rundir") or ".",
            on_group=on_group,
        )
        return base64.b64encode(pickle.dumps(res, 5)).decode("ascii")
