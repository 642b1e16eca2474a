"""Session as a drop-in ``concurrent.futures.Executor`` (issue 14): what CPython's own
tests (test_cpython_executor.py) do not cover, or cover only for threads and pools.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest

import pilotfish
from conftest import fake_session
from executor_tasks import (
    ErrorAtUnpickle,
    ExitAtUnpickle,
    Payload,
    init,
    init_fails,
    make,
    sleep_then,
    state,
    write_pid_then_sleep,
)

pytestmark = pytest.mark.timeout(120)
TESTS = str(Path(__file__).resolve().parent)


def _session(tmp_path: Path, **kw: object) -> pilotfish.Session:
    kw.setdefault("backoff", pilotfish.Backoff(base=0.01))
    return pilotfish.Session(rundir=str(tmp_path / "run"), **kw)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_shutdown_no_wait_returns_at_once_and_runs_10000_queued(tmp_path: Path) -> None:
    """Two gate tasks wait for a file the test writes only after shutdown(wait=False)
    returned, so work is still pending then however fast the workers are (with 10,000
    no-ops alone, a fast machine finished them all before the check: a race)."""
    from executor_tasks import wait_for_file

    gate = tmp_path / "shutdown-returned"
    s = _session(tmp_path, workers=2)
    gates = [s.submit(wait_for_file, str(gate), 60.0) for _ in range(2)]
    fs = [s.submit(abs, -i) for i in range(10_000)]
    master = s.processes()["master"]
    s.shutdown(wait=False)
    # it returned before the work was done (it did not wait for the gates and 10,000 tasks)
    pending = sum(not f.done() for f in [*gates, *fs])
    gate.touch()
    with pytest.raises(RuntimeError, match="cannot schedule new futures"):
        s.submit(abs, 1)
    assert [f.result(timeout=60) for f in fs] == list(range(10_000))
    assert pending > 0, "shutdown(wait=False) waited until every task was done"
    assert [g.result(timeout=60) for g in gates] == [True, True], "a gate timed out"
    # the backend is stopped once the work is done, without anyone waiting for it
    closer = [t for t in threading.enumerate() if t.name == "pilotfish-shutdown"]
    for th in closer:
        th.join(30)
    assert not _alive(master), "the master was stopped (and reaped) by the closing thread"


def test_shutdown_no_wait_then_map_iterates_everything(tmp_path: Path) -> None:
    """The client's map iterator outlives shutdown(wait=False) (FakeBackend: nothing here
    is a worker's; the test above stops a local master the same way)."""
    s = fake_session(tmp_path / "run", workers=2)
    res = s.map(sleep_then, range(6), [0.2] * 6)
    s.shutdown(wait=False)
    assert list(res) == list(range(6))


