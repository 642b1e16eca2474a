"""Unit tests for the attempt ledger (pilotfish.core.ledger), the one pure object that
holds every backend's in-flight attempts and the rules for losing them.

Each test feeds the events an engine would produce, in the order of a real-world race,
and checks the commands. No processes, clocks or threads.
"""

from __future__ import annotations

import random

import pytest

from pilotfish.core import ledger as L
from pilotfish.core.ledger import Ledger, Lost, Started
from pilotfish.core.machine import InvariantViolation


@pytest.fixture(autouse=True)
def _validate_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``handle`` in these tests ends with ``validate()`` (STYLE 15)."""
    monkeypatch.setattr(Ledger, "debug", True)


def make(*ids: int, timeout: float | None = None) -> Ledger:
    led = Ledger()
    led.handle(L.Enqueue(tuple((i, f"k{i}", f"item{i}", timeout) for i in ids)))
    return led


def of(cmds: list[L.Command], cls: type) -> list:
    return [c for c in cmds if isinstance(c, cls)]


def reports(cmds: list[L.Command], cls: type) -> list:
    return [c.msg for c in cmds if isinstance(c, L.Report) and isinstance(c.msg, cls)]


def test_start_is_granted_once_and_reported():
    """The normal path: a worker holds an attempt, asks to start it, is granted, and the
    client hears Started with the worker, pid and host."""
    led = make(1)
    assert led.handle(L.Hold("w1", (1,))) == []
    cmds = led.handle(L.Start("w1", 1, 101, "h", 5.0))
    assert of(cmds, L.Granted) == [L.Granted("w1", 1)]
    assert reports(cmds, Started) == [Started(1, "w1", 101, 5.0, "h")]
    assert led.started_on("w1") == [1]


def test_engine_reexecution_after_worker_death_is_refused():
    """Dask's scheduler reruns a task whose worker died mid-call on another worker (its
    own allowed-failures). The attempt had started on w1 and was reported lost: the rerun
    on w2 must not reach user code."""
    led = make(1)
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    lost = led.handle(L.WorkerLost("w1", "worker w1 was killed", 2.0, -9, "SIGKILL"))
    assert [m.attempt for m in reports(lost, Lost)] == [1]
    cmds = led.handle(L.Start("w2", 1, 202, "h", 2.1))
    assert of(cmds, L.Granted) == [] and reports(cmds, Started) == []
    (refused,) = of(cmds, L.Refused)
    assert refused.worker == "w2" and "not in flight" in refused.reason
    assert led.refused == 1


def test_second_start_while_first_runs_is_refused():
    """A RADICAL-Pilot task pushed twice onto the shared queue reaches two workers: only
    the first start is granted; the second names the worker already running it."""
    led = make(1)
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    (refused,) = of(led.handle(L.Start("w2", 1, 202, "h", 1.5)), L.Refused)
    assert "already started on w1" in refused.reason
    assert led.get(1) is not None and led.get(1).worker == "w1"


def test_start_by_other_worker_than_holder_is_refused():
    """A duplicate of a claimed task is taken by another worker: its start is refused,
    the holder's start is still granted."""
    led = make(1)
    led.handle(L.Hold("w1", (1,)))
    assert of(led.handle(L.Start("w2", 1, 202, "h", 1.0)), L.Refused)
    assert of(led.handle(L.Start("w1", 1, 101, "h", 1.1)), L.Granted)


def test_hold_of_already_held_attempt_is_dropped():
    """Two workers claim the same task from RP's queue (a push repeated after a
    suspected loss): the second claim is dropped."""
    led = make(1)
    led.handle(L.Hold("w1", (1,)))
    (d,) = of(led.handle(L.Hold("w2", (1,))), L.Ignored)
    assert d.worker == "w2" and "w1" in d.reason
    assert led.held_by("w2") == []


