"""Unit tests for the pure workflow state machine (pilotfish.core.workflow).

Every test drives ``Workflow.handle`` with explicit events and times, an injected
``rand`` and a ``Backoff`` from :mod:`pilotfish.core.policy`: no processes, no clock.
"""

from __future__ import annotations

import pytest

from pilotfish.core.machine import InvariantViolation
from pilotfish.core.policy import NO_BACKOFF, Backoff
from pilotfish.core.states import State
from pilotfish.core.workflow import (
    FREE_RETRIES,
    Abort,
    AttemptStarted,
    Cancel,
    CancelAttempt,
    Cancelled,
    Dispatch,
    Dropped,
    Failed,
    FailOverride,
    Reject,
    Resolve,
    Restore,
    RetryOverride,
    Submit,
    Succeeded,
    TimePassed,
    Transition,
    Wake,
    Workflow,
)
from pilotfish.errors import Category, FailureRecord, InvalidTransition

# Immediate retries unless a test says otherwise: base 0 means delay 0.
IMMEDIATE = NO_BACKOFF
# A deterministic backoff: 1, 2, 4, 8 ... s, capped at 30, half of it jitter.
SLOW = Backoff(base=1.0, factor=2.0, maximum=30.0, jitter=0.5)


@pytest.fixture(autouse=True)
def _validate_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``handle`` in these tests ends with ``validate()`` (STYLE 15, as Dask's
    worker state machine tests do): a step that breaks an invariant fails the test."""
    monkeypatch.setattr(Workflow, "debug", True)


def make(**kw) -> Workflow:
    kw.setdefault("backoff", IMMEDIATE)
    kw.setdefault("rand", lambda: 0.0)
    return Workflow(**kw)


def of(cmds, cls) -> list:
    return [c for c in cmds if isinstance(c, cls)]


def failure(cat: Category, msg: str = "boom", **kw) -> FailureRecord:
    kw.setdefault("transient", cat.transient)
    return FailureRecord(key="?", category=cat, message=msg, time=0.0, **kw)


def submit(w: Workflow, tid: int, deps=(), retries: int = 0, now: float = 0.0) -> list:
    return w.handle(Submit(tid, f"t{tid}", tuple(deps), retries, now))


def only_dispatch(cmds) -> Dispatch:
    ds = of(cmds, Dispatch)
    assert len(ds) == 1, cmds
    return ds[0]


def check_counts(w: Workflow) -> None:
    assert sum(w.counts.values()) == len(w._tasks)
    for s in State:
        assert w.counts[s] == sum(1 for t in w._tasks.values() if t.state is s), s


# --------------------------------------------------------------------------- happy path


def test_submit_without_deps_dispatches_and_success_resolves():
    """A lone task is submitted: it goes PENDING -> READY -> RUNNING and is dispatched; once
    the backend starts it and its result arrives it is DONE and resolved with that attempt."""
    w = make()
    cmds = submit(w, 1)
    trans = [(c.start, c.finish) for c in of(cmds, Transition)]
    assert trans == [
        (State.PENDING, State.PENDING),
        (State.PENDING, State.READY),
        (State.READY, State.RUNNING),
    ]
    d = only_dispatch(cmds)
    assert (d.tid, d.number) == (1, 1)
    assert w.state(1) is State.RUNNING and not w.is_started(1)

    assert w.handle(AttemptStarted(d.attempt, 1.0, worker="w1", host="h", pid=42)) == []
    assert w.is_started(1)
    cmds = w.handle(Succeeded(d.attempt, 2.0))
    assert of(cmds, Resolve) == [Resolve(1, d.attempt)]
    assert w.state(1) is State.DONE
    a = w.attempts(1)[0]
    assert (a.started, a.ended, a.outcome, a.worker, a.pid) == (1.0, 2.0, "done", "w1", 42)
    assert w.unfinished() == 0
    check_counts(w)


def test_diamond_dependents_dispatched_only_when_all_inputs_done():
    """Diamond a -> (b, c) -> d: b and c start when a is done; d waits for both and is
    dispatched exactly once, right after the second of its inputs succeeds."""
    w = make()
    da = only_dispatch(submit(w, 1))
    assert of(submit(w, 2, [1]), Dispatch) == []
    assert of(submit(w, 3, [1]), Dispatch) == []
    assert of(submit(w, 4, [2, 3]), Dispatch) == []
    assert w.state(4) is State.PENDING

    cmds = w.handle(Succeeded(da.attempt, 1.0))
    ds = of(cmds, Dispatch)
    assert sorted(d.tid for d in ds) == [2, 3]
    assert w.state(4) is State.PENDING
    db, dc = sorted(ds, key=lambda d: d.tid)

    assert of(w.handle(Succeeded(db.attempt, 2.0)), Dispatch) == []
    assert w.state(4) is State.PENDING
    cmds = w.handle(Succeeded(dc.attempt, 3.0))
    assert [d.tid for d in of(cmds, Dispatch)] == [4]
    assert w.state(4) is State.RUNNING
    check_counts(w)


def test_submit_depending_on_done_task_is_dispatched_at_once():
    """A task submitted after its input already finished does not wait for anything."""
    w = make()
    d = only_dispatch(submit(w, 1))
    w.handle(Succeeded(d.attempt, 1.0))
    assert only_dispatch(submit(w, 2, [1], now=2.0)).tid == 2


def test_restore_is_done_without_dispatch():
    """Resuming from the journal: a task already DONE becomes DONE and resolves with no
    value attempt (None) and is never dispatched; its dependents run at once."""
    w = make()
    cmds = w.handle(Restore(1, "t1", 0.0))
    assert of(cmds, Dispatch) == []
    assert of(cmds, Resolve) == [Resolve(1, None)]
    assert w.state(1) is State.DONE
    assert only_dispatch(submit(w, 2, [1])).tid == 2
    check_counts(w)


# --------------------------------------------------------------------------- fencing


def test_late_result_from_lost_worker_is_dropped_after_retry():
    """A worker is declared lost while its result is already in the pipe: the late result
    must be dropped, and the retry's result recorded once (task DONE with attempt 2)."""
    w = make()
    d1 = only_dispatch(submit(w, 1, retries=2))
    w.handle(AttemptStarted(d1.attempt, 0.5))
    cmds = w.handle(Failed(d1.attempt, failure(Category.WORKER_LOST), 1.0))
    d2 = only_dispatch(cmds)
    assert d2.attempt != d1.attempt and d2.number == 2

    late = w.handle(Succeeded(d1.attempt, 1.1))
    assert [type(c) for c in late] == [Dropped]
    assert late[0].attempt == d1.attempt and late[0].event == "succeeded"
    assert w.state(1) is State.RUNNING

    cmds = w.handle(Succeeded(d2.attempt, 2.0))
    assert of(cmds, Resolve) == [Resolve(1, d2.attempt)]
    assert w.state(1) is State.DONE
    assert [a.outcome for a in w.attempts(1)] == ["worker_lost", "done"]


