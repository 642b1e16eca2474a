"""The fault matrix: every way a process on the path to user code dies, hangs or vanishes,
on every backend (DESIGN.md sections 3-5; issue 12, requirement 5).

Each case runs once per backend through the ``backend``/``make_session`` fixtures
(``local``, ``dask`` and ``fake`` by default; ``radical`` in CI's RP step with ``--backends
radical -k radical``) and asserts the same three things:

* every task ends, DONE or FAILED with the expected category, within a bounded time;
* user code ran exactly once per *started* attempt: every body appends its pid to a file
  of its own task (``tests/faulty_matrix.py``), compared with
  ``[a for a in task.attempts if a.started]`` -- an engine's own re-execution of an
  attempt (which pilotfish's start fence must refuse) shows up here;
* the session closes (``shutdown(wait=True)``) within a bounded time.

The processes on the way to user code, innermost first, as a body sees them
(``faulty_matrix.publish_chain``):

=========  ==============================================================================
local      worker (runs the call itself) < master < client
dask       worker process (runs the call in a thread) < nanny (``dask worker``) < ...
radical    the call's own process < the per-task fork < raptor worker < ...
=========  ==============================================================================

On Dask every case that ends or stops a process gets a cluster of its own, started in the
test so its processes carry the test's token (a survivor fails the test): a
``LocalCluster``, or, to kill a nanny or the scheduler, ``dask scheduler`` and ``dask
worker`` as subprocesses (the scheduler can then die and come back at the same address).
Dask's defaults are kept (``allowed-failures`` 3): an engine that re-runs a task by itself
is what the start fence is for.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import faulty_matrix as fm
import pilotfish
from conftest import (
    FAKE_NO_CLIENT,
    FAKE_NO_CONTAINMENT,
    FAKE_NO_KILL,
    FAKE_NO_PROCESS,
    FAKE_NO_WORKER,
    TOKEN_VAR,
    skip_on,
    wait_for,
    with_env,
)
from pilotfish import Category

TESTS = Path(__file__).resolve().parent

#: a task's body must be running within this long after submit (s; RP starts a master)
START = {"local": 30.0, "dask": 30.0, "radical": 120.0, "fake": 30.0}
#: every task must end within this long after the fault (s)
END = {"local": 30.0, "dask": 60.0, "radical": 60.0, "fake": 30.0}
#: Session.shutdown(wait=True) must return within this long (s)
CLOSE = {"local": 10.0, "dask": 15.0, "radical": 60.0, "fake": 10.0}
#: Session keywords that make detection quick; RP keeps its defaults (its ping timeout is
#: half the heartbeat timeout, too short for a pilot sharing two cores)
FAST: dict[str, dict[str, Any]] = {
    "local": {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0},
    "dask": {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0},
    "radical": {},
    "fake": {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0},
}

pytestmark = [
    # each wait below is bounded (START, END, CLOSE); this only catches a hang elsewhere,
    # and on radical the first test also pays for the shared pilot's start
    pytest.mark.timeout(300),
    # our own Dask client and cluster processes: see conftest's `backend` fixture
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:.*[Ww]orker.*:UserWarning"),
]


# ---------------------------------------------------------------- a Dask cluster of our own


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _dask_infrastructure(p: psutil.Process) -> bool:
    """A process of the Dask cluster itself (scheduler, nanny, worker, resource tracker)."""
    with contextlib.suppress(psutil.Error):
        cmd = " ".join(p.cmdline())
        return "distributed.cli.dask_" in cmd or "from multiprocessing." in cmd
    return False


class DaskProcs:
    """``dask scheduler`` and ``dask worker`` processes (with nannies) owned by one test."""

    def __init__(self, tmp_path: Path, *, ttl: str | None = None) -> None:
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        # the workers import the task functions and the client's own pilotfish
        root = Path(pilotfish.__file__).resolve().parent.parent
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(root)])}
        if ttl is not None:  # how long a silent (e.g. stopped) worker is tolerated
            self.env["DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL"] = ttl
        self.tmp_path = tmp_path
        self.log = (tmp_path / "dask.log").open("ab")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nannies: list[subprocess.Popen[bytes]] = []
        self.scheduler = self.start_scheduler()

    def _spawn(self, cli: str, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-m", f"distributed.cli.{cli}", *args],
            stdout=self.log,
            stderr=self.log,
            cwd=self.tmp_path,
            env=self.env,
        )
        self.procs.append(p)
        return p

    def start_scheduler(self) -> subprocess.Popen[bytes]:
        self.workers = 0  # workers leave with the scheduler they served
        self.scheduler = self._spawn("dask_scheduler", "--host", "127.0.0.1", "--port",
                                     str(self.port), "--no-dashboard")  # fmt: skip
        return self.scheduler

    def add_workers(self, n: int) -> None:
        import distributed

        for _ in range(n):
            self.nannies.append(self._spawn("dask_worker", self.address, "--nthreads", "1",
                                            "--host", "127.0.0.1", "--no-dashboard"))  # fmt: skip
        self.workers += n
        with distributed.Client(self.address, timeout=30, set_as_default=False) as c:
            c.wait_for_workers(self.workers, timeout=30)

    def close(self) -> None:
        procs: list[psutil.Process] = []
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                procs += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        # processes of ours whose parent was killed in the test (re-parented to init)
        token = os.environ[TOKEN_VAR]
        procs += [p for p in with_env(TOKEN_VAR, token) if _dask_infrastructure(p)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        for p in self.procs:
            p.wait()
        self.log.close()


# ---------------------------------------------------------------- the rig


class Rig:
    """Sessions on the test's backend with quick detection, files per task, bounded close.

    On Dask, ``cluster()`` starts the test's own cluster: a ``LocalCluster`` (nannies in
    this process, the cheapest), or with ``separate=True`` a ``DaskProcs`` (a nanny or
    the scheduler to kill). Sessions without one use conftest's shared cluster."""

    def __init__(
        self, backend: str, make_session: Callable[..., pilotfish.Session], tmp_path: Path
    ) -> None:
        self.backend = backend
        self.make_session = make_session
        self.tmp_path = tmp_path
        self.dask: DaskProcs | None = None
        self.local_cluster: Any = None
        self.address = ""
        self.sessions: list[pilotfish.Session] = []

    def cluster(self, workers: int = 2, *, ttl: str | None = None, separate: bool = False) -> str:
        assert self.backend == "dask" and not self.address
        if separate:
            self.dask = DaskProcs(self.tmp_path, ttl=ttl)
            self.dask.add_workers(workers)
            self.address = self.dask.address
            return self.address
        import multiprocessing.resource_tracker

        import dask
        import distributed

        # the resource tracker lives as long as pytest: not one of this test's processes
        token = os.environ.pop(TOKEN_VAR)
        try:
            multiprocessing.resource_tracker.ensure_running()
        finally:
            os.environ[TOKEN_VAR] = token
        cfg = {"distributed.scheduler.worker-ttl": ttl} if ttl else {}
        with dask.config.set(cfg):
            self.local_cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
        self.address = str(self.local_cluster.scheduler_address)
        return self.address

    def session(self, **kw: Any) -> pilotfish.Session:
        kw = {**FAST[self.backend], **kw}
        kw.setdefault("workers", 2)
        if self.address:
            kw.setdefault("address", self.address)
        s = self.make_session(**kw)
        self.sessions.append(s)
        return s

    def path(self, name: str) -> str:
        return str(self.tmp_path / name)

    def close(self, s: pilotfish.Session) -> float:
        """``shutdown(wait=True)``, which must return within CLOSE s."""
        t0 = time.monotonic()
        s.shutdown(wait=True)
        took = time.monotonic() - t0
        assert took < CLOSE[self.backend], f"shutdown(wait=True) took {took:.1f} s"
        return took

    def teardown(self) -> None:
        for s in self.sessions:  # before the cluster goes, so the Dask client closes cleanly
            s.shutdown(wait=True, cancel_futures=True)
        if self.local_cluster is not None:
            self.local_cluster.close()
        if self.dask is not None:
            self.dask.close()


