"""The Dask distributed backend: pilotfish's semantics on any Dask cluster.

``Session(backend="dask", address="tcp://host:8786")`` (or ``client=`` an
existing ``distributed.Client``) runs every attempt as one Dask task on a
cluster that the user started (``LocalCluster``, ``dask_jobqueue.SLURMCluster``,
``dask scheduler`` + ``dask worker``). pilotfish never starts, restarts or
shuts down that cluster, and needs none of its settings changed. The workflow
core, the retry and poison policy, fencing and the journal stay on the client,
as with the local backend; Dask only places and runs attempts.

Each attempt is submitted with a unique key
(``pilotfish-KEY-aATTEMPT-TOKEN``), ``pure=False`` and ``retries=0``; on the
worker it calls :func:`pilotfish.runtime.execute.run_attempt`, which never
raises, and returns its ``Result``. Where each attempt is, and what Dask's
signals mean for it, is kept by the shared attempt ledger
(:class:`pilotfish.core.ledger.Ledger`): this backend only turns Dask's signals
into ledger events and carries out the ledger's commands.

**Start fence.** Before running user code the worker asks a scheduler plugin
(:mod:`pilotfish.backends.dask.fence`, registered by the session, shipped by
value) with one synchronous call (the one round trip per attempt the worker made
anyway to report ``Started``). The first request for a Dask key, from the worker
the scheduler has it processing on, is granted and published to the client as
``Started``; any other is refused, and the task returns without running user
code. So Dask's own rerun of a task whose worker died (its
``allowed-failures``, 3 by default) never runs an attempt's user code twice:
pilotfish's policy decides about a retry. A refusal is logged (``pilotfish.dask``,
INFO, naming attempt, Dask key (it holds the task key) and worker) and counted in
``Session.processes()["refused_starts"]``. A worker that died holding an attempt
it had *not* started leaves no grant behind: Dask's rerun elsewhere is granted.

Cost (see benchmarks/bench_dask.py): ``submit`` only registers an attempt; a
submitter thread hands everything pending to Dask with one ``Client.map``
(one graph update on the scheduler per batch, not per attempt). An attempt
cancelled, lost or stopped before its Dask future exists is skipped, or its
late future cancelled. The Dask task is a coroutine: the worker awaits the start
fence on its event loop (no thread hand-offs on the path every attempt waits for)
and runs the attempt in its thread pool. A small result (up to 1 KB pickled) comes
with the task's end on the session's event topic, before Dask says the task
finished, and is never fetched. Larger values are gathered in batches, straight
from the worker the fence granted the attempt to when it is on the client's host
(no ``who_has`` round trip to the scheduler first), else through Dask's
``Client.gather`` (also for keys that worker no longer has). Each batch's futures
are watched from the client's event loop (one hand-over per batch). With
``LocalCluster`` the scheduler shares the client's process and GIL, so work
kept off the scheduler is throughput.

How Dask's signals become ledger events, and what pilotfish then reports and does:

===============================================  ===============  ===============================
Dask                                             ledger event     pilotfish
===============================================  ===============  ===============================
``Session.submit`` (a retry too)                 ``Enqueue``      handed to Dask in a batch
the start fence granted a worker's request       ``Start``        ``Started``
the start fence refused it (Dask's own rerun, a  --               logged and counted; the task
task cancelled or moved meanwhile)                                returns, user code not run
future finished (or its small result's event)    ``Finish``       ``Result`` (value or error)
scheduler ``remove-worker`` event                ``WorkerLost``   ``WorkerReport("lost")`` and
                                                                  ``Lost(worker_lost)`` for the
                                                                  attempts that started there;
                                                                  their futures are cancelled
... of a worker in a SLURM job                   ``WorkerLost``   the same, naming the job and
                                                                  how it ended (``SLURM job 12
                                                                  CANCELLED``, ``TIMEOUT`` and
                                                                  its walltime) or that it runs
                                                                  on (the worker process died)
... of the last worker                           --               ``WorkerReport("gone")`` at
                                                                  once, naming the jobs; an
                                                                  adaptive cluster made by
                                                                  ``pilotfish.cluster.slurm`` is
                                                                  asked for replacements
no worker joins within ``no_workers_timeout``    ``Unrunnable``   ``Lost(runtime_lost)`` for
                                                                  every attempt in flight or
                                                                  queued, and for new ones until
                                                                  a worker joins
future erred with ``KilledWorker``, a cancel we  ``Bounce``       ``Lost(worker_lost)`` if it had
did not ask for, a result lost with its worker                    started, else resubmitted
before the client fetched it                                      unblamed under a new Dask key
future erred otherwise (e.g. pilotfish not       --               ``Result`` with an ENVIRONMENT
importable on the worker)                                         error
attempt running longer than its ``timeout``      ``TimePassed``   ``Lost(timeout)``; ``Expired``:
                                                                  future cancelled, worker
                                                                  restarted (see below)
the session cancels an attempt                   ``Revoke``       ``Withdraw``: future cancelled
                                                                  (a started one runs on; its
                                                                  result is fenced)
connection to the scheduler lost                 --               ``MasterReport("lost")``
... and back within ``heartbeat_timeout``        ``RuntimeLost``  started attempts
                                                                  ``Lost(runtime_lost)``; the
                                                                  others ``Resend``: resubmitted
                                                                  unblamed, new Dask keys;
                                                                  ``MasterReport("restarted")``
... not back, or ``max_master_restarts=0``       ``RuntimeLost``  started attempts
                                                                  ``Lost(runtime_lost)``, then
                                                                  ``Fatal(runtime_lost)``
===============================================  ===============  ===============================

``KilledWorker`` never reaches the user.

**Workers' names, and draining.** An attempt's ``worker`` (in ``Started``, results and
failure records) is the worker's *place*: its nanny's address when it has a nanny (a
nanny restarts a dead worker process under a new address, so failures there keep
counting against one place), else the worker's own address; a message that names a
worker process names both. ``drain(place)`` (the session's bad-node draining, see
:mod:`pilotfish.core.drain`) tells the start fence, which refuses every later start
there (the attempt is given back and sent again under a new Dask key, unblamed: user
code never ran there) and retires those workers (``retire_workers(close_workers=True)``:
no new Dask tasks, data moved off, worker and nanny closed; a worker that runs attempts
then gets no new Dask tasks at once and is retired when they end, so they are not
killed with it); ``drain(host, kind="host")`` does that for every worker that runs on
``host``. The client's ledger takes ``Drain`` when the fence says it drained (after
every grant made before it). A start refused because the worker is drained is given
back unblamed and never counts toward giving the attempt up (it never ran). While every
worker left is drained, attempts are held back on the client (``WorkerReport("gone")``
says why) and sent when a worker that is not drained joins; after
``no_workers_timeout`` they fail ``RUNTIME_LOST`` naming the drains and the tasks that
showed them. WorkerEvents still name worker processes by address.

**Batch jobs.** A worker plugin makes every Dask worker report its ``SLURM_JOB_ID``
(with its pid and host) on the session's topic as it joins. When it leaves, the client
asks ``scontrol show job`` (:func:`pilotfish.cluster.slurm_job`, waiting up to 3 s
while the job is ``COMPLETING``) and the attempts it had started are ``WORKER_LOST``
with ``SLURM job N CANCELLED (...)``, ``TIMEOUT (killed by SLURM at its walltime of
00:01:00 ...)``, ``PREEMPTED``, ... or, when the job is still ``RUNNING``, saying that
the worker process died inside it. Once a job's walltime is known (from the cluster
made by :func:`pilotfish.cluster.slurm`, else from the first job's ``scontrol``), an
attempt whose ``timeout`` is longer is warned about at submit (``pilotfish.dask``,
WARNING, once per timeout value). When the last worker leaves, ``WorkerReport("gone")``
says so at once; after ``no_workers_timeout`` seconds (a backend keyword, default
``heartbeat_timeout``; ``float("inf")`` waits forever) without a worker, the attempts
in flight and queued are ``RUNTIME_LOST`` naming the jobs and how they ended, and so
are attempts submitted later, until a worker joins. Before the first worker ever joined
(jobs still queued in SLURM) nothing times out.

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
  (A small result also travels on the event topic, through the scheduler, which
  keeps the topic's last ``distributed.admin.low-level-log-length`` events, 1000
  by default; once it has reached the client, the attempt is finished.)
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
  itself must be installed in the workers' (and scheduler's) environment.
* The start fence lives on the scheduler: it is registered when the session
  starts and again after a reconnect, shipped by value (so it needs the
  client's Python version there), else by reference (pilotfish installed
  there); if neither works the session fails at once, saying so. Dask itself
  unpickles task graphs on the scheduler, so pilotfish must be importable on
  the scheduler as well as on the workers (with ``LocalCluster`` and
  dask-jobqueue the scheduler runs in the client's process).
* A grant whose ``started`` message is lost with the scheduler connection is
  not known to the client: that attempt is then resent as never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import distributed
from distributed.client import done_callback as _done_callback
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.utils_comm import gather_from_workers

from ...core import ledger as L
from ...errors import InvalidTask
from ...runtime.execute import run_attempt
from ...wire import messages as _wire
from ...wire.messages import Lost, Result, RunAttempt, WorkerReport
from .._driver import Driver, Outcome, Stimuli, carry_out, environment_result, runtime_lost
from ..base import MasterReport, Pulse, Sink
from . import fence as _fence

__all__ = ["DaskBackend"]

log = logging.getLogger("pilotfish.dask")

_CONN_LOST = "scheduler-connection-lost"
_OUR_CANCEL = "pilotfish"
_MAX_RESUBMITS = 10
_EXIT_TIMEOUT = 75  # exit status of a worker pilotfish ended to stop a timed-out call
_FENCE_TIMEOUT = 30  # s a worker waits for the start fence's answer (then it refuses itself)
_EVENT_MAX = 1024  # bytes: a result up to this size also travels on the event topic
#: s to wait for a lost worker's batch job to leave COMPLETING (to learn CANCELLED, TIMEOUT)
_JOB_SETTLE = 3.0
_GONE_KEPT = 20  # how many lost workers a "no worker left" message names at most
#: the least time a Dask task takes end to end (a no-op: ~1 ms), and the longest the
#: submitter lets attempts gather while Dask's workers have a backlog (_gather_delay)
_TASK_MIN = 0.001
_GATHER_MAX = 0.02


def _warn_if_open(address: str) -> None:
    """A plain-TCP scheduler reachable from other machines runs whatever anyone who
    reaches it submits, as the user who started the workers: say so, and how to fix it."""
    scheme, _, rest = address.rpartition("://")
    if (scheme or "tcp") != "tcp":
        return  # tls://, inproc://, ucx:// ...
    host = rest.rsplit(":", 1)[0].strip("[]") if ":" in rest else rest
    if host in ("localhost", "::1") or host.startswith("127."):
        return
    log.warning(
        "pilotfish: the Dask scheduler at %s speaks plain TCP without credentials: anyone "
        "who can reach that port can submit tasks that run as you on its workers. Use TLS: "
        "start the cluster with security=distributed.Security.temporary() (or certificates "
        "of your own) and pass Session(backend='dask', address=..., security=...); "
        "pilotfish.cluster.slurm() does this by default. Or bind the scheduler to "
        "127.0.0.1 on a machine only you use.",
        address,
    )


# --------------------------------------------------------------------------- worker side


class _NotStarted(NamedTuple):
    """What a Dask task returns when the start fence refused it: user code did not run."""

    attempt: int
    dkey: str
    worker: str
    reason: str
    drained: bool = False  # refused because this worker is drained (never counted)


async def _attempt_on_worker(
    m: RunAttempt, dkey: str, fence: str, rundir: str, topic: str = ""
) -> Result | _NotStarted:
    """The Dask task: ask the start fence on the scheduler (one synchronous call), then
    run the attempt here, or return :class:`_NotStarted` without running user code.

    A coroutine, so Dask runs it on the worker's event loop, holding one of the worker's
    task slots as any task does: the fence's call is awaited right there (a worker thread
    handing it to the loop and waiting for the answer cost two thread switches per
    attempt, on the path every attempt waits for), and only the attempt itself goes to the
    worker's thread pool (:func:`_in_thread`, as Dask runs a function task).

    A small result (up to :data:`_EVENT_MAX` bytes) also goes to the client on the
    session's event topic (``op: result``), which reaches it before Dask says the task
    finished: the client then need not fetch it from the worker. The task's value is the
    result all the same (a larger one, or one whose event did not arrive, is fetched)."""
    pid = os.getpid()
    try:
        worker: Any = distributed.get_worker()
    except Exception:
        return _NotStarted(m.attempt, dkey, f"pid {pid}", "not running on a Dask worker")
    where = str(worker.address)
    host = _wire.host_name()
    try:
        answer = await asyncio.wait_for(
            getattr(worker.scheduler, fence)(
                key=dkey, attempt=m.attempt, worker=where, pid=pid, host=host, when=time.time()
            ),
            _FENCE_TIMEOUT,
        )
        granted = isinstance(answer, dict) and answer.get("granted") is True
        drained = isinstance(answer, dict) and answer.get("drained") is True
        if granted:
            why = ""
        elif isinstance(answer, dict):
            why = str(answer.get("reason") or "refused")
        else:  # Dask answers None to an unknown handler: a task from before a reconnect
            why = f"the scheduler has no start fence {fence!r} (it was replaced or removed)"
    except Exception as e:  # fail closed: no answer, no user code
        granted = drained = False
        why = f"pilotfish's start fence on the scheduler did not answer: {type(e).__name__}: {e}"
    if not granted:
        return _NotStarted(m.attempt, dkey, where, why, drained)
    ctx = contextvars.copy_context()  # Dask's worker context variable: get_worker() works
    pool = worker.executors.get("default")
    res: Result = await asyncio.get_running_loop().run_in_executor(
        pool, ctx.run, _in_thread, worker, m, dkey, where, host, rundir
    )
    if topic and len(res.data) <= _EVENT_MAX:
        with contextlib.suppress(Exception):  # else the client fetches it
            worker.log_event(topic, {"op": "result", "key": dkey, "result": list(res)})
    return res


def _in_thread(worker: Any, m: RunAttempt, dkey: str, where: str, host: str, rundir: str) -> Result:
    """Run a granted attempt in a thread of the worker's pool, set up as Dask sets up a
    thread that runs a task (its key, its worker; listed in the worker's active threads)."""
    from distributed.utils import set_thread_state

    ident = threading.get_ident()
    with worker.active_threads_lock:
        worker.active_threads[ident] = dkey
    try:
        with set_thread_state(
            start_time=time.time(), execution_state=worker.execution_state, key=dkey
        ):
            return _run_here(worker, m, dkey, where, host, rundir)
    finally:
        with worker.active_threads_lock:
            worker.active_threads.pop(ident, None)


def _run_here(worker: Any, m: RunAttempt, dkey: str, where: str, host: str, rundir: str) -> Result:
    if m.kind != "command":
        return run_attempt(m, worker=where, host=host, rundir=rundir)
    # A program runs in its own process group, which a released task (the client died or
    # cancelled it) would leave running: Dask cannot stop the thread, but we can stop the
    # program, and with it the thread.
    cancel, done = threading.Event(), threading.Event()
    watch = threading.Thread(
        target=_watch_release, args=(worker, dkey, cancel, done), daemon=True, name="pf-watch"
    )
    watch.start()
    try:
        return run_attempt(m, worker=where, host=host, rundir=rundir, cancel=cancel)
    finally:
        done.set()
        watch.join()


def _watch_release(worker: Any, dkey: str, cancel: threading.Event, done: threading.Event) -> None:
    """Set ``cancel`` once the worker no longer runs task ``dkey`` (released, cancelled)."""
    while not done.wait(0.5):
        ts = worker.state.tasks.get(dkey)
        if ts is None or ts.state not in ("executing", "long-running"):
            cancel.set()
            return


def _watch_futures(loop: Any, items: list[tuple[Any, str, int]], put: Callable[..., None]) -> None:
    """On the Dask client's event loop: put ``("done", future, dkey, attempt)`` once each
    future is done. What ``Future.add_done_callback`` does, without its per-future wake-up
    of the loop from another thread and hop through Dask's callback thread."""
    for f, dkey, aid in items:
        loop.add_callback(_done_callback, f, functools.partial(_report_done, put, dkey, aid))


def _report_done(put: Callable[..., None], dkey: str, aid: int, fut: Any) -> None:
    put(("done", fut, dkey, aid))


class _ClientSysPath(WorkerPlugin):
    """Append the client's ``sys.path`` entries a worker lacks (so its modules import)."""

    idempotent = False

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def setup(self, worker: Any) -> None:
        for p in self.paths:
            if p and p not in sys.path:
                sys.path.append(p)


class _WorkerJob(WorkerPlugin):
    """Each Dask worker says which batch job it runs in (its ``SLURM_JOB_ID``), its pid
    and host, on the session's event topic, as it joins: so that when it leaves, the
    client can ask SLURM how that job ended (see :mod:`pilotfish.cluster`)."""

    idempotent = False

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def setup(self, worker: Any) -> None:
        worker.log_event(
            self.topic,
            {
                "op": "worker",
                "worker": str(worker.address),
                "name": str(worker.name),
                "nanny": str(getattr(worker, "nanny", None) or ""),
                "job": os.environ.get("SLURM_JOB_ID", ""),
                "pid": os.getpid(),
                "host": _wire.host_name(),
            },
        )


_BY_VALUE = threading.Lock()


@contextlib.contextmanager
def _pickled_by_value(module: ModuleType) -> Iterator[None]:
    """Pickle ``module``'s objects by value (cloudpickle) for the duration."""
    import cloudpickle

    with _BY_VALUE:
        known = module.__name__ in cloudpickle.list_registry_pickle_by_value()
        if not known:
            cloudpickle.register_pickle_by_value(module)
        try:
            yield
        finally:
            if not known:
                cloudpickle.unregister_pickle_by_value(module)


# --------------------------------------------------------------------------- client side


@dataclass(slots=True, eq=False)
class _Att:
    """A ledger entry's ``item``: the Dask plumbing of one attempt (its Dask key and
    future). A resubmission gets a new one, with a new key."""

    m: RunAttempt
    dkey: str
    fut: Any = None
    resubmits: int = 0


class _Step:
    """The Dask backend's hooks for the ledger's commands (:func:`._driver.carry_out`),
    for one step of the event thread (lock held): ``events`` for the session, ``cancel``
    the Dask futures to cancel afterwards, ``restart`` the workers to end (timeouts).
    ``items``: the attempts the commands may name (one the ledger let go of is no longer
    in it); ``where``: text to add to their ``Lost`` reports."""

    __slots__ = ("b", "cancel", "events", "items", "restart", "where")

    def __init__(
        self,
        b: DaskBackend,
        items: dict[int, _Att],
        events: list[Any],
        cancel: list[Any],
        where: dict[int, str] | None = None,
    ) -> None:
        self.b, self.items, self.events, self.cancel = b, items, events, cancel
        self.where = where
        self.restart: set[str] = set()

    def report(self, msg: L.Started | L.Lost) -> None:
        if isinstance(msg, Lost):
            att = self.items.get(msg.attempt)
            if att is not None:  # Dask may still be rerunning it: not any more
                self.cancel.append(att.fut)
            if self.where and msg.attempt in self.where:
                msg = msg._replace(message=msg.message + self.where[msg.attempt])
        self.events.append(msg)

    def send(self, items: tuple[Any, ...], resend: bool) -> None:
        for it in items:  # requeued or resent alike: under a new Dask key, unblamed
            self.b._resubmit_locked(it, self.events, self.cancel)

    def withdraw(self, worker: str, attempt: int) -> None:
        att = self.items.get(attempt)
        if att is not None:
            self.cancel.append(att.fut)

    def kill_groups(self, worker: str, pgids: tuple[int, ...]) -> None:
        pass  # never asked: no Group events (a Dask worker's programs have no master)

    def expire(self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...]) -> None:
        att = self.items.get(attempt)
        if att is None:
            return
        self.cancel.append(att.fut)
        if self.b.timeout_restart:
            self.restart.add(worker)
            self.b._restarting[worker] = (
                f"task {att.m.key!r} exceeded its timeout of {att.m.timeout:g} s"
            )


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
        no_workers_timeout: float | None = None,
        security: Any = None,
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
        if security is not None and type(security).__name__ != "Security":
            raise InvalidTask(
                f"backend='dask': security={security!r} is invalid: give a "
                "distributed.Security (the TLS credentials of the scheduler), or leave it out"
            )
        self.security = security
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
        # threads, sink, restart budget, dead or not: the backends' kit
        self._driver = Driver("Dask", max_master_restarts)
        self._stopping = self._driver.stopping
        self._tick = max(0.01, min(0.1, heartbeat_interval / 4))
        self._pulse = Pulse(heartbeat_interval / 2)
        # everything the event thread handles: ("fence"|"cluster", msg), ("cancel", ids),
        # ("emit", events), ("done", future, dask key, attempt id)
        self._q: Stimuli[tuple[Any, ...]] = Stimuli(self._on_stimuli, self._tick)
        # every attempt in flight, and what Dask's signals mean for it (items: _Att)
        self._ledger = L.Ledger(max_returns=_MAX_RESUBMITS)
        self._pending: list[_Att] = []  # in the ledger, not yet handed to Dask
        self._submit_wake = threading.Event()
        self._newest_order = 0  # the latest task (submission order) handed to Dask
        self._stopped = False
        self._lost_since: float | None = None
        self._conn_lost = False
        self._fence_n = 0  # start fences registered so far (one per (re)connection)
        self._fence_op = ""  # the scheduler handler a task asks before running user code
        self._fence_close = ""
        self._fence_sched = ""  # the id of the scheduler it is registered on
        self._refused = 0  # start requests the fence refused (Dask's own reruns, ...)
        self._next_tick = 0.0
        self._sched_pid = 0
        self._workers: dict[str, tuple[int, str]] = {}  # worker address -> (pid, host)
        self._near: dict[str, bool] = {}  # worker address -> on this host (gather directly)
        self._host = _wire.host_name()
        self._restarting: dict[str, str] = {}  # worker address -> why we restarted it
        self._prev_all_handler: Callable[[Any], Any] | None = None
        # batch jobs (SLURM) and "no worker left": see _on_cluster and _check_workers
        self.no_workers_timeout = (
            heartbeat_timeout if no_workers_timeout is None else no_workers_timeout
        )
        self._job_plugin = f"pilotfish-jobs-{self._token}"
        self._live: set[str] = set()  # worker addresses in the cluster now
        self._jobs: dict[str, tuple[str, str]] = {}  # worker address -> (job id, worker name)
        self._gone: list[str] = []  # how the workers that left since the last live one ended
        self._gone_names: set[str] = set()  # their Dask worker names (cluster job names)
        self._gone_since: float | None = None  # monotonic: the last worker left
        self._starved = ""  # why attempts fail at once: no worker came back in time
        self._walltime: tuple[float, str] | None = None  # the worker jobs' walltime
        self._walltime_asked = False
        self._warned_timeouts: set[float] = set()
        # draining: worker address -> its place (its nanny's address; see the docstring)
        self._place: dict[str, str] = {}
        self._drains: list[tuple[str, str, str]] = []  # (kind, name, why) asked so far
        # attempts held back while every worker is drained (sent when a usable one joins)
        self._parked: list[_Att] = []

    # ------------------------------------------------------------------ protocol
    def start(self, sink: Sink) -> None:
        self._driver.sink = sink
        _warn_if_open(self.address or str(getattr(self._client.scheduler, "address", "")))
        if self._client is None:
            sec = self.security
            if sec is None:  # a cluster made by pilotfish.cluster.slurm: its credentials
                from ... import cluster as _cluster

                sec = getattr(_cluster.cluster_for(self.address), "security", None)
            try:
                self._client = distributed.Client(  # type: ignore[no-untyped-call]
                    self.address,
                    timeout=max(self.connect_timeout, self.hb_timeout),
                    set_as_default=False,
                    security=sec,
                )
            except Exception as e:
                why = (
                    f"cannot connect to the Dask scheduler at {self.address}: "
                    f"{type(e).__name__}: {e}"
                )
                self._die("runtime_lost", why)
                return
        c = self._client
        self.address = str(c.scheduler.address)
        with contextlib.suppress(Exception):
            self._sched_pid = int(c.run_on_scheduler(os.getpid))
        self._subscribe()
        why = self._install_fence()
        if why:
            self._die("environment", why)
            return
        self._ship_path()
        self._ship_job_plugin()
        self._cluster_walltime()
        workers: list[str] = []
        with contextlib.suppress(Exception):
            info = c.scheduler_info()["workers"]
            workers = sorted(info)
            self._place.update((a, str(w["nanny"])) for a, w in info.items() if w.get("nanny"))
        with self._lock:
            self._live.update(workers)
        now = time.time()
        events: list[Any] = [
            MasterReport("started", self._sched_pid, now, message=f"Dask scheduler {self.address}")
        ]
        events += [WorkerReport("started", w, 0, now) for w in workers]
        self._emit(events)
        self._q.start(self._driver.nursery, "pilotfish-dask")
        self._driver.nursery.start("pilotfish-dask-submit", self._run_submitter)

    def _die(self, category: str, why: str) -> None:
        """The backend cannot start: every attempt fails with ``why``."""
        with self._lock:
            fatal = self._driver.fatal(why, category)
        self._emit([fatal])
        self._q.start(self._driver.nursery, "pilotfish-dask")

    def submit(self, attempts: Sequence[RunAttempt]) -> None:
        lost: list[Any] = []
        if self._walltime is not None:
            self._warn_walltime(attempts)
        with self._lock:
            new = []
            for a in attempts:
                if self._driver.dead or self._stopped:
                    lost.append(self._driver.refuse(a, worker="scheduler", pid=self._sched_pid))
                    continue
                if self._starved and not self._usable_locked():
                    lost.append(runtime_lost(a, self._starved, worker="scheduler"))
                    continue
                att = _Att(a, self._dkey(a, 0))
                new.append((a.attempt, a.key, att, a.timeout))
                if self._live and not self._usable_locked():  # every worker is drained
                    self._parked.append(att)
                elif self._lost_since is None:  # else resent when the scheduler is back
                    self._pending.append(att)
            self._ledger.submit(new)
            if self._pending:
                self._submit_wake.set()
        if lost:
            self._q.put(("emit", lost))

    def cancel(self, attempts: Sequence[int]) -> None:
        self._q.put(("cancel", tuple(attempts)))

    def drain(self, name: str, kind: str = "worker", why: str = "") -> None:
        """The session drained worker place ``name`` (or host ``name``, ``kind="host"``):
        the start fence refuses every later start there and retires its workers (see
        the module docstring). Never blocks: the scheduler is told from a thread."""
        if kind not in ("worker", "host"):
            raise ValueError(f"drain kind={kind!r}: 'worker' or 'host'")
        d = (kind, name, why or "drained by pilotfish: several different tasks failed there")
        with self._lock:
            if self._stopped or d[:2] in {x[:2] for x in self._drains}:
                return
            self._drains.append(d)
            op = self._fence_op.replace("pilotfish_start_", "pilotfish_fence_drain_", 1)
        self._driver.nursery.start("pilotfish-dask-drain", self._tell_fence, [(op, d)])

    def _tell_fence(self, drains: list[tuple[str, tuple[str, str, str]]]) -> None:
        c = self._client
        for op, (kind, name, why) in drains:
            if not op or c is None:
                continue  # no fence yet: it is told when one is installed
            try:
                c.sync(
                    getattr(c.scheduler, op), kind=kind, place=name, why=why, callback_timeout=30
                )
            except Exception as e:  # its starts are not refused; the workflow still
                # refunds the evidence, and a reconnect tells the new fence again
                log.warning(
                    "pilotfish: could not drain Dask %s %s on the scheduler: %s", kind, name, e
                )

    def processes(self) -> dict[str, Any]:
        with self._lock:
            jobs = {a: j for a, (j, _) in self._jobs.items() if j}
        out: dict[str, Any] = {
            "master": None,
            "scheduler": self.address,
            "scheduler_pid": self._sched_pid or None,
            "workers": [],
            "worker_addresses": {},
            # Dask's own reruns of a started attempt (and other stray starts) that the
            # start fence refused: their user code did not run
            "refused_starts": self._refused,
            # batch jobs: worker address -> SLURM job id (what the worker reported)
            "worker_jobs": jobs,
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
            # the session is closing: what is in flight is abandoned, not reported
            futs = [e.item.fut for e in self._ledger.entries.values() if e.item.fut is not None]
            self._ledger = L.Ledger(max_returns=_MAX_RESUBMITS)
            self._pending.clear()
            self._parked.clear()
        self._stopping.set()
        self._submit_wake.set()
        self._q.close()
        self._driver.nursery.stop(timeout)  # the event thread, the submitter, helpers
        c = self._client
        if c is None:
            return
        if c.status == "running":
            if futs:
                with contextlib.suppress(Exception):
                    c.cancel(futs, reason=_OUR_CANCEL, msg="pilotfish session closed")
            self._remove_fence()
            self._unsubscribe()
            if self.ship_sys_path:
                with contextlib.suppress(Exception):
                    c.unregister_worker_plugin(self._plugin_name)
            with contextlib.suppress(Exception):
                c.unregister_worker_plugin(self._job_plugin)
        del futs
        if self._own_client:
            with contextlib.suppress(Exception):
                c.close(timeout=min(timeout, 5.0))

    # ------------------------------------------------------------------ the start fence
    def _install_fence(self) -> str:
        """Register a fresh start fence on the scheduler, replacing ours if it is still
        there (a task handed to Dask before a reconnect then asks a handler that is gone,
        and is refused). Returns '' or why it could not be installed."""
        sid = ""
        with contextlib.suppress(Exception):
            sid = str(self._client.scheduler_info(n_workers=0).get("id", ""))
        if sid != self._fence_sched:  # another scheduler: ours went with the old one
            self._fence_close = ""
        self._remove_fence()
        self._fence_sched = sid
        self._fence_n += 1
        plugin = _fence.StartFence(self._token, self._fence_n, self._topic)
        errors = []
        # by value first: the scheduler need not have pilotfish installed
        for how in ("by value", "by reference"):
            try:
                by_value = how == "by value"
                with _pickled_by_value(_fence) if by_value else contextlib.nullcontext():
                    self._client.register_plugin(plugin, name=plugin.name)
            except Exception as e:
                errors.append(f"{how}: {type(e).__name__}: {e}")
                continue
            with self._lock:
                self._fence_op, self._fence_close = plugin.op, plugin.close_op
            return ""
        return (
            "pilotfish could not install its start fence (a Dask scheduler plugin that lets "
            f"each attempt's user code start once) on the Dask scheduler at {self.address} ("
            + "; ".join(errors)
            + "). The scheduler must accept pickled plugins (distributed.scheduler.pickle: "
            "true, Dask's default) and run the client's Python version, or have pilotfish "
            "installed"
        )

    def _remove_fence(self) -> None:
        op, self._fence_close = self._fence_close, ""
        c = self._client
        if op and c is not None:
            with contextlib.suppress(Exception):
                c.sync(getattr(c.scheduler, op), callback_timeout=5)

    # ------------------------------------------------------------------ helpers
    def _dkey(self, a: RunAttempt, n: int) -> str:
        tail = f"-r{n}" if n else ""
        return f"pilotfish-{a.key}-a{a.attempt}-{self._token}{tail}"

    def _current(self, att: _Att) -> bool:
        e = self._ledger.entries.get(att.m.attempt)
        return e is not None and e.item is att

    def _run_submitter(self) -> None:
        """Hand pending attempts to Dask, many per ``Client.map`` (one graph update each)."""
        while True:
            self._submit_wake.wait()
            delay = self._gather_delay()
            if delay:
                self._stopping.wait(delay)
            self._submit_wake.clear()
            with self._lock:
                if self._stopped:
                    return
                batch = [a for a in self._pending if self._current(a)]
                self._pending = []
                fence = self._fence_op
            if batch:
                try:
                    self._submit_batch(batch, fence)
                except Exception as e:  # never strand an attempt: report it lost
                    log.exception("pilotfish: could not submit attempts to Dask")
                    why = f"the Dask client could not submit it: {type(e).__name__}: {e}"
                    failed: list[Any] = []
                    with self._lock:
                        for a in batch:
                            if self._current(a) and a.fut is None:
                                self._give_up_locked(a, "runtime_lost", why, failed)
                    if failed:
                        self._q.put(("emit", failed))  # from the event thread, in order

    def _gather_delay(self) -> float:
        """How long to let more pending attempts gather before handing them to Dask: each
        ``Client.map`` is one graph update, whose fixed cost on the scheduler (a hand-off
        to a thread among it) outweighs a few attempts' own, and a dependency chain's next
        steps arrive one by one. Only while Dask holds so many attempts that have not
        started that its workers stay busy meanwhile: a quarter of that backlog's run time
        at :data:`_TASK_MIN` per attempt, at most :data:`_GATHER_MAX`. Never for a retry or
        a resend."""
        with self._lock:
            pending = self._pending
            if not pending or self._stopped:
                return 0.0
            if any(a.resubmits or len(a.m.lineage) > 1 for a in pending):
                return 0.0
            started = len(self._ledger.started())
            backlog = len(self._ledger) - started - len(pending)
            slots = max(started, len(self._live), 1)
        delay = min(_GATHER_MAX, backlog / slots * _TASK_MIN / 4)
        return delay if delay >= 0.001 else 0.0

    def _submit_batch(self, batch: list[_Att], fence: str) -> None:
        # Retries keep their place: an attempt of a task submitted before the newest one
        # already handed over (a retry, or a resend) goes ahead of Dask's FIFO order
        newest = self._newest_order
        ahead: list[_Att] = []
        fresh: list[_Att] = []
        for a in batch:
            (ahead if 0 < a.m.order < newest else fresh).append(a)
        batch = ahead + fresh
        self._newest_order = max(newest, max((a.m.order for a in batch), default=0))
        futs = self._map(ahead, fence, 1) + self._map(fresh, fence, 0)
        late = []
        with self._lock:
            for a, f in zip(batch, futs, strict=True):
                if self._current(a):
                    a.fut = f
                else:  # cancelled, lost or stopped while we submitted it
                    late.append(f)
        watch = [(f, a.dkey, a.m.attempt) for a, f in zip(batch, futs, strict=True) if a.fut is f]
        if watch:  # one hand-over to the client's event loop per batch
            self._client.loop.add_callback(_watch_futures, self._client.loop, watch, self._q.put)
        self._cancel_futs(late)

    def _map(self, batch: list[_Att], fence: str, priority: int) -> list[Any]:
        if not batch:
            return []
        n = len(batch)
        keys = [a.dkey for a in batch]
        futs: list[Any] = self._client.map(
            _attempt_on_worker,
            [a.m for a in batch],
            keys,
            [fence] * n,
            [self.rundir] * n,
            [self._topic] * n,
            key=keys,
            pure=False,
            retries=0,
            batch_size=None,
            priority=priority,
        )
        return futs

    def _placed(self, ev: Any) -> Any:
        """``ev`` naming its worker by its place (see the module docstring)."""
        if not isinstance(ev, L.Started | Lost | Result) or not ev.worker:
            return ev
        place = self._place.get(ev.worker)
        if not place or place == ev.worker:
            return ev
        if not isinstance(ev, Lost) or place in ev.message:
            return ev._replace(worker=place)
        addr, msg = ev.worker, ev.message
        if addr in msg:
            msg = msg.replace(addr, f"{addr} (nanny {place})", 1)
        else:
            msg += f" (on Dask worker {addr}, nanny {place})"
        return ev._replace(worker=place, message=msg)

    def _emit(self, events: Sequence[Any]) -> None:
        if self._driver.sink is not None and events:
            if self._place:
                events = [self._placed(e) for e in events]
            try:
                self._driver.emit(events)
            except Exception:
                log.exception("pilotfish: the session failed to take backend events")

    def _subscribe(self) -> None:
        c = self._client
        c.subscribe_topic(self._topic, lambda ev: self._q.put(("fence", ev[1])))
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

    def _ship_job_plugin(self) -> None:
        try:
            self._client.register_plugin(_WorkerJob(self._topic), name=self._job_plugin)
        except Exception as e:  # losses then name the worker, not its batch job
            log.info("pilotfish: could not install the worker-job plugin on Dask workers: %s", e)

    # ------------------------------------------------------------------ batch jobs
    def _cluster_walltime(self) -> None:
        """The walltime of a cluster :func:`pilotfish.cluster.slurm` made in this process."""
        from ... import cluster as _cluster

        made = _cluster.cluster_for(self.address)
        text = str(getattr(made, "_pilotfish_walltime", "") or "")
        secs = _cluster.parse_walltime(text) if text else None
        if secs is not None:
            self._walltime = (secs, text)

    def _warn_walltime(self, attempts: Sequence[RunAttempt]) -> None:
        """Warn (once per timeout value) when a task may run longer than its worker job."""
        assert self._walltime is not None
        secs, text = self._walltime
        for a in attempts:
            t = a.timeout
            if t is None or t <= secs or t in self._warned_timeouts or a.attempt < 0:
                continue
            self._warned_timeouts.add(t)
            log.warning(
                "pilotfish: task %r has timeout=%g s, longer than the walltime of the batch "
                "jobs that run the Dask workers (%s = %g s): SLURM ends the job first, and "
                "an attempt still running then is WORKER_LOST (job TIMEOUT), not TIMEOUT. "
                "Ask for a longer walltime or give the task a shorter timeout",
                a.key,
                t,
                text,
                secs,
            )

    def _job_of(self, addr: str) -> tuple[str, Any]:
        """(job id, what SLURM says about it now) for the worker at ``addr`` ('' , None if
        it did not run in a batch job or never said so)."""
        job = self._jobs.get(addr, ("", ""))[0]
        if not job:
            return "", None
        from ... import cluster as _cluster

        return job, _cluster.slurm_job(job, settle=_JOB_SETTLE)

    def _on_worker_info(self, msg: dict[str, Any]) -> None:
        """A worker said which batch job it runs in (the :class:`_WorkerJob` plugin)."""
        addr, job, name = str(msg.get("worker")), str(msg.get("job") or ""), str(msg.get("name"))
        with self._lock:
            if msg.get("nanny"):
                self._place[addr] = str(msg["nanny"])
            self._jobs[addr] = (job, name)
            with contextlib.suppress(TypeError, ValueError):
                self._workers.setdefault(addr, (int(msg.get("pid", 0)), str(msg.get("host"))))
        if job and self._walltime is None and not self._walltime_asked:
            self._walltime_asked = True  # once: every job of a cluster has the same walltime
            from ... import cluster as _cluster

            info = _cluster.slurm_job(job)
            secs = info.walltime if info is not None else None
            if info is not None and secs is not None:
                self._walltime = (secs, info.time_limit)
        if job:
            log.info("pilotfish: Dask worker %s (%s) runs in SLURM job %s", addr, name, job)

    def _all_gone_locked(self, now: float, events: list[Any]) -> None:
        """The last worker left: say so at once, ask the cluster for replacement jobs."""
        from ... import cluster as _cluster

        self._gone_since = time.monotonic()
        made = _cluster.cluster_for(self.address)
        asked = made is not None and _cluster.request_replacements(made, set(self._gone_names))
        ended = self._gone_text()
        if self.no_workers_timeout == float("inf"):
            then = "pilotfish waits for one (no_workers_timeout=inf)"
        else:
            then = (
                f"if none joins within no_workers_timeout={self.no_workers_timeout:g} s, "
                "pilotfish fails the attempts in flight and queued as RUNTIME_LOST"
            )
        msg = (
            f"no Dask worker is left in the cluster at {self.address}: {ended}. "
            + (
                "pilotfish asked the cluster for replacement jobs; "
                if asked
                else "A new worker must join (an adaptive cluster, e.g. "
                "pilotfish.cluster.slurm(), replaces lost jobs); "
            )
            + then
        )
        log.warning("pilotfish: %s", msg)
        events.append(WorkerReport("gone", "", 0, now, message=msg))

    def _gone_text(self) -> str:
        more = len(self._gone) >= _GONE_KEPT
        return "; ".join(self._gone) + (" (and maybe more)" if more else "") or "no reason known"

    def _check_workers(self, events: list[Any], cancel: list[Any]) -> None:
        """No worker for ``no_workers_timeout``: attempts in flight and queued fail."""
        since = self._gone_since
        if since is None or self._starved or self._driver.dead:
            return
        if time.monotonic() - since < self.no_workers_timeout:
            return
        with self._lock:
            if self._usable_locked() or self._gone_since is None:
                return
            if self._live or (self._drains and not self._gone):
                why = (
                    f"every Dask worker in the cluster at {self.address} was drained by "
                    f"pilotfish ({self._drained_text()}), and no worker that is not drained "
                    f"joined within no_workers_timeout={self.no_workers_timeout:g} s"
                )
            else:
                ended = self._gone_text()
                why = (
                    f"no Dask worker joined the cluster at {self.address} within "
                    f"no_workers_timeout={self.no_workers_timeout:g} s after the last one "
                    f"left ({ended})"
                )
            self._starved = why
            now = time.time()
            for e in list(self._ledger.entries.values()):
                msg = f"task {e.key!r} (attempt id {e.attempt}): {why}"
                cmds = self._ledger.handle(L.Unrunnable(e.attempt, "runtime_lost", msg, now))
                self._carry_out(cmds, {e.attempt: e.item}, events, cancel)
            self._pending.clear()
            self._parked.clear()
        log.error("pilotfish: %s; the attempts in flight and queued fail (RUNTIME_LOST)", why)

    def _cancel_futs(self, futs: list[Any]) -> None:
        c = self._client
        futs = [f for f in futs if f is not None]  # None: not handed to Dask yet
        if futs and c is not None and c.status in ("running", "connecting"):
            with contextlib.suppress(Exception):
                c.cancel(futs, reason=_OUR_CANCEL, msg="withdrawn by pilotfish")

    # ------------------------------------------------------------------ ledger commands
    # Everything below that touches the ledger runs with self._lock held ("_locked"):
    # events are what the session is told, cancel the Dask futures to cancel afterwards.

    def _carry_out(
        self,
        cmds: list[L.Command],
        items: dict[int, _Att],
        events: list[Any],
        cancel: list[Any],
    ) -> Outcome:
        """Carry out the ledger's commands (:class:`_Step`); ``items``: the attempts they
        may name (an attempt the ledger let go of is no longer in it)."""
        return carry_out(cmds, _Step(self, items, events, cancel))

    def _resubmit_locked(self, old: _Att, events: list[Any], cancel: list[Any]) -> None:
        """The ledger sends ``old`` again (it never started): a new Dask key, unblamed."""
        if not self._current(old):
            return
        cancel.append(old.fut)
        n = old.resubmits + 1  # names its next Dask key (the ledger counts what counts)
        new = _Att(old.m, self._dkey(old.m, n), resubmits=n)
        self._ledger.replace_item(old.m.attempt, new)
        if self._live and not self._usable_locked():  # sent when a usable worker joins
            self._parked.append(new)
        elif self._lost_since is None and not self._driver.dead:  # else resent when back
            self._pending.append(new)
            self._submit_wake.set()

    def _usable_locked(self) -> bool:
        """Is a worker in the cluster that pilotfish has not drained?"""
        drained = self._ledger.drained
        return any(a not in drained for a in self._live)

    def _drained_text(self) -> str:
        """Every drain so far, with why and the tasks that showed it."""
        return "; ".join(why for _, _, why in self._drains) or "drained"

    def _every_worker_drained_locked(self, events: list[Any]) -> None:
        """Every worker left in the cluster is drained: attempts are parked (sent when a
        usable worker joins); after ``no_workers_timeout`` they fail (_check_workers)."""
        if self._usable_locked() or self._gone_since is not None or self._stopping.is_set():
            return
        self._gone_since = time.monotonic()
        if self.no_workers_timeout == float("inf"):
            then = "pilotfish waits for one (no_workers_timeout=inf)"
        else:
            then = (
                f"if none joins within no_workers_timeout={self.no_workers_timeout:g} s, the "
                "attempts in flight and queued fail RUNTIME_LOST"
            )
        msg = (
            f"every Dask worker in the cluster at {self.address} is drained "
            f"({self._drained_text()}); attempts wait for a worker that is not drained to "
            f"join; {then}"
        )
        log.warning("pilotfish: %s", msg)
        events.append(WorkerReport("gone", "", 0, time.time(), message=msg))

    def _give_up_locked(self, att: _Att, category: str, why: str, events: list[Any]) -> None:
        """An attempt that never started cannot be run: it leaves the ledger, lost."""
        why = f"task {att.m.key!r} (attempt id {att.m.attempt}): {why}"
        cmds = self._ledger.handle(L.Unrunnable(att.m.attempt, category, why, time.time()))
        self._carry_out(cmds, {}, events, [])  # its Dask future, if any, ends by itself

    def _bounce_locked(
        self,
        att: _Att,
        why: str,
        now: float,
        events: list[Any],
        cancel: list[Any],
        drained: bool = False,
    ) -> None:
        """Dask gave ``att`` back: lost if it started, else sent again unblamed."""
        e = self._ledger.get(att.m.attempt)
        if e is None or e.item is not att:
            return
        where = ""
        if e.where == "started":
            where = f"; it ran on Dask worker {e.worker} (pid {e.pid}) at host {e.host}"
        msg = f"task {e.key!r} (attempt id {e.attempt}) was lost: {why}{where}"
        cmds = self._ledger.handle(L.Bounce(e.attempt, msg, now, drained))
        self._carry_out(cmds, {e.attempt: att}, events, cancel)

    # ------------------------------------------------------------------ event thread
    def _on_stimuli(self, items: list[tuple[Any, ...]]) -> None:
        """One step of the event thread (:class:`._driver.Stimuli`): what piled up, in
        order, then the timers; a crash here is the driver's ``Fatal``."""
        events: list[Any] = []
        cancel: list[Any] = []
        done: list[tuple[Any, str, int]] = []
        for it in items:
            kind = it[0]
            if kind == "done":
                done.append((it[1], it[2], it[3]))
                continue
            if done:  # keep the order of results and worker losses
                self._collect(done, events, cancel)
                done = []
            if kind == "fence":
                self._on_fence(it[1], events, cancel)
            elif kind == "cluster":
                self._on_cluster(it[1], events, cancel)
            elif kind == "cancel":
                self._on_cancel(it[1], cancel)
            elif kind == "emit":
                events.extend(it[1])
        if done:
            self._collect(done, events, cancel)
        self._check_timeouts(events, cancel, self._tick)
        self._check_scheduler(events, cancel)
        self._check_workers(events, cancel)
        self._cancel_futs(cancel)
        if not self._driver.dead:  # this thread bounds the silence itself (_check_scheduler)
            events.extend(self._pulse.beat())
        self._emit(events)

    def _on_fence(self, msg: Any, events: list[Any], cancel: list[Any]) -> None:
        """The start fence granted (``started``) or refused a worker's request."""
        if not isinstance(msg, dict):
            return
        if msg.get("op") == "worker":
            self._on_worker_info(msg)
            return
        if msg.get("op") == "drained":
            self._on_drained(msg, events, cancel)
            return
        if msg.get("op") == "result":
            self._on_result(msg, events, cancel)
            return
        op, aid, dkey = msg.get("op"), int(msg.get("attempt", 0)), str(msg.get("key"))
        worker, pid, host = str(msg.get("worker")), int(msg.get("pid", 0)), str(msg.get("host"))
        if op == "refused":
            self._refused += 1
            log.info(
                "pilotfish: the start fence refused attempt %s (Dask key %s) on Dask worker "
                "%s (pid %s, host %s); its user code did not run there: %s",
                aid,
                dkey,
                worker,
                pid,
                host,
                msg.get("reason"),
            )
            return
        if op != "started":
            return
        now = time.time()
        with self._lock:
            self._workers[worker] = (pid, host)
            if msg.get("place"):
                self._place[worker] = str(msg["place"])
            e = self._ledger.get(aid)
            if e is None:
                log.info(
                    "pilotfish: attempt %s (Dask key %s) started on Dask worker %s after "
                    "pilotfish withdrew it or gave it up; its result will be dropped",
                    aid,
                    dkey,
                    worker,
                )
                return
            att = e.item
            cmds = self._ledger.handle(L.Start(worker, aid, pid, host, now))
            out = self._carry_out(cmds, {aid: att}, events, cancel)
            for c in out.refused:
                log.warning(
                    "pilotfish: Dask started attempt %s (Dask key %s) on %s although %s; "
                    "its result will be dropped",
                    aid,
                    dkey,
                    worker,
                    c.reason,
                )
            if out.granted and att.dkey != dkey:
                # it started under a key pilotfish had replaced (the fence refuses the new
                # one): its result will not reach us through the future we hold
                self._bounce_locked(
                    att,
                    f"it started under Dask key {dkey}, which pilotfish had already "
                    "replaced, so its result cannot be collected",
                    now,
                    events,
                    cancel,
                )

    def _on_result(self, msg: dict[str, Any], events: list[Any], cancel: list[Any]) -> None:
        """A worker sent a small result with its Dask task's end (see
        :func:`_attempt_on_worker`): delivered now, as if fetched; its future's end is
        then ignored. One for an attempt pilotfish withdrew, lost or sent again under
        another Dask key is ignored here (its future's end decides, as without it)."""
        try:
            res = Result(*msg["result"])
        except Exception:
            return  # then its future brings it
        with self._lock:
            e = self._ledger.get(res.attempt)
            if e is not None and e.item.dkey == str(msg.get("key")):
                self._deliver_locked(e.item, res, events, cancel)

    def _on_drained(self, msg: dict[str, Any], events: list[Any], cancel: list[Any]) -> None:
        """The start fence drained a place (after every grant it made before): the ledger
        takes ``Drain`` for each worker there (what one held unstarted goes elsewhere)."""
        kind, name, why = str(msg.get("kind")), str(msg.get("name")), str(msg.get("why"))
        now = time.time()
        with self._lock:
            addrs = {str(a) for a in msg.get("workers") or ()}
            if kind == "worker":
                addrs |= {a for a, p in self._place.items() if p == name}
                addrs.add(name)
            else:
                addrs |= {a for a, (_, h) in self._workers.items() if h == name}
            led = self._ledger
            for addr in sorted(addrs):
                items = {a: led.entries[a].item for a in led.held_by(addr)}
                self._carry_out(led.handle(L.Drain(addr, why, now)), items, events, cancel)
            self._every_worker_drained_locked(events)
        log.info(
            "pilotfish: Dask %s %s drained (workers %s): no new attempts start there",
            kind,
            name,
            ", ".join(sorted(addrs)) or "none now",
        )

    def _on_cluster(self, msg: dict[str, Any], events: list[Any], cancel: list[Any]) -> None:
        now = time.time()
        addr = str(msg.get("worker", ""))
        if msg.get("action") == "add-worker":
            with self._lock:
                self._live.add(addr)
                if addr not in self._ledger.drained:
                    self._gone_since, self._starved = None, ""
                    self._gone.clear()
                    self._gone_names.clear()
                    if self._parked:  # a worker that is not drained: send what waited
                        self._pending.extend(a for a in self._parked if self._current(a))
                        self._parked.clear()
                        self._submit_wake.set()
            events.append(WorkerReport("started", addr, 0, now))
            return
        processing = set(msg.get("processing-tasks") or ())
        expected = bool(msg.get("expected"))
        # a worker in a batch job: how did the job end? (scontrol, ~10 ms; before the
        # lock, and before Dask's own rerun elsewhere could be taken for the cause)
        job, info = self._job_of(addr)
        with self._lock:
            why_restart = self._restarting.pop(addr, "")
            pid, host = self._workers.pop(addr, (0, ""))
            name = self._jobs.pop(addr, ("", ""))[1]
            self._live.discard(addr)
            led = self._ledger
            started = tuple(led.started_on(addr))
            cause = f"Dask's stimulus: {msg.get('stimulus_id', '?')}"
            drained = led.drained.get(addr)
            if why_restart:
                cause = f"pilotfish restarted it: {why_restart}"
            elif drained is not None:
                cause = f"pilotfish drained and retired it: {drained}"
            elif expected:
                cause += ", an expected removal (retired or restarted)"
            place = self._place.get(addr, addr)
            who = f"Dask worker {addr}{f' (nanny {place})' if place != addr else ''}"
            who += f" (pid {pid or '?'}){' at host ' + host if host else ''}"
            what, ended = self._describe_removal(who, cause, job, info)
            kind = "lost" if started or not expected else "stopped"
            events.append(WorkerReport(kind, addr, pid, now, None, None, started, what))
            if ended:  # its job is over: the cluster may replace it
                self._gone.append(ended)
                if name:
                    self._gone_names.add(name)
            elif not self._stopping.is_set():
                still = f"; its SLURM job {job} is still {info.state}" if info else ""
                self._gone.append(f"{who} was removed ({cause}){still}")
            items = {a: led.entries[a].item for a in led.held_by(addr)}
            cmds: list[L.Command] = []
            for aid in started:
                e = led.entries[aid]
                if e.item.dkey not in processing:  # it finished there, value not fetched
                    ran = now - (e.started or now)
                    why = (
                        f"{what}, while holding the unfetched result of task {e.key!r} "
                        f"(attempt id {aid}, after {ran:.2f} s)"
                    )
                    cmds += led.handle(L.Bounce(aid, why, now))
            cmds += led.handle(L.WorkerLost(addr, what, now))
            self._carry_out(cmds, items, events, cancel)
            del self._gone[:-_GONE_KEPT]
            # a cluster scaled down to nothing (retired: expected) is not "gone", unless
            # pilotfish retired it (drained)
            if self._live and not self._usable_locked():
                self._every_worker_drained_locked(events)
            elif not (
                self._live
                or (expected and drained is None)
                or self._stopping.is_set()
                or self._gone_since
            ):
                self._all_gone_locked(now, events)

    @staticmethod
    def _describe_removal(who: str, cause: str, job: str, info: Any) -> tuple[str, str]:
        """What a removed worker's loss says (for its attempts' WORKER_LOST), and how its
        batch job ended ('' if it did not, or it ran in none)."""
        if not job:
            return (
                f"{who} was removed from the cluster ({cause}); Dask does not report its exit "
                "status: see the worker's and its nanny's log",
                "",
            )
        from ... import cluster as _cluster

        if info is None:
            return (
                f"{who}, in SLURM job {job}, was removed from the cluster ({cause}); SLURM did "
                "not say how the job ended (no scontrol here, or it did not answer): see "
                f"`scontrol show job {job}` and the job's log",
                "",
            )
        if info.ended:
            ended = _cluster.describe_job_end(info)
            return f"{who} was removed from the cluster: its {ended}", ended
        if info.state == "COMPLETING":
            ended = (
                f"SLURM job {job} COMPLETING (it is ending, but SLURM did not say why within "
                f"{_JOB_SETTLE:g} s: see `scontrol show job {job}`)"
            )
            return f"{who} was removed from the cluster: its {ended}", ended
        log_ = f"; see its log {info.stderr}" if info.stderr and info.stderr != "(null)" else ""
        return (
            f"{who} was removed from the cluster ({cause}), but its SLURM job {job} is still "
            f"{info.state}: the worker process ended inside the job (killed, crashed, or out "
            f"of memory; a nanny starts a new one){log_}",
            "",
        )

    def _on_cancel(self, ids: Sequence[int], cancel: list[Any]) -> None:
        with self._lock:
            items = {a: e.item for a in ids if (e := self._ledger.get(a)) is not None}
            self._carry_out(self._ledger.handle(L.Revoke(tuple(ids))), items, [], cancel)

    def _collect(
        self, done: list[tuple[Any, str, int]], events: list[Any], cancel: list[Any]
    ) -> None:
        finished: list[tuple[_Att, Any]] = []
        other: list[tuple[_Att, Any, str]] = []
        holder: dict[str, str] = {}  # Dask key -> the worker on this host that ran it
        with self._lock:
            for fut, dkey, aid in done:
                e = self._ledger.get(aid)
                if e is None or e.item.dkey != dkey:
                    continue  # withdrawn, lost or resubmitted under a new key meanwhile
                status = fut.status
                if status == "finished":
                    finished.append((e.item, fut))
                    if e.where == "started" and self._is_near(e.worker, e.host):
                        holder[dkey] = e.worker
                else:
                    other.append((e.item, fut, status))
        for att, fut, status in other:
            self._on_unfinished(att, fut, status, events, cancel)
        if not finished:
            return
        try:
            values = self._fetch(finished, holder)
            pairs = list(zip([a for a, _ in finished], values, strict=True))
        except Exception:  # one by one; a result lost with its worker fails its attempt
            pairs = []
            for att, fut in finished:
                if fut.status == "finished":
                    with contextlib.suppress(Exception):
                        pairs.append((att, fut.result(timeout=5)))
                        continue
                self._on_unfinished(att, fut, fut.status, events, cancel)
        with self._lock:
            for att, res in pairs:
                self._deliver_locked(att, res, events, cancel)

    def _fetch(self, finished: list[tuple[_Att, Any]], holder: dict[str, str]) -> list[Any]:
        """The values of finished futures, in order. A value whose worker is on this host
        comes straight from the worker the start fence granted its attempt to, asked
        directly (one request per worker: no detour through the scheduler, and no
        ``who_has`` round trip to it first, as ``Client.gather(direct=True)`` makes). The
        others, and any that worker no longer has (moved, lost), come through
        ``Client.gather``: directly when all of them are near, else Dask's default."""
        got: dict[str, Any] = {}
        if holder:
            with contextlib.suppress(Exception):  # then all of them through Client.gather
                got = self._client.sync(
                    gather_from_workers,
                    {k: [w] for k, w in holder.items()},
                    rpc=self._client.rpc,
                )[0]
        rest = [f for a, f in finished if a.dkey not in got]
        if rest:
            near = all(f.key in holder for f in rest)
            values = self._client.gather(rest, direct=near or None)
            got.update(zip([f.key for f in rest], values, strict=True))
        return [got[a.dkey] for a, _ in finished]

    def _deliver_locked(self, att: _Att, res: Any, events: list[Any], cancel: list[Any]) -> None:
        e = self._ledger.get(att.m.attempt)
        if e is None or e.item is not att:
            return
        now = time.time()
        if isinstance(res, _NotStarted):
            if e.where == "started":
                # Dask ran its task again (the fence refused: nothing ran) and our future
                # now holds that, so the started run's result cannot arrive through it
                why = (
                    f"Dask ran its task again on {res.worker}, where pilotfish's start fence "
                    "refused it (user code did not run there), so the result of the run "
                    f"that started cannot reach the client"
                )
            else:  # never started: given back, sent again unblamed
                why = f"pilotfish's start fence refused it on Dask worker {res.worker}: "
                why += res.reason
            refused_drained = res.drained and e.where != "started"
            if refused_drained and res.worker not in self._ledger.drained:
                # a worker of a drained place that joined after the drain (a nanny's restart)
                dcmds = self._ledger.handle(L.Drain(res.worker, res.reason, now))
                self._carry_out(dcmds, {}, events, cancel)
            self._bounce_locked(att, why, now, events, cancel, refused_drained)
            if refused_drained:
                self._every_worker_drained_locked(events)
            return
        if not isinstance(res, Result):
            self._env_error_locked(att, TypeError(f"unexpected task result {res!r}"), events)
            return
        cmds: list[L.Command] = []
        if e.where == "queued":  # its `started` message was missed: the result proves it
            # (the fence granted it: a drain after that grant does not undo it)
            drained = self._ledger.drained.pop(res.worker, None)
            cmds += self._ledger.handle(L.Start(res.worker, e.attempt, res.pid, res.host, now))
            if drained is not None:
                self._ledger.drained[res.worker] = drained
        cmds += self._ledger.handle(L.Finish(res.worker, e.attempt))
        out = self._carry_out(cmds, {e.attempt: att}, events, cancel)
        if out.accepted:
            events.append(res)
        else:
            log.info(
                "pilotfish: dropped the result of attempt %s from Dask worker %s: %s",
                e.attempt,
                res.worker,
                out.reasons(),
            )

    def _is_near(self, worker: str, host: str) -> bool:
        """Is ``worker`` surely reachable from here (this host)?"""
        hit = self._near.get(worker)
        if hit is None:
            h = worker.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
            hit = worker.startswith("inproc://") or h in ("localhost", "::1")
            hit = hit or h.startswith("127.") or host == self._host
            self._near[worker] = hit
        return hit

    def _on_unfinished(
        self, att: _Att, fut: Any, status: str, events: list[Any], cancel: list[Any]
    ) -> None:
        if status == "cancelled":
            self._on_cancelled(att, fut, events, cancel)
        elif status == "error":
            self._on_error(att, fut, events, cancel)
        else:  # "lost"/"pending": Dask lost the result with its worker and recomputes
            with self._lock:
                self._bounce_locked(
                    att,
                    "the Dask worker that held its result was lost before the client could "
                    "fetch it",
                    time.time(),
                    events,
                    cancel,
                )

    def _on_cancelled(self, att: _Att, fut: Any, events: list[Any], cancel: list[Any]) -> None:
        reason = ""
        try:
            fut.result(timeout=5)
        except BaseException as e:
            reason = str(getattr(e, "reason", "") or e)
        if _CONN_LOST in reason:
            self._conn_lost = True  # handled by _check_scheduler: lost or resubmitted
            return
        with self._lock:
            self._bounce_locked(
                att,
                f"its Dask task was cancelled by someone else ({reason})",
                time.time(),
                events,
                cancel,
            )

    def _on_error(self, att: _Att, fut: Any, events: list[Any], cancel: list[Any]) -> None:
        try:
            exc = fut.exception(timeout=5)
        except BaseException as e:
            exc = e
        if isinstance(exc, distributed.KilledWorker) or type(exc).__name__ == "KilledWorker":
            last = ""
            with contextlib.suppress(Exception):
                last = f" (last on worker {exc.last_worker.address})"
            with self._lock:
                self._bounce_locked(
                    att,
                    f"Dask gave up on its task after workers died running it{last}",
                    time.time(),
                    events,
                    cancel,
                )
            return
        if exc is None:
            exc = RuntimeError(f"Dask future ended with status {fut.status!r}")
        with self._lock:
            self._env_error_locked(att, exc, events)

    def _env_error_locked(self, att: _Att, exc: BaseException, events: list[Any]) -> None:
        """Dask could not run the task: an ENVIRONMENT error, not retried."""
        e = self._ledger.get(att.m.attempt)
        if e is None or e.item is not att:
            return
        if e.where == "started":
            self._ledger.handle(L.Finish(e.worker, e.attempt))
        else:  # it failed before it reached the start fence (e.g. pilotfish not importable)
            self._ledger.handle(L.Revoke((e.attempt,)))  # (a queued one: no command back)
        message = (
            f"Dask could not run task {att.m.key!r} (attempt id {att.m.attempt})"
            f"{' on worker ' + e.worker if e.worker else ''}: "
            f"{type(exc).__name__}: {exc}. Is pilotfish (the same version as on the "
            "client) installed in the environment of the Dask workers and scheduler?"
        )
        events.append(environment_result(att.m.attempt, message, e, exc))

    # ------------------------------------------------------------------ timeouts
    def _check_timeouts(self, events: list[Any], cancel: list[Any], every: float) -> None:
        now = time.time()
        if now < self._next_tick:
            return
        self._next_tick = now + min(every, 0.05)
        if self.timeout_restart:
            how = (
                "pilotfish cancelled its Dask task and ends that worker process so that its "
                "nanny starts a fresh one (a worker without a nanny is left alone: the call "
                "then runs on in its thread and its result is dropped)"
            )
        else:
            how = (
                "pilotfish cancelled its Dask task; Dask cannot stop a running thread, so the "
                "call runs on and its result is dropped"
            )
        with self._lock:
            deadline = self._ledger.next_deadline()
            if deadline is None or deadline > now:
                return
            items = {e.attempt: e.item for e in self._ledger.started()}
            step = _Step(self, items, events, cancel)  # expire(): cancel, and restart
            carry_out(self._ledger.handle(L.TimePassed(now, how)), step)
        if step.restart:
            self._driver.nursery.start(
                "pilotfish-dask-restart", self._restart_workers, sorted(step.restart)
            )

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
    def _check_scheduler(self, events: list[Any], cancel: list[Any]) -> None:
        if self._driver.dead or self._client is None:
            return
        status = self._client.status
        if self._lost_since is None:
            if status == "running" and not self._conn_lost:
                return
            with self._lock:
                self._lost_since = time.monotonic()
            events.append(
                MasterReport(
                    "lost",
                    self._sched_pid,
                    time.time(),
                    message=f"lost the connection to the Dask scheduler at {self.address}",
                )
            )
            if not self._driver.budget.take():
                what = (
                    f"lost the connection to the Dask scheduler at {self.address} (it was "
                    "killed, crashed, or the network failed)"
                )
                again = "wait for it to return"
                self._fatal(f"{what}; {self._driver.budget.spent(again)}", events, cancel)
                return
        if status == "running":
            self._recovered(events, cancel)
        elif status in ("closed", "closing"):
            self._fatal(
                f"lost the connection to the Dask scheduler at {self.address} and the Dask "
                "client gave up reconnecting",
                events,
                cancel,
            )
        elif time.monotonic() - self._lost_since > self.hb_timeout:
            self._fatal(
                f"lost the connection to the Dask scheduler at {self.address}, and it did not "
                f"come back within heartbeat_timeout={self.hb_timeout:g} s",
                events,
                cancel,
            )

    def _fatal(self, why: str, events: list[Any], cancel: list[Any]) -> None:
        """The scheduler is gone for good: started attempts are RUNTIME_LOST (the ledger
        says so); the others have nowhere to go, and ``Fatal`` fails them."""
        with self._lock:
            fatal = self._driver.fatal(why)
            cancel.extend(e.item.fut for e in self._ledger.entries.values())
            # started: Lost(runtime_lost); the others are not sent again (dead): Fatal
            # fails them
            self._scheduler_lost_locked(why, self._sched_pid, {}, events, cancel)
            self._pending.clear()
            self._parked.clear()
        events.append(fatal)

    def _scheduler_lost_locked(
        self, why: str, pid: int, items: dict[int, _Att], events: list[Any], cancel: list[Any]
    ) -> None:
        """``RuntimeLost`` for the ledger, carried out; its reports also name the Dask
        worker an attempt was running on."""
        where = {
            e.attempt: f"; it was running on Dask worker {e.worker} (pid {e.pid}) at host {e.host}"
            for e in self._ledger.started()
        }
        cmds = self._ledger.handle(
            L.RuntimeLost(why, time.time(), f"scheduler {self.address}", pid)
        )
        carry_out(cmds, _Step(self, items, events, cancel, where))

    def _recovered(self, events: list[Any], cancel: list[Any]) -> None:
        """The client is connected again: what the old scheduler had is gone."""
        with contextlib.suppress(Exception):
            self._subscribe()
        failed = self._install_fence()
        if failed:
            self._fatal(failed, events, cancel)
            return
        self._ship_path()
        self._ship_job_plugin()
        with self._lock:
            op = self._fence_op.replace("pilotfish_start_", "pilotfish_fence_drain_", 1)
            drains = [(op, d) for d in self._drains]
        if drains:
            self._driver.nursery.start("pilotfish-dask-drain", self._tell_fence, drains)
        why = (
            f"the connection to the Dask scheduler at {self.address} was lost (reconnected; "
            f"{self._driver.budget.note()})"
        )
        old_pid = self._sched_pid
        with contextlib.suppress(Exception):
            self._sched_pid = int(self._client.run_on_scheduler(os.getpid))
        with self._lock:
            self._conn_lost = False
            self._lost_since = None
            items = {a: e.item for a, e in self._ledger.entries.items()}
            # started: Lost(runtime_lost); the others: Resend, under new keys
            self._scheduler_lost_locked(why, old_pid, items, events, cancel)
        events.append(
            MasterReport(
                "restarted",
                self._sched_pid,
                time.time(),
                message=f"reconnected to the Dask scheduler at {self.address}",
            )
        )
