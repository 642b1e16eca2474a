"""The Dask distributed backend: what is specific to Dask (faults, clients, scheduler).

The behaviour shared with every backend (values, dependencies, errors, retries,
programs) is asserted by the conformance tests (test_callables.py, test_commands.py),
which run once per backend through the `session`/`make_session` fixtures.

Clusters and the leak check (conftest.py): every test runs with a unique token in its
environment and fails if a process carrying it survives. The shared ``cluster`` is
module-scoped, so it starts before any test's token is set and its processes carry
none; it is only used by tests that never end a worker process (a nanny restarting a
worker would start it with the running test's token). Tests that kill workers or time
out (pilotfish then ends the worker) get their own cluster, closed inside the test.
The scheduler test runs ``dask scheduler``/``dask worker`` as subprocesses of its own.

Worker imports: LocalCluster's workers are spawned with this process's ``sys.path``;
the subprocess worker of the scheduler test relies on the backend's sys.path plugin.
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing.resource_tracker
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

distributed = pytest.importorskip("distributed")

import faulty  # noqa: E402
import pilotfish  # noqa: E402
from conftest import TOKEN_VAR, wait_for  # noqa: E402
from pilotfish import Category, State  # noqa: E402
from test_callables import (  # noqa: E402
    add,
    sleep_then,
)

pytestmark = [
    # Closing a LocalCluster while its nanny processes exit can leave asyncio
    # transports/sockets to be collected later; Python reports them as
    # ResourceWarning/"unclosed" at an arbitrary later point. They are Dask's, not ours.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    # Dask warns (UserWarning) when a worker it did not expect to lose goes away or a
    # nanny restarts one; in these tests that is the point.
    pytest.mark.filterwarnings("ignore:.*[Ww]orker.*:UserWarning"),
]


def _local_cluster(n: int = 2) -> Any:
    # dashboard_address=None still binds the scheduler's dashboard to :8787, and a
    # second cluster then warns "Port 8787 is already in use" (an error here): use :0
    return distributed.LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"
    )


def _start_resource_tracker() -> None:
    """multiprocessing's resource tracker is started on first use and lives as long as
    this process: start it without the running test's token (else it is a leftover)."""
    token = os.environ.pop(TOKEN_VAR, None)
    try:
        multiprocessing.resource_tracker.ensure_running()
    finally:
        if token is not None:
            os.environ[TOKEN_VAR] = token


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    _start_resource_tracker()
    with _local_cluster() as c:
        yield c


@pytest.fixture
def ds(cluster: Any, tmp_path: Path) -> Iterator[pilotfish.Session]:
    with pilotfish.Session(
        backend="dask",
        address=cluster.scheduler_address,
        rundir=str(tmp_path / "run"),
        backoff=pilotfish.Backoff(base=0.01),
    ) as s:
        yield s


@pytest.fixture
def own_cluster() -> Iterator[Any]:
    _start_resource_tracker()
    with _local_cluster() as c:
        yield c


def _backend(address: str, tmp_path: Path, hooks: Any = None) -> Any:
    """A Dask backend object, for tests that watch it through its documented seams
    (``hooks=DaskHooks(...)``, ``token``, ``topic``, ``in_flight()``)."""
    from pilotfish.backends.dask import DaskBackend

    return DaskBackend(address=address, rundir=str(tmp_path / "run"), hooks=hooks)


def _attempt(aid: int, x: Any) -> Any:
    """A RunAttempt of ``faulty.ident(x)``, for tests that drive a backend directly."""
    from pilotfish.wire import messages as _wire

    payload = _wire.dumps_call((faulty.ident, (x,), {}), lambda _obj: None)
    return _wire.RunAttempt(aid, f"k{aid}", "call", payload, (), None)


def _dask_keys(scheduler: Any, prefix: str) -> list[str]:
    """The keys the Dask scheduler holds that start with ``prefix``."""
    return [str(k) for k in list(scheduler.tasks) if str(k).startswith(prefix)]


# ---------------------------------------------------------------- values and errors


@pytest.mark.timeout(60)
def test_attempts_on_the_schedulers_host_start_by_reservation(
    ds: pilotfish.Session, cluster: Any
) -> None:
    """LocalCluster's workers share the scheduler's host: each attempt, chained ones
    included, starts by the fence's reservation (no round trip to its handler), and is
    recorded as started on the worker that ran it (named by its nanny)."""
    fences = [p for n, p in cluster.scheduler.plugins.items() if n.startswith("pilotfish-fence")]
    assert len(fences) == 1
    fence = fences[0]
    fs = [ds.submit(faulty.ident, i) for i in range(20)]
    fs += [ds.submit(faulty.ident, f) for f in fs[:5]]
    assert [f.result(timeout=30) for f in fs] == [*range(20), *range(5)]
    assert fence.asked == 0 and fence.reserved >= 25
    assert len(fence.ready) == 2
    places = {ws.nanny for ws in cluster.scheduler.workers.values()}  # a worker's name
    for f in fs:
        (a,) = f.attempts
        assert a.started is not None and a.pid and a.worker in places


@pytest.mark.timeout(60)
def test_cancel_and_processes(ds: pilotfish.Session, cluster: Any) -> None:
    first = [ds.submit(sleep_then, i, 0.5) for i in range(2)]
    queued = [ds.submit(sleep_then, i, 0.01) for i in range(2, 12)]
    wait_for(lambda: all(t.running() for t in first), timeout=20)
    assert queued[-1].cancel() and queued[-1].state is State.CANCELLED
    assert [t.result(timeout=30) for t in first] == [0, 1]
    assert queued[0].result(timeout=30) == 2
    procs = ds.processes()
    assert procs["master"] is None and procs["scheduler"] == cluster.scheduler_address
    assert len(procs["workers"]) == 2 and os.getpid() not in procs["workers"]


@pytest.mark.timeout(60)
def test_existing_client_is_left_open(cluster: Any, tmp_path: Path) -> None:
    with distributed.Client(cluster, set_as_default=False) as client:
        with pilotfish.Session(backend="dask", client=client, rundir=str(tmp_path / "r")) as s:
            assert s.submit(add, 2, 3).result(timeout=30) == 5
        assert client.status == "running"
        assert client.submit(faulty.square, 3).result(timeout=30) == 9