@pytest.fixture
def rig(
    backend: str, make_session: Callable[..., pilotfish.Session], tmp_path: Path
) -> Iterator[Rig]:
    r = Rig(backend, make_session, tmp_path)
    try:
        yield r
    finally:
        r.teardown()


def read_chain(path: str, timeout: float) -> list[dict[str, Any]]:
    """The process chain a body published (innermost first), once it exists."""
    wait_for(lambda: os.path.exists(path), timeout=timeout, interval=0.01)
    with open(path) as f:
        chain: list[dict[str, Any]] = json.load(f)
    os.unlink(path)
    return chain


def ends(tasks: list[pilotfish.Task], timeout: float, after: str) -> None:
    """Every task in ``tasks`` ends (DONE, FAILED or CANCELLED) within ``timeout`` s."""
    _, pending = cf.wait(tasks, timeout)
    assert not pending, (
        f"{len(pending)} of {len(tasks)} tasks did not end within {timeout:g} s after "
        f"{after}: {[(t.key, t.state.name, t.attempts) for t in pending]}"
    )


def check_runs(t: pilotfish.Task, countfile: str) -> None:
    """The body of ``t`` ran exactly once per started attempt."""
    ran = fm.body_pids(countfile)
    attempts = t.attempts
    started = [a for a in attempts if a.started]
    assert len(ran) == len(started), (
        f"task {t.key}: its body ran {len(ran)} times (pids {ran}) for {len(started)} "
        f"started attempts {[(a.number, a.outcome, a.pid) for a in attempts]}"
    )


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# ---------------------------------------------------------------- 1, 2: SIGKILL on the way

