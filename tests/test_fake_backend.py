"""Session + workflow core + attempt ledger, with the in-memory FakeBackend.

No processes: attempts run in threads of this process, and the races real
backends meet by chance are scripted exactly (see pilotfish.backends.fake).
Each test says which real-world failure it reproduces; each runs in well under
a second.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import pilotfish
from pilotfish import Category, State
from pilotfish.backends.base import Alive, Result, Started
from pilotfish.backends.fake import (
    DuplicateResult,
    FakeBackend,
    GoSilent,
    LoseMaster,
    LoseWorker,
    Reexecute,
)
from pilotfish.core.policy import NO_BACKOFF, Silence

pytestmark = pytest.mark.timeout(10)

CALLS: list[Any] = []
GATE = threading.Event()


def counted(x: int) -> int:
    """Returns how many times it was called so far: each run has its own value."""
    CALLS.append(x)
    return len(CALLS)


def gated(x: int) -> int:
    GATE.wait(5)
    return x


def boom(x: int) -> int:
    raise KeyError(x)


@pytest.fixture(autouse=True)
def _reset() -> Any:
    CALLS.clear()
    GATE.clear()
    yield
    GATE.set()  # never leave a fake worker thread waiting


def session(tmp_path: Any, fake: FakeBackend, **kw: Any) -> pilotfish.Session:
    kw.setdefault("backoff", NO_BACKOFF)
    return pilotfish.Session(backend=fake, rundir=str(tmp_path), journal=None, **kw)


def fake_backend(tmp_path: Any, *faults: Any, **kw: Any) -> FakeBackend:
    return FakeBackend(faults=faults, rundir=str(tmp_path), **kw)


def until(cond: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


# --------------------------------------------------------------------------- no fault


def test_values_dependencies_errors_and_map(tmp_path: Any) -> None:
    """Without faults the fake is a complete backend: values, dependencies, the user's own
    exception with its remote traceback, map; every attempt ran once, in order."""
    fake = fake_backend(tmp_path, workers=2)
    with session(tmp_path, fake) as s:
        a = s.submit(pow, 2, 10)
        b = s.submit(sum, [a, a])
        bad = s.submit(boom, 7)
        assert list(s.map(abs, [-1, -2])) == [1, 2]
    assert (a.result(), b.result()) == (1024, 2048)
    with pytest.raises(KeyError) as ei:
        bad.result()
    assert "boom" in "".join(ei.value.__notes__) or "boom" in str(bad.failure.traceback)
    assert bad.failure.category is Category.USER_ERROR
    assert sorted(fake.ran) == [1, 2, 3, 4, 5]
    assert fake.refused == [] and fake.dropped == []
    assert s.processes() == {"master": None, "workers": []}


# --------------------------------------------------------------------------- worker loss


def test_worker_killed_while_running_is_retried(tmp_path: Any) -> None:
    """The OOM killer SIGKILLs a worker in the middle of a task: the attempt is WORKER_LOST
    with the signal named, the task runs again on the replacement, and the worker event
    names the task it held."""
    events: list[Any] = []
    fake = fake_backend(tmp_path, LoseWorker(attempt=1, returncode=-9, stderr_tail="oom"))
    with session(tmp_path, fake, on_event=events.append) as s:
        t = s.submit(counted, 1)
    assert t.result() == 1  # the user code ran once: on the replacement worker
    first, second = t.attempts
    assert first.outcome == "worker_lost" and second.outcome == "done"
    assert first.failure is not None and first.failure.signal == "SIGKILL"
    assert "was killed by signal SIGKILL (-9)" in first.failure.message
    assert first.failure.stderr_tail == "oom"
    assert first.worker == "w1" and second.worker == "w2"
    (lost,) = [e for e in events if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost"]
    assert lost.held == (t.key,) and lost.signal == "SIGKILL"
    assert any(isinstance(e, pilotfish.WorkerEvent) and e.kind == "replaced" for e in events)


def test_task_that_kills_every_worker_is_poison(tmp_path: Any) -> None:
    """A task that segfaults every worker it runs on (a bad input crashing a C extension)
    is failed as poison after poison_after deaths, not retried forever, and the message
    lists each death."""
    faults = [LoseWorker(attempt=n, returncode=-11) for n in (1, 2, 3)]
    fake = fake_backend(tmp_path, *faults)
    with session(tmp_path, fake, poison_after=3) as s:
        t = s.submit(counted, 1)
    with pytest.raises(pilotfish.WorkerLost, match="poison"):
        t.result()
    assert t.failure is not None and t.failure.message.count("SIGSEGV") == 3
    assert CALLS == []  # the user code never ran to completion


def test_late_result_of_a_worker_declared_lost_is_dropped(tmp_path: Any) -> None:
    """A worker that was only slow (a long GC pause, a SIGSTOP) is declared lost; its
    result arrives after the retry started. The fence drops it: the task keeps the
    retry's value, recorded DONE exactly once."""
    events: list[Any] = []
    fake = fake_backend(tmp_path, LoseWorker(attempt=1, late_result=True))
    with session(tmp_path, fake, on_event=events.append) as s:
        t = s.submit(counted, 1)
    assert CALLS == [1, 1]  # attempt 1 ran (its result came late), attempt 2 ran
    assert t.result() == 2  # the retry's value, not the late one
    late = [e for e in fake.delivered if isinstance(e, Result) and e.attempt == 1]
    assert len(late) == 1  # it was delivered, after Started of attempt 2...
    order = [(type(e).__name__, e.attempt) for e in fake.delivered if hasattr(e, "attempt")]
    assert order.index(("Result", 1)) > order.index(("Started", 2))
    done = [e for e in events if isinstance(e, pilotfish.TaskEvent) and e.finish is State.DONE]
    assert len(done) == 1  # ...and dropped by the fence
    assert [a.outcome for a in t.attempts] == ["worker_lost", "done"]