@pytest.mark.timeout(60)
def test_many_tasks_batched_and_fetched_directly(cluster: Any, tmp_path: Path) -> None:
    """Attempts reach Dask in batches (one graph per batch); small values come with the
    task's end on the session's event topic (never fetched), larger ones straight from
    the workers on this host; every task still gets Started and its own value."""
    from pilotfish.backends.dask import DaskHooks

    fetched: list[str] = []
    direct: set[str] = set()

    def on_fetched(keys: list[str], straight: set[str]) -> None:
        fetched.extend(keys)
        direct.update(straight)

    b = _backend(cluster.scheduler_address, tmp_path, DaskHooks(fetched=on_fetched))
    with pilotfish.Session(
        backend=b, rundir=str(tmp_path / "run"), backoff=pilotfish.Backoff(base=0.01)
    ) as ds:
        ts = [ds.submit(faulty.ident, i) for i in range(300)]
        chain = ds.submit(add, ds.submit(add, 1, 2), 3)
        assert [t.result(timeout=60) for t in ts] == list(range(300))
        assert chain.result(timeout=60) == 6
        assert all(len(t.attempts) == 1 and t.attempts[0].started for t in ts)
        assert fetched == []  # all small: every value came on the event topic
        big = [ds.submit(faulty.ident, "x" * 5000 + str(i)) for i in range(5)]
        assert [t.result(timeout=60) for t in big] == ["x" * 5000 + str(i) for i in range(5)]
        assert len(fetched) == 5
        assert direct == set(fetched)  # LocalCluster: all straight from their workers
        assert b.in_flight() == 0


@pytest.mark.timeout(60)
def test_result_events_for_attempts_not_held_are_ignored(cluster: Any, tmp_path: Path) -> None:
    """A result event on the session's topic for an attempt pilotfish does not hold
    (never did, or long delivered) is ignored: each attempt's result is reported once."""
    from pilotfish.wire import messages as _wire

    got: list[Any] = []
    b = _backend(cluster.scheduler_address, tmp_path)

    def results() -> list[int]:
        return [e.attempt for e in list(got) if isinstance(e, _wire.Result)]

    b.start(got.extend)
    try:
        b.submit([_attempt(1, 10)])
        wait_for(lambda: results() == [1], timeout=30)
        with distributed.Client(cluster, set_as_default=False) as c:
            for aid in (10**9, 1):  # unknown, and long delivered
                result = [aid, True, b"", "tcp://w:1", 1, 0.0, 0.0, "h"]
                c.log_event(b.topic, {"op": "result", "key": "k", "result": result})
        b.submit([_attempt(2, 20)])  # its result reaches the backend after those events
        wait_for(lambda: 2 in results(), timeout=30)
    finally:
        b.stop()
    assert results() == [1, 2]


def where_it_runs() -> tuple[str, str, str]:
    """A task: its Dask worker, thread and Dask key, as Dask's worker sees them."""
    from distributed.worker import thread_state

    w = distributed.get_worker()
    return str(w.address), threading.current_thread().name, str(thread_state.key)


@pytest.mark.timeout(60)
def test_attempt_runs_in_the_workers_thread_pool(cluster: Any, tmp_path: Path) -> None:
    """The Dask task is a coroutine (it awaits the start fence on the worker's event loop,
    no thread hand-offs), but the attempt itself runs in a thread of the worker's pool,
    set up as Dask sets up a task's thread: get_worker() and the task's key work there."""
    from pilotfish.backends.dask.worker import attempt_on_worker

    assert inspect.iscoroutinefunction(attempt_on_worker)
    b = _backend(cluster.scheduler_address, tmp_path)
    with pilotfish.Session(backend=b, rundir=str(tmp_path / "run")) as ds:
        addr, thread, key = ds.submit(where_it_runs).result(timeout=30)
    assert addr in cluster.scheduler.workers
    assert "Dask-Default-Threads" in thread  # not the event loop's thread
    assert key.startswith("pilotfish-") and b.token in key


@pytest.mark.timeout(60)
def test_values_come_from_the_granted_worker_without_asking_the_scheduler(
    ds: pilotfish.Session, cluster: Any
) -> None:
    """A value is fetched straight from the worker the start fence granted its attempt to
    (no who_has round trip to the scheduler first); a value that worker does not have
    (moved, lost) comes through Client.gather."""
    handlers = cluster.scheduler.handlers
    real = handlers["who_has"]
    asked: list[Any] = []

    def who_has(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("keys"))
        return real(*args, **kwargs)

    handlers["who_has"] = who_has
    try:
        pad = "y" * 5000  # larger than a result that travels on the event topic
        ts = [ds.submit(add, pad, str(i)) for i in range(40)]
        assert [t.result(timeout=60) for t in ts] == [pad + str(i) for i in range(40)]
        assert asked == []
        # a holder that does not have the value: Client.gather finds it
        from pilotfish.backends.dask.results import fetch_values

        w1, w2 = sorted(cluster.scheduler.workers)
        with distributed.Client(cluster, set_as_default=False) as c:
            fut = c.submit(faulty.square, 7, workers=[w1], pure=False)
            assert fut.result(timeout=30) == 49
            assert fetch_values(c, [(fut.key, fut)], {fut.key: w2}) == ([49], set())
        assert asked  # asked the scheduler where it is
    finally:
        handlers["who_has"] = real


@pytest.mark.timeout(60)
def test_attempt_cancelled_while_being_handed_to_dask(cluster: Any, tmp_path: Path) -> None:
    """A cancel that lands between taking a batch and Dask's futures existing: the late
    future is cancelled and nothing of that attempt is ever reported."""
    from pilotfish.backends.dask import DaskHooks
    from pilotfish.wire import messages as _wire

    got: list[Any] = []
    inside, go = threading.Event(), threading.Event()

    def hold(batch: list[Any]) -> None:  # the submitter took the batch: hold it there
        inside.set()
        assert go.wait(20)

    b = _backend(cluster.scheduler_address, tmp_path, DaskHooks(before_batch=hold))
    b.start(got.extend)
    try:
        b.submit([_attempt(1, 10), _attempt(2, 20)])
        assert inside.wait(20)
        b.cancel([1])
        wait_for(lambda: b.in_flight() == 1, timeout=20)  # attempt 1 withdrawn
        go.set()
        wait_for(lambda: any(isinstance(e, _wire.Result) for e in got), timeout=30)
        assert b.in_flight() == 0
        # attempt 1's late Dask future was cancelled: the scheduler forgets its task
        wait_for(lambda: not _dask_keys(cluster.scheduler, f"pilotfish-k1-a1-{b.token}"), 20)
    finally:
        go.set()
        b.stop()  # nothing is reported after stop() returns
    mine = [e for e in got if getattr(e, "attempt", None) in (1, 2)]
    assert {type(e).__name__ for e in mine} == {"Started", "Result"}
    assert all(e.attempt == 2 for e in mine)
    res = next(e for e in mine if isinstance(e, _wire.Result))
    assert res.ok and pickle.loads(res.data) == 20