#: which processes of the published chain each level kills (outermost first)
KILL: dict[str, dict[str, tuple[int, ...]]] = {
    "local": {"user_code": (0,)},
    "dask": {"user_code": (0,), "worker_tree": (1, 0)},
    "radical": {"user_code": (0,), "task_fork": (1,), "worker": (2,), "worker_tree": (2, 1, 0)},
    "fake": {},
}
NO_SUCH_LEVEL = {
    "local": {
        "task_fork": "no process between user code and the worker: the worker runs the call",
        "worker": "the worker process is the process running user code (level user_code)",
        "worker_tree": "the worker's tree is the worker itself, plus programs (user_code)",
    },
    "dask": {
        "task_fork": "a Dask worker runs the call in a thread of its own process",
        "worker": "the Dask worker process is the process running user code (user_code)",
    },
    "radical": {},
    "fake": dict.fromkeys(
        ("user_code", "task_fork", "worker", "worker_tree"),
        FAKE_NO_WORKER + " (its LoseWorker fault scripts this: tests/test_fake_backend.py)",
    ),
}


def _check_chain(rig: Rig, s: pilotfish.Session, chain: list[dict[str, Any]]) -> None:
    """The chain is what we think it is (never kill the wrong process)."""
    pids = [c["pid"] for c in chain]
    procs = s.processes()
    if rig.backend == "local":
        assert pids[0] in procs["workers"] and pids[1] == procs["master"], (chain, procs)
    elif rig.backend == "dask":
        assert pids[0] in procs["workers"], (chain, procs)
        nannies = [n.pid for n in rig.dask.nannies] if rig.dask else [os.getpid()]
        assert pids[1] in nannies, chain
    else:
        assert pids[2] in procs["workers"], (chain, procs)


@pytest.mark.parametrize("level", ["user_code", "task_fork", "worker", "worker_tree"])
def test_sigkill_on_the_way_to_user_code(rig: Rig, backend: str, level: str) -> None:
    """The OOM killer, a node failure or an admin's ``kill -9`` ends a process on the way
    to a running call: the process running user code, one above it up to the worker, or
    the worker with its whole tree. The attempt is WORKER_LOST, retried on a live worker
    and done; user code ran once per started attempt; the session closes promptly."""
    if level not in KILL[backend]:
        skip_on(backend, backend, reason=NO_SUCH_LEVEL[backend][level])
    if backend == "dask":
        rig.cluster(separate=level == "worker_tree")  # a nanny to kill: not in this process
    s = rig.session()
    count, chainfile = rig.path("count"), rig.path("chain")
    t = s.submit(fm.chain_then_sleep, count, chainfile, 30, 0.1, 42)
    chain = read_chain(chainfile, START[backend])
    _check_chain(rig, s, chain)
    victims = [chain[i]["pid"] for i in KILL[backend][level]]
    for pid in victims:
        _kill(pid)
    t0 = time.monotonic()
    ends([t], END[backend], f"the SIGKILL of {level} {victims}")
    took = time.monotonic() - t0
    closed = rig.close(s)
    print(
        f"\n[{backend}] SIGKILL {level} {victims}: ended in {took:.2f} s, closed in {closed:.2f} s"
    )
    check_runs(t, count)
    assert t.result() == 42
    first, last = t.attempts[0], t.attempts[-1]
    assert first.outcome == "worker_lost", t.attempts
    assert first.failure is not None and first.failure.category is Category.WORKER_LOST
    assert first.failure.transient
    assert last.outcome == "done" and last.pid not in victims
    assert len(t.attempts) == 2, t.attempts


