"""The RADICAL-Pilot raptor backend on a real ``local.localhost`` pilot (no mocks).

Skipped unless radical.pilot is importable (``pip install 'pilotfish[radical]'``). One
pilot (conftest's ``rp_pilot``) is shared by the test run; every test starts its own
pilotfish raptor master and workers on it and must end them. These are the failures
RADICAL-Pilot alone loses or truncates; the conformance suite (test_callables.py,
test_commands.py with ``--backends radical``) covers the common semantics.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from pilotfish.core.policy import Backoff

rp = pytest.importorskip("radical.pilot")

from conftest import TOKEN_VAR, pid_alive, wait_for, with_env  # noqa: E402
from pilotfish.backends.radical.backend import RadicalBackend  # noqa: E402

pytestmark = [
    pytest.mark.timeout(240),
    # RP's zmq sockets/contexts are garbage-collected unclosed in RP's own threads
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture
def make(rp_pilot: Any, tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[pilotfish.Session, RadicalBackend]] = []

    def mk(workers: int = 2, **kw: Any) -> pilotfish.Session:
        rundir = str(tmp_path / f"run{len(made)}")
        b = RadicalBackend(
            workers,
            pilot=rp_pilot[0],
            task_manager=rp_pilot[1],
            rundir=rundir,
            max_master_restarts=kw.pop("max_master_restarts", 3),
            heartbeat_timeout=kw.pop("heartbeat_timeout", 10.0),
        )
        kw.setdefault("backoff", Backoff(base=0.01))
        s = pilotfish.Session(backend=b, rundir=rundir, **kw)
        made.append((s, b))
        return s

    yield mk
    for s, b in made:
        procs = b.processes()
        s.shutdown(wait=True, cancel_futures=True)
        pids = [p for p in [procs["master"], *procs["workers"]] if p]
        wait_for(lambda pids=pids: not [p for p in pids if pid_alive(p)], timeout=15, interval=0.1)


# ---------------------------------------------------------------- task functions


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


class Oops(Exception):
    pass


def raise_oops(x: int) -> None:
    def inner() -> None:
        raise Oops(f"bad value {x}")

    inner()


def return_lock() -> Any:
    return threading.Lock()


def slow_once(marker: str) -> int:
    if not os.path.exists(marker):
        Path(marker).write_text("x")
        time.sleep(120)
    return 42


def sleep_long() -> None:
    time.sleep(120)


# ---------------------------------------------------------------- tests


def test_values_and_dependencies(make: Any) -> None:
    with make() as s:
        a = s.submit(square, 3)
        b = s.submit(square, 4)
        c = s.submit(add, a, b)
        assert c.result(timeout=120) == 25
        assert list(s.map(square, range(5), timeout=120)) == [0, 1, 4, 9, 16]


def test_user_exception_type_and_traceback(make: Any) -> None:
    with make() as s:
        t = s.submit(raise_oops, 7)
        with pytest.raises(Oops, match="bad value 7"):
            t.result(timeout=120)
        f = t.failure
        assert f is not None and f.category == pilotfish.Category.USER_ERROR
        assert "inner" in (f.traceback or "") and "raise_oops" in (f.traceback or "")


def test_unpicklable_result_is_user_error(make: Any) -> None:
    # RP alone loses this task forever (it stays AGENT_SCHEDULING)
    with make() as s:
        t = s.submit(return_lock)
        with pytest.raises(TypeError, match="lock"):
            t.result(timeout=120)
        assert t.failure is not None and t.failure.category == pilotfish.Category.USER_ERROR
        assert "could not be pickled" in t.failure.message
        assert len(t.attempts) == 1  # not retried, no worker lost
        assert s.submit(square, 6).result(timeout=120) == 36  # the worker is fine


def test_program_exit_3_full_stderr(make: Any) -> None:
    with make() as s:
        t = s.executable(
            [
                "sh",
                "-c",
                "i=0; while [ $i -lt 300 ]; do echo line-$i-xxxxxxxx >&2; i=$((i+1)); done; exit 3",
            ],
        )
        with pytest.raises(pilotfish.CommandFailed):
            t.result(timeout=120)
        f = t.failure
        assert f is not None and f.returncode == 3 and f.stderr_path
        err = Path(f.stderr_path).read_text()
        assert len(err) > 1024 and err.startswith("line-0-") and "line-299-" in err
        assert f.sandbox and Path(f.sandbox).is_dir()  # failed sandboxes are kept


def test_worker_sigkill_mid_task_is_lost_then_retried(make: Any, tmp_path: Path) -> None:
    # RP alone never fails the in-flight task of a killed worker
    marker = str(tmp_path / "marker")
    events: list[Any] = []
    with make(on_event=events.append) as s:
        t = s.submit(slow_once, marker)
        wait_for(lambda: os.path.exists(marker), timeout=120, interval=0.05)
        backend = s._backend
        held = wait_for(lambda: backend.processes()["held"], timeout=30, interval=0.05)
        (pid,) = held.values()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert t.result(timeout=120) == 42
        took = time.monotonic() - t0
        first = t.attempts[0]
        assert first.failure is not None
        assert first.failure.category == pilotfish.Category.WORKER_LOST
        assert len(t.attempts) == 2
        print(f"worker SIGKILL -> done on retry in {took:.2f} s")


def test_master_killed_is_runtime_lost_quickly(make: Any) -> None:
    with make(max_master_restarts=0) as s:
        t = s.submit(sleep_long)
        backend = s._backend
        wait_for(lambda: backend.processes()["held"], timeout=120, interval=0.05)
        master = backend.processes()["master"]
        t0 = time.monotonic()
        os.kill(master, signal.SIGKILL)
        with pytest.raises(pilotfish.RuntimeLost) as ei:
            t.result(timeout=60)
        took = time.monotonic() - t0
        assert took < 15, took
        assert "master" in str(ei.value) and "sandbox" in str(ei.value)
        print(f"master SIGKILL -> RuntimeLost in {took:.2f} s")


@pytest.mark.timeout(300)
def test_own_pilot_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend's own RP session and pilot: nothing survives the Session."""
    monkeypatch.delenv(TOKEN_VAR)  # our own check below is stricter: the backend's token
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    b = RadicalBackend(1, rundir=str(tmp_path / "run"), cores=4)
    t0 = time.monotonic()
    with pilotfish.Session(backend=b, rundir=str(tmp_path / "run")) as s:
        started = time.monotonic() - t0
        assert s.submit(square, 5).result(timeout=120) == 25
        wait_for(lambda: b.processes()["master"] and b.processes()["workers"], timeout=30)
        pids = [p for p in [b.processes()["master"], *b.processes()["workers"]] if p]
    closed = time.monotonic() - t0
    left = with_env("PILOTFISH_RP_TOKEN", b._token)
    assert not left, [" ".join(p.cmdline()) for p in left]
    assert not [p for p in pids if pid_alive(p)]
    print(f"own pilot: start {started:.1f} s, start+task+close {closed:.1f} s")
