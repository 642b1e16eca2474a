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
    "InputMissing",
    "NotStarted",
    "Preload",
    "Reservations",
    "WorkerJob",
    "attempt_on_worker",
]

FENCE_TIMEOUT = 30  # s a worker waits for the start fence's answer (then it refuses itself)
EVENT_MAX = 1024  # bytes: a result up to this size also travels on the event topic


EXIT_RELEASED = 76  # exit status of a worker that ended a Python call its session let go of
WATCH_EVERY = 0.25  # s between looks at the running attempts' Dask task states


class _Running:
    """An attempt this worker process runs: its worker, the cancel event of a program
    (None: a Python call, which nothing can stop but the end of its process), whether
    the session lets its process end to stop a released call, and how many looks in a
    row found its Dask task released."""

    __slots__ = ("cancel", "end_released", "released", "worker")

    def __init__(self, worker: Any, cancel: threading.Event | None, end_released: bool) -> None:
        self.worker = worker
        self.cancel = cancel
        self.end_released = end_released
        self.released = 0


#: start reservations the scheduler's fence sent this worker process (see
#: :class:`Reservations`): Dask key -> (the fence's handler name, the scheduler's run_id)
_RESERVED: dict[str, tuple[str, int]] = {}
RESERVED_PRUNE = 10_000  # reservations held before those of keys gone are dropped

#: the attempts this worker process is running, by Dask key
_RUNNING: dict[str, _Running] = {}
_RUNNING_LOCK = threading.Lock()
_WATCHER: list[threading.Thread] = []  # the one watcher thread of this process, once started


class NotStarted(NamedTuple):
    """What a Dask task returns when the start fence refused it: user code did not run."""

    attempt: int
    dkey: str
    worker: str
    reason: str
    drained: bool = False  # refused because this worker is drained (never counted)


class InputMissing(NamedTuple):
    """What a linked attempt's Dask task returns when an input it was linked to left no
    value (the input attempt failed, or the fence refused a rerun of it): user code did
    not run, and the start fence was not asked."""

    attempt: int
    dkey: str
    reason: str


def link_inputs(m: RunAttempt, inputs: Sequence[Any]) -> RunAttempt | str:
    """``m`` with the values of its linked inputs (what their Dask tasks returned, in the
    order of ``m.links``) in place, or why it cannot run."""
    if len(inputs) != len(m.links):
        return f"it got {len(inputs)} input values for {len(m.links)} links"
    deps = list(m.deps)
    for (i, aid), got in zip(m.links, inputs, strict=True):
        if not isinstance(got, Result) or got.attempt != aid:
            what = got.reason if isinstance(got, NotStarted) else type(got).__name__
            return f"its input attempt {aid} did not run here ({what})"
        if not got.ok:
            return f"its input attempt {aid} failed"
        deps[i] = got.data
    return m._replace(deps=tuple(deps), links=())


