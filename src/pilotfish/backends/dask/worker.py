"""The worker side of the Dask backend: the Dask task every attempt is, and the worker
plugins a session installs.

Everything here runs in a Dask worker process and is pickled *by reference*, so the
workers need pilotfish (the same version as the client) importable. The task asks the
start fence (:mod:`.fence`, on the scheduler) before it runs user code, and returns
either the attempt's ``Result`` or :class:`NotStarted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from ...runtime.execute import run_attempt
from ...wire import messages as _wire
from ...wire.messages import Result, RunAttempt

__all__ = [
    "EVENT_MAX",
    "ClientSysPath",
    "EndAttemptsOnClose",
    "NotStarted",
    "WorkerJob",
    "attempt_on_worker",
]

FENCE_TIMEOUT = 30  # s a worker waits for the start fence's answer (then it refuses itself)
EVENT_MAX = 1024  # bytes: a result up to this size also travels on the event topic


#: the attempts this worker process is running: Dask key -> the cancel event of a program
#: (None: a Python call, which nothing can stop but the end of its process)
_RUNNING: dict[str, threading.Event | None] = {}
_RUNNING_LOCK = threading.Lock()


class NotStarted(NamedTuple):
    """What a Dask task returns when the start fence refused it: user code did not run."""

    attempt: int
    dkey: str
    worker: str
    reason: str
    drained: bool = False  # refused because this worker is drained (never counted)


async def attempt_on_worker(
    m: RunAttempt, dkey: str, fence: str, rundir: str, topic: str = ""
) -> Result | NotStarted:
    """The Dask task: ask the start fence on the scheduler (one synchronous call), then
    run the attempt here, or return :class:`NotStarted` without running user code.

    A coroutine, so Dask runs it on the worker's event loop, holding one of the worker's
    task slots as any task does: the fence's call is awaited right there (a worker thread
    handing it to the loop and waiting for the answer cost two thread switches per
    attempt, on the path every attempt waits for), and only the attempt itself goes to the
    worker's thread pool (:func:`_in_thread`, as Dask runs a function task).

    A small result (up to :data:`EVENT_MAX` bytes) also goes to the client on the
    session's event topic (``op: result``), which reaches it before Dask says the task
    finished: the client then need not fetch it from the worker. The task's value is the
    result all the same (a larger one, or one whose event did not arrive, is fetched)."""
    pid = os.getpid()
    try:
        worker: Any = distributed.get_worker()
    except Exception:
        return NotStarted(m.attempt, dkey, f"pid {pid}", "not running on a Dask worker")
    where = str(worker.address)
    host = _wire.host_name()
    try:
        answer = await asyncio.wait_for(
            getattr(worker.scheduler, fence)(
                key=dkey, attempt=m.attempt, worker=where, pid=pid, host=host, when=time.time()
            ),
            FENCE_TIMEOUT,
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
        return NotStarted(m.attempt, dkey, where, why, drained)
    ctx = contextvars.copy_context()  # Dask's worker context variable: get_worker() works
    pool = worker.executors.get("default")
    res: Result = await asyncio.get_running_loop().run_in_executor(
        pool, ctx.run, _in_thread, worker, m, dkey, where, host, rundir
    )
    if topic and len(res.data) <= EVENT_MAX:
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
        with _RUNNING_LOCK:
            _RUNNING[dkey] = None
        try:
            return run_attempt(m, worker=where, host=host, rundir=rundir)
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(dkey, None)
    # A program runs in its own process group, which a released task (the client died or
    # cancelled it) would leave running: Dask cannot stop the thread, but we can stop the
    # program, and with it the thread.
    cancel, done = threading.Event(), threading.Event()
    watch = threading.Thread(
        target=_watch_release, args=(worker, dkey, cancel, done), daemon=True, name="pf-watch"
    )
    watch.start()
    with _RUNNING_LOCK:
        _RUNNING[dkey] = cancel
    try:
        return run_attempt(m, worker=where, host=host, rundir=rundir, cancel=cancel)
    finally:
        with _RUNNING_LOCK:
            _RUNNING.pop(dkey, None)
        done.set()
        watch.join()


def _watch_release(worker: Any, dkey: str, cancel: threading.Event, done: threading.Event) -> None:
    """Set ``cancel`` once the worker no longer runs task ``dkey`` (released, cancelled)."""
    while not done.wait(0.5):
        ts = worker.state.tasks.get(dkey)
        if ts is None or ts.state not in ("executing", "long-running"):
            cancel.set()
            return


class ClientSysPath(WorkerPlugin):
    """Append the client's ``sys.path`` entries a worker lacks (so its modules import)."""

    idempotent = False

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def setup(self, worker: Any) -> None:
        for p in self.paths:
            if p and p not in sys.path:
                sys.path.append(p)


class WorkerJob(WorkerPlugin):
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


class EndAttemptsOnClose(WorkerPlugin):
    """A worker that closes while it runs attempts ends them at once.

    A graceful close (SIGTERM from ``scancel``, a preemption, a walltime; a nanny or the
    scheduler closing it) makes the scheduler give its running tasks up at once, and the
    session retries them elsewhere within milliseconds, while the closing worker waits
    for its threads: Dask cannot stop a thread, so the lost attempt ran on beside its
    retry until it returned or the nanny killed the process (measured: 7.4 s of two runs
    of one task writing the same files). So, when the worker closes (not when a session
    merely removes this plugin): programs are killed with their process group (their
    cancel events), and if Python calls are still running, the process ends itself; its
    nanny, unless it is closing too, starts a new worker."""

    idempotent = False

    def teardown(self, worker: Any) -> None:
        status = str(getattr(getattr(worker, "status", None), "name", ""))
        if status not in ("closing", "closed", "closing_gracefully", "failed"):
            return  # a session removed the plugin: the worker runs on
        with _RUNNING_LOCK:
            running = dict(_RUNNING)
        if not running:
            return
        for cancel in running.values():
            if cancel is not None:
                cancel.set()
        end = time.monotonic() + 2.0  # a killed program's attempt returns within moments
        while time.monotonic() < end:
            with _RUNNING_LOCK:
                if not _RUNNING or all(c is None for c in _RUNNING.values()):
                    break
            time.sleep(0.02)
        with _RUNNING_LOCK:
            left = sorted(_RUNNING)
        if left:
            with contextlib.suppress(Exception):
                print(
                    f"pilotfish: Dask worker {worker.address} is closing while attempts "
                    f"{', '.join(left)} run; ending its process so that they do not run on "
                    "beside their retries",
                    file=sys.stderr,
                    flush=True,
                )
            os._exit(1)
