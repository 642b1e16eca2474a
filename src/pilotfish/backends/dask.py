"""The Dask distributed backend: pilotfish's semantics on any Dask cluster.

``Session(backend="dask", address="tcp://host:8786")`` (or ``client=`` an
existing ``distributed.Client``) runs every attempt as one Dask task on a
cluster that the user started (``LocalCluster``, ``dask_jobqueue.SLURMCluster``,
``dask scheduler`` + ``dask worker``). pilotfish never starts, restarts or
shuts down that cluster. The workflow core, the retry and poison policy,
fencing and the journal stay on the client, as with the local backend; Dask
only places and runs attempts.

Each attempt is submitted with a unique key
(``pilotfish-KEY-aATTEMPT-TOKEN``), ``pure=False`` and ``retries=0``; on the
worker it calls :func:`pilotfish.backends.execute.run_attempt`, which never
raises, and returns its ``Result``. Before running user code the worker
reports ``Started`` to the scheduler with a synchronous call (one round trip
per attempt), so that the client knows which worker holds which attempt even
if the task kills its worker at once.

Cost (see benchmarks/bench_dask.py): ``submit`` only registers an attempt; a
submitter thread hands everything pending to Dask with one ``Client.map``
(one graph update on the scheduler per batch, not per attempt). An attempt
cancelled, lost or stopped before its Dask future exists is skipped, or its
late future cancelled. Finished values are gathered in batches, straight from
the workers when they are on the client's host (else through the scheduler,
Dask's default; keys a worker no longer has fall back to the scheduler). With
``LocalCluster`` the scheduler shares the client's process and GIL, so work
kept off the scheduler is throughput.

How Dask's signals become pilotfish events:

=====================================================  ===============================
Dask                                                   pilotfish
=====================================================  ===============================
our task reports it is running (event topic)           ``Started``
future finished                                        ``Result`` (value or error envelope)
scheduler ``remove-worker`` event naming a worker      ``WorkerEvent("lost")`` and
that ran one of our started attempts                   ``Lost(worker_lost)``; its future is
                                                       cancelled, so Dask's own reschedule
                                                       of it does not run on (best effort:
                                                       Dask may start it before the cancel
                                                       arrives; fencing drops its result)
future erred with ``KilledWorker`` / a cancel we did   ``Lost(worker_lost)`` if it had
not ask for                                            started, else resubmitted unblamed
future erred otherwise (e.g. pilotfish not importable  ``Result`` with an ENVIRONMENT error
on the worker)
attempt running longer than its ``timeout``            ``Lost(timeout)``, future cancelled,
                                                       worker restarted (see below)
connection to the scheduler lost                       ``MasterEvent("lost")``; back within
                                                       ``heartbeat_timeout``: started attempts
                                                       ``Lost(runtime_lost)``, the others
                                                       resubmitted, ``MasterEvent("restarted")``;
                                                       otherwise, or with
                                                       ``max_master_restarts=0``:
                                                       ``Fatal(runtime_lost)``
=====================================================  ===============================

``KilledWorker`` never reaches the user. Tip: set the scheduler's
``distributed.scheduler.allowed-failures`` to 0 so Dask never reruns a task
whose worker died; pilotfish's policy decides instead.

Limits (honest ones):

* Timeouts are enforced from the client (measured from ``Started``). Dask
  cannot stop a running thread, so pilotfish ends the timed-out attempt's
  worker process and its nanny starts a fresh one (``timeout_restart=True``,
  the default); any other task running on that worker is lost with it
  (reported ``worker_lost`` and retried by policy). A worker without a nanny
  is never ended: the call runs on in its thread until it returns, and its
  result is dropped.
  Program tasks are stopped by their own worker-side timeout (the whole
  process group is killed); the client-side limit is only a backstop.
* A value stays on its Dask worker until the client fetches it (at once, in
  batches). A worker lost in that window loses the value: the attempt is
  reported ``Lost(worker_lost)`` and retried by policy, never silently re-run.
* A hung worker (SIGSTOP) is noticed only when Dask's scheduler removes it
  (``distributed.scheduler.worker-ttl``). Dask does not report a dead
  worker's exit status or signal, so ``WorkerLost`` names the worker's
  address, pid and host and Dask's cause instead.
* Files: a program's sandbox, its stdout/stderr and declared outputs live on
  the *worker's* filesystem under ``rundir`` (resolved to an absolute path on
  the client); paths in results and failure records are the worker's, and the
  host is recorded with them. Use a shared filesystem for ``rundir`` on a
  multi-node cluster. Workers keep their own working directory.
* A Dask worker killed while it runs a program (SIGKILL, OOM) cannot take the
  program's process group with it: no pilotfish master watches Dask workers,
  so the program may run on as an orphan until it ends. (Locally the master
  kills the group.) The attempt is still reported lost and retried.
* Worker start-up pre-flight (versions, sandbox root, disk) is not run on Dask
  workers yet; task-level ``requires``/``requires_programs`` are checked, as
  everywhere, and ``Session.preflight()`` runs the full set on one worker.
* Imports: by default (``ship_sys_path=True``) a worker plugin appends the
  client's ``sys.path`` entries that a worker lacks, so modules next to the
  user's script import there too (when the filesystem is shared); pilotfish
  itself must be installed in the workers' environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from .. import _wire
from .._wire import Fatal, Lost, Result, RunAttempt, Started, WorkerEvent
from ..errors import InvalidTask
from .base import MasterEvent, Sink
from .execute import run_attempt

__all__ = ["DaskBackend"]

log = logging.getLogger("pilotfish.dask")

_CONN_LOST = "scheduler-connection-lost"
_OUR_CANCEL = "pilotfish"
_MAX_RESUBMITS = 10
_EXIT_TIMEOUT = 75  # exit status of a worker pilotfish ended to stop a timed-out call


# --------------------------------------------------------------------------- worker side


def _attempt_on_worker(m: RunAttempt, dkey: str, topic: str, rundir: str) -> Result:
    """The Dask task: say ``Started`` (synchronously), then run the attempt here."""
    host = _wire.host_name()
    worker: Any = None
    try:
        worker = distributed.get_worker()
        where = str(worker.address)
    except Exception:
        where = f"dask-worker-pid-{os.getpid()}"
    if worker is not None:
        msg = {
            "op": "started",
            "attempt": m.attempt,
            "key": dkey,
            "worker": where,
            "pid": os.getpid(),
            "time": time.time(),
            "host": host,
        }
        try:  # one round trip: the client hears of it even if the task kills us next
            from distributed.utils import sync

            sync(worker.loop, worker.scheduler.log_event, topic=topic, msg=msg, callback_timeout=30)
        except Exception:
            with contextlib.suppress(Exception):
                worker.log_event(topic, msg)
    return run_attempt(m, worker=where, host=host, rundir=rundir)


class _ClientSysPath(WorkerPlugin):
    """Append the client's ``sys.path`` entries a worker lacks (so its modules import)."""

    idempotent = False

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def setup(self, worker: Any) -> None:
        for p in self.paths:
            if p and p not in sys.path:
                sys.path.append(p)


