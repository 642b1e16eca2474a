"""pilotfish's raptor worker (runs inside the pilot; loaded by path by RADICAL-Pilot).

RADICAL-Pilot loads this file with ``ru.load_class(path, "PilotfishWorker")``, so it
uses absolute imports only. It is RP's ``DefaultWorker`` (one forked process per task)
with these changes:

* pre-flight (:func:`pilotfish.runtime.preflight.worker_checks`) runs before the worker takes
  any task; the result goes to the master with the worker's pid in ``pilotfish_hello``;
* a bulk of tasks taken from RP's shared queue is *claimed* from the master at once
  (``pilotfish_claim``), so the master knows which worker holds which task; a task the
  master no longer has (cancelled, already claimed elsewhere) is dropped;
* the worker asks the master before it forks the per-task process for a task, once
  RP gave the task its core (``pilotfish_start``, from the thread that forks, on the
  worker's one connection to the master): the master then knows the task is *running*
  (not just queued in this worker) and tells the client at once; a task the master
  withdrew in the meantime is not run (its per-task process reports it withdrawn);
* the per-task process runs the call in a child of its own and always reports: a
  result, a timeout, or, when that child died without one (segfault, ``os._exit``,
  SIGKILL), a ``"pilotfish": "task_process_lost"`` record with its exit status. RP's
  own ``DefaultWorker`` reports nothing in that case and the task waits forever;
* the worker watches every per-task process it forked: when one ends (SIGKILL, the
  OOM killer) before a result for its task was sent, the worker reports the same
  ``task_process_lost`` record with *that* process's exit status, and ends the call's
  process and its program group if they are still there. RP's own worker would hold
  the task (and its cores) forever;
* every process RP forks per task dies with its parent (``PR_SET_PDEATHSIG``, and a
  check that the parent did not die before that was set), and a program's process
  group is reported to the master, which kills it if the worker dies;
* a second result for the same task process (the child reported and then died) is
  dropped instead of crashing RP's result thread;
* ``pilotfish_run(blob)`` is the one function every task calls: it runs a pickled
  :class:`~pilotfish.wire.messages.RunAttempt` through :func:`pilotfish.runtime.execute.run_attempt`
  (which never raises) and returns the pickled ``Result``, base64-encoded. The call's
  process calls it directly (stdout/stderr captured as RP's function dispatcher does),
  without RP's per-call asyncio event loop and environment copy.

Per task, the worker forks; what every task's processes need is imported in the worker
before that (so not once per task), and the start fence travels on the worker's one
connection to the master (not a new ZMQ context per task process).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any

import radical.utils as ru
from radical.pilot import TASK_FUNCTION, TASK_METHOD
from radical.pilot.raptor import DefaultWorker

_CFG_VAR = "PILOTFISH_RP_CFG"
_MASTER_VAR = "PILOTFISH_RP_MASTER"


def _die_with_master(told: queue.SimpleQueue[str]) -> None:
    """End this worker when its master (on this host) is gone: RP's worker waits for
    its registration forever if the master died first, and keeps running otherwise
    until RP's agent notices (it may not, when the master was killed).

    The master ('host pid create_time') is ``told``: at once by the environment of a
    worker the master submitted; by the master's answer to its hello for one the client
    submitted (started with the master: until then RP's own watch ends it when the
    master's task is final, or the client cancels it). This thread starts with the
    worker and imports what it needs then: an import in a thread while RP forks a task's
    process could leave that process a held import lock."""
    import time

    import psutil  # noqa: F401  (what alive() uses: imported now, not after a fork)

    from pilotfish.runtime.procs import alive
    from pilotfish.wire import messages as _wire

    try:
        host, pid, created = told.get().split()
        master = (int(pid), float(created))
    except ValueError:
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


_WATCH_EVERY = 0.2  # s between looks at the per-task processes


def _preload() -> None:
    """Import in the worker what each task's forked processes need, and look up prctl
    (``die_with_parent`` keeps it): a fork inherits them instead of importing them for
    every task."""
    import importlib

    for name in (
        "setproctitle",
        "pilotfish.runtime.execute",
        "pilotfish.backends.local.worker",
        "pilotfish.core.ledger",
    ):
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    from pilotfish.runtime.procs import libc_prctl

    libc_prctl()


class _Fork:
    """A per-task process this worker forked, and what it shares with the worker.

    The shared values are allocated in the worker *before* the fork (so the per-task
    process and the call's process write where the worker reads): ``sent`` is set once
    a result for the task is in the result queue (by the call's process, or by the
    per-task process for its own reports), ``child`` is the call's process's pid,
    ``pgid`` the program's process group (0: none). A plain class, not a dataclass: RP
    loads this file without registering it in ``sys.modules``."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task
        self.sent: Any = mp.Value("b", 0, lock=False)
        self.child: Any = mp.Value("i", 0, lock=False)
        self.pgid: Any = mp.Value("i", 0, lock=False)
        self.proc: Any = None  # the multiprocessing.Process RP started for the task


class PilotfishWorker(DefaultWorker):  # type: ignore[misc]
    def __init__(self, raptor_id: str) -> None:
        self._pf_master: queue.SimpleQueue[str] = queue.SimpleQueue()  # see _die_with_master
        if os.environ.get(_MASTER_VAR):
            self._pf_master.put(os.environ[_MASTER_VAR])
        threading.Thread(
            target=_die_with_master,
            args=(self._pf_master,),
            name="pilotfish-master-watch",
            daemon=True,
        ).start()
        cfg = _cfg()
        _client_path(cfg)
        from pilotfish.wire import messages as _wire

        self._pf_cfg = cfg
        self._pf_host = _wire.host_name()
        self._pf_problems: list[str] = []
        # imports and pre-flight while RP's worker start-up waits (a second for ZMQ, then
        # for its master): done before the first task is taken, and before any fork
        prepare = threading.Thread(target=self._pf_prepare, name="pilotfish-prepare", daemon=True)
        prepare.start()
        if cfg.get("preload"):  # Session(preload=...): in the main thread, before the worker
            from pilotfish.runtime.preflight import preload  # registers and takes tasks

            preload([str(m) for m in cfg["preload"]], raptor_id)
        self._pf_lock = threading.Lock()
        self._pf_client: Any = None
        self._pf_said_hello = False
        self._pf_pid = os.getpid()
        # task uid -> its per-task process; read by the fork (inherited), so entries are
        # added before RP forks and removed once that process has ended
        self._pf_forks: dict[str, _Fork] = {}
        self._pf_forks_lock = threading.Lock()
        self._pf_fork: _Fork | None = None  # in a per-task process: its own record
        self._pf_reported = False  # in a per-task process: it put a result of its own
        # RP's DefaultWorker.__init__ subscribes to the request queue (its callback runs in
        # another thread at once) before it creates the pool, its lock and the result
        # queue: tasks already queued would hit a half-made worker ("no attribute
        # '_plock'", and that listener dies). Requests wait for the end of __init__.
        self._pf_ready = threading.Event()
        super().__init__(raptor_id)
        prepare.join()
        # a subreaper: what a per-task process started is re-parented to us when that
        # process dies before its attempt's containment ran (SIGKILL); _pf_sweep ends it
        from pilotfish.runtime.procs import become_subreaper, children

        become_subreaper()
        self._pf_own = children(os.getpid())  # RP's own children: never swept
        self._pf_ready.set()
        threading.Thread(
            target=self._pf_watch_forks, name="pilotfish-fork-watch", daemon=True
        ).start()
        self._pf_hello()

    def _pf_prepare(self) -> None:
        """What each task's forked processes need, imported once here, and the pre-flight
        checks (``self._pf_problems``)."""
        from pilotfish.runtime.preflight import worker_checks

        cfg = self._pf_cfg
        _preload()
        try:
            checks = worker_checks(cfg.get("versions") or {}, cfg.get("rundir") or ".")
            self._pf_problems = [c.message() for c in checks if not c.ok]
        except Exception as e:  # pragma: no cover - defensive
            self._pf_problems = [f"pre-flight could not run: {type(e).__name__}: {e}"]

    # -- talking to the master (its task service, request/reply) ---------------
    def _pf_request(self, cmd: str, *args: Any) -> Any:
        with self._pf_lock:
            if self._pf_client is None:
                self._pf_client = ru.zmq.Client(url=self._ts_addr)
            return self._pf_client.request(cmd, *args)

    def _pf_hello(self) -> None:
        if self._pf_said_hello:
            return
        ans = self._pf_request(
            "pilotfish_hello", self._uid, os.getpid(), self._pf_host, list(self._pf_problems)
        )
        self._pf_said_hello = True
        if isinstance(ans, dict) and not os.environ.get(_MASTER_VAR):
            self._pf_master.put(str(ans.get("master") or ""))

    def _request_cb(self, tasks: Any) -> None:
        self._pf_ready.wait()
        tasks = ru.as_list(tasks)
        if not tasks:
            return
        uids = [t["uid"] for t in tasks]
        try:
            self._pf_hello()
            mine = set(self._pf_request("pilotfish_claim", self._uid, uids))
        except Exception:
            self._log.exception("pilotfish: claim failed for %s", uids)
            mine = set(uids)  # let RP run them; the master's record decides about results
        for task in tasks:
            if task["uid"] in mine:
                self._pf_start_fork(task)
            else:
                self._log.info("pilotfish: master withdrew %s", task["uid"])

    _pf_alloc_wait = 1.0  # s to wait for a core to come free before RP's caller retries

    def _alloc(self, task: Any) -> bool:
        """RP's resource allocation, then the start fence: RP forks the task's process
        right after this returns True, in this thread.

        RP's caller sleeps 10 ms between tries while no core is free (on average 5 ms
        of idle core after every task); this waits for ``_dealloc``'s signal instead
        (cleared before the try, so a core freed in between is not missed).
        ``pilotfish_start`` is asked here, on the worker's connection (a new ZMQ context
        in every per-task process cost ~2 ms of CPU per task); a refused task's process
        runs nothing and reports it withdrawn."""
        self._res_evt.clear()
        if not super()._alloc(task):
            self._res_evt.wait(self._pf_alloc_wait)
            if not super()._alloc(task):
                return False
        uid = task["uid"]
        try:
            go = self._pf_request("pilotfish_start", self._uid, uid, os.getpid())
        except Exception:
            self._log.exception("pilotfish: start request failed for %s", uid)
            go = True  # run it; the master's record decides about its result
        if not go:
            task["pf_withdrawn"] = True
        return True

    # -- watching the per-task processes (in the worker) ---------------------------
    def _pf_start_fork(self, task: Any) -> None:
        """Have RP fork the task's process, and watch that process."""
        rec = _Fork(task)
        with self._pf_forks_lock:
            self._pf_forks[task["uid"]] = rec
        # RP keeps no record of which process runs which task other than its pool,
        # keyed by pid: the pid this call adds is the task's (only this thread adds)
        with self._plock:
            before = set(self._pool)
        super()._request_cb([task])
        with self._plock:
            new = [p for pid, p in self._pool.items() if pid not in before]
        if len(new) == 1:
            rec.proc = new[0]
        else:  # no process (RP reported the failure itself) or its result is already in
            with self._pf_forks_lock:
                self._pf_forks.pop(task["uid"], None)

    def _pf_watch_forks(self) -> None:
        """Poll each per-task process's exit status (waitpid on that pid, through the
        ``Process`` object, whose status multiprocessing may also collect when RP starts
        the next one). Not its sentinel: the call's process inherits that pipe, so it
        would not signal the per-task process's death while the call's process lives."""
        while True:
            time.sleep(_WATCH_EVERY)
            with self._pf_forks_lock:
                recs = [r for r in self._pf_forks.values() if r.proc is not None]
            for rec in recs:
                try:
                    code = rec.proc.exitcode
                except Exception:  # pragma: no cover - defensive
                    self._log.exception("pilotfish: cannot watch %s", rec.task.get("uid"))
                    continue
                if code is None:
                    continue
                with self._pf_forks_lock:
                    self._pf_forks.pop(rec.task["uid"], None)
                self._pf_sweep()
                try:
                    self._pf_fork_ended(rec, code)
                except Exception:  # pragma: no cover - keep watching the others
                    self._log.exception("pilotfish: report for %s failed", rec.task["uid"])

    def _pf_sweep(self) -> None:
        """Kill and reap our children that are neither RP's per-task processes nor RP's
        own: orphans of a per-task process that died, re-parented to us."""
        import multiprocessing.process as mpp

        from pilotfish.runtime.procs import children, descendants, kill_and_reap

        with self._plock:  # RP adds a process to its pool under this lock
            orphans = children(os.getpid()) - set(self._pool) - self._pf_own
        # every process multiprocessing started and has not joined yet is RP's
        orphans -= {getattr(p, "pid", None) for p in list(getattr(mpp, "_children", ()))}
        with self._pf_forks_lock:
            orphans -= {r.proc.pid for r in self._pf_forks.values() if r.proc is not None}
        if orphans:
            kill_and_reap(descendants(orphans), settle=0.5)

    def _pf_fork_ended(self, rec: _Fork, code: int) -> None:
        """A per-task process has ended with exit status ``code``."""
        uid, pid = rec.task["uid"], rec.proc.pid
        if rec.sent.value:
            return  # its result (or its own report) is in the queue
        with self._plock:
            waiting = pid in self._pool
        if not waiting:
            return  # the result came back already
        # what ran under it must not outlive it (its death signal may have been missed)
        if rec.pgid.value:
            with contextlib.suppress(OSError):
                os.killpg(rec.pgid.value, signal.SIGKILL)
        if rec.child.value:
            with contextlib.suppress(OSError):
                os.kill(rec.child.value, signal.SIGKILL)
        from pilotfish.core.ledger import describe_exit

        how, sig = describe_exit(code)
        msg = (
            f"the per-task process of task {uid} (pid {pid}, forked by RADICAL-Pilot raptor "
            f"worker {self._uid} on host {self._pf_host}) {how} before it returned a result"
        )
        self._log.info("pilotfish: %s", msg)
        # through the result queue, behind anything that process put there before it
        # died: a result already sent wins, and this report is dropped as a second one
        self._pf_put(
            dict(rec.task, pid=pid),
            err=msg,
            val={
                "pilotfish": "task_process_lost",
                "worker": self._uid,
                "pid": pid,
                "host": self._pf_host,
                "returncode": code,
                "signal": sig,
                "message": msg,
            },
            exc=(f"pilotfish: {msg}", None),
        )

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
        from pilotfish.runtime.procs import die_with_parent

        die_with_parent()
        if os.getppid() != self._pf_pid:  # the worker died before the line above
            os._exit(70)
        task["pid"] = os.getpid()
        self._pf_fork = self._pf_forks.get(task["uid"]) or _Fork(task)
        self._pf_reported = False
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
                if self._pf_reported:  # in the pipe: the worker's watch need not report
                    self._pf_fork.sent.value = 1
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
        self._pf_reported = True
        self._result_queue.put([task, out, err, ret, val, list(exc)])

    def _pf_run_task(self, task: Any) -> None:
        uid = task["uid"]
        if task.get("pf_withdrawn"):  # the master refused its start (see _alloc)
            self._pf_put(task)
            return
        rec = self._pf_fork
        assert rec is not None
        sent = rec.sent
        # a program's process group, set by pilotfish_run in the child (shared memory,
        # also read by the worker if this process dies)
        self._pf_pgid = rec.pgid
        child = mp.Process(target=self._pf_child, args=(task, sent), daemon=True)
        child.start()
        rec.child.value = child.pid or 0
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
        from pilotfish.core.ledger import describe_exit

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
        from pilotfish.runtime.procs import die_with_parent

        die_with_parent()
        if os.getppid() != task["pid"]:  # the per-task process died before the line above
            os._exit(70)
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
            if mode == TASK_FUNCTION and task["description"].get("function") == "pilotfish_run":
                out, err, ret, val, exc = self._pf_call(task)
            elif mode in (TASK_FUNCTION, TASK_METHOD):
                out, err, ret, val, exc = asyncio.run(dispatcher(task))
            else:
                out, err, ret, val, exc = dispatcher(task)
        except Exception as e:
            exc = (repr(e), traceback.format_exc())
        self._pf_put(task, out=out, err=err, ret=ret, val=val, exc=exc)
        self._result_queue.close()
        self._result_queue.join_thread()  # the result is in the pipe before we say so
        sent.value = 1

    def _pf_call(self, task: Any) -> tuple[Any, Any, int, Any, Any]:
        """RP's function dispatcher for ``pilotfish_run``, less its asyncio event loop
        (``pilotfish_run`` is not a coroutine), its copy of ``os.environ`` and its name
        look-ups: the same (out, err, exit code, value, exception) from the same call."""
        import io

        td = task["description"]
        args = list(td.get("args") or [])
        kwargs = dict(td.get("kwargs") or {})
        for k, v in (td.get("environment") or {}).items():
            os.environ[k] = str(v)
        bak_out, bak_err = sys.stdout, sys.stderr
        sys.stdout = strout = io.StringIO()
        sys.stderr = strerr = io.StringIO()
        try:
            val = self.pilotfish_run(*args, **kwargs)
            return strout.getvalue(), strerr.getvalue(), 0, val, (None, None)
        except Exception as e:
            err = strerr.getvalue() + f"\ncall failed: {e}"
            return strout.getvalue(), err, 1, None, (repr(e), traceback.format_exc())
        finally:
            sys.stdout, sys.stderr = bak_out, bak_err

    # -- the function every pilotfish task calls --------------------------------
    def pilotfish_run(self, blob: str) -> str:
        from pilotfish.runtime.execute import run_attempt

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
