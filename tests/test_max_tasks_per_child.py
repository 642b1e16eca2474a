"""``Session(max_tasks_per_child=K)`` on the local backend, with real processes.

A worker process runs at most K attempts, then retires in order (``stopped``, not
``lost``) and a fresh one takes its place, without losing or re-running any attempt.
Users ask for it for the reasons they ask ``ProcessPoolExecutor`` for it: a library
that leaks memory or file handles, or global state that must not outlive a few
tasks. Every test is bounded in time; the autouse fixture in conftest.py fails it if
any process it started survives.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from conftest import wait_for
from pilotfish import Category, State

pytestmark = pytest.mark.timeout(90)


# --------------------------------------------------------------------------- tasks


def pid_of(i: int) -> tuple[int, int]:
    return i, os.getpid()


def pid_or_raise(i: int) -> tuple[int, int]:
    if i % 3 == 1:
        raise ValueError(f"task {i} fails on purpose in pid {os.getpid()}")
    return i, os.getpid()


def logged(log: str, i: int, sleep: float = 0.0) -> tuple[int, int]:
    """Append ``i pid`` to ``log`` (one write, O_APPEND: whole lines), then sleep."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{i} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    time.sleep(sleep)
    return i, os.getpid()


def logged_then_die_once(log: str, marker: str, i: int) -> tuple[int, int]:
    """Like ``logged``; the first time, the worker is SIGKILLed 0.3 s into the task."""
    logged(log, i, 0.3)
    if not os.path.exists(marker):
        Path(marker).write_text("killed once")
        os.kill(os.getpid(), signal.SIGKILL)
    return i, os.getpid()


def sleepy_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def executions(log: Path) -> list[tuple[int, int]]:
    """(task number, pid) for every execution that started, in order."""
    if not log.exists():
        return []
    return [(int(a), int(b)) for a, b in (ln.split() for ln in log.read_text().splitlines())]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def events() -> list[Any]:
    return []


@pytest.fixture
def make(tmp_path: Path, events: list[Any]) -> Iterator[Any]:
    sessions: list[pilotfish.Session] = []

    def make(**kw: Any) -> pilotfish.Session:
        kw.setdefault("rundir", str(tmp_path / "run"))
        kw.setdefault("journal", None)
        kw.setdefault("heartbeat_interval", 0.25)
        kw.setdefault("heartbeat_timeout", 2.0)
        kw.setdefault("backoff", pilotfish.Backoff(base=0.01))
        s = pilotfish.Session(on_event=events.append, **kw)
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.shutdown(wait=True, cancel_futures=True)


def worker_events(events: list[Any], kind: str | None = None) -> list[Any]:
    return [
        e
        for e in events
        if isinstance(e, pilotfish.WorkerEvent) and (kind is None or e.kind == kind)
    ]


def runs(pids: list[int]) -> list[int]:
    """Lengths of the runs of equal consecutive pids: [a, a, a, b, b] -> [3, 2]."""
    out: list[int] = []
    for i, p in enumerate(pids):
        if i and p == pids[i - 1]:
            out[-1] += 1
        else:
            out.append(1)
    return out


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_value_is_rejected_naming_the_parameter(make: Any, bad: Any) -> None:
    """A mistaken user passes 0, a float or a string: Session() itself refuses it with
    InvalidTask (a ValueError) naming max_tasks_per_child and what to give instead."""
    with pytest.raises(pilotfish.InvalidTask, match=r"max_tasks_per_child=.*int >= 1.*None"):
        make(workers=1, max_tasks_per_child=bad)