def test_worker_lost_blames_started_and_requeues_held_in_order():
    """A worker with a prefetch of three is SIGKILLed while running the first: only the
    running one is WORKER_LOST (exit status and stderr in the message); the two it never
    started go back on the queue, unblamed, in their order; program groups are killed."""
    led = make(1, 2, 3)
    led.handle(L.Hold("w1", (1, 2, 3)))
    led.handle(L.Start("w1", 1, 101, "h", 10.0))
    led.handle(L.Group("w1", 1, 777))
    cmds = led.handle(
        L.WorkerLost("w1", "worker w1 (pid 101) was killed", 12.5, -9, "SIGKILL", "boom")
    )
    (lost,) = reports(cmds, Lost)
    assert lost.attempt == 1 and lost.category == "worker_lost"
    assert (lost.returncode, lost.signal, lost.stderr_tail) == (-9, "SIGKILL", "boom")
    assert "task 'k1'" in lost.message and "after 2.50 s" in lost.message
    assert "boom" in lost.message and lost.started == 10.0 and lost.ended == 12.5
    assert of(cmds, L.Requeue) == [L.Requeue(("item2", "item3"))]
    assert of(cmds, L.KillGroups) == [L.KillGroups("w1", (777,))]
    assert led.held_by("w1") == [] and led.get(2).where == "queued"


def test_late_result_from_lost_worker_is_dropped():
    """A worker is declared lost (hung, SIGSTOP) and its result arrives after SIGCONT:
    the attempt was already reported lost, so the late result is dropped."""
    led = make(1)
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    led.handle(L.WorkerLost("w1", "hung", 5.0))
    (d,) = of(led.handle(L.Finish("w1", 1)), L.Ignored)
    assert "not in flight" in d.reason and led.dropped == 1


def test_result_from_non_holder_is_dropped_and_holder_is_accepted_once():
    """A duplicate result from a worker that never held the attempt is dropped; the
    holder's result is accepted once; a second copy is dropped."""
    led = make(1)
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    assert of(led.handle(L.Finish("w2", 1)), L.Ignored)
    assert led.handle(L.Finish("w1", 1)) == [L.Accept("w1", 1)]
    assert of(led.handle(L.Finish("w1", 1)), L.Ignored)
    assert len(led) == 0


def test_master_loss_blames_started_and_resends_the_rest():
    """The master is SIGKILLed with one task running and six queued or prefetched: the
    running one is RUNTIME_LOST; the six are sent again unblamed (no retry used)."""
    led = make(*range(1, 8))
    led.handle(L.Hold("w1", (1, 2)))
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    cmds = led.handle(L.RuntimeLost("the master (pid 9) was killed", 3.0, "master", 9, -9))
    (lost,) = reports(cmds, Lost)
    assert lost.attempt == 1 and lost.category == "runtime_lost"
    assert "while task 'k1' was running" in lost.message and lost.pid == 9
    (resend,) = of(cmds, L.Resend)
    assert resend.items == tuple(f"item{i}" for i in range(2, 8))
    assert all(led.get(i).where == "queued" for i in range(2, 8))
    # the new master's workers can take them
    assert of(led.handle(L.Start("w9", 2, 1, "h", 4.0)), L.Granted)


def test_cancel_queued_withdraws_and_cancel_started_runs_on():
    """Cancel withdraws what has not started; a started attempt runs on (its result is
    fenced by the workflow, not here)."""
    led = make(1, 2)
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    cmds = led.handle(L.Revoke((1, 2)))
    assert cmds == [L.Withdraw("", 2)]
    assert 2 not in led and 1 in led


def test_cancelled_prefetched_attempt_is_not_requeued_when_worker_dies():
    """A prefetched attempt is cancelled, then its worker dies before it confirmed the
    withdrawal: the cancelled attempt must not be requeued (a cancelled task would run),
    and a start request for it is refused."""
    led = make(1, 2)
    led.handle(L.Hold("w1", (1, 2)))
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    assert led.handle(L.Revoke((2,))) == [L.Withdraw("w1", 2)]
    assert of(led.handle(L.Start("w1", 2, 101, "h", 1.1)), L.Refused)
    cmds = led.handle(L.WorkerLost("w1", "gone", 2.0))
    assert of(cmds, L.Requeue) == [] and 2 not in led


