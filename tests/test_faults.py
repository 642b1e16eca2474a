"""Fault injection on the local backend: workers and masters die, hang and time out.

Every test is bounded in time and the autouse fixture in conftest.py fails it if
any process it started survives.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import psutil
import pytest

import faulty
import pilotfish
from conftest import wait_for
from pilotfish import Category, State


def _pid_from(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text(), timeout=20))


@pytest.fixture
def events() -> list[object]:
    return []


@pytest.fixture
def fs(tmp_path: Path, events: list[object]):  # type: ignore[no-untyped-def]
    with pilotfish.Session(
        workers=2,
        rundir=str(tmp_path / "run"),
        heartbeat_interval=0.25,
        heartbeat_timeout=2.0,
        on_event=events.append,
        backoff=pilotfish.Backoff(base=0.01),
    ) as s:
        yield s


def test_sigkill_worker_mid_task_is_retried_elsewhere(
    fs: pilotfish.Session, tmp_path: Path, events: list[object]
) -> None:
    """The OOM killer or a node failure SIGKILLs a worker mid-task: the attempt it held is
    reported lost at once (signal named), the worker replaced, the task retried and done."""
    pidfile = tmp_path / "pid"
    t = fs.submit(faulty.write_pid_then_sleep, str(pidfile), 1.0, 42)
    pid = _pid_from(pidfile)
    pidfile.unlink()
    os.kill(pid, signal.SIGKILL)
    assert t.result(timeout=30) == 42
    assert len(t.attempts) == 2
    first, second = t.attempts
    assert first.outcome == "worker_lost" and first.pid == pid
    assert first.failure is not None and first.failure.signal == "SIGKILL"
    assert "SIGKILL" in first.failure.message and first.failure.transient
    assert second.outcome == "done" and second.pid != pid
    lost = [e for e in events if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost"]
    assert len(lost) == 1 and lost[0].pid == pid and lost[0].held == (t.key,)
    assert any(isinstance(e, pilotfish.WorkerEvent) and e.kind == "replaced" for e in events)
    assert fs.submit(faulty.ident, 1).result(timeout=30) == 1


def test_os_exit_every_time_is_poison(fs: pilotfish.Session, events: list[object]) -> None:
    """A task that kills its worker every time (a native crash, `os._exit` in a library)
    is declared poison after poison_after=3 deaths; only it is blamed."""
    bad = fs.submit(faulty.exit_hard, 3)
    others = [fs.submit(faulty.slow, i, 0.05) for i in range(8)]
    with pytest.raises(pilotfish.WorkerLost) as info:
        bad.result(timeout=60)
    msg = str(info.value)
    assert "poison" in msg and msg.count("exit code 3") == 3
    assert "about to exit with 3" in msg  # the worker's own stderr
    assert len(bad.attempts) == 3
    assert info.value.failure is not None and not info.value.failure.transient
    assert [o.result(timeout=30) for o in others] == list(range(8))
    assert all(len(o.attempts) == 1 for o in others)
    lost = [e for e in events if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost"]
    assert len(lost) == 3 and all(e.held == (bad.key,) and e.returncode == 3 for e in lost)


def test_segfault_names_the_signal(fs: pilotfish.Session) -> None:
    """A segfault in native code (ctypes) is WORKER_LOST with SIGSEGV named."""
    t = fs.submit(pilotfish.task(faulty.segfault, retries=1))
    with pytest.raises(pilotfish.WorkerLost, match="SIGSEGV") as info:
        t.result(timeout=60)
    f = info.value.failure
    assert f is not None and f.signal == "SIGSEGV" and f.returncode == -11
    assert len(t.attempts) == 2 and t.failure is not None
    assert t.failure.category is Category.WORKER_LOST
    assert fs.submit(faulty.ident, 2).result(timeout=30) == 2


def test_sigstop_worker_detected_by_heartbeat(
    fs: pilotfish.Session, tmp_path: Path, events: list[object]
) -> None:
    """A stopped worker (SIGSTOP, a debugger) never answers: it is declared hung within
    about two heartbeat intervals, killed, replaced, and its task retried."""
    pidfile = tmp_path / "pid"
    t = fs.submit(faulty.write_pid_then_sleep, str(pidfile), 0.5, 7)
    pid = _pid_from(pidfile)
    pidfile.unlink()
    os.kill(pid, signal.SIGSTOP)
    assert t.result(timeout=30) == 7
    first = t.attempts[0]
    assert first.outcome == "worker_lost" and first.failure is not None
    assert "stopped" in first.failure.message and "hung" in first.failure.message
    lost = [e for e in events if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost"]
    assert lost and lost[0].pid == pid
    # "stopped" above: found by the kernel's process state within a heartbeat interval or
    # two, not by heartbeat_timeout (the fixture's is longer than this test's timeout)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_gil_holding_c_code_is_not_mistaken_for_a_hang(tmp_path: Path) -> None:
    """A long C call holding the GIL starves the worker's heartbeat thread; the kernel
    shows it burning CPU, so it must not be killed as hung."""
    with pilotfish.Session(
        workers=1, rundir=str(tmp_path / "r"), heartbeat_interval=0.1, heartbeat_timeout=0.5
    ) as s:
        t = s.submit(faulty.spin_in_c, 1.5)
        assert t.result(timeout=60) == 1
        assert len(t.attempts) == 1


def test_timeout_of_a_sleeping_task(fs: pilotfish.Session, events: list[object]) -> None:
    """timeout= stops the attempt by killing its worker; TaskTimeout states limit and
    elapsed time; the worker's loss names the task it was killed for (pilotfish run's
    progress line shows that message); the session keeps working."""
    t = fs.submit(pilotfish.task(faulty.slow, timeout=0.5, retries=0), 1, 30)
    with pytest.raises(pilotfish.TaskTimeout) as info:
        t.result(timeout=30)
    assert isinstance(info.value, TimeoutError)
    (a,) = t.attempts
    assert a.ended is not None and a.started is not None and a.ended - a.started >= 0.5
    assert "0.5 s" in str(info.value) and "ran" in str(info.value)
    f = info.value.failure
    assert f is not None and f.category is Category.TIMEOUT and f.transient
    assert fs.submit(faulty.ident, 3).result(timeout=30) == 3
    (lost,) = [e for e in events if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost"]
    assert f"attempt {a.id} of task {t.key!r} timed out" in lost.message


def test_timeout_is_retried_by_policy(fs: pilotfish.Session) -> None:
    """TIMEOUT is transient: `retries` applies."""
    t = fs.submit(pilotfish.task(faulty.slow, timeout=0.3, retries=1), 1, 30)
    with pytest.raises(pilotfish.TaskTimeout):
        t.result(timeout=30)
    assert [a.outcome for a in t.attempts] == ["timeout", "timeout"]


def test_worker_that_cannot_start(tmp_path: Path) -> None:
    """Workers that crash at start-up (bad interpreter or environment) are reported as
    ENVIRONMENT with their stderr after a bounded number of tries; nothing waits forever."""
    bad = tmp_path / "badpython"
    bad.write_text("#!/bin/sh\necho 'ImportError: libfoo.so: cannot open' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pilotfish.Session(workers=1, rundir=str(tmp_path / "r"), worker_python=str(bad)) as s:
        t = s.submit(faulty.ident, 1)
        with pytest.raises(pilotfish.EnvironmentMismatch, match=r"libfoo\.so") as info:
            t.result(timeout=30)
        assert "no worker could start" in str(info.value)


def test_master_killed_mid_run_restarts(tmp_path: Path) -> None:
    """The master dies mid-run (SIGKILL): a new master starts, in-flight tasks are
    resubmitted and finish; nothing hangs; its old workers do not survive it."""
    ev: list[object] = []
    with pilotfish.Session(workers=2, rundir=str(tmp_path / "r"), on_event=ev.append) as s:
        ts = [s.submit(faulty.slow, i, 0.3) for i in range(8)]
        wait_for(lambda: any(t.running() for t in ts))
        old = s.processes()
        os.kill(old["master"], signal.SIGKILL)
        assert [t.result(timeout=60) for t in ts] == list(range(8))
        assert any(a.outcome == "runtime_lost" for t in ts for a in t.attempts)
        new = s.processes()
        assert new["master"] != old["master"]
        for pid in old["workers"]:
            wait_for(
                lambda pid=pid: (
                    not psutil.pid_exists(pid)
                    or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                )
            )
    kinds = [e.kind for e in ev if isinstance(e, pilotfish.MasterEvent)]
    assert kinds == ["started", "lost", "restarted"]


def test_master_killed_without_restarts_fails_fast(tmp_path: Path) -> None:
    """max_master_restarts=0: a lost master fails in-flight and pending tasks with
    RuntimeLost within seconds."""
    with pilotfish.Session(workers=2, rundir=str(tmp_path / "r"), max_master_restarts=0) as s:
        ts = [s.submit(faulty.slow, i, 1.0) for i in range(4)]
        wait_for(lambda: any(t.running() for t in ts))
        os.kill(s.processes()["master"], signal.SIGKILL)
        for t in ts:
            with pytest.raises(pilotfish.RuntimeLost, match="SIGKILL"):
                t.result(timeout=10)
        late = s.submit(faulty.ident, 1)
        with pytest.raises(pilotfish.RuntimeLost):
            late.result(timeout=5)


@pytest.mark.timeout(60)
def test_local_backend_gone_silent_does_not_hang_shutdown(tmp_path: Path) -> None:
    """The local backend's event path wedges while a task runs (here: an on_event
    callback that blocks its reader thread; a bug could do the same): no event, no Alive
    gets through, and leaving the with-block ends about heartbeat_timeout later with
    RuntimeLost naming the backend, instead of never."""
    gate = threading.Event()

    def wedge(e: object) -> None:
        if threading.current_thread() is not threading.main_thread():
            gate.wait(60)  # the thread that delivers the backend's events is stuck here

    try:
        with pilotfish.Session(
            workers=1,
            rundir=str(tmp_path / "r"),
            heartbeat_interval=0.1,
            heartbeat_timeout=0.5,
            on_event=wedge,
        ) as s:
            t = s.submit(faulty.slow, 1, 30.0)
    finally:
        gate.set()
    with pytest.raises(pilotfish.RuntimeLost, match="the local backend sent nothing"):
        t.result()


def test_master_crashing_at_startup(tmp_path: Path) -> None:
    """A master that cannot start (e.g. a broken interpreter) fails tasks with
    RuntimeLost carrying the master's own stderr, instead of hanging."""
    bad = tmp_path / "badpython"
    bad.write_text("#!/bin/sh\necho 'Fatal Python error: init_import_site' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pilotfish.Session(workers=1, rundir=str(tmp_path / "r"), python=str(bad)) as s:
        t = s.submit(faulty.ident, 1)
        with pytest.raises(pilotfish.RuntimeLost, match="init_import_site") as info:
            t.result(timeout=30)
        assert "cannot be started" in str(info.value)


def test_master_hung_is_detected(tmp_path: Path) -> None:
    """A stopped master (SIGSTOP) is detected by the client's heartbeat watch, killed and
    replaced; the work finishes."""
    with pilotfish.Session(
        workers=1, rundir=str(tmp_path / "r"), heartbeat_interval=0.2, heartbeat_timeout=1.0
    ) as s:
        ts = [s.submit(faulty.slow, i, 0.2) for i in range(3)]
        wait_for(lambda: any(t.running() for t in ts))
        master = s.processes()["master"]
        os.kill(master, signal.SIGSTOP)
        assert [t.result(timeout=30) for t in ts] == [0, 1, 2]
        assert s.processes()["master"] != master


def test_orderly_shutdown_is_not_a_crash(tmp_path: Path) -> None:
    """Workers that exit because the session closes say so first: no 'lost' events."""
    ev: list[object] = []
    with pilotfish.Session(workers=2, rundir=str(tmp_path / "r"), on_event=ev.append) as s:
        s.submit(faulty.ident, 1).result(timeout=30)
        procs = s.processes()
    kinds = Counter(e.kind for e in ev if isinstance(e, pilotfish.WorkerEvent))
    assert kinds["stopped"] == 2 and kinds["lost"] == 0
    for pid in [procs["master"], *procs["workers"]]:
        wait_for(
            lambda pid=pid: (
                not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            )
        )


def test_client_killed_takes_master_and_workers_with_it(tmp_path: Path) -> None:
    """The user's script is SIGKILLed (or the login node session dies): the master and
    the workers it started exit on their own; nothing is orphaned."""
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = {sys.path!r}
        import pilotfish, faulty
        s = pilotfish.Session(workers=2, rundir={str(tmp_path / "r")!r})
        ts = [s.submit(faulty.slow, i, 30) for i in range(2)]
        p = s.processes()
        print(p["master"], *p["workers"], flush=True)
        time.sleep(60)
    """)
    )
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            pids = [int(x) for x in proc.stdout.readline().split()]
            assert len(pids) == 3
        finally:
            proc.kill()
            proc.wait()
    for pid in pids:
        wait_for(
            lambda pid=pid: (
                not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            ),
            timeout=10,
        )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_chaos_random_worker_kills(tmp_path: Path) -> None:
    """2,000 short tasks while a random worker is SIGKILLed every 200 ms: every task ends
    DONE exactly once, with the right value."""
    done_events: Counter[str] = Counter()

    def on_event(e: object) -> None:
        if isinstance(e, pilotfish.TaskEvent) and e.finish is State.DONE:
            done_events[e.key] += 1

    stop = threading.Event()
    kills = 0
    with pilotfish.Session(
        workers=2,
        rundir=str(tmp_path / "r"),
        on_event=on_event,
        poison_after=50,
        backoff=pilotfish.Backoff(base=0.01),
    ) as s:
        task = pilotfish.task(faulty.square_slowly, retries=50)

        def killer() -> None:
            nonlocal kills
            rng = random.Random(7)
            while not stop.wait(0.2):
                workers = s.processes()["workers"]
                if workers:
                    try:
                        os.kill(rng.choice(workers), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass

        th = threading.Thread(target=killer, daemon=True)
        th.start()
        try:
            ts = [s.submit(task, i) for i in range(2000)]
            values = [t.result(timeout=100) for t in ts]
        finally:
            stop.set()
            th.join()
        assert values == [i * i for i in range(2000)]
        assert all(t.state is State.DONE for t in ts)
        assert kills >= 5
        assert len(done_events) == 2000 and set(done_events.values()) == {1}
        assert sum(len(t.attempts) for t in ts) > 2000  # some were really retried