# --------------------------------------------------------------------------- results


def test_duplicate_result_is_recorded_once(tmp_path: Any) -> None:
    """A result resent after a reconnect arrives twice: the task is DONE once, with that
    value; the second copy is dropped."""
    events: list[Any] = []
    fake = fake_backend(tmp_path, DuplicateResult(attempt=1))
    with session(tmp_path, fake, on_event=events.append) as s:
        t = s.submit(counted, 1)
    assert t.result() == 1
    assert [e.attempt for e in fake.delivered if isinstance(e, Result)] == [1, 1]
    done = [e for e in events if isinstance(e, pilotfish.TaskEvent) and e.finish is State.DONE]
    assert len(done) == 1
    assert len(t.attempts) == 1


def test_engine_reexecution_after_finish_is_refused(tmp_path: Any) -> None:
    """Dask re-runs a finished task whose worker died while holding its result (it re-ran
    26 of 200 in our measurement): the ledger's start fence refuses, user code runs once."""
    fake = fake_backend(tmp_path, Reexecute(attempt=1), workers=2)
    with session(tmp_path, fake) as s:
        t = s.submit(counted, 1)
    assert t.result() == 1 and CALLS == [1]
    assert fake.ran == [1]
    ((aid, why),) = fake.refused
    assert aid == 1 and "not in flight" in why


def test_engine_reexecution_while_running_is_refused(tmp_path: Any) -> None:
    """An engine starts a second copy of a running task on another worker (work stealing,
    a resubmission after a lost heartbeat): the fence refuses the copy."""
    fake = fake_backend(tmp_path, Reexecute(attempt=1, while_running=True), workers=2)
    with session(tmp_path, fake) as s:
        t = s.submit(counted, 1)
    assert t.result() == 1 and CALLS == [1]
    ((aid, why),) = fake.refused
    assert aid == 1 and f"already started on {t.attempts[0].worker}" in why


# --------------------------------------------------------------------------- master loss


def test_master_lost_started_is_runtime_lost_queued_is_resent(tmp_path: Any) -> None:
    """The master is OOM-killed with one task running and two queued: the running one is
    RUNTIME_LOST and retried, the queued ones are sent again to the restarted master
    without blame (one attempt each)."""
    events: list[Any] = []
    fake = fake_backend(tmp_path, LoseMaster(attempt=1))
    with session(tmp_path, fake, on_event=events.append) as s:
        ts = [s.submit(counted, i) for i in range(3)]
    assert sorted(t.result() for t in ts) == [1, 2, 3]
    assert [a.outcome for a in ts[0].attempts] == ["runtime_lost", "done"]
    assert ts[0].attempts[0].failure is not None
    assert "fake master" in ts[0].attempts[0].failure.message
    assert [len(t.attempts) for t in ts[1:]] == [1, 1]
    kinds = [e.kind for e in events if isinstance(e, pilotfish.MasterEvent)]
    assert kinds == ["started", "lost", "restarted"]


def test_master_lost_for_good_fails_every_unfinished_task(tmp_path: Any) -> None:
    """The scheduler dies and is not restarted (max_master_restarts used up): every
    unfinished task fails RuntimeLost at once, none hangs, the session returns."""
    fake = fake_backend(tmp_path, LoseMaster(attempt=1, restart=False))
    with session(tmp_path, fake) as s:
        a = s.submit(counted, 1)
        b = s.submit(counted, 2)
        c = s.submit(sum, [a, b])
    for t in (a, b, c):
        with pytest.raises(pilotfish.RuntimeLost):
            t.result()
    assert CALLS == []