def test_sigkill_of_the_head_of_a_running_chain(rig: Rig, backend: str) -> None:
    """The worker running the first task of a chain of four is killed. On Dask the three
    after it were already handed to the scheduler, linked to its attempt (issue 26): those
    linked attempts are dropped, never run and not charged, and go out again linked to its
    retry; elsewhere they wait for it. Either way every link ends DONE with the right
    value, and each body ran exactly once per started attempt."""
    if not KILL[backend]:
        skip_on(backend, backend, reason=NO_SUCH_LEVEL[backend]["user_code"])
    if backend == "dask":
        rig.cluster()
    s = rig.session()
    counts = [rig.path(f"count{i}") for i in range(4)]
    chainfile = rig.path("chain")
    head = s.submit(fm.chain_then_sleep, counts[0], chainfile, 30, 0.1, 40)
    links = [head]
    for i in range(1, 4):
        links.append(s.submit(fm.plus, counts[i], links[-1], 1))
    chain = read_chain(chainfile, START[backend])
    _check_chain(rig, s, chain)
    _kill(chain[0]["pid"])
    ends(links, END[backend], "the SIGKILL of the chain's first task")
    rig.close(s)
    assert [t.result() for t in links] == [40, 41, 42, 43]
    print(f"\n[{backend}] chain attempts: {[[a.outcome for a in t.attempts] for t in links]}")
    assert head.attempts[0].outcome == "worker_lost" and len(head.attempts) == 2
    for t, count in zip(links, counts, strict=True):
        check_runs(t, count)
    for t in links[1:]:
        *before, last = t.attempts
        assert last.outcome == "done", t.attempts
        for a in before:  # only dropped links: never started, never charged
            assert a.outcome == "dropped" and a.started is None, t.attempts
            assert a.note is not None and "not charged" in a.note, a.note