def test_one_worker_is_replaced_every_k_tasks(make: Any, events: list[Any]) -> None:
    """workers=1, max_tasks_per_child=3, ten tasks: they run in order in groups of
    exactly 3, 3, 3, 1 per process; every result is right and every task ran once.
    Each retired worker is 'stopped' (saying why), never 'lost'; processes() shows the
    current worker, not the retired ones."""
    s = make(workers=1, max_tasks_per_child=3)
    tasks = [s.submit(pid_of, i) for i in range(10)]
    out = [t.result(timeout=60) for t in tasks]
    assert [i for i, _ in out] == list(range(10))
    pids = [p for _, p in out]
    assert runs(pids) == [3, 3, 3, 1] and len(set(pids)) == 4
    assert all(len(t.attempts) == 1 for t in tasks)
    wait_for(lambda: s.processes()["workers"] == [pids[-1]])
    assert worker_events(events, "lost") == []
    stopped = worker_events(events, "stopped")
    assert [e.pid for e in stopped] == pids[::3][:3]
    assert all("max_tasks_per_child=3" in e.message for e in stopped)
    assert len(worker_events(events, "replaced")) == 3


@pytest.mark.timeout(180)  # 25 worker start-ups: slow on a loaded 2-core machine
def test_two_workers_k2_fifty_tasks(make: Any, events: list[Any]) -> None:
    """workers=2, max_tasks_per_child=2, 50 tasks: no process runs more than 2, all 50
    results are right, each task has exactly one attempt, nothing is lost, and at the
    end the pool is two live workers."""
    s = make(workers=2, max_tasks_per_child=2)
    tasks = [s.submit(pid_of, i) for i in range(50)]
    out = [t.result(timeout=60) for t in tasks]
    assert [i for i, _ in out] == list(range(50))
    per_pid = Counter(p for _, p in out)
    assert max(per_pid.values()) <= 2 and len(per_pid) >= 25
    assert all(len(t.attempts) == 1 and t.state is State.DONE for t in tasks)
    assert worker_events(events, "lost") == []

    # a worker that ran its second task is retiring: the pool settles on two live ones
    def settled() -> list[int] | None:
        w = s.processes()["workers"]
        return w if len(w) == 2 and all(os.path.exists(f"/proc/{p}") for p in w) else None

    assert wait_for(settled, timeout=30, interval=0.05)


def test_failed_task_counts_as_a_task(make: Any, events: list[Any]) -> None:
    """A task that raises (a user error) ran on the worker: it counts toward the limit.
    workers=1, max_tasks_per_child=2, nine tasks of which three fail: the pids of all
    nine (failures report theirs in the message) come in groups of exactly two."""
    s = make(workers=1, max_tasks_per_child=2)
    tasks = [s.submit(pid_or_raise, i) for i in range(9)]
    pids = []
    for i, t in enumerate(tasks):
        exc = t.exception(timeout=60)
        if i % 3 == 1:
            assert isinstance(exc, ValueError) and t.failure is not None
            assert t.failure.category is Category.USER_ERROR
            pids.append(int(str(exc).split()[-1]))
        else:
            assert exc is None
            pids.append(t.result()[1])
        assert len(t.attempts) == 1
    assert runs(pids) == [2, 2, 2, 2, 1]
    assert worker_events(events, "lost") == []


def test_cancelled_task_is_not_counted(make: Any) -> None:
    """workers=1, max_tasks_per_child=3, the first task busy for a while: the user
    cancels task 1 (already prefetched by the worker) and task 3 (still queued). Neither
    runs nor counts: the first process runs tasks 0, 2 and 4, the next one 5 and 6."""
    s = make(workers=1, max_tasks_per_child=3)
    first = s.submit(sleepy_pid, 1.0)
    rest = [s.submit(pid_of, i) for i in range(1, 7)]
    wait_for(lambda: first.state is State.RUNNING, timeout=30)
    assert rest[0].cancel() and rest[2].cancel()
    p0 = first.result(timeout=60)
    got = {i: t.result(timeout=60)[1] for i, t in enumerate(rest, 1) if i not in (1, 3)}
    assert got[2] == got[4] == p0
    assert got[5] == got[6] != p0
    assert rest[0].cancelled() and rest[2].cancelled()
    assert rest[0].attempts == [] or all(a.outcome != "done" for a in rest[0].attempts)