def _run_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, *sys.path])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_pending_work_runs_at_interpreter_exit(tmp_path: Path) -> None:
    """No shutdown at all: the script ends, and every submitted task still runs."""
    out = _run_script(
        """
        import pilotfish
        from executor_tasks import say, sleep_then
        s = pilotfish.Session(2, rundir="run")
        for i in range(20):
            s.submit(say, "done", i)
        s.submit(sleep_then, None, 0.5)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split("\n")[:-1]) == sorted(f"done {i}" for i in range(20))
    status = subprocess.run(
        [sys.executable, "-m", "pilotfish.tools.cli", "status", "--rundir", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "(finished)" in status.stdout, status.stdout + status.stderr
    assert [
        ln.split()[-1] for ln in status.stdout.splitlines() if ln.strip().startswith("done")
    ] == ["21"], status.stdout


def test_shutdown_no_wait_at_script_end_finishes_the_work(tmp_path: Path) -> None:
    out = _run_script(
        """
        import pilotfish
        from executor_tasks import say, sleep_then
        s = pilotfish.Session(2, rundir="run")
        for i in range(5):
            s.submit(say, "apple", i)
        s.submit(sleep_then, None, 1.0)
        s.shutdown(wait=False)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == [f"apple {i}" for i in range(5)]
    assert "Traceback" not in out.stderr


def test_cancel_futures_at_exit_is_explicit(tmp_path: Path) -> None:
    """shutdown(wait=False, cancel_futures=True): what has not started is cancelled, and
    the process exits without running it."""
    out = _run_script(
        """
        import pilotfish, time
        from executor_tasks import sleep_then
        s = pilotfish.Session(1, rundir="run")
        fs = [s.submit(sleep_then, i, 0.3) for i in range(30)]
        t = time.monotonic()
        s.shutdown(wait=False, cancel_futures=True)
        print(sum(f.cancelled() for f in fs) >= 25)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("result_cls", [ExitAtUnpickle, ErrorAtUnpickle])
def test_result_that_raises_when_unpickled(tmp_path: Path, result_cls: type) -> None:
    """SystemExit (or an error) raised while the client unpickles a result fails that
    task as a user error; the session goes on."""
    with _session(tmp_path, workers=1) as s:
        bad = s.submit(make, result_cls)
        with pytest.raises(pilotfish.RemoteError, match="could not be unpickled"):
            bad.result(timeout=30)
        assert bad.failure is not None
        assert bad.failure.category is pilotfish.Category.USER_ERROR
        assert "raised while unpickling" in bad.failure.message
        assert s.submit(pow, 6, 2).result(timeout=20) == 36
        assert len(bad.attempts) == 1  # permanent: not retried


def test_finished_results_are_freed(tmp_path: Path) -> None:
    with _session(tmp_path, workers=2) as s:
        refs = []
        for obj in s.map(make, [Payload] * 20):
            refs.append(weakref.ref(obj))
            del obj
        gc.collect()
        assert all(r() is None for r in refs)
        kept = s.submit(make, Payload)
        kept.result(timeout=30)
        assert kept in s.tasks  # held by the user: still there
        fs = [s.submit(abs, i) for i in range(300)]
        pilotfish.wait(fs)
        del fs
        gc.collect()
        assert len(s.tasks) == 1  # only `kept`
        assert s.counts()["DONE"] == 321  # records stay
        failing = s.submit(init_fails)
        pilotfish.wait([failing])
        del failing
        gc.collect()
        assert len(s.failures()) == 1  # its record outlives the Task


def test_dropped_session_is_collected_and_stops(tmp_path: Path) -> None:
    before = {t.ident for t in threading.enumerate()}
    s = _session(tmp_path, workers=2)
    assert list(s.map(abs, range(-3, 3))) == [3, 2, 1, 0, 1, 2]
    procs = s.processes()
    pids = [procs["master"], *procs["workers"]]
    ref = weakref.ref(s)
    del s
    gc.collect()
    assert ref() is None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        any(_alive(p) for p in pids) or {t.ident for t in threading.enumerate()} - before
    ):
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert not left, left


def test_dropped_session_with_pending_work_finishes_it(tmp_path: Path) -> None:
    """Like concurrent.futures: dropping every reference does not drop the work; the
    session is stopped when the garbage collector finds it idle."""
    out = tmp_path / "out"
    s = _session(tmp_path, workers=1)
    s.submit(sleep_then, None, 0.3)
    s.submit(Path(out).write_text, "written")
    pids = [s.processes()["master"]]
    ref = weakref.ref(s)
    del s
    gc.collect()
    assert ref() is not None  # busy: it keeps itself alive
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not out.exists():
        time.sleep(0.05)
    assert out.read_text() == "written"
    while time.monotonic() < deadline and ref() is not None:
        time.sleep(0.05)
        gc.collect()
    assert ref() is None
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_initializer_runs_once_per_worker_and_in_replacements(tmp_path: Path) -> None:
    log = tmp_path / "init.log"
    pidfile = tmp_path / "pid"
    with _session(tmp_path, workers=2, initializer=init, initargs=("ready", str(log))) as s:
        results = [f.result(timeout=60) for f in [s.submit(state) for _ in range(20)]]
        assert {v for v, _ in results} == {"ready"}
        pids = {p for _, p in results}
        victim = s.submit(write_pid_then_sleep, str(pidfile), 30)
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        value, pid = victim.result(timeout=60)  # retried on the replacement worker
        assert value == "ready"
        assert len(victim.attempts) == 2
        inits = [int(x) for x in log.read_text().split()]
        assert len(inits) == len(set(inits))  # once per worker process
        assert pids <= set(inits) and pid in inits


def test_failing_initializer_is_environment_with_traceback(tmp_path: Path) -> None:
    with _session(tmp_path, workers=2, initializer=init_fails) as s:
        fs = [s.submit(state) for _ in range(4)]
        pilotfish.wait(fs, timeout=60)
        for f in fs:
            with pytest.raises(pilotfish.EnvironmentMismatch, match="initializer init_fails"):
                f.result()
            assert f.failure is not None
            assert f.failure.category is pilotfish.Category.ENVIRONMENT
            assert "ValueError: error in initializer" in (f.failure.traceback or "")
            assert len(f.attempts) == 1  # permanent: no loop of retries or restarts


def test_initializer_arguments_are_checked_at_construction(tmp_path: Path) -> None:
    with pytest.raises(pilotfish.InvalidTask, match="initializer"):
        pilotfish.Session(1, rundir=str(tmp_path / "a"), initializer=42)  # type: ignore[arg-type]
    with pytest.raises(pilotfish.InvalidTask, match=r"cannot be pickled|initargs"):
        pilotfish.Session(
            1, rundir=str(tmp_path / "b"), initializer=init, initargs=(threading.Lock(),)
        )
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        pilotfish.Session(max_workers=0, rundir=str(tmp_path / "c"))
    with pytest.raises(pilotfish.InvalidTask, match="give one of them"):
        pilotfish.Session(2, max_workers=2, rundir=str(tmp_path / "d"))


def test_map_chunksize_batches_calls(tmp_path: Path) -> None:
    """map(chunksize=) is the client's batching (FakeBackend; chunks on the local and Dask
    workers: test_callables.py::test_initializer_state_is_seen_by_tasks)."""
    with fake_session(tmp_path / "run", workers=2) as s:
        assert list(s.map(pow, range(10), range(10), chunksize=4)) == [pow(i, i) for i in range(10)]
        assert len(s.tasks) == 0 or all(t.name == "pow[chunk]" for t in s.tasks)
        it = s.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], chunksize=2)
        assert next(it) == (0, 1)
        assert next(it) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(it)
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="chunksize must be >= 1"):
                s.map(pow, [1], [1], chunksize=bad)  # type: ignore[arg-type]
        before = s.counts().get("DONE", 0)
        assert list(s.map(abs, range(100), chunksize=25)) == list(range(100))
        assert s.counts()["DONE"] - before == 4  # 100 calls in 4 attempts