def test_sigkill_of_a_program(rig: Rig, backend: str) -> None:
    """A program task is killed by ``kill -9`` (the OOM killer picks the program, not the
    worker): that is the program's own result, COMMAND_FAILED naming SIGKILL (return code
    -9), permanent, so not retried; its worker is not blamed and keeps working."""
    events: list[Any] = []
    # nothing but the program dies: the shared Dask cluster serves
    s = rig.session(on_event=events.append)
    count, pidfile = rig.path("count"), rig.path("pid")
    script = f"echo $$ >> {count}; echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; "
    t = s.executable(["sh", "-c", script + "exec sleep 30"])
    pidpath = Path(pidfile)
    pid = int(wait_for(lambda: pidpath.exists() and pidpath.read_text().strip(), START[backend]))
    _kill(pid)
    t0 = time.monotonic()
    ends([t], END[backend], "the program's SIGKILL")
    took = time.monotonic() - t0
    exc = t.exception()
    after = s.submit(fm.record, rig.path("count-after"), 5)
    ends([after], END[backend], "submit")
    assert after.result() == 5
    closed = rig.close(s)
    print(f"\n[{backend}] program SIGKILL: failed in {took:.2f} s, closed in {closed:.2f} s")
    check_runs(t, count)
    check_runs(after, rig.path("count-after"))
    assert isinstance(exc, pilotfish.CommandFailed), repr(exc)
    f = exc.failure
    assert f is not None and f.category is Category.COMMAND_FAILED and not f.transient
    assert f.signal == "SIGKILL" and f.returncode == -9, f
    assert "SIGKILL" in str(exc)
    assert [a.outcome for a in t.attempts] == ["command_failed"]
    lost = [e for e in events if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost"]
    assert not lost, lost


# ---------------------------------------------------------------- 3: SIGSTOP

#: the worker, in the published chain
WORKER_IN_CHAIN = {"local": 0, "dask": 0, "radical": 2}


def test_sigstop_of_a_worker(rig: Rig, backend: str) -> None:
    """A worker stops answering without dying: SIGSTOP (a batch system suspending the
    job, a debugger attached, a node swapping to death). It is found hung, its attempt is
    WORKER_LOST and retried on another worker; user code ran once per started attempt.
    (On Dask it is the scheduler's worker-ttl that finds it: set short here.)"""
    skip_on(backend, "fake", reason=FAKE_NO_WORKER + " (its GoSilent fault scripts a hang)")
    if backend == "dask":
        rig.cluster(ttl="1s")  # Dask applies max(ttl, 10 heartbeats) = 5 s
    s = rig.session()
    count, chainfile = rig.path("count"), rig.path("chain")
    t = s.submit(fm.chain_then_sleep, count, chainfile, 30, 0.1, 7)
    chain = read_chain(chainfile, START[backend])
    _check_chain(rig, s, chain)
    victim = psutil.Process(chain[WORKER_IN_CHAIN[backend]]["pid"])
    try:
        victim.suspend()
        t0 = time.monotonic()
        ends([t], END[backend], f"the SIGSTOP of worker {victim.pid}")
        took = time.monotonic() - t0
        ended = not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
        closed = rig.close(s)
        print(
            f"\n[{backend}] SIGSTOP worker {victim.pid}: done in {took:.2f} s, stopped "
            f"worker ended by the runtime: {ended}, closed in {closed:.2f} s"
        )
        check_runs(t, count)
        assert t.result() == 7
        first, last = t.attempts[0], t.attempts[-1]
        assert first.outcome == "worker_lost", t.attempts
        assert first.failure is not None and first.failure.category is Category.WORKER_LOST
        assert last.outcome == "done" and last.pid != victim.pid
    finally:
        with contextlib.suppress(psutil.Error):
            victim.kill()
            victim.resume()


# ---------------------------------------------------------------- 4: master/scheduler SIGKILL


@pytest.mark.parametrize("recovery", ["restarted", "gone"])
def test_master_killed_with_queued_work(rig: Rig, backend: str, recovery: str) -> None:
    """The master (local; RADICAL-Pilot: pilotfish's raptor master) or the Dask scheduler
    is SIGKILLed (the OOM killer on a shared login node, a crashed service node) while one
    task runs and six wait, all with retries=0. The running attempt is RUNTIME_LOST; the
    six never started are sent again unblamed and succeed without using a retry. When the
    runtime cannot come back ("gone": no restarts allowed, or the scheduler never returns)
    every unfinished task fails RUNTIME_LOST at once, nothing waits."""
    skip_on(backend, "fake", reason=FAKE_NO_PROCESS + ": no master (its LoseMaster scripts this)")
    restarted = recovery == "restarted"
    kw: dict[str, Any] = {"workers": 1}
    if backend == "dask":
        rig.cluster(workers=1, separate=True)
        # how long the scheduler may be away; "gone": it never comes back
        kw["heartbeat_timeout"] = 30.0 if restarted else 2.0
    else:
        kw["max_master_restarts"] = 3 if restarted else 0
    s = rig.session(**kw)
    once = {"retries": 0}
    counts = [rig.path(f"count{i}") for i in range(7)]
    chainfile = rig.path("chain")
    long = s.submit(pilotfish.task(fm.chain_then_sleep, **once), counts[0], chainfile, 30, 30, 0)
    read_chain(chainfile, START[backend])
    queued = [s.submit(pilotfish.task(fm.record, **once), counts[i], i) for i in range(1, 7)]
    t0 = time.monotonic()
    if backend == "dask":
        assert rig.dask is not None
        rig.dask.scheduler.kill()
        rig.dask.scheduler.wait()
        if restarted:
            rig.dask.start_scheduler()
            rig.dask.add_workers(1)
    else:
        # the master's pid reaches the client with its first ping answer or task start
        deadline = time.monotonic() + 30
        while not s.processes()["master"] and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill(s.processes()["master"])
    ends([long, *queued], END[backend], "the SIGKILL of the master/scheduler")
    took = time.monotonic() - t0
    closed = rig.close(s)
    print(f"\n[{backend}] master SIGKILL ({recovery}): all ended in {took:.2f} s, closed in "
          f"{closed:.2f} s")  # fmt: skip
    for t, c in zip([long, *queued], counts, strict=True):
        check_runs(t, c)
    assert isinstance(long.exception(), pilotfish.RuntimeLost), repr(long.exception())
    assert [a.outcome for a in long.attempts] == ["runtime_lost"]
    for q in queued:
        if restarted:  # unblamed: no attempt of theirs failed, no retry was used
            assert q.exception() is None, f"{q.key}: {q.exception()!r} {q.attempts}"
            assert all(a.failure is None for a in q.attempts), q.attempts
        else:
            assert isinstance(q.exception(), pilotfish.RuntimeLost), repr(q.exception())
    if restarted:
        assert [q.result() for q in queued] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 5: poison


def test_task_killing_its_worker_every_time_is_poison(rig: Rig, backend: str) -> None:
    """A task that kills the process running it every time (a segfaulting library, an
    allocation the OOM killer answers) is declared poison after poison_after=2 deaths:
    FAILED, WorkerLost saying it killed 2 workers, not retried again; an independent task
    in the same session succeeds; user code ran once per started attempt."""
    skip_on(backend, "fake", reason=FAKE_NO_WORKER + ": the task would kill the test process")
    if backend == "dask":
        rig.cluster()
    s = rig.session(poison_after=2)
    bad_count, ok_count = rig.path("count-bad"), rig.path("count-ok")
    bad = s.submit(fm.kill_own_process, bad_count)
    ok = s.submit(fm.chain_then_sleep, ok_count, rig.path("chain"), 0.5, 0.5, 9)
    t0 = time.monotonic()
    ends([bad, ok], END[backend], "submit")
    took = time.monotonic() - t0
    closed = rig.close(s)
    print(f"\n[{backend}] poison: ended in {took:.2f} s, closed in {closed:.2f} s")
    check_runs(bad, bad_count)
    check_runs(ok, ok_count)
    assert ok.result() == 9
    exc = bad.exception()
    assert isinstance(exc, pilotfish.WorkerLost), repr(exc)
    f = exc.failure
    assert f is not None and f.category is Category.WORKER_LOST
    assert {a.outcome for a in bad.attempts} == {"worker_lost"}, bad.attempts
    if backend == "radical" and len({a.worker for a in bad.attempts}) == 1:
        # RADICAL-Pilot's workers pull tasks, so a retry cannot be sent elsewhere yet:
        # the same worker, restarted under its name, may get every retry; one worker's
        # deaths never make a task poison (a bad worker would condemn healthy tasks),
        # so the task fails when its retries are used up, each death on record
        assert len(bad.attempts) == 4 and "poison" not in str(exc), str(exc)
        return
    assert not f.transient
    # poison_after=2 deaths on two different workers: two attempts, or more where a
    # worker is restarted under its name (RADICAL-Pilot, a Dask nanny) and died twice
    assert "poison" in str(exc), str(exc)
    assert len({a.worker for a in bad.attempts}) == 2, bad.attempts
    two = "killed 2 different workers" if len(bad.attempts) == 2 else "(2 different workers)"
    assert two in str(exc), str(exc)


# ---------------------------------------------------------------- 6: the client SIGKILLed

_CLIENT = """
import os, sys, time
sys.path[:0] = {path!r}
import pilotfish, faulty_matrix as fm
backend, rundir, tmp, marker, address = sys.argv[1:6]
kw = {{"address": address}} if backend == "dask" else {{"workers": 2}}
if backend == "local":
    kw["prefetch"] = 1  # not queued behind the program on a worker, with one idle
if backend == "radical":
    kw["cores"] = 4
s = pilotfish.Session(backend=backend, rundir=rundir, **kw)

def wait_for_file(path, timeout):  # proof that it runs (Task.running() may come first)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.path.exists(path)

s.executable(["sh", "-c", f"echo $$ > {{tmp}}/program; exec sleep 1000.{{marker}}"])
wait_for_file(tmp + "/program", 600)
# submitted once the program runs: a busy worker may still take it and hold it behind
# the program (RADICAL-Pilot's worker does, while another worker is idle)
s.submit(fm.chain_then_sleep, tmp + "/count", tmp + "/chain", 300, 300, 1)
print("running", wait_for_file(tmp + "/count", 20), flush=True)
time.sleep(600)
"""


def test_client_sigkilled(
    rig: Rig, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's script is SIGKILLed (the login node's session dies, an OOM kill) while a
    call and a program run: within 30 s no process the backend started on its behalf is
    left (local: master, workers, program; RADICAL-Pilot: its agent, master, workers,
    task processes; Dask: the program; the user's Dask cluster itself stays)."""
    skip_on(backend, "fake", reason=FAKE_NO_CLIENT)
    address = rig.cluster() if backend == "dask" else ""
    if backend == "radical":  # its own RP session and pilot: RP writes under HOME and cwd
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        (tmp_path / "home").mkdir()
        if sys.prefix != sys.base_prefix:  # RP's local resource needs an "activated" venv
            monkeypatch.setenv("VIRTUAL_ENV", sys.prefix)
            bindir = os.path.join(sys.prefix, "bin")
            monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(_CLIENT.format(path=[str(TESTS), *sys.path])))
    marker = str(random.randint(10**8, 10**9 - 1))  # sleep 1000.<marker> is a valid time
    args = [backend, str(tmp_path / "run"), str(tmp_path), marker, address]
    token = os.environ[TOKEN_VAR]

    def left() -> list[psutil.Process]:
        procs = with_env(TOKEN_VAR, token)
        if backend == "dask":  # the cluster is the user's: it stays
            procs = [p for p in procs if not _dask_infrastructure(p)]
        return procs

    remaining: list[str] = []
    call_ran = False
    proc = subprocess.Popen(
        [sys.executable, str(script), *args], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], START[backend] + 60)
        line = proc.stdout.readline().split() if ready else []
        assert line[:1] == ["running"], "the client did not start its program"
        call_ran = line[1:] == ["True"]
        if backend != "radical":
            assert call_ran, "the client's call did not start while a worker was free"
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        t0 = time.monotonic()
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not left(), timeout=30, interval=0.2)
        took = time.monotonic() - t0
        for p in left():  # described, then ended: reported once, below
            with contextlib.suppress(psutil.Error):
                remaining.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
                p.kill()
    print(
        f"\n[{backend}] client SIGKILL (call running: {call_ran}): {len(remaining)} "
        f"processes left after {took:.1f} s"
    )
    assert not remaining, f"left {took:.0f} s after the client died: {remaining}"
    assert len(fm.body_pids(str(tmp_path / "count"))) == int(call_ran)  # nothing re-ran it