def test_bounce_requeues_unstarted_and_blames_started():
    """Dask gives up on a task (KilledWorker) whose workers died: if our attempt never
    started it is requeued unblamed; if it had started it is WORKER_LOST."""
    led = make(1, 2)
    led.handle(L.Start("w1", 2, 101, "h", 1.0))
    assert led.handle(L.Bounce(1, "KilledWorker", 2.0)) == [L.Requeue(("item1",))]
    (lost,) = reports(led.handle(L.Bounce(2, "KilledWorker", 2.0)), Lost)
    assert lost.attempt == 2 and lost.category == "worker_lost"


def test_timeout_expires_started_attempt_once():
    """A started attempt runs past its timeout: one TimePassed reports it TIMEOUT and asks the
    backend to stop it (with its program groups); it is then out of the ledger, so the
    worker's later exit does not report it again."""
    led = make(1, timeout=5.0)
    led.handle(L.Start("w1", 1, 101, "h", 10.0))
    led.handle(L.Group("w1", 1, 55))
    assert led.next_deadline() == 15.0
    assert led.handle(L.TimePassed(14.9)) == []
    cmds = led.handle(L.TimePassed(15.2, "killed the worker"))
    (lost,) = reports(cmds, Lost)
    assert lost.category == "timeout" and "timeout of 5 s" in lost.message
    assert "killed the worker" in lost.message
    assert of(cmds, L.Expired) == [L.Expired("w1", 1, 101, (55,), "k1")]
    assert reports(led.handle(L.WorkerLost("w1", "killed", 15.3)), Lost) == []


def test_describe_exit():
    assert L.describe_exit(-9) == ("was killed by signal SIGKILL (-9)", "SIGKILL")
    assert L.describe_exit(3) == ("exited with code 3", None)
    assert L.describe_exit(None)[1] is None


def test_refusals_on_drained_workers_are_never_counted_as_given_back():
    """Issue 22 item 6: every Dask worker was drained, so the start fence refused each
    start of a healthy task; each refusal came back as a give-back, the tenth gave up on
    the attempt as WORKER_LOST "on ? (pid None)", and three of those made the task
    poison. The rule: a refusal because the worker is drained (``Bounce(drained=True)``)
    requeues the attempt unblamed however often it happens; only other give-backs count
    toward ``max_returns``, and the one past it is lost with no worker and no pid (it
    never ran anywhere). A ledger without ``max_returns`` never gives up (the local
    master's rebalancing)."""
    led = Ledger(max_returns=2)
    led.handle(L.Enqueue(((1, "k1", "item1", None), (2, "k2", "item2", None))))
    for i in range(50):
        assert led.handle(L.Bounce(1, "worker w1 is drained", float(i), drained=True)) == [
            L.Requeue(("item1",))
        ]
    assert 1 in led and led.get(1).returned == 0  # type: ignore[union-attr]
    assert led.handle(L.Bounce(1, "KilledWorker", 60.0)) == [L.Requeue(("item1",))]
    assert led.handle(L.Bounce(1, "KilledWorker", 61.0)) == [L.Requeue(("item1",))]
    (lost,) = reports(led.handle(L.Bounce(1, "KilledWorker", 62.0)), Lost)
    assert (lost.worker, lost.pid, lost.started) == ("", 0, None)
    assert "given back 3 times without running" in lost.message
    assert "no worker died" in lost.message and 1 not in led
    unlimited = make(1)
    for i in range(100):
        assert unlimited.handle(L.Bounce(1, "rebalanced", float(i))) == [L.Requeue(("item1",))]


# --------------------------------------------------------------------------- validate()