# --------------------------------------------------------------------------- client side


@dataclass(slots=True)
class _Att:
    m: RunAttempt
    dkey: str
    fut: Any = None
    started: bool = False
    worker: str = ""
    pid: int = 0
    host: str = ""
    t0: float = 0.0  # monotonic, at Started
    t0_wall: float | None = None
    resubmits: int = 0
    gen: int = 0


class DaskBackend:
    """Runs attempts as Dask tasks; see the module docstring for the event mapping."""

    name = "dask"

    def __init__(
        self,
        workers: int | None = None,
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_master_restarts: int = 3,
        rundir: str = ".pilotfish",
        address: str | None = None,
        client: Any = None,
        timeout_restart: bool = True,
        ship_sys_path: bool = True,
        connect_timeout: float = 30.0,
    ) -> None:
        if client is None and not address:
            raise InvalidTask(
                "backend='dask' needs a running Dask scheduler: pass address='tcp://HOST:PORT' "
                "(e.g. LocalCluster().scheduler_address, or the scheduler of a "
                "dask_jobqueue.SLURMCluster) or client=<a distributed.Client>; pilotfish "
                "never starts a Dask cluster itself"
            )
        if client is not None and address and address != getattr(client.scheduler, "address", ""):
            raise InvalidTask(
                f"backend='dask': address={address!r} and client= (connected to "
                f"{getattr(client.scheduler, 'address', '?')!r}) disagree; pass one of them"
            )
        self.workers = workers  # the cluster decides its size; kept for diagnostics
        self.hb_interval = heartbeat_interval
        self.hb_timeout = heartbeat_timeout
        self.max_restarts = max_master_restarts
        self.rundir = str(Path(rundir).resolve())
        self.address = address or ""
        self.timeout_restart = timeout_restart
        self.ship_sys_path = ship_sys_path
        self.connect_timeout = connect_timeout
        self._client: Any = client
        self._own_client = client is None
        self._token = uuid.uuid4().hex[:8]
        self._topic = f"pilotfish-{self._token}"
        self._plugin_name = f"pilotfish-syspath-{self._token}"
        self._lock = threading.Lock()
        self._q: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._inflight: dict[int, _Att] = {}
        self._held: list[RunAttempt] = []  # submitted while the scheduler is away
        self._pending: list[_Att] = []  # registered, not yet handed to Dask
        self._submit_wake = threading.Event()
        self._submitter: threading.Thread | None = None
        self._sink: Sink | None = None
        self._stopping = threading.Event()
        self._stopped = False
        self._dead = False
        self._fatal_message = ""
        self._lost_since: float | None = None
        self._conn_lost = False
        self._restarts = 0
        self._gen = 0
        self._sched_pid = 0
        self._worker_pids: dict[str, int] = {}
        self._near: dict[str, bool] = {}  # worker address -> on this host (gather directly)
        self._host = _wire.host_name()
        self._restarting: dict[str, str] = {}  # worker address -> why we restarted it
        self._prev_all_handler: Callable[[Any], Any] | None = None
        self._threads: list[threading.Thread] = []
        self._consumer: threading.Thread | None = None

    # ------------------------------------------------------------------ protocol
    def start(self, sink: Sink) -> None:
        self._sink = sink
        self._consumer = threading.Thread(
            target=self._run_consumer, name="pilotfish-dask", daemon=True
        )
        self._submitter = threading.Thread(
            target=self._run_submitter, name="pilotfish-dask-submit", daemon=True
        )
        if self._client is None:
            try:
                self._client = distributed.Client(  # type: ignore[no-untyped-call]
                    self.address,
                    timeout=max(self.connect_timeout, self.hb_timeout),
                    set_as_default=False,
                )
            except Exception as e:
                why = (
                    f"cannot connect to the Dask scheduler at {self.address}: "
                    f"{type(e).__name__}: {e}"
                )
                with self._lock:
                    self._dead, self._fatal_message = True, why
                self._emit([Fatal("runtime_lost", why)])
                self._consumer.start()
                return
        c = self._client
        self.address = str(c.scheduler.address)
        with contextlib.suppress(Exception):
            self._sched_pid = int(c.run_on_scheduler(os.getpid))
        self._subscribe()
        self._ship_path()
        workers: list[str] = []
        with contextlib.suppress(Exception):
            workers = sorted(c.scheduler_info()["workers"])
        now = time.time()
        events: list[Any] = [
            MasterEvent("started", self._sched_pid, now, message=f"Dask scheduler {self.address}")
        ]
        events += [WorkerEvent("started", w, 0, now) for w in workers]
        self._emit(events)
        self._consumer.start()
        self._submitter.start()

    def submit(self, attempts: Sequence[RunAttempt]) -> None:
        lost: list[Any] = []
        with self._lock:
            for a in attempts:
                if self._dead or self._stopped:
                    lost.append(self._runtime_lost(a, self._fatal_message or "backend stopped"))
                elif self._lost_since is not None:
                    self._held.append(a)
                else:
                    self._submit_locked(_Att(a, self._dkey(a, 0)))
        if lost:
            self._q.put(("emit", lost))

    def cancel(self, attempts: Sequence[int]) -> None:
        self._q.put(("cancel", tuple(attempts)))

    def processes(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "master": None,
            "scheduler": self.address,
            "scheduler_pid": self._sched_pid or None,
            "workers": [],
            "worker_addresses": {},
        }
        c = self._client
        if c is not None and c.status == "running":
            with contextlib.suppress(Exception):
                pids = c.run(os.getpid, on_error="ignore")
                out["worker_addresses"] = dict(pids)
                out["workers"] = sorted(int(p) for p in pids.values())
        return out

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            futs = [a.fut for a in self._inflight.values() if a.fut is not None]
            self._inflight.clear()
            self._held.clear()
            self._pending.clear()
        self._stopping.set()
        self._submit_wake.set()
        self._q.put(None)
        for t in (self._submitter, self._consumer):
            if t is not None and t.is_alive() and t is not threading.current_thread():
                t.join(timeout)
        c = self._client
        if c is None:
            return
        if c.status == "running":
            if futs:
                with contextlib.suppress(Exception):
                    c.cancel(futs, reason=_OUR_CANCEL, msg="pilotfish session closed")
            self._unsubscribe()
            if self.ship_sys_path:
                with contextlib.suppress(Exception):
                    c.unregister_worker_plugin(self._plugin_name)
        del futs
        for t in self._threads:
            t.join(timeout)
        if self._own_client:
            with contextlib.suppress(Exception):
                c.close(timeout=min(timeout, 5.0))

    # ------------------------------------------------------------------ helpers
    def _dkey(self, a: RunAttempt, n: int) -> str:
        tail = f"-r{n}" if n else ""
        return f"pilotfish-{a.key}-a{a.attempt}-{self._token}{tail}"

    def _submit_locked(self, att: _Att) -> None:
        """Register ``att``; the submitter thread hands it to Dask (in a batch)."""
        att.gen = self._gen
        self._inflight[att.m.attempt] = att
        self._pending.append(att)
        self._submit_wake.set()

    def _run_submitter(self) -> None:
        """Hand pending attempts to Dask, many per ``Client.map`` (one graph update each)."""
        while True:
            self._submit_wake.wait()
            self._submit_wake.clear()
            with self._lock:
                if self._stopped:
                    return
                batch = [a for a in self._pending if self._inflight.get(a.m.attempt) is a]
                self._pending = []
            if batch:
                try:
                    self._submit_batch(batch)
                except Exception as e:  # never strand an attempt: report it lost
                    log.exception("pilotfish: could not submit attempts to Dask")
                    why = f"the Dask client could not submit it: {type(e).__name__}: {e}"
                    failed = []
                    with self._lock:
                        for a in batch:
                            if self._inflight.get(a.m.attempt) is a and a.fut is None:
                                del self._inflight[a.m.attempt]
                                failed.append(self._runtime_lost(a.m, why))
                    if failed:
                        self._q.put(("emit", failed))

    def _submit_batch(self, batch: list[_Att]) -> None:
        n = len(batch)
        keys = [a.dkey for a in batch]
        futs = self._client.map(
            _attempt_on_worker,
            [a.m for a in batch],
            keys,
            [self._topic] * n,
            [self.rundir] * n,
            key=keys,
            pure=False,
            retries=0,
            batch_size=None,
        )
        late = []
        with self._lock:
            for a, f in zip(batch, futs, strict=True):
                if self._inflight.get(a.m.attempt) is a:
                    a.fut = f
                else:  # cancelled, lost or stopped while we submitted it
                    late.append(f)
        put = self._q.put
        for a, f in zip(batch, futs, strict=True):
            if a.fut is f:
                f.add_done_callback(
                    lambda f, dkey=a.dkey, aid=a.m.attempt: put(("done", f, dkey, aid))
                )
        self._cancel_futs(late, "cancelled by pilotfish")

    def _emit(self, events: Sequence[Any]) -> None:
        if self._sink is not None and events:
            try:
                self._sink(events)
            except Exception:
                log.exception("pilotfish: the session failed to take backend events")

    def _subscribe(self) -> None:
        c = self._client
        c.subscribe_topic(self._topic, lambda ev: self._q.put(("started", ev[1])))
        prev = c._event_handlers.get("all")  # chain to the user's own handler, if any
        if prev is not None and getattr(prev, "_pilotfish", None) != self._token:
            self._prev_all_handler = prev

        def on_all(ev: Any) -> Any:
            msg = ev[1] if isinstance(ev, tuple | list) and len(ev) == 2 else None
            if isinstance(msg, dict) and msg.get("action") in ("remove-worker", "add-worker"):
                self._q.put(("cluster", msg))
            if self._prev_all_handler is not None:
                return self._prev_all_handler(ev)
            return None

        on_all._pilotfish = self._token  # type: ignore[attr-defined]
        c.subscribe_topic("all", on_all)

    def _unsubscribe(self) -> None:
        c = self._client
        with contextlib.suppress(Exception):
            c.unsubscribe_topic(self._topic)
        with contextlib.suppress(Exception):
            if self._prev_all_handler is not None:
                c.subscribe_topic("all", self._prev_all_handler)
            else:
                c.unsubscribe_topic("all")

    def _ship_path(self) -> None:
        if not self.ship_sys_path:
            return
        try:
            self._client.register_plugin(_ClientSysPath(sys.path), name=self._plugin_name)
        except Exception as e:  # tasks then fail with ENVIRONMENT, naming what is missing
            log.warning("pilotfish: could not install the sys.path plugin on Dask workers: %s", e)

    def _runtime_lost(self, a: RunAttempt, why: str, att: _Att | None = None) -> Lost:
        return Lost(
            a.attempt,
            "runtime_lost",
            f"task {a.key!r}: {why}",
            att.worker if att else "scheduler",
            att.pid if att else self._sched_pid,
            None,
            None,
            "",
            att.t0_wall if att else None,
            time.time(),
            att.host if att else "",
        )

    def _cancel_futs(self, futs: list[Any], msg: str) -> None:
        c = self._client
        futs = [f for f in futs if f is not None]  # None: not handed to Dask yet
        if futs and c is not None and c.status in ("running", "connecting"):
            with contextlib.suppress(Exception):
                c.cancel(futs, reason=_OUR_CANCEL, msg=msg)

    # ------------------------------------------------------------------ consumer thread
    def _run_consumer(self) -> None:
        try:
            self._consume()
        except BaseException as e:  # never leave the session waiting on a dead backend
            log.exception("pilotfish: the Dask backend's event thread failed")
            self._emit([Fatal("runtime_lost", f"pilotfish's Dask backend failed: {e!r}")])

    def _consume(self) -> None:
        tick = max(0.01, min(0.1, self.hb_interval / 4))
        while not self._stopping.is_set():
            try:
                item = self._q.get(timeout=tick)
            except queue.Empty:
                item = None
            items = [item]
            with contextlib.suppress(queue.Empty):
                while len(items) < 5000:
                    items.append(self._q.get_nowait())
            if self._stopping.is_set():
                return
            events: list[Any] = []
            done: list[tuple[Any, str, int]] = []
            for it in items:
                if it is None:
                    continue
                kind = it[0]
                if kind == "done":
                    done.append((it[1], it[2], it[3]))
                    continue
                if done:  # keep the order of results and worker losses
                    self._collect(done, events)
                    done = []
                if kind == "started":
                    self._on_started(it[1], events)
                elif kind == "cluster":
                    self._on_cluster(it[1], events)
                elif kind == "cancel":
                    self._on_cancel(it[1])
                elif kind == "emit":
                    events.extend(it[1])
            if done:
                self._collect(done, events)
            self._check_timeouts(events)
            self._check_scheduler(events)
            self._emit(events)

    def _on_started(self, msg: Any, events: list[Any]) -> None:
        if not isinstance(msg, dict) or msg.get("op") != "started":
            return
        aid, worker = int(msg["attempt"]), str(msg["worker"])
        with self._lock:
            att = self._inflight.get(aid)
            if att is None or att.dkey != msg.get("key") or att.started:
                return
            att.started, att.worker, att.pid = True, worker, int(msg["pid"])
            att.host, att.t0, att.t0_wall = str(msg["host"]), time.monotonic(), float(msg["time"])
            self._worker_pids[worker] = att.pid
        events.append(Started(aid, worker, att.pid, att.t0_wall, att.host))

    def _on_cluster(self, msg: dict[str, Any], events: list[Any]) -> None:
        now = time.time()
        addr = str(msg.get("worker", ""))
        if msg.get("action") == "add-worker":
            events.append(WorkerEvent("started", addr, 0, now))
            return
        processing = set(msg.get("processing-tasks") or ())
        expected = bool(msg.get("expected"))
        with self._lock:
            why_restart = self._restarting.pop(addr, "")
            # every attempt of ours that started there and is not delivered yet is lost
            held = [a for a in self._inflight.values() if a.started and a.worker == addr]
            for a in held:
                del self._inflight[a.m.attempt]
            pid = self._worker_pids.pop(addr, 0)
        cause = f"Dask's stimulus: {msg.get('stimulus_id', '?')}"
        if why_restart:
            cause = f"pilotfish restarted it: {why_restart}"
        elif expected:
            cause += ", an expected removal (retired or restarted)"
        what = (
            f"Dask worker {addr} (pid {pid or '?'}) was removed from the cluster ({cause}); "
            "Dask does not report its exit status: see the worker's and its nanny's log"
        )
        kind = "lost" if held or not expected else "stopped"
        events.append(
            WorkerEvent(kind, addr, pid, now, None, None, tuple(a.m.attempt for a in held), what)
        )
        for a in held:
            state = "running" if a.dkey in processing else "holding the unfetched result of"
            events.append(
                Lost(
                    a.m.attempt,
                    "worker_lost",
                    f"{what}, while {state} task {a.m.key!r} (attempt id {a.m.attempt}, "
                    f"after {time.monotonic() - a.t0:.2f} s) at host {a.host}",
                    addr,
                    a.pid,
                    None,
                    None,
                    "",
                    a.t0_wall,
                    now,
                    a.host,
                )
            )
        self._cancel_futs([a.fut for a in held], f"worker {addr} lost")

    def _on_cancel(self, ids: Sequence[int]) -> None:
        with self._lock:
            gone = [self._inflight.pop(i) for i in ids if i in self._inflight]
            held = {i for i in ids}
            self._held = [h for h in self._held if h.attempt not in held]
        self._cancel_futs([a.fut for a in gone if a.fut is not None], "cancelled by pilotfish")

    def _collect(self, done: list[tuple[Any, str, int]], events: list[Any]) -> None:
        finished: list[tuple[_Att, Any]] = []
        for fut, dkey, aid in done:
            with self._lock:
                att = self._inflight.get(aid)
            if att is None or att.dkey != dkey:
                continue  # we cancelled it, or already reported it lost
            status = fut.status
            if status == "finished":
                finished.append((att, fut))
            elif status == "cancelled":
                self._on_cancelled(att, fut, events)
            elif status == "error":
                self._on_error(att, fut, events)
            else:  # "lost"/"pending": Dask lost the result with its worker and recomputes
                self._result_lost(att, events)
        if not finished:
            return
        try:
            # from the workers themselves when they are on this host (no detour through
            # the scheduler); else Dask's default. Missing keys fall back to the scheduler.
            direct = all(self._is_near(a) for a, _ in finished) or None
            values = self._client.gather([f for _, f in finished], direct=direct)
            pairs = list(zip([a for a, _ in finished], values, strict=True))
        except Exception:  # one by one; a result lost with its worker fails its attempt
            pairs = []
            for att, fut in finished:
                if fut.status == "finished":
                    with contextlib.suppress(Exception):
                        pairs.append((att, fut.result(timeout=5)))
                        continue
                if fut.status == "error":
                    self._on_error(att, fut, events)
                elif fut.status == "cancelled":
                    self._on_cancelled(att, fut, events)
                else:
                    self._result_lost(att, events)
        for att, res in pairs:
            with self._lock:
                if self._inflight.get(att.m.attempt) is not att:
                    continue
                del self._inflight[att.m.attempt]
            if not isinstance(res, Result):
                res = self._env_result(att, TypeError(f"unexpected task result {res!r}"))
            elif att.started and (res.worker, res.pid) != (att.worker, att.pid):
                log.info(
                    "pilotfish: Dask re-ran attempt %s of %r on %s after losing %s",
                    att.m.attempt,
                    att.m.key,
                    res.worker,
                    att.worker,
                )
            if not att.started:
                events.append(Started(res.attempt, res.worker, res.pid, res.started, res.host))
            events.append(res)

    def _is_near(self, att: _Att) -> bool:
        """Did ``att`` run on a worker that surely is reachable from here (this host)?"""
        w = att.worker
        if not att.started or not w:
            return False
        hit = self._near.get(w)
        if hit is None:
            host = w.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
            hit = w.startswith("inproc://") or host in ("localhost", "::1")
            hit = hit or host.startswith("127.") or att.host == self._host
            self._near[w] = hit
        return hit

    def _result_lost(self, att: _Att, events: list[Any]) -> None:
        """Never let Dask silently run a finished attempt again: report it lost instead."""
        self._lost_or_resubmit(
            att,
            f"Dask worker {att.worker or '?'}, which held its result, was lost before the "
            "client could fetch it",
            events,
            cancel=True,
        )

    def _on_cancelled(self, att: _Att, fut: Any, events: list[Any]) -> None:
        reason = ""
        try:
            fut.result(timeout=5)
        except BaseException as e:
            reason = str(getattr(e, "reason", "") or e)
        if _CONN_LOST in reason:
            self._conn_lost = True  # handled by _check_scheduler: lost or resubmitted
            return
        self._lost_or_resubmit(
            att, f"its Dask task was cancelled by someone else ({reason})", events
        )

    def _on_error(self, att: _Att, fut: Any, events: list[Any]) -> None:
        try:
            exc = fut.exception(timeout=5)
        except BaseException as e:
            exc = e
        if isinstance(exc, distributed.KilledWorker) or type(exc).__name__ == "KilledWorker":
            last = ""
            with contextlib.suppress(Exception):
                last = f" (last on worker {exc.last_worker.address})"
            self._lost_or_resubmit(
                att, f"Dask gave up on its task after workers died running it{last}", events
            )
            return
        if exc is None:
            exc = RuntimeError(f"Dask future ended with status {fut.status!r}")
        with self._lock:
            if self._inflight.get(att.m.attempt) is not att:
                return
            del self._inflight[att.m.attempt]
        events.append(self._env_result(att, exc))

    def _env_result(self, att: _Att, exc: BaseException) -> Result:
        env = _wire.envelope_for(
            exc,
            "environment",
            message=(
                f"Dask could not run task {att.m.key!r} (attempt id {att.m.attempt})"
                f"{' on worker ' + att.worker if att.worker else ''}: "
                f"{type(exc).__name__}: {exc}. Is pilotfish (the same version as on the "
                "client) installed in the Dask workers' environment?"
            ),
        )
        now = time.time()
        return Result(
            att.m.attempt,
            False,
            pickle.dumps(env, _wire.PROTOCOL),
            att.worker,
            att.pid,
            att.t0_wall or now,
            now,
            att.host,
        )

    def _lost_or_resubmit(
        self, att: _Att, why: str, events: list[Any], *, cancel: bool = False
    ) -> None:
        """Blame a started attempt (``Lost``); quietly resubmit one that never started."""
        with self._lock:
            if self._inflight.get(att.m.attempt) is not att:
                return
            del self._inflight[att.m.attempt]
            if not att.started and att.resubmits < _MAX_RESUBMITS and not self._dead:
                n = att.resubmits + 1
                self._submit_locked(_Att(att.m, self._dkey(att.m, n), resubmits=n))
                if cancel:
                    self._cancel_futs([att.fut], "resubmitted")
                return
        if cancel:
            self._cancel_futs([att.fut], "lost")
        now = time.time()
        events.append(
            Lost(
                att.m.attempt,
                "worker_lost",
                f"task {att.m.key!r} (attempt id {att.m.attempt}) was lost: {why}"
                + (f"; it was running on Dask worker {att.worker}" if att.worker else ""),
                att.worker,
                att.pid,
                None,
                None,
                "",
                att.t0_wall,
                now,
                att.host,
            )
        )

    def _check_timeouts(self, events: list[Any]) -> None:
        now = time.monotonic()
        with self._lock:
            late = [
                a
                for a in self._inflight.values()
                if a.started and a.m.timeout is not None and now - a.t0 >= a.m.timeout
            ]
            for a in late:
                del self._inflight[a.m.attempt]
        if not late:
            return
        wall = time.time()
        restart: set[str] = set()
        for a in late:
            assert a.m.timeout is not None
            if self.timeout_restart:
                how = (
                    f"pilotfish cancelled it and ends that worker process (pid {a.pid}) so that "
                    "its nanny starts a fresh one (a worker without a nanny is left alone: the "
                    "call then runs on in its thread and its result is dropped)"
                )
                restart.add(a.worker)
                with self._lock:
                    self._restarting[a.worker] = (
                        f"task {a.m.key!r} exceeded its timeout of {a.m.timeout:g} s"
                    )
            else:
                how = (
                    "pilotfish cancelled it; Dask cannot stop a running thread, so the call "
                    "runs on and its result is dropped"
                )
            events.append(
                Lost(
                    a.m.attempt,
                    "timeout",
                    f"task {a.m.key!r} exceeded its timeout of {a.m.timeout:g} s "
                    f"(ran {now - a.t0:.2f} s) on Dask worker {a.worker} at host {a.host}; " + how,
                    a.worker,
                    a.pid,
                    None,
                    None,
                    "",
                    a.t0_wall,
                    wall,
                    a.host,
                )
            )
        self._cancel_futs([a.fut for a in late], "timeout")
        if restart:
            t = threading.Thread(
                target=self._restart_workers,
                args=(sorted(restart),),
                name="pilotfish-dask-restart",
                daemon=True,
            )
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _restart_workers(self, addrs: list[str]) -> None:
        """Stop a runaway call the only way Dask allows: end its worker process.

        Only workers with a nanny, which starts a fresh worker at once; ``restart_workers``
        would first wait seconds for the busy thread to finish.
        """
        c = self._client
        try:
            info = c.scheduler_info()["workers"]
            nanny = [a for a in addrs if (info.get(a) or {}).get("nanny")]
            with self._lock:
                for a in addrs:
                    if a not in nanny:
                        self._restarting.pop(a, None)
            if nanny and not self._stopping.is_set():
                c.run(os._exit, _EXIT_TIMEOUT, workers=nanny, on_error="ignore")
        except Exception as e:
            log.info("pilotfish: could not restart Dask workers %s: %s", addrs, e)

    # ------------------------------------------------------------------ scheduler loss
    def _check_scheduler(self, events: list[Any]) -> None:
        if self._dead or self._client is None:
            return
        status = self._client.status
        if self._lost_since is None:
            if status == "running" and not self._conn_lost:
                return
            with self._lock:
                self._lost_since = time.monotonic()
            events.append(
                MasterEvent(
                    "lost",
                    self._sched_pid,
                    time.time(),
                    message=f"lost the connection to the Dask scheduler at {self.address}",
                )
            )
            if self._restarts >= self.max_restarts:
                self._fatal(self._no_restart_reason(), events)
                return
        if status == "running":
            self._recovered(events)
        elif status in ("closed", "closing"):
            self._fatal(
                f"lost the connection to the Dask scheduler at {self.address} and the Dask "
                "client gave up reconnecting",
                events,
            )
        elif time.monotonic() - self._lost_since > self.hb_timeout:
            self._fatal(
                f"lost the connection to the Dask scheduler at {self.address}, and it did not "
                f"come back within heartbeat_timeout={self.hb_timeout:g} s",
                events,
            )

    def _no_restart_reason(self) -> str:
        what = (
            f"lost the connection to the Dask scheduler at {self.address} (it was killed, "
            "crashed, or the network failed)"
        )
        if self.max_restarts == 0:
            return f"{what}; max_master_restarts=0, so pilotfish does not wait for it to return"
        return (
            f"{what}; it was lost {self._restarts} times before (max_master_restarts="
            f"{self.max_restarts}), so pilotfish does not wait for it again"
        )

    def _fatal(self, why: str, events: list[Any]) -> None:
        with self._lock:
            self._dead = True
            self._fatal_message = why
            futs = [a.fut for a in self._inflight.values() if a.fut is not None]
            self._inflight.clear()
            self._held.clear()
        events.append(Fatal("runtime_lost", why))
        self._cancel_futs(futs, "scheduler lost")

    def _recovered(self, events: list[Any]) -> None:
        """The client is connected again: what the old scheduler had is gone."""
        self._restarts += 1
        with contextlib.suppress(Exception):
            self._subscribe()
        self._ship_path()
        why = (
            f"the connection to the Dask scheduler at {self.address} was lost while it ran "
            f"(reconnected; restart {self._restarts} of max_master_restarts={self.max_restarts})"
        )
        with self._lock:
            self._gen += 1
            self._conn_lost = False
            self._lost_since = None
            gone = [
                a
                for a in self._inflight.values()
                if a.fut is not None and a.fut.status == "cancelled"
            ]
            for a in gone:
                del self._inflight[a.m.attempt]
                if a.started:
                    events.append(self._runtime_lost(a.m, why, a))
                else:
                    self._submit_locked(
                        _Att(a.m, self._dkey(a.m, a.resubmits + 1), resubmits=a.resubmits + 1)
                    )
            held, self._held = self._held, []
            for m in held:
                self._submit_locked(_Att(m, self._dkey(m, 0)))
        events.append(
            MasterEvent(
                "restarted",
                self._sched_pid,
                time.time(),
                message=f"reconnected to the Dask scheduler at {self.address}",
            )
        )