async def attempt_on_worker(
    m: RunAttempt,
    dkey: str,
    fence: str,
    rundir: str,
    topic: str = "",
    end_released: bool = True,
    inputs: Sequence[Any] = (),
) -> Result | NotStarted | InputMissing:
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
    result all the same (a larger one, or one whose event did not arrive, is fetched).

    ``end_released``: a Python call whose Dask task is released while it runs (its
    session's link to the scheduler broke, its client died or let it go) ends this worker
    process when it has a nanny (see :func:`_watch`), so that it does not run on beside
    its retry; off with the backend's ``timeout_restart=False``.

    ``inputs``: for a linked attempt (``m.links``), what its inputs' Dask tasks returned
    (Dask passes them: this task depends on theirs); without a successful value for each,
    it returns :class:`InputMissing` before asking the fence."""
    if m.links:
        linked = link_inputs(m, inputs)
        if isinstance(linked, str):
            return InputMissing(m.attempt, dkey, linked)
        m = linked
    pid = os.getpid()
    try:
        worker: Any = distributed.get_worker()
    except Exception:
        return NotStarted(m.attempt, dkey, f"pid {pid}", "not running on a Dask worker")
    where = str(worker.address)
    host = _wire.host_name()
    if topic and _take_reservation(worker, dkey, fence):
        why = await _start_reserved(worker, topic, m.attempt, dkey, where, pid, host)
        if not why:
            return await _run_granted(worker, m, dkey, where, host, rundir, topic, end_released)
        # it could not say so itself: it asks the fence, as a worker without one does
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
    return await _run_granted(worker, m, dkey, where, host, rundir, topic, end_released)


def _take_reservation(worker: Any, dkey: str, fence: str) -> bool:
    """Does this worker hold the fence's reservation for this very hand-over of ``dkey``
    (the ``run_id`` of the Dask task it runs)? Taken: it is used once."""
    r = _RESERVED.pop(dkey, None)
    if r is None or r[0] != fence:
        return False
    ts = worker.state.tasks.get(dkey)
    return ts is not None and getattr(ts, "run_id", None) == r[1]


async def _start_reserved(
    worker: Any, topic: str, attempt: int, dkey: str, where: str, pid: int, host: str
) -> str:
    """Publish a reserved start (``started`` on the session's topic, through the
    scheduler) on this worker's stream to the scheduler, written into the socket with
    everything queued before it, before user code runs; '' or why it could not be (then
    the worker asks the fence instead)."""
    msg: dict[str, Any] = {
        "op": "started",
        "attempt": attempt,
        "key": dkey,
        "worker": where,
        "pid": pid,
        "host": host,
        "time": time.time(),
        "reserved": True,
    }
    nanny = getattr(worker, "nanny", None)
    if nanny and str(nanny) != where:  # the client names the worker by its place
        msg["place"] = str(nanny)
    try:
        bs = worker.batched_stream
        comm = bs.comm
        if comm is None or comm.closed():
            return "its worker's stream to the scheduler is closed"
        # BatchedSend would send it within its interval; it must be in the socket before
        # user code can end this process, so it goes now, after what was queued before it
        payload, bs.buffer = [*bs.buffer, {"op": "log-event", "topic": topic, "msg": msg}], []
        bs.message_count += 1
        await comm.write(payload, serializers=bs.serializers, on_error="raise")
        stream = getattr(comm, "stream", None)
        if stream is not None:
            await stream.write(b"")  # resolves once the kernel has every byte
    except Exception as e:
        return f"its start could not be sent to the scheduler: {type(e).__name__}: {e}"
    return ""


async def _run_granted(
    worker: Any,
    m: RunAttempt,
    dkey: str,
    where: str,
    host: str,
    rundir: str,
    topic: str,
    end_released: bool,
) -> Result:
    """Run a granted attempt in the worker's thread pool; a small result also goes on the
    session's topic."""
    ctx = contextvars.copy_context()  # Dask's worker context variable: get_worker() works
    pool = worker.executors.get("default")
    res: Result = await asyncio.get_running_loop().run_in_executor(
        pool, ctx.run, _in_thread, worker, m, dkey, where, host, rundir, end_released
    )
    if topic and len(res.data) <= EVENT_MAX:
        with contextlib.suppress(Exception):  # else the client fetches it
            worker.log_event(topic, {"op": "result", "key": dkey, "result": list(res)})
    return res


def _in_thread(
    worker: Any, m: RunAttempt, dkey: str, where: str, host: str, rundir: str, end_released: bool
) -> Result:
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
            return _run_here(worker, m, dkey, where, host, rundir, end_released)
    finally:
        with worker.active_threads_lock:
            worker.active_threads.pop(ident, None)


def _run_here(
    worker: Any, m: RunAttempt, dkey: str, where: str, host: str, rundir: str, end_released: bool
) -> Result:
    # A program runs in its own process group, which a released task would leave running:
    # Dask cannot stop the thread, but the watcher stops the program, and with it the
    # thread. A Python call can only be stopped with its process (see _watch).
    cancel = threading.Event() if m.kind == "command" else None
    with _RUNNING_LOCK:
        _RUNNING[dkey] = _Running(worker, cancel, end_released)
        if not _WATCHER:
            w = threading.Thread(target=_watch, daemon=True, name="pilotfish-watch")
            _WATCHER.append(w)
            w.start()
    try:
        return run_attempt(m, worker=where, host=host, rundir=rundir, cancel=cancel)
    finally:
        with _RUNNING_LOCK:
            _RUNNING.pop(dkey, None)


def _watch() -> None:
    """This process's watcher: every :data:`WATCH_EVERY` s, look at the Dask task of each
    attempt it runs. Once a task is no longer executing here (Dask released it: its
    session's connection to the scheduler broke and the scheduler let go of the session's
    tasks, its client died, or it timed out), the attempt is lost to its session, which
    retries it: a program is killed with its process group at once (its cancel event);
    a Python call, seen released on two looks in a row, ends this worker process when a
    nanny will start a fresh one (the rule of :class:`EndAttemptsOnClose`: a lost
    attempt's body does not run on beside its retry). A worker without a nanny is left
    running (ending it would shrink the cluster for good): it says so on stderr."""
    said: set[str] = set()
    while True:
        time.sleep(WATCH_EVERY)
        with _RUNNING_LOCK:
            running = list(_RUNNING.items())
        end: list[str] = []
        worker: Any = None
        for dkey, r in running:
            try:
                ts = r.worker.state.tasks.get(dkey)
            except Exception:  # the worker is closing: EndAttemptsOnClose ends its attempts
                continue
            if ts is not None and ts.state in ("executing", "long-running"):
                r.released = 0
                continue
            r.released += 1
            if r.cancel is not None:
                r.cancel.set()
            elif r.end_released and r.released >= 2:
                if getattr(r.worker, "nanny", None):
                    end.append(dkey)
                    worker = r.worker
                elif dkey not in said:
                    said.add(dkey)
                    _say(
                        f"pilotfish: Dask worker {r.worker.address} runs attempt {dkey}, which "
                        "its session let go of; this worker has no nanny to start a fresh "
                        "one, so the call runs on (its result is dropped)"
                    )
        if end:
            _say(
                f"pilotfish: Dask worker {worker.address}: its session let go of attempts "
                f"{', '.join(sorted(end))} while they ran; ending this process so that they "
                "do not run on beside their retries (its nanny starts a fresh worker)"
            )
            os._exit(EXIT_RELEASED)


def _say(text: str) -> None:
    with contextlib.suppress(Exception):
        print(text, file=sys.stderr, flush=True)


def _on_reserve(
    fence: str, key: str = "", run_id: int | None = None, revoke: bool = False, **_: Any
) -> None:
    """The ``pilotfish_reserve`` message from the scheduler's fence: keep a reservation,
    or drop all of that fence's (``revoke``)."""
    if revoke:
        for k in [k for k, r in _RESERVED.items() if r[0] == fence]:
            _RESERVED.pop(k, None)
        return
    if run_id is not None and key:
        _RESERVED[key] = (fence, int(run_id))


def _prune_reservations(worker: Any) -> None:
    """Drop the reservations of keys this worker no longer has (Dask moved or released
    them before they started)."""
    tasks = worker.state.tasks
    for k in [k for k in _RESERVED if k not in tasks]:
        _RESERVED.pop(k, None)


class Reservations(WorkerPlugin):
    """Lets the start fence (``fence``, its handler's name) send this worker start
    reservations: installs the handler of ``pilotfish_reserve`` messages (a message a
    worker has no handler for would end its connection to the scheduler), then tells the
    fence, on its topic, that this worker takes them (see :mod:`.fence`)."""

    idempotent = False

    def __init__(self, fence: str) -> None:
        self.fence = fence

    def setup(self, worker: Any) -> None:
        def on_reserve(**msg: Any) -> None:
            _on_reserve(**msg)
            if len(_RESERVED) > RESERVED_PRUNE:
                _prune_reservations(worker)

        worker.stream_handlers["pilotfish_reserve"] = on_reserve
        worker.log_event(self.fence, {"op": "ready"})


class ClientSysPath(WorkerPlugin):
    """Append the client's ``sys.path`` entries a worker lacks (so its modules import)."""

    idempotent = False

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def setup(self, worker: Any) -> None:
        for p in self.paths:
            if p and p not in sys.path:
                sys.path.append(p)


class Preload(WorkerPlugin):
    """``Session(preload=...)``: each worker imports these modules as it joins (or when
    the session starts, for the workers already there), not on its first task."""

    idempotent = False

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = list(modules)

    def setup(self, worker: Any) -> None:
        from ...runtime.preflight import preload

        preload(self.modules, str(worker.address))


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
        for r in running.values():
            if r.cancel is not None:
                r.cancel.set()
        end = time.monotonic() + 2.0  # a killed program's attempt returns within moments
        while time.monotonic() < end:
            with _RUNNING_LOCK:
                if not _RUNNING or all(r.cancel is None for r in _RUNNING.values()):
                    break
            time.sleep(0.02)
        with _RUNNING_LOCK:
            left = sorted(_RUNNING)
        if left:
            _say(
                f"pilotfish: Dask worker {worker.address} is closing while attempts "
                f"{', '.join(left)} run; ending its process so that they do not run on "
                "beside their retries"
            )
            os._exit(1)