def test_worker_killed_while_retiring(make: Any, tmp_path: Path, events: list[Any]) -> None:
    """The OOM killer SIGKILLs a worker that is retiring: it was given its third attempt
    (the held, unstarted task 2) while running task 1. Task 1 is lost and retried once;
    task 2 goes back unblamed and runs once, on the replacement that already started at
    retirement; no second replacement (the pool stays one worker); no task runs twice
    and no process runs more than three attempts."""
    log, marker = tmp_path / "log", tmp_path / "marker"
    s = make(workers=1, max_tasks_per_child=3)
    t1 = s.submit(logged, str(log), 0)
    t2 = s.submit(logged_then_die_once, str(log), str(marker), 1)
    rest = [s.submit(logged, str(log), i) for i in range(2, 8)]
    tasks = [t1, t2, *rest]
    out = [t.result(timeout=60) for t in tasks]
    assert [i for i, _ in out] == list(range(8))
    assert [len(t.attempts) for t in tasks] == [1, 2] + [1] * 6
    assert t2.attempts[0].failure is not None
    assert t2.attempts[0].failure.category is Category.WORKER_LOST
    ran = executions(log)
    assert Counter(i for i, _ in ran) == {i: 2 if i == 1 else 1 for i in range(8)}
    assert max(Counter(p for _, p in ran).values()) <= 3
    (lost,) = worker_events(events, "lost")
    assert lost.signal == "SIGKILL" and lost.held == (t2.key,)
    live = wait_for(lambda: (w := s.processes()["workers"]) and len(w) == 1 and w)
    # every process that started was replacing another one, except the first
    assert len(worker_events(events, "started")) == len(worker_events(events, "replaced")) + 1
    gone = {e.pid for e in worker_events(events, "stopped")} | {lost.pid}
    assert live[0] not in gone


def test_random_kills_during_recycling_lose_and_repeat_nothing(
    make: Any, tmp_path: Path, events: list[Any]
) -> None:
    """Chaos while workers recycle every two tasks: a worker is SIGKILLed every 0.3 s,
    four times. Every task ends DONE with the right value; only attempts that were lost
    were repeated (each task's executions never exceed its attempts); no process runs
    more than two attempts; at the end the pool is two workers."""
    log = tmp_path / "log"
    s = make(workers=2, max_tasks_per_child=2, poison_after=10)
    tasks = [s.submit(pilotfish.task(logged, retries=10), str(log), i, 0.05) for i in range(24)]
    stop = threading.Event()
    kills: list[int] = []

    def killer() -> None:
        while not stop.wait(0.3) and len(kills) < 4:
            pids = s.processes()["workers"]
            if pids:
                pid = pids[len(kills) % len(pids)]
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        out = [t.result(timeout=60) for t in tasks]
    finally:
        stop.set()
        th.join(10)
    assert [i for i, _ in out] == list(range(24))
    assert kills  # the chaos did happen while the tasks ran
    ran = executions(log)
    per_task = Counter(i for i, _ in ran)
    for i, t in enumerate(tasks):
        assert 1 <= per_task[i] <= len(t.attempts), (i, t.attempts)
        assert t.state is State.DONE
        for a in t.attempts[:-1]:
            assert a.failure is not None and a.failure.category is Category.WORKER_LOST
    assert max(Counter(p for _, p in ran).values()) <= 2
    wait_for(lambda: len(s.processes()["workers"]) == 2)


def test_no_limit_keeps_the_same_workers(make: Any, events: list[Any]) -> None:
    """The default (None): the same processes run everything; nothing is replaced."""
    s = make(workers=2)
    out = [t.result(timeout=60) for t in [s.submit(pid_of, i) for i in range(30)]]
    assert len({p for _, p in out}) <= 2
    assert worker_events(events, "replaced") == [] and worker_events(events, "stopped") == []