def test_duplicate_success_for_same_attempt_is_dropped():
    """The same result message is delivered twice: the task is resolved once, the second
    copy is Dropped and changes nothing."""
    w = make()
    d = only_dispatch(submit(w, 1))
    assert len(of(w.handle(Succeeded(d.attempt, 1.0)), Resolve)) == 1
    again = w.handle(Succeeded(d.attempt, 1.5))
    assert [type(c) for c in again] == [Dropped]
    assert w.state(1) is State.DONE
    assert w.attempts(1)[0].ended == 1.0


def test_duplicate_result_dropped_with_reason_naming_task_state():
    """Diagnosing a duplicate result: the Dropped reason should say the task is already
    DONE, not that the attempt was 'superseded by attempt None'."""
    w = make()
    d = only_dispatch(submit(w, 1))
    w.handle(Succeeded(d.attempt, 1.0))
    (drop,) = w.handle(Succeeded(d.attempt, 1.5))
    assert "None" not in drop.reason
    assert "DONE" in drop.reason


def test_result_for_unknown_attempt_is_dropped():
    """A corrupted or foreign message carries an attempt id never issued: Dropped."""
    w = make()
    submit(w, 1)
    for ev in (
        Succeeded(999, 1.0),
        AttemptStarted(999, 1.0),
        Failed(999, failure(Category.USER_ERROR), 1),
    ):
        (drop,) = w.handle(ev)
        assert isinstance(drop, Dropped)
        assert drop.attempt == 999 and drop.reason == "unknown attempt"
    assert w.state(1) is State.RUNNING


def test_started_for_superseded_attempt_is_dropped():
    """The backend reports 'started' for attempt 1 after it was already lost and retried:
    the message is dropped and the retry's attempt record is untouched."""
    w = make()
    d1 = only_dispatch(submit(w, 1, retries=1))
    d2 = only_dispatch(w.handle(Failed(d1.attempt, failure(Category.WORKER_LOST), 1.0)))
    (drop,) = w.handle(AttemptStarted(d1.attempt, 1.5, worker="old"))
    assert isinstance(drop, Dropped) and drop.event == "started"
    assert not w.is_started(1)
    assert w.attempts(1)[-1].worker is None
    w.handle(AttemptStarted(d2.attempt, 2.0, worker="new"))
    assert w.attempts(1)[-1].worker == "new"


def test_duplicate_started_is_dropped():
    """A 'started' notice delivered twice keeps the first start time."""
    w = make()
    d = only_dispatch(submit(w, 1))
    w.handle(AttemptStarted(d.attempt, 1.0))
    (drop,) = w.handle(AttemptStarted(d.attempt, 5.0))
    assert isinstance(drop, Dropped) and drop.reason == "duplicate start"
    assert w.attempts(1)[0].started == 1.0


def test_result_after_cancel_is_dropped():
    """A task is cancelled while queued at the backend, but the worker had already picked
    it up: its result must be dropped and the task stay CANCELLED."""
    w = make()
    d = only_dispatch(submit(w, 1))
    w.handle(Cancel(1, 0.5))
    assert w.state(1) is State.CANCELLED
    for ev in (AttemptStarted(d.attempt, 0.6), Succeeded(d.attempt, 1.0)):
        assert [type(c) for c in w.handle(ev)] == [Dropped]
    assert w.state(1) is State.CANCELLED
    assert w.attempts(1)[0].outcome == "cancelled"


def test_result_after_abort_is_dropped():
    """The runtime was declared lost and every task failed; a result that was still in
    flight arrives afterwards: it is dropped, the task stays FAILED."""
    w = make()
    d = only_dispatch(submit(w, 1, retries=3))
    w.handle(AttemptStarted(d.attempt, 0.5))
    w.handle(Abort(Category.RUNTIME_LOST, "master died", 1.0))
    assert [type(c) for c in w.handle(Succeeded(d.attempt, 2.0))] == [Dropped]
    assert w.state(1) is State.FAILED
    assert w.failure(1).category is Category.RUNTIME_LOST


# --------------------------------------------------------------------------- retries


def test_user_error_not_retried_by_default():
    """User code raised ValueError and the task has retries left: a user error is not
    transient, so the task fails at once with the original record (key filled in)."""
    w = make()
    d = only_dispatch(submit(w, 1, retries=3))
    cmds = w.handle(Failed(d.attempt, failure(Category.USER_ERROR, "ValueError: x"), 1.0))
    assert of(cmds, Dispatch) == []
    (rej,) = of(cmds, Reject)
    assert rej.tid == 1 and rej.failure.category is Category.USER_ERROR
    assert rej.failure.key == "t1"
    assert w.state(1) is State.FAILED


def test_user_error_retried_when_requested():
    """The user error matched the task's retry_on: it is retried within the budget."""
    w = make()
    d = only_dispatch(submit(w, 1, retries=1))
    cmds = w.handle(Failed(d.attempt, failure(Category.USER_ERROR), 1.0, retry_requested=True))
    d2 = only_dispatch(cmds)
    assert d2.number == 2
    cmds = w.handle(Failed(d2.attempt, failure(Category.USER_ERROR), 2.0, retry_requested=True))
    assert len(of(cmds, Reject)) == 1  # budget of 1 spent