# ---------------------------------------------------------------- 7: what a task leaves (issue 22)


def _marked(marker: str) -> list[str]:
    """Live processes whose command line carries ``marker`` (zombies are gone already)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(
                p.info["cmdline"] or ()
            ):
                out.append(f"{p.pid} {' '.join(p.info['cmdline'])}")
    return out


def _marker() -> str:
    return str(random.randint(10**8, 10**9 - 1))  # sleep 1000.<marker> is a valid time


@pytest.mark.parametrize("how", ["returns", "times_out"])
def test_nothing_a_python_task_starts_outlives_its_attempt(
    rig: Rig, backend: str, how: str
) -> None:
    """A Python task starts children and never waits for them: a plain
    ``subprocess.Popen(["sleep", "1000"])``, one in a new session, and a double fork
    (issue 22 item 10: the child survived the session; one in a new session survived the
    task's timeout). Whether the task returns or times out, once it has ended no process
    it started is alive, and the worker keeps working."""
    skip_on(backend, "fake", reason=FAKE_NO_KILL if how == "times_out" else FAKE_NO_CONTAINMENT)
    if how == "times_out" and backend == "dask":
        why = "a timed-out call ends its Dask worker process, whose orphans go to init"
        skip_on(backend, "dask", reason=why + ": Dask's nanny is no subreaper (README)")
    if backend == "dask":
        rig.cluster(workers=1)
    s = rig.session(workers=1)
    marker, count = _marker(), rig.path("count")
    hang = 1000.0 if how == "times_out" else 0.0
    fn = fm.leave_children if not hang else pilotfish.task(fm.leave_children, timeout=2, retries=0)
    t = s.submit(fn, count, marker, hang)
    ends([t], END[backend], "submit")
    if how == "returns":
        assert len(t.result()) == 2
        assert not _marked(marker), "left by the attempt, after its result came"
    else:
        assert isinstance(t.exception(), pilotfish.TaskTimeout), repr(t.exception())
        # the worker was killed for the timeout; its orphans went to the master
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not _marked(marker), timeout=10, interval=0.05)
        assert not _marked(marker), "left by the attempt, after it timed out"
    after = s.submit(fm.record, rig.path("count-after"), 3)
    assert after.result(timeout=END[backend]) == 3
    rig.close(s)
    check_runs(t, count)


def test_nothing_a_program_starts_outlives_its_timeout(rig: Rig, backend: str) -> None:
    """A program detaches children before it times out: one in a new session
    (``setsid``), one by a double fork (issue 22 item 10: ``setsid`` children survived the
    program's timeout and the session, as the README promised the whole tree would be
    killed). The task ends TIMEOUT and, by then, none of them is alive."""
    skip_on(backend, "fake", reason=FAKE_NO_CONTAINMENT)
    s = rig.session(workers=1)
    marker = _marker()
    sleep = f"sleep 1000.{marker}"
    script = f"setsid {sleep} & ({sleep} &) ; setsid sh -c '({sleep} &)' ; exec {sleep}"
    t = s.executable(["sh", "-c", script], timeout=1.0, retries=0)
    ends([t], END[backend], "submit")
    assert isinstance(t.exception(), pilotfish.TaskTimeout), repr(t.exception())
    assert not _marked(marker), "left by the program, after its timeout"
    rig.close(s)


def test_a_task_that_hangs_every_time_is_retried_once(rig: Rig, backend: str) -> None:
    """A hang tends to repeat (issue 25 item 17: with timeout=3600 and the default 3
    retries, 4 hours went by before the user heard): a timed-out call is retried once by
    default, then fails TIMEOUT, its last attempt's note saying why, though retries are
    left; its body ran once per started attempt; other tasks are not held up."""
    skip_on(backend, "fake", reason=FAKE_NO_KILL)
    if backend == "dask":
        rig.cluster(workers=2)
    s = rig.session(workers=2)
    count = rig.path("count")
    t = s.submit(pilotfish.task(fm.record_then_hang, timeout=1.0), count, 1000.0)
    ok = s.submit(fm.record, rig.path("count-ok"), 5)
    ends([t, ok], END[backend] + 10, "submit")
    assert ok.result() == 5
    assert isinstance(t.exception(), pilotfish.TaskTimeout), repr(t.exception())
    assert [a.outcome for a in t.attempts] == ["timeout", "timeout"], t.attempts
    note = t.attempts[-1].note or ""
    assert "not retried: timed out 2 times (timeout_retries=1" in note, t.attempts[-1]
    rig.close(s)
    check_runs(t, count)


def test_a_task_that_closes_its_stdio_breaks_no_later_task(rig: Rig, backend: str) -> None:
    """A Python task closes file descriptors 0-2 (a library that daemonizes itself);
    issue 22 item 11: the next, innocent task on that worker failed with ``OSError: Bad
    file descriptor`` when it printed. Every attempt starts with the worker's stdio as it
    was: the innocent task prints and succeeds, on the same worker."""
    skip_on(backend, "fake", reason=FAKE_NO_PROCESS + ": the task would close the test's stdio")
    if backend == "dask":
        rig.cluster(workers=1)
    s = rig.session(workers=1)
    c1, c2 = rig.path("count-close"), rig.path("count-say")
    bad = s.submit(fm.close_stdio, c1)
    assert bad.result(timeout=END[backend]) == "closed"
    good = s.submit(fm.say, c2, "still here")
    assert good.result(timeout=END[backend]) == "still here"
    rig.close(s)
    assert good.attempts[0].worker == bad.attempts[0].worker  # the same worker
    if backend != "radical":  # RP's worker forks a process per task; the others reuse one
        assert good.attempts[0].pid == bad.attempts[0].pid
    check_runs(bad, c1)
    check_runs(good, c2)


def test_a_program_that_swaps_its_stderr_for_a_fifo(rig: Rig, backend: str) -> None:
    """A program replaces its own ``stderr.txt`` with a FIFO and exits 1 (issue 22 item 12:
    the worker blocked opening it to quote its tail; the task and the session never
    ended). The task ends COMMAND_FAILED at once, and the message says stderr was not
    read because it is not a regular file; the worker keeps working."""
    s = rig.session(workers=1)
    t = s.executable(["sh", "-c", "rm stderr.txt && mkfifo stderr.txt && exit 1"], retries=0)
    ends([t], END[backend], "submit")
    exc = t.exception()
    assert isinstance(exc, pilotfish.CommandFailed), repr(exc)
    assert exc.failure is not None and exc.failure.returncode == 1
    assert "not a regular file" in str(exc) and "FIFO" in str(exc), str(exc)
    after = s.submit(fm.record, rig.path("count-after"), 4)
    assert after.result(timeout=END[backend]) == 4
    rig.close(s)