def test_validate_catches_an_attempt_held_by_two_workers():
    """A bug files one attempt under two workers: both could be granted its start, and
    the loss of either would requeue or blame it. validate() names both."""
    led = make(1)
    led.handle(L.Hold("w1", (1,)))
    led._by_worker.setdefault("w2", {})[1] = None
    with pytest.raises(InvariantViolation, match="attempt 1 is held by both w1 and w2") as ei:
        led.validate()
    assert "Hold(worker='w1', attempts=(1,))" in str(ei.value)


def test_validate_catches_a_started_attempt_without_its_holder():
    """A started attempt nobody holds would never be reported lost with its worker."""
    led = make(1)
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    led._by_worker["w1"].clear()
    with pytest.raises(InvariantViolation, match=r"attempt 1 \('k1', started\) names worker 'w1'"):
        led.validate()


def test_validate_catches_a_queued_attempt_that_is_held():
    """An attempt both on the queue and held by a worker could run twice."""
    led = make(1)
    led._by_worker["w1"] = {1: None}
    with pytest.raises(InvariantViolation, match="which is queued"):
        led.validate()


def test_validate_catches_a_finished_attempt_still_held():
    """A finished attempt left in its worker's list: the worker's loss would report it."""
    led = make(1)
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    del led.entries[1]
    with pytest.raises(InvariantViolation, match="holds attempt 1, which is not in flight"):
        led.validate()


def test_validate_catches_a_lost_deadline():
    """A started attempt with a timeout but no deadline would never time out."""
    led = make(1, timeout=5.0)
    led.handle(L.Start("w1", 1, 101, "h", 1.0))
    led._deadlines.clear()
    with pytest.raises(InvariantViolation, match="its deadline is None"):
        led.validate()


@pytest.mark.parametrize("seed", range(25))
def test_random_events_keep_every_invariant(seed):
    """Random holds, starts, results, groups, cancels, bounces, drains, worker and runtime
    losses and ticks from three workers, for attempts in every place (and gone ones):
    the ledger validates after each (the fixture), and every attempt it reports lost or
    accepts leaves it exactly once."""
    rng = random.Random(seed)
    led = Ledger(max_returns=rng.choice([None, 2]))
    workers = ["w1", "w2", "w3"]
    nxt, now, gone = 1, 0.0, []
    for _ in range(400):
        now += rng.random()
        w = rng.choice(workers)
        known = list(range(1, nxt)) or [1]
        aid = rng.choice(known)
        r = rng.random()
        if r < 0.15:
            n = rng.randint(1, 3)
            ids = range(nxt, nxt + n)
            led.handle(L.Enqueue(tuple((i, f"k{i}", i, rng.choice([None, 2.0])) for i in ids)))
            nxt += n
            continue
        ev: L.Event
        if r < 0.3:
            ev = L.Hold(w, tuple(rng.sample(known, k=min(2, len(known)))))
        elif r < 0.45:
            ev = L.Start(w, aid, 100, "h", now)
        elif r < 0.6:
            ev = L.Finish(w, aid)
        elif r < 0.65:
            ev = L.Group(w, aid, 4242)
        elif r < 0.7:
            ev = L.Revoke((aid,))
        elif r < 0.77:
            ev = L.Bounce(aid, "given back", now, drained=rng.random() < 0.3)
        elif r < 0.8:
            ev = L.Drain(w, "broken", now)
        elif r < 0.86:
            ev = L.WorkerLost(w, f"worker {w} died", now, -9, "SIGKILL")
        elif r < 0.87:
            ev = L.RuntimeLost("master died", now)
        elif r < 0.9:
            ev = L.Unrunnable(aid, "worker_lost", "refused", now)
        else:
            ev = L.TimePassed(now)
        for c in led.handle(ev):
            if isinstance(c, L.Accept):
                gone.append(c.attempt)
            elif isinstance(c, L.Report) and isinstance(c.msg, Lost):
                gone.append(c.msg.attempt)
        if rng.random() < 0.05:  # a drained worker is replaced by a fresh name
            workers[workers.index(w)] = f"{w}x"
    assert len(gone) == len(set(gone))
    assert not set(gone) & set(led.entries)