# --------------------------------------------------------------------------- silence


def test_silent_backend_does_not_hang_shutdown(tmp_path: Any) -> None:
    """The scheduler's node drops off the network: no events, no EOF, no exit code. The
    with-block still ends, after heartbeat_timeout, with the unfinished tasks (and their
    dependents) RuntimeLost, and a message naming the backend and what to check."""
    events: list[Any] = []
    fake = fake_backend(tmp_path, GoSilent(attempt=2))
    with session(
        tmp_path, fake, heartbeat_interval=0.02, heartbeat_timeout=0.1, on_event=events.append
    ) as s:
        ok = s.submit(counted, 1)
        until(ok.done)
        stuck = s.submit(counted, 2)
        after = s.submit(sum, [stuck])
    assert ok.result() == 1
    for t in (stuck, after):
        with pytest.raises(pilotfish.RuntimeLost, match="fake backend sent nothing") as ei:
            t.result()
        assert "heartbeat_timeout=0.1" in str(ei.value)
        assert "still running and reachable" in str(ei.value)
    assert stuck.failure is not None and stuck.failure.category is Category.RUNTIME_LOST
    assert [e.kind for e in events if isinstance(e, pilotfish.MasterEvent)][-1] == "lost"
    assert any(isinstance(e, Started) and e.attempt == 2 for e in fake.swallowed)


@pytest.mark.parametrize("alive_interval", [0.02, None], ids=["alive", "no-alive"])
def test_long_task_on_a_healthy_backend_is_not_silence(
    tmp_path: Any, alive_interval: float | None
) -> None:
    """A task runs longer than heartbeat_timeout while the session waits at shutdown. A
    backend that sends Alive is heard; one that never sent it (Dask, RADICAL-Pilot today)
    is not held to the rule: either way the task finishes with its value."""
    fake = fake_backend(tmp_path, alive_interval=alive_interval)
    threading.Timer(0.3, GATE.set).start()
    with session(tmp_path, fake, heartbeat_interval=0.02, heartbeat_timeout=0.1) as s:
        t = s.submit(gated, 5)
    assert t.result() == 5
    assert any(isinstance(e, Alive) for e in fake.delivered) is (alive_interval is not None)


def test_silence_rule() -> None:
    """The rule alone: no limit before the first Alive, then silence past the limit."""
    s = Silence(limit=1.0)
    s.heard(0.0)
    assert s.silent_for(100.0) is None  # never sent Alive: never timed out
    s.heard(10.0, alive=True)
    assert s.silent_for(10.5) is None
    s.heard(11.0)  # any event counts as a sign of life
    assert s.silent_for(11.9) is None
    assert s.silent_for(12.5) == pytest.approx(1.5)


# --------------------------------------------------------------------------- time, cancel


def test_timeout_is_reported_and_the_late_result_dropped(tmp_path: Any) -> None:
    """A task hangs past its timeout (a stuck file system): it fails TIMEOUT at the
    deadline; when the user code returns at last, its result is dropped by the ledger."""
    fake = fake_backend(tmp_path)
    with session(tmp_path, fake) as s:
        t = s.submit(pilotfish.task(gated, timeout=0.05, retries=0), 1)
        with pytest.raises(pilotfish.TaskTimeout, match="exceeded its timeout"):
            t.result()
        GATE.set()
        until(lambda: fake.ran == [1])
    until(lambda: bool(fake.dropped))
    assert fake.dropped[0][0] == 1


def test_cancel_of_a_queued_task_withdraws_it(tmp_path: Any) -> None:
    """The user cancels work queued behind a long task: it is withdrawn from the backend
    and never starts."""
    fake = fake_backend(tmp_path)
    with session(tmp_path, fake) as s:
        first = s.submit(gated, 1)
        until(first.running)
        queued = s.submit(counted, 2)
        assert queued.cancel()
        GATE.set()
    assert first.result() == 1 and queued.cancelled()
    assert fake.ran == [1] and CALLS == []


def test_preflight_travels_as_a_probe(tmp_path: Any) -> None:
    """Pre-flight checks go to a worker as an attempt with a negative id, which a backend
    runs like any other; the session answers the probe, not the workflow core."""
    fake = fake_backend(tmp_path)
    with session(tmp_path, fake) as s:
        checks = s.preflight(["pytest"], ["sh"])
        t = s.submit(counted, 1)
    assert all(c.ok for c in checks), [c.message() for c in checks if not c.ok]
    assert fake.ran == [-1, 1] and t.result() == 1