@pytest.mark.parametrize(
    "cat", [Category.WORKER_LOST, Category.TIMEOUT, Category.RUNTIME_LOST], ids=lambda c: c.value
)
def test_transient_failures_retried_up_to_budget_then_rejected(cat):
    """Flaky infrastructure: a transient failure is retried `retries` times; the failure
    after the last retry rejects the task with that failure's category."""
    w = make(poison_after=100)
    d = only_dispatch(submit(w, 1, retries=2))
    for n in (2, 3):
        d = only_dispatch(w.handle(Failed(d.attempt, failure(cat), float(n))))
        assert d.number == n
    cmds = w.handle(Failed(d.attempt, failure(cat), 9.0))
    assert of(cmds, Dispatch) == []
    (rej,) = of(cmds, Reject)
    assert rej.failure.category is cat
    assert [a.outcome for a in w.attempts(1)] == [cat.value] * 3


def test_backoff_delay_grows_exponentially_with_jitter_and_cap():
    """Backoff.delay: base * factor**(n-1), capped at maximum, then reduced by up to
    `jitter` of itself according to rand."""
    b = Backoff(base=1.0, factor=2.0, maximum=10.0, jitter=0.5)
    assert [b.delay(n, 0.0) for n in (1, 2, 3, 4, 5, 6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.delay(3, 0.5) == pytest.approx(3.0)
    assert b.delay(3, 0.999) == pytest.approx(2.002)
    assert b.delay(0, 0.0) == 1.0
    assert Backoff(base=1, jitter=0.0).delay(2, 0.9) == 2.0
    assert NO_BACKOFF.delay(5, 0.3) == 0.0


@pytest.mark.parametrize(
    "kw",
    [{"base": -1.0}, {"factor": 0.5}, {"maximum": -1.0}, {"jitter": -0.1}, {"jitter": 1.5}],
)
def test_invalid_backoff_raises(kw):
    """A misconfigured retry policy is rejected when it is built, not at the first retry."""
    with pytest.raises(ValueError, match="invalid Backoff"):
        Backoff(**kw)


def test_backoff_delay_does_not_overflow_after_many_failures():
    """A task with a huge retry budget on flaky infrastructure reaches its 1100th retry:
    the delay must stay capped at maximum instead of raising OverflowError."""
    assert Backoff(base=1.0, maximum=30.0, jitter=0.0).delay(1100, 0.0) == 30.0
    assert NO_BACKOFF.delay(1100, 0.0) == 0.0


def test_retry_waits_in_retrying_until_tick_reaches_backoff():
    """A worker is lost; the retry is delayed by the backoff: the task waits RETRYING,
    a Wake is requested for the right time, an early TimePassed does nothing, and the TimePassed at
    that time dispatches attempt 2. The next delay is twice as long."""
    w = make(backoff=SLOW)
    d = only_dispatch(submit(w, 1, retries=3))
    cmds = w.handle(Failed(d.attempt, failure(Category.WORKER_LOST), 10.0))
    assert of(cmds, Dispatch) == []
    assert of(cmds, Wake) == [Wake(11.0)]
    assert w.state(1) is State.RETRYING

    early = w.handle(TimePassed(10.5))
    assert of(early, Dispatch) == [] and of(early, Wake) == [Wake(11.0)]
    assert w.state(1) is State.RETRYING

    d2 = only_dispatch(w.handle(TimePassed(11.0)))
    assert d2.number == 2 and w.state(1) is State.RUNNING

    cmds = w.handle(Failed(d2.attempt, failure(Category.TIMEOUT), 20.0))
    assert of(cmds, Wake) == [Wake(22.0)]
    d3 = only_dispatch(w.handle(TimePassed(25.0)))  # a late tick is fine too
    assert d3.number == 3


def test_retry_delay_uses_jitter_from_injected_rand():
    """Many tasks lost together must not retry in lockstep: rand shortens the delay."""
    w = make(backoff=SLOW, rand=lambda: 0.5)
    d = only_dispatch(submit(w, 1, retries=3))
    cmds = w.handle(Failed(d.attempt, failure(Category.WORKER_LOST), 10.0))
    assert of(cmds, Wake) == [Wake(10.75)]


# --------------------------------------------------------------------------- poison


def lost(rc=None, sig=None, tail="", worker="w1", pid=1) -> FailureRecord:
    return failure(
        Category.WORKER_LOST,
        "worker died",
        returncode=rc,
        signal=sig,
        stderr_tail=tail,
        worker=worker,
        pid=pid,
    )


def test_poison_task_rejected_after_killing_three_workers():
    """A task segfaults every worker it lands on: after poison_after=3 lost workers it is
    rejected for good although retries remain; the message lists every attempt with its
    exit code or signal and stderr lines. An independent task is unaffected."""
    w = make(poison_after=3)
    d = only_dispatch(submit(w, 1, retries=10))
    other = only_dispatch(submit(w, 2))
    fails = [
        lost(sig="SIGSEGV", tail="Fatal Python error: Segmentation fault", worker="w1", pid=11),
        lost(rc=3, tail="line a\nline b", worker="w2", pid=12),
        lost(sig="SIGKILL", tail="oom", worker="w3", pid=13),
    ]
    for i, f in enumerate(fails[:2]):
        d = only_dispatch(w.handle(Failed(d.attempt, f, float(i + 1))))
    cmds = w.handle(Failed(d.attempt, fails[2], 3.0))
    assert of(cmds, Dispatch) == []
    (rej,) = of(cmds, Reject)
    f = rej.failure
    assert f.transient is False
    assert f.category is Category.WORKER_LOST
    assert "poison" in f.message and "poison_after=3" in f.message
    assert "attempt 1 on w1 (pid 11): SIGSEGV" in f.message
    assert "attempt 2 on w2 (pid 12): exit code 3" in f.message
    assert "attempt 3 on w3 (pid 13): SIGKILL" in f.message
    for line in ("Fatal Python error: Segmentation fault", "line a", "line b", "oom"):
        assert f"    | {line}" in f.message
    assert w.state(1) is State.FAILED

    assert w.state(2) is State.RUNNING
    assert of(w.handle(Succeeded(other.attempt, 4.0)), Resolve) == [Resolve(2, other.attempt)]


def test_one_worker_dying_again_and_again_never_makes_a_task_poison():
    """Issue 24 item 9: a Dask nanny restarts its worker under the same name after every
    death; a healthy task sent there three times in a row was declared poison ("killed 3
    workers": the same one thrice). Deaths count per different worker: the task keeps
    its retries (the worker is drained by the drain rule, not the task condemned)."""
    w = make(poison_after=3)
    d = only_dispatch(submit(w, 1, retries=10))
    for i in range(5):
        w.handle(AttemptStarted(d.attempt, float(i), "tcp://n2:1", "node2", 100 + i))
        cmds = w.handle(Failed(d.attempt, lost(worker="tcp://n2:1", pid=100 + i), i + 0.5))
        assert of(cmds, Reject) == [], "the same worker five times is not poison"
        d = only_dispatch(cmds)
    w.handle(AttemptStarted(d.attempt, 9.0, "tcp://n1:1", "node1", 200))
    assert of(w.handle(Succeeded(d.attempt, 9.5)), Resolve) == [Resolve(1, d.attempt)]


def test_a_task_killing_both_workers_of_two_in_turn_is_poison():
    """Two workers that their nannies restart under their names: a task killing whichever
    runs it kills "w1", "w2", "w1": poison_after=3 deaths on two different workers is
    poison (counting only different workers, it could never be, and would use up its
    retries killing workers), and the message says how many times and how many workers."""
    w = make(poison_after=3)
    d = only_dispatch(submit(w, 1, retries=10))
    for i, worker in enumerate(("w1", "w2", "w1")):
        w.handle(AttemptStarted(d.attempt, float(i), worker, "h1", 10 + i))
        cmds = w.handle(Failed(d.attempt, lost(worker=worker, pid=10 + i), i + 0.5))
        if i < 2:
            assert of(cmds, Reject) == []
            d = only_dispatch(cmds)
    (rej,) = of(cmds, Reject)
    assert "killed workers 3 times (2 different workers)" in rej.failure.message


def test_deaths_on_one_host_of_several_never_make_a_task_poison():
    """One bad node with several workers: three different workers died there, but the run
    has other hosts, so the task is not poison; once its attempts killed workers on two
    hosts, it is (the message says how many different workers, on how many hosts)."""
    w = make(poison_after=3)
    other = only_dispatch(submit(w, 2))
    w.handle(AttemptStarted(other.attempt, 0.0, "a1", "node1", 50))  # a second host seen
    d = only_dispatch(submit(w, 1, retries=10))
    for i, worker in enumerate(("b1", "b2", "b3")):
        w.handle(AttemptStarted(d.attempt, float(i), worker, "node2", 60 + i))
        cmds = w.handle(Failed(d.attempt, lost(worker=worker, pid=60 + i), i + 0.5))
        assert of(cmds, Reject) == []
        d = only_dispatch(cmds)
    w.handle(AttemptStarted(d.attempt, 5.0, "a2", "node1", 70))
    (rej,) = of(w.handle(Failed(d.attempt, lost(worker="a2", pid=70), 5.5)), Reject)
    assert "killed 4 different workers on 2 hosts" in rej.failure.message


def test_timeouts_do_not_count_as_poison():
    """Only lost workers make a task poison; a slow task that times out uses its budget."""
    w = make(poison_after=1)
    d = only_dispatch(submit(w, 1, retries=1))
    d = only_dispatch(w.handle(Failed(d.attempt, failure(Category.TIMEOUT), 1.0)))
    (rej,) = of(w.handle(Failed(d.attempt, lost(rc=1), 2.0)), Reject)
    assert "poison" in rej.failure.message  # the first lost worker, with poison_after=1


def test_poison_after_must_be_positive():
    """A configuration error is reported at construction."""
    with pytest.raises(ValueError, match="poison_after"):
        Workflow(poison_after=0)


# --------------------------------------------------------------------------- dependencies


def test_dependency_failure_rejects_whole_chain_at_once():
    """a -> b -> c -> d; a fails: b, c and d are rejected in the same step (nobody hangs
    waiting), each naming its direct input as upstream and a as root. An independent task
    still completes, and a task submitted later on top of c fails immediately."""
    w = make()
    da = only_dispatch(submit(w, 1))
    submit(w, 2, [1])
    submit(w, 3, [2])
    submit(w, 4, [3])
    di = only_dispatch(submit(w, 5))

    cmds = w.handle(Failed(da.attempt, failure(Category.USER_ERROR, "KeyError: 'x'"), 1.0))
    rejects = {r.tid: r.failure for r in of(cmds, Reject)}
    assert set(rejects) == {1, 2, 3, 4}
    for tid, up in ((2, "t1"), (3, "t2"), (4, "t3")):
        f = rejects[tid]
        assert f.category is Category.DEPENDENCY_FAILED
        assert f.upstream == up and f.root == "t1" and f.key == f"t{tid}"
        assert f.transient is False
        assert "t1" in f.message and "KeyError" in f.message
        assert w.state(tid) is State.FAILED

    assert of(w.handle(Succeeded(di.attempt, 2.0)), Resolve) == [Resolve(5, di.attempt)]

    cmds = submit(w, 6, [3], now=3.0)
    assert of(cmds, Dispatch) == []
    (rej,) = of(cmds, Reject)
    assert rej.failure.category is Category.DEPENDENCY_FAILED
    assert rej.failure.upstream == "t3" and rej.failure.root == "t1"
    check_counts(w)


# --------------------------------------------------------------------------- keep_going


def test_keep_going_false_stops_unstarted_work_but_lets_started_finish():
    """keep_going=False, a task fails for good: pending, ready-but-queued and retrying
    tasks are cancelled (CancelAttempt for those dispatched but not started); a task
    already running on a worker keeps running and can still succeed; new submissions are
    cancelled."""
    w = make(keep_going=False, backoff=SLOW)
    d_bad = only_dispatch(submit(w, 1))
    d_run = only_dispatch(submit(w, 2))
    w.handle(AttemptStarted(d_run.attempt, 0.1))
    d_queued = only_dispatch(submit(w, 3))
    submit(w, 4, [2])  # PENDING
    d_retry = only_dispatch(submit(w, 5, retries=3))
    w.handle(Failed(d_retry.attempt, failure(Category.WORKER_LOST), 0.2))
    assert w.state(5) is State.RETRYING

    cmds = w.handle(Failed(d_bad.attempt, failure(Category.USER_ERROR), 1.0))
    assert [r.tid for r in of(cmds, Reject)] == [1]
    assert sorted(c.tid for c in of(cmds, Cancelled)) == [3, 4, 5]
    assert of(cmds, CancelAttempt) == [CancelAttempt(d_queued.attempt)]
    assert w.state(2) is State.RUNNING

    assert of(w.handle(TimePassed(100.0)), Dispatch) == []  # the retry timer is dead
    assert of(w.handle(Succeeded(d_run.attempt, 2.0)), Resolve) == [Resolve(2, d_run.attempt)]
    assert w.state(4) is State.CANCELLED
    cmds = submit(w, 6, now=3.0)
    assert of(cmds, Dispatch) == [] and of(cmds, Cancelled) == [Cancelled(6)]
    check_counts(w)


def test_keep_going_false_running_task_is_not_retried_after_stop():
    """After the stop, a started task loses its worker: it is not retried (that would
    start new work), it fails with its own category."""
    w = make(keep_going=False)
    d1 = only_dispatch(submit(w, 1))
    d2 = only_dispatch(submit(w, 2, retries=5))
    w.handle(AttemptStarted(d2.attempt, 0.1))
    w.handle(Failed(d1.attempt, failure(Category.USER_ERROR), 1.0))
    cmds = w.handle(Failed(d2.attempt, failure(Category.WORKER_LOST), 2.0))
    assert of(cmds, Dispatch) == []
    (rej,) = of(cmds, Reject)
    assert rej.failure.category is Category.WORKER_LOST


# --------------------------------------------------------------------------- cancel


def test_cancel_not_started_task_and_its_downstream():
    """future.cancel() on a task still queued at the backend: it is CANCELLED, the
    backend is told to withdraw the attempt, and tasks waiting on it are cancelled too."""
    w = make()
    d = only_dispatch(submit(w, 1))
    submit(w, 2, [1])
    submit(w, 3, [2])
    cmds = w.handle(Cancel(1, 1.0))
    assert of(cmds, CancelAttempt) == [CancelAttempt(d.attempt)]
    assert sorted(c.tid for c in of(cmds, Cancelled)) == [1, 2, 3]
    assert of(cmds, Reject) == []
    assert all(w.state(t) is State.CANCELLED for t in (1, 2, 3))
    assert w.failure(2) is None
    check_counts(w)


def test_cancel_pending_task_emits_no_cancel_attempt():
    """Cancelling a task still waiting for inputs: nothing was dispatched to withdraw."""
    w = make()
    submit(w, 1)
    submit(w, 2, [1])
    cmds = w.handle(Cancel(2, 1.0))
    assert of(cmds, CancelAttempt) == []
    assert of(cmds, Cancelled) == [Cancelled(2)]


def test_cancel_started_task_is_refused():
    """concurrent.futures semantics: a task already running cannot be cancelled; it
    completes normally and its dependents run."""
    w = make()
    d = only_dispatch(submit(w, 1))
    submit(w, 2, [1])
    w.handle(AttemptStarted(d.attempt, 0.5))
    assert w.handle(Cancel(1, 1.0)) == []
    assert w.state(1) is State.RUNNING
    cmds = w.handle(Succeeded(d.attempt, 2.0))
    assert [x.tid for x in of(cmds, Dispatch)] == [2]


def test_cancel_final_task_is_a_no_op():
    """Cancelling a task that already finished changes nothing."""
    w = make()
    d = only_dispatch(submit(w, 1))
    w.handle(Succeeded(d.attempt, 1.0))
    assert w.handle(Cancel(1, 2.0)) == []
    assert w.state(1) is State.DONE


def test_submit_on_cancelled_input_is_cancelled():
    """A task submitted on top of a cancelled input is cancelled, not failed."""
    w = make()
    submit(w, 1)
    w.handle(Cancel(1, 0.5))
    cmds = submit(w, 2, [1], now=1.0)
    assert of(cmds, Cancelled) == [Cancelled(2)] and of(cmds, Dispatch) == []


# --------------------------------------------------------------------------- overrides


def test_fail_override_stops_retries_with_replacement_record():
    """The failure handler says 'give up' on a lost worker although retries remain; its
    replacement record is used (with the task's key)."""
    w = make()
    d = only_dispatch(submit(w, 1, retries=5))
    mine = failure(Category.ENVIRONMENT, "no GPU here")
    cmds = w.handle(
        Failed(d.attempt, failure(Category.WORKER_LOST), 1.0, override=FailOverride(mine))
    )
    assert of(cmds, Dispatch) == []
    (rej,) = of(cmds, Reject)
    assert rej.failure.category is Category.ENVIRONMENT and rej.failure.key == "t1"


def test_fail_override_without_record_keeps_original():
    """FailOverride() with no record: the attempt's own failure is final."""
    w = make()
    d = only_dispatch(submit(w, 1, retries=5))
    cmds = w.handle(Failed(d.attempt, failure(Category.TIMEOUT), 1.0, override=FailOverride()))
    (rej,) = of(cmds, Reject)
    assert rej.failure.category is Category.TIMEOUT


def test_retry_override_with_new_budget_and_delay():
    """The failure handler retries a user error (not transient, retries=0) after 5 s and
    raises the budget to 1: the task waits RETRYING, runs again at the TimePassed, and the
    next transient failure may use the new budget once."""
    w = make(backoff=IMMEDIATE)
    d = only_dispatch(submit(w, 1, retries=0))
    cmds = w.handle(
        Failed(
            d.attempt,
            failure(Category.USER_ERROR),
            10.0,
            override=RetryOverride(delay=5.0, retries=1),
        )
    )
    assert of(cmds, Wake) == [Wake(15.0)] and of(cmds, Dispatch) == []
    assert w.state(1) is State.RETRYING
    d2 = only_dispatch(w.handle(TimePassed(15.0)))
    d3 = only_dispatch(w.handle(Failed(d2.attempt, failure(Category.WORKER_LOST), 16.0)))
    cmds = w.handle(Failed(d3.attempt, failure(Category.WORKER_LOST), 17.0))
    assert len(of(cmds, Reject)) == 1


def test_retry_override_without_delay_redispatches_now():
    """RetryOverride(): immediate retry through RETRYING -> READY -> RUNNING."""
    w = make()
    d = only_dispatch(submit(w, 1))
    cmds = w.handle(Failed(d.attempt, failure(Category.USER_ERROR), 1.0, override=RetryOverride()))
    assert [(t.start, t.finish) for t in of(cmds, Transition)] == [
        (State.RUNNING, State.RETRYING),
        (State.RETRYING, State.READY),
        (State.READY, State.RUNNING),
    ]
    assert only_dispatch(cmds).number == 2


# --------------------------------------------------------------------------- abort


def test_abort_fails_every_unfinished_task_with_category():
    """The master died for good: every task not yet final (running, pending, retrying)
    fails with RUNTIME_LOST; finished tasks keep their state."""
    w = make(backoff=SLOW)
    d1 = only_dispatch(submit(w, 1))
    w.handle(Succeeded(d1.attempt, 1.0))
    d2 = only_dispatch(submit(w, 2, retries=3))
    submit(w, 3, [2])
    d4 = only_dispatch(submit(w, 4, retries=3))
    w.handle(Failed(d4.attempt, failure(Category.WORKER_LOST), 1.0))
    assert w.state(4) is State.RETRYING

    cmds = w.handle(Abort(Category.RUNTIME_LOST, "master vanished", 2.0))
    rej = {r.tid: r.failure for r in of(cmds, Reject)}
    assert set(rej) == {2, 3, 4}
    for tid, f in rej.items():
        assert f.category is Category.RUNTIME_LOST
        assert f.transient is True
        assert f"t{tid}" in f.message and "master vanished" in f.message
    assert w.state(1) is State.DONE
    assert w.attempts(2)[-1].outcome == "runtime_lost"
    assert [type(c) for c in w.handle(Failed(d2.attempt, failure(Category.USER_ERROR), 3))] == [
        Dropped
    ]
    assert w.unfinished() == 0
    assert of(w.handle(TimePassed(100.0)), Dispatch) == []
    assert w.running_attempts() == []
    check_counts(w)


# --------------------------------------------------------------------------- invariants


def test_invalid_transition_carries_history_and_names_task():
    """An internal bug tries to move a DONE task back to RUNNING: InvalidTransition is
    raised, naming the task and carrying its full history."""
    w = make()
    d = only_dispatch(submit(w, 1, now=1.0))
    w.handle(Succeeded(d.attempt, 2.0))
    with pytest.raises(InvalidTransition) as ei:
        w._move(w._tasks[1], State.RUNNING, 3.0, [])
    e = ei.value
    assert e.key == "t1" and (e.start, e.finish) == ("DONE", "RUNNING")
    assert "'t1'" in str(e) and "DONE -> RUNNING" in str(e)
    assert [h[1:] for h in e.history] == [
        ("", "PENDING"),
        ("PENDING", "READY"),
        ("READY", "RUNNING"),
        ("RUNNING", "DONE"),
    ]
    assert w.state(1) is State.DONE
    check_counts(w)


def test_submit_same_tid_twice_raises():
    """A session bug submits a tid twice: refused loudly."""
    w = make()
    submit(w, 1)
    with pytest.raises(ValueError, match="submitted twice"):
        submit(w, 1)


def test_counts_consistent_after_mixed_scenario():
    """A busy session: successes, a retry, a failure with dependents, a cancel, a restore
    and a task still retrying: the per-state counts always add up to the number of tasks
    and match the tasks' states."""
    w = make(backoff=SLOW)
    w.handle(Restore(0, "t0", 0.0))
    d1 = only_dispatch(submit(w, 1, [0]))
    d2 = only_dispatch(submit(w, 2, retries=1))
    submit(w, 3, [1, 2])
    only_dispatch(submit(w, 4))
    d5 = only_dispatch(submit(w, 5, retries=2))
    submit(w, 6, [4])
    check_counts(w)
    for ev in [
        Succeeded(d1.attempt, 1.0),
        Failed(d2.attempt, failure(Category.TIMEOUT), 1.0),
        Cancel(4, 1.5),
        Failed(d5.attempt, failure(Category.WORKER_LOST), 2.0),
    ]:
        w.handle(ev)
    check_counts(w)
    d2b = only_dispatch(w.handle(TimePassed(2.0)))
    w.handle(Failed(d2b.attempt, failure(Category.USER_ERROR), 3.0))
    check_counts(w)
    assert {t: w.state(t) for t in range(7)} == {
        0: State.DONE,
        1: State.DONE,
        2: State.FAILED,
        3: State.FAILED,
        4: State.CANCELLED,
        5: State.RETRYING,
        6: State.CANCELLED,
    }
    assert w.unfinished() == 1


# --------------------------------------------------------------------------- validate()


def test_validate_catches_a_running_task_without_its_attempt():
    """A bug clears a RUNNING task's current attempt (its fencing token): every later
    result would be dropped and the task would hang. validate() names the task and the
    broken invariant, and shows the stimuli that led there."""
    w = make()
    submit(w, 1)
    w._tasks[1].current = None
    with pytest.raises(
        InvariantViolation, match=r"task 't1' \(RUNNING\) has no current attempt"
    ) as ei:
        w.validate()
    assert "Submit(tid=1, key='t1'" in str(ei.value)


def test_validate_catches_counts_that_do_not_add_up():
    """A bug moves a task without its count: ``unfinished()`` would lie to the session,
    which waits for it at shutdown."""
    w = make()
    submit(w, 1)
    w.counts[State.RUNNING] += 1
    with pytest.raises(InvariantViolation, match=r"counts\[RUNNING\] is 2 but 1 tasks"):
        w.validate()


def test_validate_catches_a_pending_task_whose_inputs_are_done():
    """A PENDING task none of whose inputs is unfinished would never be dispatched."""
    w = make()
    d = only_dispatch(submit(w, 1))
    submit(w, 2, [1])
    w.debug = False  # corrupt first, then look
    w._tasks[2].dependents = None
    w._tasks[1].dependents = None  # its input forgets it: its success will not wake it
    w.handle(Succeeded(d.attempt, 1.0))
    assert w.state(2) is State.PENDING
    with pytest.raises(InvariantViolation, match=r"'t2' \(PENDING\) waits but every input"):
        w.validate()


def test_validate_catches_a_task_retrying_without_a_timer():
    """A RETRYING task whose timer is lost never runs again (a hang, not a failure)."""
    w = make(backoff=SLOW)
    d = only_dispatch(submit(w, 1, retries=1))
    w.handle(Failed(d.attempt, failure(Category.WORKER_LOST), 1.0))
    w._timers.clear()
    with pytest.raises(InvariantViolation, match="has no timer to wake it"):
        w.validate()


def test_story_is_bounded_and_goes_into_an_impossible_transition(monkeypatch):
    """The machine keeps only its recent stimuli; an InvalidTransition raised by a buggy
    handler inside ``handle`` (here: the tick handler moves a DONE task back to RUNNING)
    carries them as a note, so the report shows what led there."""
    w = make()
    for tid in range(1, 300):
        submit(w, tid)
    assert len(w.story) == 200
    w.handle(Succeeded(only_dispatch(submit(w, 300)).attempt, 1.0))
    monkeypatch.setattr(
        w, "_tick", lambda now, out: w._move(w._tasks[300], State.RUNNING, now, out)
    )
    with pytest.raises(InvalidTransition, match="DONE -> RUNNING") as ei:
        w.handle(TimePassed(2.0))
    (note,) = ei.value.__notes__
    assert "Succeeded(attempt=300" in note and note.rstrip().endswith("TimePassed(now=2.0)")


def _random_run(seed: int, steps: int = 300) -> Workflow:
    import random

    rng = random.Random(seed)
    w = make(backoff=SLOW, rand=rng.random, keep_going=rng.random() < 0.9)
    now, tid, running = 0.0, 0, []
    cats = [Category.WORKER_LOST, Category.TIMEOUT, Category.USER_ERROR, Category.ENVIRONMENT]
    for _ in range(steps):
        now += rng.random()
        r = rng.random()
        if r < 0.3 or not tid:
            tid += 1
            deps = tuple(rng.sample(range(1, tid), k=min(tid - 1, rng.randint(0, 2))))
            cmds = submit(w, tid, deps, retries=rng.randint(0, 2), now=now)
        elif r < 0.45 and running:
            cmds = w.handle(AttemptStarted(rng.choice(running), now, worker="w1", pid=7))
        elif r < 0.65 and running:
            cmds = w.handle(Succeeded(rng.choice(running), now))
        elif r < 0.85 and running:
            f = failure(rng.choice(cats))
            cmds = w.handle(Failed(rng.choice(running), f, now, retry_requested=rng.random() < 0.2))
        elif r < 0.92:
            cmds = w.handle(Cancel(rng.randint(1, tid), now))
        elif r < 0.997:
            cmds = w.handle(TimePassed(now + rng.random() * 5))
        else:
            cmds = w.handle(Abort(Category.RUNTIME_LOST, "gone", now))
        running.extend(c.attempt for c in of(cmds, Dispatch))  # stale ids stay: fencing
    return w


@pytest.mark.parametrize("seed", range(25))
def test_random_stimuli_keep_every_invariant(seed):
    """Random submissions (with dependencies), starts, results, failures of every kind,
    cancels, ticks and the odd abort, including events for superseded attempts: the
    workflow validates after every one (the fixture), and at the end every task that is
    not final is waiting for something."""
    w = _random_run(seed)
    w.validate()
    for tid in list(w._tasks):
        assert w.state(tid).final or w.state(tid) in (State.PENDING, State.RUNNING, State.RETRYING)


def test_no_attempt_ends_before_it_started():
    """Issue 24 item 4: an attempt's start came from one clock and its end from another
    (the client's, the worker's), so short attempts showed negative durations ("done after
    -0.0s"). An end before the start is recorded as the start: never a negative duration."""
    w = make()
    d = only_dispatch(submit(w, 1, retries=1))
    w.handle(AttemptStarted(d.attempt, 100.0, "w1", "node2", 5))
    w.handle(Succeeded(d.attempt, 99.98))  # the end, by a clock 20 ms behind
    (a,) = w.attempts(1)
    assert a.started == 100.0 and a.ended == 100.0
    d2 = only_dispatch(submit(w, 2, retries=1))
    w.handle(AttemptStarted(d2.attempt, 50.0, "w1", "node2", 6))
    w.handle(Failed(d2.attempt, lost(worker="w1", pid=6), 49.0))  # the client's clock
    assert all(x.ended is not None and x.ended >= x.started for x in w.attempts(2) if x.started)


def test_a_retry_is_asked_to_go_elsewhere():
    """Issue 24: a retry after a lost, timed-out or ENVIRONMENT attempt names the workers
    it happened on (``Dispatch.avoid``), so a backend that can choose sends it to another
    worker while one is there; a user error says nothing about the worker."""
    w = make()
    d = only_dispatch(submit(w, 1, retries=5))
    assert d.avoid == ()
    w.handle(AttemptStarted(d.attempt, 1.0, "tcp://n2:1", "node2", 5))
    d = only_dispatch(w.handle(Failed(d.attempt, lost(worker="tcp://n2:1", pid=5), 2.0)))
    assert d.avoid == ("tcp://n2:1",)
    w.handle(AttemptStarted(d.attempt, 3.0, "tcp://n3:1", "node3", 6))
    late = failure(Category.TIMEOUT, "ran past its timeout", worker="tcp://n3:1", pid=6)
    d = only_dispatch(w.handle(Failed(d.attempt, late, 4.0)))
    assert d.avoid == ("tcp://n2:1", "tcp://n3:1")


def test_an_unblamed_loss_is_retried_without_charge_a_bounded_number_of_times():
    """A loss that is not the attempt's doing (the backend says why: the link to the
    scheduler broke) is retried even with retries=0, marked "not charged: <why>"; at most
    FREE_RETRIES times, so a link that keeps breaking cannot retry a task forever."""
    w = make()
    d = only_dispatch(submit(w, 1, retries=0))
    why = "the link to the Dask scheduler at tcp://head:8786 broke"
    for i in range(FREE_RETRIES):
        w.handle(AttemptStarted(d.attempt, float(i), "w1", "h1", 10 + i))
        cmds = w.handle(Failed(d.attempt, failure(Category.RUNTIME_LOST), i + 0.5, unblamed=why))
        assert of(cmds, Reject) == []
        assert w.attempts(1)[-2].note == f"not charged: {why}"
        d = only_dispatch(cmds)
    w.handle(AttemptStarted(d.attempt, 9.0, "w1", "h1", 20))
    cmds = w.handle(Failed(d.attempt, failure(Category.RUNTIME_LOST), 9.5, unblamed=why))
    (rej,) = of(cmds, Reject)
    assert rej.failure.category is Category.RUNTIME_LOST and w.state(1) is State.FAILED
    w.validate()


# --------------------------------------------------------------------------- settled inputs


def _settled(w: Workflow, tid: int, groups, plain=(), now: float = 0.0) -> list:
    """Submit ``tid`` taking each group (members, at_least) settled, and ``plain`` inputs."""
    from pilotfish.core.workflow import Settled

    listed = {m for members, _need in groups for m in members}
    deps = tuple(dict.fromkeys([*plain, *(m for members, _n in groups for m in members)]))
    st = Settled(frozenset(listed - set(plain)), tuple((tuple(m), n) for m, n in groups))
    return w.handle(Submit(tid, f"t{tid}", deps, 0, now, st))


def test_settled_inputs_run_the_dependent_whatever_they_became():
    """An analysis over an ensemble (issue 25 item 5): it waits for every member to
    finish, and runs when they have, though some failed or were cancelled; a plain
    dependent of the same failed member fails at once as always."""
    w = make()
    d1, d2 = only_dispatch(submit(w, 1)), only_dispatch(submit(w, 2))
    only_dispatch(submit(w, 5))
    submit(w, 3, [5])  # waits for 5: cancelled below, while PENDING
    assert of(_settled(w, 10, [((1, 2, 3), 0)]), Dispatch) == []
    plain = submit(w, 11, [1])
    assert of(plain, Dispatch) == []
    cmds = w.handle(Failed(d1.attempt, failure(Category.USER_ERROR), 1.0))
    assert w.state(1) is State.FAILED and w.state(11) is State.FAILED
    assert w.state(10) is State.PENDING  # still waiting for 2 and 3
    assert of(cmds, Dispatch) == []
    w.handle(Cancel(3, 2.0))
    assert w.state(3) is State.CANCELLED and w.state(10) is State.PENDING
    cmds = w.handle(Succeeded(d2.attempt, 3.0))
    assert [d.tid for d in of(cmds, Dispatch)] == [10]
    check_counts(w)


def test_settled_with_too_few_successes_fails_naming_the_first_failure():
    """``at_least`` not met: the dependent does not run; DEPENDENCY_FAILED says how many
    succeeded, how many it asked for, and where the first failure began."""
    w = make()
    ds = [only_dispatch(submit(w, i)) for i in (1, 2, 3)]
    _settled(w, 10, [((1, 2, 3), 2)])
    w.handle(Succeeded(ds[0].attempt, 1.0))
    w.handle(Failed(ds[1].attempt, failure(Category.TIMEOUT, "timed out after 5 s"), 2.0))
    assert w.state(10) is State.PENDING
    cmds = w.handle(Failed(ds[2].attempt, failure(Category.USER_ERROR), 3.0))
    assert of(cmds, Dispatch) == []
    rej = [r for r in of(cmds, Reject) if r.tid == 10]
    assert len(rej) == 1 and w.state(10) is State.FAILED
    f = rej[0].failure
    assert f.category is Category.DEPENDENCY_FAILED and (f.upstream, f.root) == ("t2", "t2")
    assert "1 of its 3 settled inputs succeeded" in f.message and "at least 2" in f.message
    assert "timed out after 5 s" in f.message
    check_counts(w)


def test_settled_inputs_already_finished_at_submit_and_a_plain_one_that_failed():
    """Members that finished before the dependent was submitted count at once; an input
    that is both listed settled and passed plainly is plain: its failure fails the call."""
    w = make()
    d1, d2 = only_dispatch(submit(w, 1)), only_dispatch(submit(w, 2))
    w.handle(Failed(d1.attempt, failure(Category.USER_ERROR), 1.0))
    w.handle(Succeeded(d2.attempt, 1.0))
    assert [d.tid for d in of(_settled(w, 10, [((1, 2), 1)]), Dispatch)] == [10]
    cmds = _settled(w, 11, [((1, 2), 0)], plain=(1,))
    assert w.state(11) is State.FAILED and of(cmds, Dispatch) == []
    assert [d.tid for d in of(_settled(w, 12, [((1, 2), 0)]), Dispatch)] == [12]
    check_counts(w)


def test_a_task_that_keeps_timing_out_stops_after_timeout_retries():
    """Issue 25 item 17: a hang tends to repeat; with timeout_retries=1 the second
    timeout is final though retries are left, and the attempt's note says why; other
    transient failures still use the whole budget."""
    w = make()
    d = only_dispatch(w.handle(Submit(1, "t1", (), 3, 0.0, None, 1)))
    d = only_dispatch(w.handle(Failed(d.attempt, failure(Category.WORKER_LOST), 1.0)))
    d = only_dispatch(w.handle(Failed(d.attempt, failure(Category.TIMEOUT), 2.0)))
    cmds = w.handle(Failed(d.attempt, failure(Category.TIMEOUT), 3.0))
    assert of(cmds, Dispatch) == [] and w.state(1) is State.FAILED
    last = w.attempts(1)[-1]
    assert last.note and "timed out 2 times (timeout_retries=1" in last.note
    assert [a.outcome for a in w.attempts(1)] == ["worker_lost", "timeout", "timeout"]
    w2 = make()  # no limit of its own (None): the retry budget alone
    d = only_dispatch(w2.handle(Submit(1, "t1", (), 2, 0.0)))
    for i in range(2):
        d = only_dispatch(w2.handle(Failed(d.attempt, failure(Category.TIMEOUT), 1.0 + i)))
    w2.handle(Failed(d.attempt, failure(Category.TIMEOUT), 5.0))
    assert len(w2.attempts(1)) == 3 and w2.state(1) is State.FAILED
