"""The local master's depth and balance, with real processes: short attempts travel in
batches, a worker never makes the master wait, and an idle worker takes back what is held
behind a long attempt elsewhere (the rules are unit-tested in test_dispatch.py)."""

from __future__ import annotations

from pathlib import Path

import faulty
import pilotfish
from executor_tasks import log_once, sleep_then


def _len(b: bytes) -> int:
    return len(b)


def test_held_attempt_is_taken_back_by_an_idle_worker(tmp_path: Path) -> None:
    """Three tasks on two workers: the first worker takes the 5 s one and holds another
    behind it (prefetch 2). The other worker is done in 0.2 s and takes the held one
    back; it does not wait the 5 s. Every body runs once."""
    with pilotfish.Session(2, rundir=str(tmp_path / "run")) as s:
        s.submit(sleep_then, None, 0).result()  # both workers up is not needed; one is
        long = s.submit(sleep_then, "long", 5.0)
        short = [s.submit(sleep_then, i, 0.2) for i in range(2)]
        assert [f.result(timeout=30) for f in short] == [0, 1]
        assert not long.done(), "a short task waited behind the long one"
        assert long.result(timeout=30) == "long"
        assert [len(f.attempts) for f in [long, *short]] == [1, 1, 1]


def test_busy_worker_never_blocks_the_master(tmp_path: Path) -> None:
    """One worker runs a 3 s task while a 64 MB argument waits for it: the master must
    not wait on the worker's full socket (it would miss its heartbeats to the client,
    heartbeat_timeout=1 s, and be killed as hung). Both tasks succeed at their first
    attempt."""
    big = b"x" * (64 << 20)
    with pilotfish.Session(
        1, rundir=str(tmp_path / "run"), heartbeat_interval=0.2, heartbeat_timeout=1.0
    ) as s:
        first = s.submit(sleep_then, "slept", 3.0)
        second = s.submit(_len, big)
        del big
        assert first.result(timeout=60) == "slept"
        assert second.result(timeout=60) == 64 << 20
        assert [len(first.attempts), len(second.attempts)] == [1, 1]
        assert s.counts().get("DONE") == 2


def test_worker_killed_while_holding_a_batch(tmp_path: Path) -> None:
    """Short tasks are held 64 deep; a task in the middle kills its worker. Only that task
    is charged (WORKER_LOST, then done on its retry); the batch the dead worker held goes
    back unblamed and each of those bodies runs exactly once."""
    log = tmp_path / "ran.log"
    with pilotfish.Session(
        2, rundir=str(tmp_path / "run"), backoff=pilotfish.Backoff(base=0.01)
    ) as s:
        [s.submit(log_once, str(tmp_path / "warm.log"), i) for i in range(300)][-1].result()
        before = [s.submit(log_once, str(log), i) for i in range(600)]
        killer = s.submit(faulty.kill_self_once, str(tmp_path / "marker"), 7)
        after = [s.submit(log_once, str(log), i) for i in range(600, 1200)]
        assert killer.result(timeout=60) == 7
        assert [f.result(timeout=60) for f in before + after] == list(range(1200))
        assert [a.outcome for a in killer.attempts] == ["worker_lost", "done"]
        assert {len(f.attempts) for f in before + after} == {1}
    ran = sorted(int(x) for x in log.read_text().split())
    assert ran == list(range(1200)), "a body ran twice, or never"