@pytest.mark.timeout(60)
def test_start_fence_that_cannot_be_installed_fails_clearly(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler that will not take the start fence (no pilotfish there and another
    Python version, say): without it Dask could rerun user code behind pilotfish's back,
    so the session fails at once and says what the scheduler needs."""
    with distributed.Client(cluster, set_as_default=False) as client:
        real = client.register_plugin

        def register(plugin: Any, *args: Any, **kwargs: Any) -> Any:
            if type(plugin).__name__ == "StartFence":
                raise ModuleNotFoundError("No module named 'pilotfish'")
            return real(plugin, *args, **kwargs)

        monkeypatch.setattr(client, "register_plugin", register)
        with pilotfish.Session(backend="dask", client=client, rundir=str(tmp_path / "r")) as s:
            t = s.submit(add, 1, 2)
            with pytest.raises(pilotfish.EnvironmentMismatch, match="start fence") as info:
                t.result(timeout=30)
            msg = str(info.value)
            assert cluster.scheduler_address in msg and "by value" in msg
            assert "have pilotfish installed" in msg and "Python version" in msg
        assert client.status == "running"


@pytest.mark.timeout(30)
def test_no_address_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(pilotfish.InvalidTask, match="address="):
        pilotfish.Session(backend="dask", rundir=str(tmp_path / "r"))


# ---------------------------------------------------------------- faults (own clusters)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(60)
def test_timeout_is_task_timeout(own_cluster: Any, tmp_path: Path) -> None:
    """Dask cannot stop a thread: the attempt is failed at its limit from the client and
    its worker process ended (the nanny starts a new one)."""
    with pilotfish.Session(
        backend="dask", address=own_cluster.scheduler_address, rundir=str(tmp_path / "r")
    ) as s:
        t = s.submit(pilotfish.task(faulty.slow, timeout=0.5, retries=0), 1, 30)
        with pytest.raises(pilotfish.TaskTimeout) as info:
            t.result(timeout=30)
        assert "0.5 s" in str(info.value) and "ran" in str(info.value)
        f = info.value.failure
        assert f is not None and f.category is Category.TIMEOUT and f.transient
        (a,) = t.attempts  # failed at its limit, measured from Started
        assert a.outcome == "timeout" and a.started is not None and a.ended is not None
        assert a.ended - a.started >= 0.5 and a.started <= f.time
        assert f.pid and f.worker is not None and f.worker in str(info.value)
        pid = f.pid
        wait_for(lambda: _gone(pid), timeout=10)  # the call's worker process was ended
        assert [s.submit(faulty.ident, i).result(timeout=30) for i in range(4)] == [0, 1, 2, 3]


# Task bodies that count their runs: each run appends its pid to a file of its task, so a
# test can compare how often user code ran with the attempts pilotfish started.


def body_runs(countfile: Path) -> list[int]:
    """The pid of every run of a counting body."""
    if not countfile.exists():
        return []
    return [int(line) for line in countfile.read_text().split()]


def _count(countfile: str) -> int:
    """Record this run; returns how many runs came before it."""
    before = len(body_runs(Path(countfile)))
    with open(countfile, "a") as f:
        f.write(f"{os.getpid()}\n")
    return before


def count_then_sleep(countfile: str, pidfile: str, seconds: float, value: int) -> int:
    """The first run publishes its pid and sleeps (to be killed); later runs return."""
    if _count(countfile) == 0:
        Path(pidfile).write_text(str(os.getpid()))
        time.sleep(seconds)
    return value


def count_then_exit(countfile: str, code: int) -> None:
    """Kills the worker process running it, every time."""
    _count(countfile)
    os._exit(code)


def _started(t: pilotfish.Task) -> int:
    return len([a for a in t.attempts if a.started])


@pytest.mark.timeout(90)
def test_sigkill_worker_mid_task_is_retried(own_cluster: Any, tmp_path: Path) -> None:
    """Issue 12, with Dask's DEFAULT configuration (allowed-failures=3): a worker is
    SIGKILLed (OOM killer, a node lost) in the middle of a call. Dask's scheduler
    reschedules the lost task on the other worker at once, by itself; before the start
    fence that rerun ran the body a second time behind pilotfish's back, and pilotfish's
    retry then ran it a third time. Now the body runs exactly once per started attempt:
    twice, and the task succeeds on pilotfish's retry."""
    events: list[object] = []
    with pilotfish.Session(
        backend="dask",
        address=own_cluster.scheduler_address,
        rundir=str(tmp_path / "r"),
        on_event=events.append,
        backoff=pilotfish.Backoff(base=0.01),
    ) as s:
        pidfile, countfile = tmp_path / "pid", tmp_path / "count"
        t = s.submit(count_then_sleep, str(countfile), str(pidfile), 30, 42)
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=20))
        os.kill(pid, signal.SIGKILL)
        assert t.result(timeout=60) == 42
        assert len(t.attempts) == 2
        first, second = t.attempts
        assert first.outcome == "worker_lost" and first.pid == pid
        f = first.failure
        assert f is not None and f.transient and f.category is Category.WORKER_LOST
        assert f.worker is not None and f.worker in f.message and f.worker.startswith("tcp://")
        assert f"pid {pid}" in f.message and t.key in f.message and "stimulus" in f.message
        assert second.outcome == "done" and second.pid != pid
        lost = [e for e in events if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost"]
        assert any(e.held == (t.key,) and e.pid == pid for e in lost)
        assert s.submit(faulty.ident, 1).result(timeout=30) == 1
        # Dask is done with the first attempt's task (no rerun of it can come any more)
        prefix = f"pilotfish-{t.key}-a{first.id}-"
        wait_for(lambda: not _dask_keys(own_cluster.scheduler, prefix), timeout=20)
        runs = body_runs(countfile)
        assert len(runs) == _started(t) == 2, (runs, t.attempts)
        assert runs[0] == pid and runs[1] == second.pid
        print(f"\nbody runs {len(runs)}, started attempts {_started(t)}, "
              f"Dask reruns refused {s.processes()['refused_starts']}")  # fmt: skip


@pytest.mark.timeout(90)
def test_dask_rerun_of_a_started_attempt_is_refused_and_recorded(
    own_cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The race behind issue 12, made certain: when Dask removes a dead worker it
    reschedules that worker's task on another worker in the same step; pilotfish's cancel
    of the lost attempt's Dask task has to go through the client and usually arrives
    later. Here it never takes effect (a second client wants the key, as another user of
    the cluster might: pilotfish's cancel then only drops its own interest), so Dask's
    rerun always reaches the other worker: the start fence refuses it (user code does
    not run), the refusal is logged naming attempt and worker and counted in
    processes(), and the task succeeds on pilotfish's own retry."""
    import logging

    caplog.set_level(logging.INFO, logger="pilotfish.dask")
    sched = own_cluster.scheduler
    with (
        pilotfish.Session(
            backend="dask",
            address=own_cluster.scheduler_address,
            rundir=str(tmp_path / "r"),
            backoff=pilotfish.Backoff(base=0.01),
        ) as s,
        distributed.Client(own_cluster, set_as_default=False) as other,
    ):
        pidfile, countfile = tmp_path / "pid", tmp_path / "count"
        t = s.submit(count_then_sleep, str(countfile), str(pidfile), 30, 7)
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=20))
        wait_for(lambda: t.attempts and t.attempts[0].started, timeout=20)
        aid = t.attempts[0].id
        (dkey,) = wait_for(lambda: _dask_keys(sched, f"pilotfish-{t.key}-a{aid}-"), 20)
        # someone else wants the key: Dask keeps (and reruns) the task whatever pilotfish
        # cancels
        distributed.fire_and_forget(distributed.Future(dkey, other))
        wants = lambda: {c.client_key for c in sched.tasks[dkey].who_wants}  # noqa: E731
        wait_for(lambda: "fire-and-forget" in wants(), timeout=20)
        first_worker = sched.tasks[dkey].processing_on.address
        os.kill(pid, signal.SIGKILL)
        assert t.result(timeout=60) == 7
        # Dask's rerun of the first attempt reached the other worker and was refused there
        wait_for(lambda: s.processes()["refused_starts"] >= 1, timeout=30)
        refusals = [r.args for r in caplog.records if "refused attempt" in str(r.msg)]
        assert any(
            isinstance(a, tuple) and a[:2] == (aid, dkey) and a[2] != first_worker
            and "already started on" in str(a[5])
            for a in refusals
        ), refusals  # fmt: skip
        runs = body_runs(countfile)
        assert len(runs) == _started(t) == 2, (runs, t.attempts)


@pytest.mark.timeout(120)
def test_task_killing_its_worker_every_time_is_poison(own_cluster: Any, tmp_path: Path) -> None:
    """A task that kills its worker on every run (a segfaulting extension), with Dask's
    default allowed-failures=3: Dask would rerun each attempt on the surviving worker and
    kill it too (and end in KilledWorker); the start fence refuses those reruns, so the
    body runs once per started attempt and pilotfish's poison policy decides."""
    countfile = tmp_path / "count"
    with pilotfish.Session(
        backend="dask",
        address=own_cluster.scheduler_address,
        rundir=str(tmp_path / "r"),
        backoff=pilotfish.Backoff(base=0.01),
    ) as s:
        bad = s.submit(count_then_exit, str(countfile), 3)
        others = [s.submit(faulty.slow, i, 0.05) for i in range(8)]
        with pytest.raises(pilotfish.WorkerLost, match="poison") as info:
            bad.result(timeout=90)
        assert len(bad.attempts) == 3
        assert all(a.outcome == "worker_lost" for a in bad.attempts)
        assert info.value.failure is not None and not info.value.failure.transient
        assert "KilledWorker" not in str(info.value)
        assert [o.result(timeout=60) for o in others] == list(range(8))
        # Dask keeps a result on its worker until the client fetches it: when the poison
        # task kills a worker in that window, the innocent attempt is honestly reported
        # lost and retried (never silently re-run); nothing else may happen to them
        for o in others:
            assert o.attempts[-1].outcome == "done"
            assert all(a.outcome == "worker_lost" for a in o.attempts[:-1])
            assert len(o.attempts) < 3
        # Dask is done with the poison task's attempts: no rerun of them can come any more
        wait_for(lambda: not _dask_keys(own_cluster.scheduler, f"pilotfish-{bad.key}-"), 20)
        assert len(body_runs(countfile)) == _started(bad) == 3
        print(f"\nbody runs {len(body_runs(countfile))}, started attempts {_started(bad)}, "
              f"Dask reruns refused {s.processes()['refused_starts']}")  # fmt: skip


# ---------------------------------------------------------------- the start fence itself


class _FakeTask:
    def __init__(self, on: str | None, state: str = "processing") -> None:
        self.processing_on = types.SimpleNamespace(address=on) if on else None
        self.state = state


class _FakeScheduler:
    """What the fence uses of distributed's Scheduler: handlers, tasks, plugins, events."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.tasks: dict[str, _FakeTask] = {}
        self.plugins: dict[str, Any] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []

    def log_event(self, topic: str, msg: dict[str, Any]) -> None:
        self.events.append((topic, msg))

    def remove_plugin(self, name: str) -> None:
        del self.plugins[name]


def test_submitter_lets_attempts_gather_only_while_dask_has_a_backlog() -> None:
    """Each Client.map is one graph update on the scheduler: while Dask holds many
    attempts that have not started (its workers stay busy), the submitter waits a little
    for more (a quarter of the backlog's run time at 1 ms each, at most 20 ms); never
    without a backlog, and never for a retry or a resend."""
    from pilotfish.backends.dask.flight import Att
    from pilotfish.backends.dask.submit import gather_delay
    from pilotfish.wire import messages as _wire

    def att(aid: int, lineage: tuple[Any, ...] = ("n",), resubmits: int = 0) -> Att:
        m = _wire.RunAttempt(aid, f"k{aid}", "call", b"", (), None, lineage=lineage)
        return Att(m, f"d{aid}", resubmits=resubmits)

    new = att(100)
    assert gather_delay([], 40, 0, 2) == 0.0  # nothing pending
    # 40 queued in Dask, not started, 2 workers; one new pending
    assert gather_delay([new], 41, 0, 2) == pytest.approx(40 / 2 * 0.001 / 4)  # 5 ms
    assert gather_delay([new], 241, 0, 2) == pytest.approx(0.02)  # at most 20 ms
    assert gather_delay([new, att(101, ("n", 7, 1))], 242, 0, 2) == 0.0  # a retry: at once
    assert gather_delay([new, att(102, resubmits=1)], 242, 0, 2) == 0.0  # a resend too
    assert gather_delay([new], 1, 0, 2) == 0.0  # no backlog: at once


def test_start_fence_grants_each_key_once() -> None:
    """The start fence's own rules (no cluster): the first request for a Dask key, from
    the worker the scheduler has it processing on, is granted and published as started;
    Dask's rerun of it elsewhere after its worker died is refused; so are a worker asking
    twice, and a task the scheduler no longer has (cancelled) or has on another worker (a
    worker declared dead that runs on). A worker that died holding a task it had not
    started leaves no grant: the rerun is granted. Grants are dropped when the scheduler
    forgets the key (bounded memory); removing the fence (session closed, or replaced
    after a reconnect, so that tasks from before it find no handler) removes its
    handlers."""
    import asyncio

    from pilotfish.backends.dask.fence import StartFence

    sched = _FakeScheduler()
    fence = StartFence("tok", 1, "pilotfish-tok")
    asyncio.run(fence.start(sched))
    sched.plugins[fence.name] = fence
    ask = sched.handlers["pilotfish_start_tok_1"]

    def req(key: str, worker: str, attempt: int = 1) -> dict[str, Any]:
        out: dict[str, Any] = ask(
            key=key, attempt=attempt, worker=worker, pid=7, host="h", when=1.0
        )
        return out

    sched.tasks["k1"] = _FakeTask("tcp://a")
    assert req("k1", "tcp://a") == {"granted": True, "reason": "", "drained": False}
    started = {"op": "started", "attempt": 1, "key": "k1", "worker": "tcp://a", "pid": 7}
    assert sched.events[-1] == ("pilotfish-tok", {**started, "host": "h", "time": 1.0})
    sched.tasks["k1"] = _FakeTask("tcp://b")  # a died; Dask reschedules k1 on b
    r = req("k1", "tcp://b")
    assert not r["granted"] and "already started on tcp://a" in r["reason"]
    assert sched.events[-1][1]["op"] == "refused" and sched.events[-1][1]["reason"] == r["reason"]
    assert not req("k1", "tcp://a")["granted"]  # asked twice: refused too
    # a task its worker held but never started: Dask's rerun on b is its first start
    sched.tasks["k2"] = _FakeTask("tcp://b")
    assert req("k2", "tcp://b", 2)["granted"]
    # cancelled/released, or moved to another worker: refused
    assert "no longer has" in req("gone", "tcp://a", 3)["reason"]
    sched.tasks["k3"] = _FakeTask("tcp://b")
    assert "processing on tcp://b, not on tcp://a" in req("k3", "tcp://a", 4)["reason"]
    sched.tasks["k4"] = _FakeTask(None, "released")
    assert "in state 'released'" in req("k4", "tcp://a", 5)["reason"]
    assert fence.refused == 5
    # forgotten keys leave the fence's memory
    assert set(fence.granted) == {"k1", "k2"}
    fence.transition("k1", "memory", "released", stimulus_id="s")
    assert set(fence.granted) == {"k1", "k2"}
    fence.transition("k1", "released", "forgotten", stimulus_id="s")
    fence.transition("k2", "erred", "forgotten", stimulus_id="s")
    assert fence.granted == {}
    # removed (session closed, or a reconnect registered a new fence): handlers gone
    assert fence.remove() == 5
    assert sched.handlers == {} and sched.plugins == {}


class _Stream:
    """A BatchedSend that keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)


def test_start_fence_reserves_starts_for_ready_workers_on_its_host() -> None:
    """Start reservations (no cluster): a worker on the scheduler's host that said it
    takes them gets one when the scheduler hands it a key of this session that was never
    granted, with the run_id of that hand-over; a worker on another host, a worker that
    did not say so, another session's key, a key already started (Dask running it again)
    and a drained worker get none and ask. A reserved start passing through the scheduler
    is the grant (a later request for that key is refused); a drain and the fence's
    removal revoke what they hold."""
    import asyncio

    from pilotfish.backends.dask.fence import StartFence

    sched = _FakeScheduler()
    sched.address = "tcp://10.0.0.1:8786"  # type: ignore[attr-defined]
    streams = {w: _Stream() for w in ("tcp://10.0.0.1:1", "tcp://10.0.0.1:2", "tcp://10.0.0.2:1")}
    sched.stream_comms = streams  # type: ignore[attr-defined]
    sched.workers = {w: types.SimpleNamespace(nanny=None) for w in streams}  # type: ignore[attr-defined]
    fence = StartFence("tok", 1, "pilotfish-tok")
    asyncio.run(fence.start(sched))
    sched.plugins[fence.name] = fence
    a, a2, far = streams

    def ready(worker: str) -> None:  # what Reservations.setup sends, as the scheduler adds "worker"
        fence.log_event(fence.op, {"op": "ready", "worker": worker})

    def hand(key: str, worker: str, run_id: int) -> list[dict[str, Any]]:
        t = _FakeTask(worker)
        t.run_id = run_id  # type: ignore[attr-defined]
        sched.tasks[key] = t
        before = len(streams[worker].sent)
        fence.transition(key, "waiting", "processing", stimulus_id="s")
        return streams[worker].sent[before:]

    ready(a)
    ready(far)  # another host: never reserved
    ready("tcp://10.0.0.1:99")  # not a worker the scheduler knows (gone already)
    assert fence.ready == {a}
    key = "pilotfish-k1-a1-tok"
    assert hand(key, a, 5) == [
        {"op": "pilotfish_reserve", "fence": fence.op, "key": key, "run_id": 5}
    ]
    assert hand("pilotfish-k2-a2-tok-r1", a, 6)[0]["run_id"] == 6  # a resend: its own key
    assert hand("pilotfish-k1-a1-other", a, 7) == []  # another session's key
    assert hand("some-dask-key", a, 8) == []
    assert hand("pilotfish-k3-a3-tok", a2, 9) == []  # same host, not ready: it asks
    assert hand("pilotfish-k4-a4-tok", far, 10) == []
    # the worker publishes its reserved start; the scheduler passes it through the fence
    started = {"op": "started", "key": key, "worker": a, "host": "h", "reserved": True}
    fence.log_event("pilotfish-tok", started)
    assert fence.granted == {key: a} and fence.hosts[a] == "h"
    # its worker died; Dask hands the key to another: no reservation, and its request is refused
    ready(a2)
    assert hand(key, a2, 11) == []
    r = sched.handlers[fence.op](key=key, attempt=1, worker=a2, pid=1, host="h", when=1.0)
    assert not r["granted"] and "already started" in r["reason"]
    # a drain revokes the reservations the worker holds and stops new ones
    drain = sched.handlers[fence.drain_op]
    fence.retire = lambda workers: None  # type: ignore[method-assign]
    drain(kind="worker", place=a, why="3 tasks died there")
    assert streams[a].sent[-1] == {"op": "pilotfish_reserve", "fence": fence.op, "revoke": True}
    assert hand("pilotfish-k5-a5-tok", a, 12) == []
    assert hand("pilotfish-k6-a6-tok", a2, 13)[0]["key"] == "pilotfish-k6-a6-tok"
    # a worker that left takes none; the fence's end revokes the rest
    fence.remove_worker(sched, a)
    assert fence.ready == {a2}
    fence.remove()
    assert streams[a2].sent[-1]["revoke"] is True and fence.ready == set()
    assert fence.reserved == 3 and fence.asked == 1


def test_the_fence_knows_its_sessions_dask_keys() -> None:
    """The Dask keys the client makes (first hand-over, resends) are its session's to the
    fence, whatever the task key holds; another session's and Dask's own are not."""
    from pilotfish.backends.dask.fence import dask_key, is_session_key

    for task_key in ("sim-1", "run-r5", "x-tok-r2", "a-tok"):
        for n in (0, 1, 12):
            assert is_session_key(dask_key(task_key, 7, "tok", n), "tok")
            assert not is_session_key(dask_key(task_key, 7, "other", n), "tok")
    assert not is_session_key("inc-5f2a", "tok") and not is_session_key(("tuple", 1), "tok")


def test_a_drained_worker_holding_a_reservation_is_retired_once_its_key_leaves() -> None:
    """A worker drained while it holds a reservation may start that attempt before the
    revocation reaches it: the fence does not retire (close) it at once, which would end
    an attempt it may just have started, but when that key leaves it (it ran, or the
    worker asked and was refused), as for a worker running a granted attempt."""
    import asyncio

    from pilotfish.backends.dask.fence import StartFence

    sched = _FakeScheduler()
    sched.address = "tcp://10.0.0.1:8786"  # type: ignore[attr-defined]
    a, b = "tcp://10.0.0.1:1", "tcp://10.0.0.1:2"
    sched.stream_comms = {a: _Stream(), b: _Stream()}  # type: ignore[attr-defined]
    task = _FakeTask(a)
    task.key = "pilotfish-k1-a1-tok"  # type: ignore[attr-defined]
    task.run_id = 3  # type: ignore[attr-defined]
    sched.tasks[task.key] = task  # type: ignore[attr-defined]
    sched.workers = {  # type: ignore[attr-defined]
        a: types.SimpleNamespace(nanny=None, processing=[task]),
        b: types.SimpleNamespace(nanny=None, processing=[]),
    }
    fence = StartFence("tok", 1, "pilotfish-tok")
    asyncio.run(fence.start(sched))
    for w in (a, b):
        fence.log_event(fence.op, {"op": "ready", "worker": w})
    fence.transition(task.key, "waiting", "processing", stimulus_id="s")  # type: ignore[attr-defined]
    assert fence.reserved_for == {task.key: a} and fence.busy(a) and not fence.busy(b)  # type: ignore[attr-defined]
    fence.drain(kind="worker", place=a, why="3 tasks died there")
    fence.drain(kind="worker", place=b, why="3 tasks died there")
    assert fence.waiting == {a} and fence.retiring == {b}  # b held nothing: at once
    sched.workers[a].processing = []  # type: ignore[attr-defined]
    fence.transition(task.key, "processing", "memory", stimulus_id="s")  # type: ignore[attr-defined]
    assert fence.waiting == set() and fence.retiring == {a, b}
    fence.transition(task.key, "memory", "forgotten", stimulus_id="s")  # type: ignore[attr-defined]
    assert fence.reserved_for == {}


def test_a_reserved_start_is_written_before_user_code_or_the_worker_asks() -> None:
    """A worker starting by its reservation writes ``started`` (after what its stream had
    queued, in order) into its stream to the scheduler and waits until the kernel has
    every byte; a closed stream, or a Dask whose stream is not what pilotfish knows, is a
    reason (then the worker asks the fence as any other does), never an exception."""
    import asyncio

    from pilotfish.backends.dask import worker as w

    class Comm:
        def __init__(self, closed: bool = False) -> None:
            self.is_closed, self.written, self.flushed = closed, [], 0
            self.stream = self

        def closed(self) -> bool:
            return self.is_closed

        async def write(self, payload: Any, **kw: Any) -> int:
            if isinstance(payload, bytes):  # the stream's "all written" future
                self.flushed += 1
                return 0
            self.written.append(list(payload))
            return 1

    queued = {"op": "task-finished", "key": "before"}
    bs = types.SimpleNamespace(comm=Comm(), buffer=[queued], message_count=1, serializers=None)
    fake = types.SimpleNamespace(batched_stream=bs, nanny="tcp://h:9")

    def start(worker: Any) -> str:
        return asyncio.run(w._start_reserved(worker, "topic", 4, "dk", "tcp://h:1", 7, "h"))

    assert start(fake) == ""
    ((first, sent),) = bs.comm.written
    assert first == queued and bs.buffer == [] and bs.comm.flushed == 1
    assert sent["op"] == "log-event" and sent["topic"] == "topic"
    assert sent["msg"]["op"] == "started" and sent["msg"]["reserved"] is True
    assert sent["msg"]["attempt"] == 4 and sent["msg"]["place"] == "tcp://h:9"
    bs.comm = Comm(closed=True)
    assert "closed" in start(fake)
    assert "AttributeError" in start(types.SimpleNamespace(batched_stream=object()))


def test_a_worker_starts_by_reservation_only_for_the_hand_over_it_was_made_for() -> None:
    """The worker's side of start reservations: a reservation is used once, only by the
    fence that made it, and only while the worker's Dask task has the run_id it was made
    for (a task Dask stole away and handed back has a new one); a revocation drops that
    fence's reservations; reservations of keys the worker no longer has are pruned."""
    from pilotfish.backends.dask import worker as w

    tasks: dict[str, Any] = {}
    fake = types.SimpleNamespace(state=types.SimpleNamespace(tasks=tasks))
    w._RESERVED.clear()
    try:
        tasks["k1"] = types.SimpleNamespace(run_id=5)
        w._on_reserve(fence="f1", key="k1", run_id=5)
        assert not w._take_reservation(fake, "k1", "f2")  # another fence's: dropped, unused
        w._on_reserve(fence="f1", key="k1", run_id=5)
        assert w._take_reservation(fake, "k1", "f1")
        assert not w._take_reservation(fake, "k1", "f1")  # once
        w._on_reserve(fence="f1", key="k1", run_id=5)
        tasks["k1"] = types.SimpleNamespace(run_id=6)  # handed over again (stolen, back)
        assert not w._take_reservation(fake, "k1", "f1")
        for k in ("k2", "k3"):
            tasks[k] = types.SimpleNamespace(run_id=1)
            w._on_reserve(fence="f1", key=k, run_id=1)
        w._on_reserve(fence="f9", key="k4", run_id=1)
        w._on_reserve(fence="f1", revoke=True)
        assert w._RESERVED == {"k4": ("f9", 1)}
        w._prune_reservations(fake)  # k4 is not a task of this worker
        assert w._RESERVED == {}
    finally:
        w._RESERVED.clear()


# ---------------------------------------------------------------- scheduler loss


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _External:
    """A scheduler and workers (nanny-less unless ``nanny``) as our own subprocesses, each
    in a process group of its own (all killed at the end)."""

    def __init__(self, tmp_path: Path, nanny: bool = False) -> None:
        self.nanny = nanny
        self.tmp_path = tmp_path
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs = (tmp_path / "dask.log").open("wb")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scheduler = self.spawn("dask_scheduler", "--host", "127.0.0.1", "--port",
                                     str(self.port), "--no-dashboard")  # fmt: skip
        self.add_worker()

    def spawn(self, cli: str, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-m", f"distributed.cli.{cli}", *args],
            stdout=self.logs,
            stderr=self.logs,
            cwd=self.tmp_path,
            env={**os.environ, "PYTHONPATH": ""},  # only the backend's plugin adds tests/
            start_new_session=True,  # a nanny's worker process goes with its group
        )
        self.procs.append(p)
        return p

    def add_worker(self) -> None:
        nanny = "--nanny" if self.nanny else "--no-nanny"
        self.spawn("dask_worker", self.address, "--nthreads", "1", nanny,
                    "--no-dashboard", "--death-timeout", "30")  # fmt: skip
        with distributed.Client(self.address, timeout=30, set_as_default=False) as c:
            c.wait_for_workers(1, timeout=30)

    def restart_scheduler(self) -> None:
        self.scheduler = self.spawn("dask_scheduler", "--host", "127.0.0.1", "--port",
                                     str(self.port), "--no-dashboard")  # fmt: skip

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.logs.close()


@pytest.fixture
def external(tmp_path: Path) -> Iterator[_External]:
    ext = _External(tmp_path)
    try:
        yield ext
    finally:
        ext.close()


@pytest.fixture
def external_nanny(tmp_path: Path) -> Iterator[_External]:
    ext = _External(tmp_path, nanny=True)
    try:
        yield ext
    finally:
        ext.close()


@pytest.mark.timeout(90)
def test_scheduler_killed_without_restarts_is_runtime_lost(
    external: _External, tmp_path: Path
) -> None:
    events: list[object] = []
    address = external.address
    s = pilotfish.Session(
        backend="dask",
        address=address,
        rundir=str(tmp_path / "r"),
        max_master_restarts=0,
        on_event=events.append,
    )
    try:
        assert s.submit(faulty.ident, 7).result(timeout=30) == 7  # sys.path plugin works
        ts = [s.submit(faulty.slow, i, 2.0) for i in range(3)]
        wait_for(lambda: any(t.running() for t in ts), timeout=20)
        external.scheduler.kill()
        for t in ts:  # at once: no restart to wait for (not heartbeat_timeout later)
            with pytest.raises(pilotfish.RuntimeLost, match=address):
                t.result(timeout=20)
        assert "max_master_restarts=0" in str(ts[0].exception())
        late = s.submit(faulty.ident, 1)
        with pytest.raises(pilotfish.RuntimeLost):
            late.result(timeout=5)
    finally:
        s.shutdown(wait=False, cancel_futures=True)
    kinds = [e.kind for e in events if isinstance(e, pilotfish.MasterEvent)]
    assert kinds == ["started", "lost"]


@pytest.mark.timeout(90)
def test_a_silent_scheduler_link_is_reported_and_nothing_lost(
    external: _External, tmp_path: Path
) -> None:
    """Issue 24 item 6: the scheduler's stream stalls while the connection stays open (a
    network cut between client and scheduler, a frozen scheduler: here the scheduler is
    SIGSTOPped for 6 s, shorter than Dask's TCP timeout). The session says so within a
    few seconds (MasterEvent "silent", in the journal and `pilotfish status`), the
    attempts run on, and when the scheduler answers again ("answering", for how long)
    every task is DONE with its one attempt: nothing lost, nothing charged."""
    from pilotfish.store.reader import JournalReader
    from pilotfish.tools import render

    events: list[Any] = []
    rundir = tmp_path / "r"
    with pilotfish.Session(
        backend="dask", address=external.address, rundir=str(rundir), on_event=events.append
    ) as s:
        assert s.submit(faulty.ident, 1).result(timeout=30) == 1
        ts = [s.submit(faulty.slow, i, 3.0) for i in range(2)]
        wait_for(lambda: any(t.running() for t in ts), timeout=20)
        stopped = time.monotonic()
        external.scheduler.send_signal(signal.SIGSTOP)
        try:
            silent = wait_for(
                lambda: [e for e in events if getattr(e, "kind", "") == "silent"], timeout=20
            )
            noticed = time.monotonic() - stopped
            time.sleep(max(0.0, 6.0 - noticed))
        finally:
            external.scheduler.send_signal(signal.SIGCONT)
        assert [t.result(timeout=40) for t in ts] == [0, 1]
        back = wait_for(
            lambda: [e for e in events if getattr(e, "kind", "") == "answering"], timeout=20
        )
    print(f"\nscheduler stopped 6 s: reported silent after {noticed:.1f} s")
    assert external.address in silent[0].message and "cut" in silent[0].message
    assert "heard again after" in back[0].message and "nothing was lost" in back[0].message
    for t in ts:
        assert [a.outcome for a in t.attempts] == ["done"], t.attempts
    kinds = [e.kind for e in events if isinstance(e, pilotfish.MasterEvent)]
    assert kinds == ["started", "silent", "answering"], kinds
    reader = JournalReader(rundir / "journal.db")
    logged = [e["kind"] for e in reader.events() if e["kind"].startswith("master-")]
    assert logged == ["master-silent", "master-answering"], logged
    table = render.workers_table(reader)
    assert table is not None
    states = [str(c) for col in table.columns if col.header == "state" for c in col.cells]
    assert "silent" in states and "answering" in states, states


@pytest.mark.timeout(90)
def test_a_broken_scheduler_link_is_reconnected_and_not_charged(
    external: _External, tmp_path: Path
) -> None:
    """Issue 24 item 6: the client's connection to the scheduler breaks (a network outage
    outlasting the TCP timeout; here the client's comm is aborted): Dask cancels the
    client's futures and the scheduler lets go of its tasks. pilotfish reconnects to the
    same scheduler, retries the attempt that was running (RUNTIME_LOST, not charged: with
    retries=0 it is still retried) and resends the queued ones: every task DONE once."""
    client = distributed.Client(external.address, timeout=30, set_as_default=False)
    events: list[Any] = []
    try:
        with pilotfish.Session(
            backend="dask",
            client=client,
            rundir=str(tmp_path / "r"),
            on_event=events.append,
            backoff=pilotfish.Backoff(base=0.01),
        ) as s:
            fn = pilotfish.task(faulty.slow, retries=0)
            ts = [s.submit(fn, i, 1.5) for i in range(3)]
            wait_for(lambda: any(t.running() for t in ts), timeout=20)
            comm = client.scheduler_comm.comm
            client.loop.add_callback(comm.abort)
            assert [t.result(timeout=60) for t in ts] == [0, 1, 2]
    finally:
        client.close()
    lost = [a for t in ts for a in t.attempts if a.outcome == "runtime_lost"]
    assert lost, [t.attempts for t in ts]
    for a in lost:
        assert a.note and a.note.startswith("not charged: the link to the Dask scheduler"), a
        assert a.failure is not None and "broke (a network outage" in a.failure.message
    assert all(t.attempts[-1].outcome == "done" for t in ts)
    kinds = [e.kind for e in events if isinstance(e, pilotfish.MasterEvent)]
    assert kinds == ["started", "lost", "restarted"], kinds


@pytest.mark.timeout(90)
def test_a_released_call_does_not_run_beside_its_retry(
    external_nanny: _External, tmp_path: Path
) -> None:
    """Issue 24: the link breaks while a Python call runs; the scheduler lets go of the
    session's tasks, and Dask lets a released call run on in its thread. The worker ends
    its process (its nanny starts a fresh one) once it sees the call released, so the
    retry after the reconnect never runs beside the lost body for more than a moment."""
    import lab

    client = distributed.Client(external_nanny.address, timeout=30, set_as_default=False)
    trace = tmp_path / "trace"
    try:
        with pilotfish.Session(
            backend="dask",
            client=client,
            rundir=str(tmp_path / "r"),
            backoff=pilotfish.Backoff(base=0.01),
        ) as s:
            t = s.submit(pilotfish.task(lab.ticking, retries=0), str(trace), 4.0, 7)
            wait_for(lambda: lab.read_trace(trace), timeout=30, interval=0.05)
            time.sleep(0.3)
            t_cut = time.time()
            client.loop.add_callback(client.scheduler_comm.comm.abort)
            value, _host, pid = t.result(timeout=60)
    finally:
        client.close()
    rows = lab.read_trace(trace)
    starts = [r for r in rows if r[0] == "start"]
    assert len(starts) == 2 and value == 7, rows
    # the released body's process ended: the retry ran in a fresh worker process
    assert pid != starts[0][2], "the released call ran on in the worker that ran its retry"
    old = [r[3] for r in rows if r[2] == starts[0][2]]
    new = [r[3] for r in rows if r[2] != starts[0][2]]
    overlap = max(0.0, max(old) - min(new))
    print(
        f"\nlink broken: the released call ran on {max(old) - t_cut:.2f} s, its retry "
        f"started {min(new) - t_cut:.2f} s after the break; overlap {overlap:.2f} s"
    )
    assert [a.outcome for a in t.attempts] == ["runtime_lost", "done"], t.attempts
    assert not any(r[0] == "end" and r[2] == starts[0][2] for r in rows)
    assert overlap <= 1.0, f"the retry ran beside its released attempt for {overlap:.2f} s"


@pytest.mark.timeout(90)
def test_scheduler_restarted_in_time_resumes(external: _External, tmp_path: Path) -> None:
    """The scheduler comes back at the same address within heartbeat_timeout: started
    attempts are RUNTIME_LOST and retried, the others resubmitted; all finish."""
    events: list[object] = []
    with pilotfish.Session(
        backend="dask",
        address=external.address,
        rundir=str(tmp_path / "r"),
        heartbeat_timeout=20,
        on_event=events.append,
        backoff=pilotfish.Backoff(base=0.01),
    ) as s:
        ts = [s.submit(faulty.slow, i, 1.0) for i in range(3)]
        wait_for(lambda: any(t.running() for t in ts), timeout=20)
        external.scheduler.kill()
        external.scheduler.wait()
        external.restart_scheduler()
        external.add_worker()
        assert [t.result(timeout=40) for t in ts] == [0, 1, 2]
        outcomes = [a.outcome for t in ts for a in t.attempts]
        assert "runtime_lost" in outcomes and outcomes.count("done") == 3
        assert s.submit(faulty.ident, 5).result(timeout=30) == 5
    kinds = [e.kind for e in events if isinstance(e, pilotfish.MasterEvent)]
    assert kinds == ["started", "lost", "restarted"]
