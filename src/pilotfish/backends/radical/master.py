"""pilotfish's raptor master (runs inside the pilot; loaded by path by RADICAL-Pilot).

RADICAL-Pilot loads this file with ``ru.load_class(path, "PilotfishMaster")``, so it
uses absolute imports only. Which task is queued, held by which worker or running is the
shared attempt ledger's (:mod:`pilotfish.core.ledger`, keyed by the number at the end of
the task's uid); this master (an RP component) turns RP's signals into calls of its bookkeeping, a
:class:`~pilotfish.backends.radical.master_book.MasterBook` (no RP in it: where every
rule below is written, and what tests drive):

* every task it received (``request_cb``) until it is finished or advanced by us;
* which worker *holds* which task: a worker claims the bulk of tasks it took from RP's
  shared queue (``pilotfish_claim``) as soon as it has them;
* which held task is *running*: the worker asks before it forks the process for one
  (``pilotfish_start``); the master then publishes the task's AGENT_EXECUTING state
  with the worker's name, pid and host in ``description.metadata["pilotfish"]``, so
  the client knows at once where the attempt runs (RP alone reports AGENT_EXECUTING
  only together with the result);
* each worker's pid, host and pre-flight result (``pilotfish_hello``).

The first workers are submitted by the client together with the master (uids from
:func:`~pilotfish.backends.radical.master_book.client_worker_uids`, known to the book from
the start), so they start while it does; a registration that comes before the master
serves pilotfish's requests is answered once it does. RP's state update of such a worker
can come before the master listens to them: the client sends the final states it saw
with every ping. The master submits only replacements itself.

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

* a task pushed on the queue more than ``IDLE_GRACE`` ago and still unclaimed while a
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
names the master's pid, its workers (and how a lost one ended) and the running tasks;
``pilotfish_cancel`` withdraws tasks that are not running; ``pilotfish_drain`` drains a
worker or a host (the book's :meth:`~.master_book.MasterBook.drain`): no task starts
there any more, what its workers hold goes back on the queue, and each is stopped
(SIGTERM) once it runs nothing, then replaced unless its host was drained. The drains
so far come with a restarted master's configuration.
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

from pilotfish.backends.radical.master_book import MasterBook, Task, client_worker_uids

_CFG_VAR = "PILOTFISH_RP_CFG"
_MASTER_VAR = "PILOTFISH_RP_MASTER"
_TAIL = 4000
_GONE_GRACE = 1.0  # s to wait for RP's state update (with the exit code) of a vanished worker


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


class _Port:
    """How the book (:class:`MasterBook`) acts on RADICAL-Pilot: through its master."""

    def __init__(self, master: PilotfishMaster) -> None:
        self.master = master

    def push(self, tasks: list[Task]) -> None:
        self.master._req_put.put(tasks)

    def cancel(self, tasks: list[Task]) -> None:
        with contextlib.suppress(Exception):
            self.master.advance(tasks, rps.CANCELED, publish=True, push=False)

    def fail(self, task: Task, info: dict[str, Any], code: int) -> None:
        task["exit_code"] = code or 1
        task["return_value"] = info
        task["stdout"] = ""
        task["stderr"] = info.get("stderr_tail", "")
        task["exception"] = f"pilotfish: {info.get('pilotfish')}"
        task["exception_detail"] = info.get("message", "")
        task["target_state"] = rps.FAILED
        try:
            Master._result_cb(self.master, [task])
        except Exception:
            self.master._log.exception("pilotfish: could not advance %s", task.get("uid"))

    def publish_start(self, uid: str, info: dict[str, Any]) -> None:
        update = {
            "uid": uid,
            "type": "task",
            "state": rps.AGENT_EXECUTING,
            "description": {"metadata": {"pilotfish": info}},
            "$all": True,  # publish these fields, not just the state
        }
        try:
            self.master.advance([update], publish=True, push=False)
        except Exception:
            self.master._log.exception("pilotfish: could not publish the start of %s", uid)

    def kill_groups(self, pgids: tuple[int, ...]) -> None:
        for pg in pgids:
            with contextlib.suppress(OSError):
                os.killpg(pg, signal.SIGKILL)

    def log(self, msg: str) -> None:
        path = os.path.join(os.environ.get("RP_TASK_SANDBOX", "."), "pilotfish-master.log")
        with contextlib.suppress(Exception), open(path, "a") as f:
            f.write(f"{time.time():.3f} {msg}\n")


class PilotfishMaster(Master):  # type: ignore[misc]
    """RP's raptor master around a :class:`MasterBook` (``self.book``): RP's requests,
    callbacks and rpc go to the book; the watch thread finds lost workers."""

    def __init__(self) -> None:
        self._pf_cfg: dict[str, Any] = json.loads(
            base64.b64decode(os.environ.get(_CFG_VAR) or "e30=")
        )
        self._pf_port = _Port(self)
        # set once pilotfish's requests are served: a worker's registration waits for it
        self._pf_up = threading.Event()
        self.book = MasterBook(
            self._pf_port,
            token=str(self._pf_cfg.get("token") or ""),
            uid=os.environ.get("RP_TASK_ID"),
        )
        for kind, name, why in self._pf_cfg.get("drains") or ():  # a restarted master's
            self.book.drain(str(kind), str(name), str(why))
        # the workers the client submitted with this master: starting while it does
        n = int(self._pf_cfg.get("client_workers") or 0)
        self._pf_client_workers = client_worker_uids(os.environ.get("RP_TASK_ID", ""), n)
        self.book.add_workers(self._pf_client_workers, time.time())
        self._pf_preflight()  # before RP's init: tasks arrive as soon as it registers
        super().__init__()
        self.book.mark_up()
        if self.book.env_problem:
            self._pf_port.log(self.book.env_problem)
        ts = self._task_service
        ts.register_request("pilotfish_hello", self._pf_hello)
        ts.register_request("pilotfish_claim", self.book.claim)
        ts.register_request("pilotfish_start", self._pf_start)
        ts.register_request("pilotfish_group", self._pf_group)
        self._pf_up.set()
        self.register_rpc_handler("raptor_rpc", self._raptor_rpc, rpc_addr=self.uid)
        threading.Thread(target=self._pf_watch, name="pilotfish-watch", daemon=True).start()
        if self.book.env_problem:
            self._pf_cancel_workers(self._pf_client_workers)
        else:
            own = int(self._pf_cfg.get("workers") or 1) - len(self._pf_client_workers)
            self._pf_start_workers(own)

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
            self.book.env_problem = (
                "pre-flight checks failed in the pilotfish raptor master "
                f"{os.environ.get('RP_TASK_ID', '?')} "
                f"(pid {os.getpid()}, host {host}); no worker takes tasks:\n{lines}"
            )

    # -- workers ----------------------------------------------------------------
    def _pf_start_workers(self, n: int) -> None:
        if n <= 0 or self.book.stopping:
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
        self.book.add_workers(self.submit_workers(tds), time.time())

    def _pf_cancel_workers(self, wids: list[str]) -> None:
        """Have RP's agent cancel these workers (running or still starting)."""
        if wids:
            msg = {"cmd": "cancel_tasks", "arg": {"uids": wids}}
            with contextlib.suppress(Exception):
                self.publish(rpc_const.CONTROL_PUBSUB, msg)

    @staticmethod
    def _pf_me() -> str:
        """'host pid create_time': a worker on this host ends itself when we are gone."""
        import psutil

        return f"{_host()} {os.getpid()} {psutil.Process().create_time()!r}"

    def control_cb(self, topic: str, msg: Any) -> Any:
        """A worker submitted with this master may register while the master is still
        starting (before RP's queues, or pilotfish's requests, are there): its
        registration is answered once they are, so its hello finds them."""
        if (
            isinstance(msg, dict)
            and msg.get("cmd") == "worker_register"
            and not self._pf_up.is_set()
        ):
            threading.Thread(target=self._pf_register_later, args=(topic, msg), daemon=True).start()
            return True
        return super().control_cb(topic, msg)

    def _pf_register_later(self, topic: str, msg: Any) -> None:
        self._pf_up.wait()
        super().control_cb(topic, msg)

    def _pf_hello(self, wid: str, pid: int, host: str, problems: list[str]) -> dict[str, Any]:
        """A worker is up: whether it may take tasks, and who the master is (a worker the
        client submitted watches it from now on)."""
        self._pf_port.log(f"hello {wid} pid {pid} host {host} problems {problems}")
        ok = self.book.hello(wid, pid, host, problems)
        self._pf_stop_drained(self.book.idle_drained())  # it joined on a drained host
        return {"ok": ok, "master": self._pf_me()}

    def _pf_stop_drained(self, wids: list[str]) -> None:
        """End drained workers that run nothing (SIGTERM; RP's agent cancels one still
        starting): their RP final state is a lost worker with nothing running, and one
        drained as a worker (not with its host) is replaced."""
        for wid in wids:
            w = self.book.workers.get(wid) or {}
            self._pf_port.log(f"stop drained worker {wid} pid {w.get('pid')}: {w.get('drained')}")
            pid = int(w.get("pid") or 0)
            if pid:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            else:
                self._pf_cancel_workers([wid])

    def _pf_start(self, wid: str, uid: str, pid: int) -> bool:
        """A worker asks to run a task it holds (the start fence), just before it forks
        the task's process (``pid`` is the worker's own)."""
        return self.book.start(wid, uid, (os.getpid(), _host()))

    def _pf_group(self, uid: str, pgid: int) -> bool:
        self.book.group(uid, pgid)
        return True

    def _pf_watch(self) -> None:
        """Backstop for RP's state updates: a worker whose process is gone is lost; and
        the book's backstops for tasks lost on the way to a worker."""
        book = self.book
        while not self._term.is_set():
            time.sleep(0.25)
            now = time.monotonic()
            gone = []
            with book.lock:
                for w in book.workers.values():
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
            book.fail_doomed()
            if book.stopping:
                continue
            lost = book.lost_in_transit()
            idle = book.unclaimed_while_idle(now)
            if lost:
                self._pf_port.log(
                    f"lost on the way to a worker, pushed again: {[t['uid'] for t in lost]}"
                )
                self._req_put.put(lost)
            if idle:
                self._pf_port.log(
                    f"unclaimed while a worker was idle, pushed again: {[t['uid'] for t in idle]}"
                )
                self._req_put.put(idle)

    def _pf_check_stopped(self, w: dict[str, Any], now: float) -> None:
        """A worker the kernel shows stopped (SIGSTOP, a debugger, a suspended job) for a
        heartbeat interval runs nothing and answers nothing: it is killed as hung, and then
        lost like any dead worker (the book's lock held). The local master's rule, from
        /proc."""
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
        self._pf_port.log(f"worker {w['uid']} (pid {w['pid']}) {w['hung']}")
        with contextlib.suppress(OSError):
            os.kill(int(w["pid"]), signal.SIGKILL)

    def _state_cb(self, topic: str, msg: Any) -> bool:
        with contextlib.suppress(Exception):
            if msg.get("cmd") == "update":
                for thing in ru.as_list(msg.get("arg")):
                    uid, state = thing.get("uid"), thing.get("state")
                    if uid in self.book.workers and state in rps.FINAL:
                        self._pf_worker_lost(uid, thing.get("exit_code"), f"RP state {state}")
        return super()._state_cb(topic, msg)  # type: ignore[no-any-return]

    def _pf_worker_lost(self, wid: str, exit_code: Any, why: str) -> None:
        self._pf_port.log(f"worker lost? {wid} exit {exit_code}: {why}")
        marked = self.book.lose_worker(wid)
        if marked is None:
            return
        was, w = marked
        if w.get("hung"):  # we killed it: say why, and how
            why, exit_code = w["hung"], -9
        err_path = os.path.join(self._sbox, f"{wid}.err")
        tail = _tail(err_path)
        if exit_code is None and w.get("pid"):
            exit_code = _shell_reported_exit(tail, int(w["pid"]))
        code, how, sig = _exit_status(exit_code)
        ended = f"was lost: {why}"
        if w.get("drained") and w.get("stop_asked"):
            kind, because = w["drained"]
            ended = f"was drained ({kind}: {because}) and stopped by pilotfish: {why}"
        what = (
            f"RADICAL-Pilot raptor worker {wid} (pid {w.get('pid') or '?'}, host "
            f"{w.get('host') or '?'}) {ended}" + (f"; it {how}" if code is not None else "")
        )
        self.book.worker_gone(wid, what, code, sig, tail[-2000:], err_path)
        if (
            not self.book.stopping
            and was != "preflight_failed"
            and not self.book.env_problem
            and self.book.replace_lost(w)
        ):
            self._pf_start_workers(1)

    # -- tasks ------------------------------------------------------------------
    def request_cb(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.book.request(tasks)

    def _result_cb(self, tasks: Any) -> None:
        mine = self.book.results(ru.as_list(tasks))
        if mine:
            super()._result_cb(mine)
        self._pf_stop_drained(self.book.idle_drained())  # its last task ended

    def _pf_shutdown(self) -> None:
        pids = [int(w.get("pid") or 0) for w in self.book.workers.values()]
        for pid in pids:  # RP's worker_terminate is a request; make sure
            if pid:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
        # a worker still starting has no pid yet: have RP's agent cancel every worker task
        # (and such a worker ends itself when this master is gone)
        self._pf_cancel_workers(list(self.book.workers))
        self.stop()

    # -- rpc from the client ---------------------------------------------------------
    def _raptor_rpc(self, *args: Any, **kwargs: Any) -> Any:
        cmd = kwargs.get("raptor_cmd")
        book = self.book
        if cmd == "pilotfish_ping":
            # workers the client saw end: their RP state may have come before this master
            # listened (a worker the client submitted starts with it)
            for wid, state, code in kwargs.get("ended") or ():
                w = book.workers.get(wid)
                if w is not None and w.get("state") not in ("lost", "stopped"):
                    self._pf_worker_lost(str(wid), code, f"RP state {state}")
            with book.lock:
                return {
                    "pid": os.getpid(),
                    "host": _host(),
                    "time": time.time(),
                    "workers": {
                        w["uid"]: [
                            w.get("state"),
                            int(w.get("pid") or 0),
                            w.get("host") or "",
                            w.get("why") or "",  # how a lost worker ended
                        ]
                        for w in book.workers.values()
                    },
                    "running": {e.item["uid"]: e.worker for e in book.ledger.started()},
                    "env_problem": book.env_problem,
                    "up": book.up,
                }
        if cmd == "pilotfish_sweep":
            uids = [str(u) for u in kwargs.get("uids") or ()]
            graces = [float(g) for g in kwargs.get("graces") or ()]
            return book.sweep(uids, graces + [10.0] * (len(uids) - len(graces)))
        if cmd == "pilotfish_cancel":
            return book.cancel([str(u) for u in kwargs.get("uids") or []])
        if cmd == "pilotfish_drain":
            stop = book.drain(
                str(kwargs.get("kind")), str(kwargs.get("name")), str(kwargs.get("why") or "")
            )
            self._pf_stop_drained(stop)
            return stop
        if cmd == "stop":
            book.stop()
            # answer at once: RP's Component.stop() joins threads for seconds
            threading.Thread(target=self._pf_shutdown, name="pilotfish-stop", daemon=True).start()
            return True
        return super()._raptor_rpc(*args, **kwargs)
