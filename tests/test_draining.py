"""Bad-node draining (issue 17): a worker or host on which several *different* tasks
fail (WORKER_LOST, ENVIRONMENT, TIMEOUT) within a window is drained, and those attempts
are not charged to the tasks' retry budgets.

The rule is pure (:mod:`pilotfish.core.drain`), fed by the workflow core
(:class:`pilotfish.core.workflow.Workflow`, which refunds and emits ``Drained``); the
attempt ledger refuses new work on a drained worker (``ledger.Drain``). Most tests
drive them with explicit events and times; the last ones run a Session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from pilotfish.core import ledger as L
from pilotfish.core.drain import DrainPolicy, DrainRule
from pilotfish.core.policy import NO_BACKOFF
from pilotfish.core.states import State
from pilotfish.core.workflow import (
    AttemptStarted,
    Dispatch,
    Drained,
    Failed,
    Reject,
    Submit,
    Succeeded,
    Workflow,
)
from pilotfish.errors import Category, FailureRecord

TIMEOUT, ENV, LOST = Category.TIMEOUT, Category.ENVIRONMENT, Category.WORKER_LOST


def fail(rule: DrainRule, key: str, cat: Category, worker: str, now: float, **kw: Any) -> list[Any]:
    kw.setdefault("host", "h1")
    kw.setdefault("pid", 100)
    kw.setdefault("attempt", hash((key, now)) % 10_000)
    return rule.failed(key=key, category=cat, worker=worker, now=now, **kw)


# ------------------------------------------------------------------ the rule
def test_three_different_tasks_timing_out_on_one_worker_drain_it() -> None:
    """A worker with a dead GPU makes every member time out: the third different task
    drains it, and the decision names the tasks and why."""
    rule = DrainRule(DrainPolicy(tasks=3, window=60))
    assert fail(rule, "a", TIMEOUT, "w1", 0) == []
    assert fail(rule, "b", TIMEOUT, "w1", 10) == []
    [d] = fail(rule, "c", TIMEOUT, "w1", 20)
    assert (d.kind, d.name, d.keys) == ("worker", "w1", ("a", "b", "c"))
    assert "3 different tasks failed there (timeout) within 20 s" in d.reason
    assert rule.is_drained("w1", "h1")
    assert fail(rule, "d", TIMEOUT, "w1", 21) == []  # drained once


def test_one_task_failing_again_and_again_is_the_tasks_problem() -> None:
    """The same member timing out three times on one worker is not evidence against it."""
    rule = DrainRule(DrainPolicy(tasks=2, window=60))
    for t in range(3):
        assert fail(rule, "a", TIMEOUT, "w1", t) == []
    assert not rule.is_drained("w1", "h1")


def test_old_evidence_leaves_the_window() -> None:
    rule = DrainRule(DrainPolicy(tasks=2, window=30))
    assert fail(rule, "a", ENV, "w1", 0) == []
    assert fail(rule, "b", ENV, "w1", 100) == []  # 'a' is 100 s old: out of the window
    assert len(fail(rule, "c", ENV, "w1", 110)) == 1


def test_user_errors_and_command_failures_are_no_evidence() -> None:
    rule = DrainRule(DrainPolicy(tasks=2))
    for i, cat in enumerate((Category.USER_ERROR, Category.COMMAND_FAILED)):
        assert fail(rule, f"t{i}", cat, "w1", i) == []
    assert not rule.is_drained("w1", "h1")


def test_one_worker_death_is_one_incident() -> None:
    """A Dask worker dies holding three running attempts: one incident, not three; three
    workers of one host dying with different tasks drain the host (another host exists)."""
    rule = DrainRule(DrainPolicy(tasks=3))
    rule.seen("h2")
    for key in "abc":
        assert fail(rule, key, LOST, "w1", 1, pid=7) == []
    assert fail(rule, "d", LOST, "w2", 2, pid=8) == []
    [d] = fail(rule, "e", LOST, "w3", 3, pid=9)
    assert (d.kind, d.name, d.keys) == ("host", "h1", ("a", "d", "e"))


def test_the_last_host_is_never_drained() -> None:
    """On one machine (the local backend) every worker shares the host: dying workers
    there are evidence against workers, never a reason to drain the only host."""
    rule = DrainRule(DrainPolicy(tasks=2))
    assert fail(rule, "a", LOST, "w1", 1, pid=1) == []
    assert fail(rule, "b", LOST, "w2", 2, pid=2) == []
    assert fail(rule, "c", LOST, "w3", 3, pid=3) == []
    assert not rule.drained


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (False, None), (True, DrainPolicy()), (4, DrainPolicy(4)),
     ((2, 30), DrainPolicy(2, 30.0))],
)  # fmt: skip
def test_policy_coercion(value: Any, expected: DrainPolicy | None) -> None:
    assert DrainPolicy.coerce(value) == expected


@pytest.mark.parametrize("value", [1, 0, "3", (3,), (3, -1)])
def test_bad_policies_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="drain_after"):
        DrainPolicy.coerce(value)


# ------------------------------------------------------------------ the workflow core
def wf_fail(w: Workflow, aid: int, cat: Category, worker: str, now: float) -> list[Any]:
    w.handle(AttemptStarted(aid, now, worker, "h1", 100 + aid))
    f = FailureRecord(key="?", category=cat, message="x", transient=cat.transient, time=now)
    return w.handle(Failed(aid, f, now))


def current(cmds: list[Any]) -> int:
    [d] = [c for c in cmds if isinstance(c, Dispatch)]
    return d.attempt


def test_drained_worker_attempts_are_not_charged() -> None:
    """Three members each time out once on worker w1 (retries=1 each): the third drains
    w1, the first two get their retry back, and every member can still be retried once
    more on a healthy worker."""
    w = Workflow(backoff=NO_BACKOFF, drain=DrainPolicy(tasks=3, window=60))
    aids = [current(w.handle(Submit(t, f"t{t}", (), 1, 0.0))) for t in (1, 2, 3)]
    nxt = [current(wf_fail(w, a, TIMEOUT, "w1", 1.0 + i)) for i, a in enumerate(aids[:2])]
    assert [w._tasks[t].retries_used for t in (1, 2)] == [1, 1]
    cmds = wf_fail(w, aids[2], TIMEOUT, "w1", 3.0)
    [d] = [c for c in cmds if isinstance(c, Drained)]
    assert (d.kind, d.name, d.keys) == ("worker", "w1", ("t1", "t2", "t3"))
    assert [w._tasks[t].retries_used for t in (1, 2, 3)] == [0, 0, 0]
    assert w.attempts(1)[0].note == "not charged: worker w1 drained"
    assert w.attempts(3)[0].note == "not charged: worker w1 drained"
    # the budgets are whole again: one more timeout each on w2 is retried
    third = current(cmds)
    for aid in (*nxt, third):
        assert [c for c in wf_fail(w, aid, TIMEOUT, "w2", 10.0) if isinstance(c, Dispatch)]
    assert w.drained()[0].name == "w1"


def test_a_late_failure_on_a_drained_worker_is_not_charged() -> None:
    """An attempt that was already running on w1 when it was drained fails there too."""
    w = Workflow(backoff=NO_BACKOFF, drain=DrainPolicy(tasks=2))
    aids = [current(w.handle(Submit(t, f"t{t}", (), 0, 0.0))) for t in (1, 2, 3)]
    wf_fail(w, aids[0], TIMEOUT, "w1", 1.0)  # first failure, retries=0 -> FAILED
    assert w.state(1) is State.FAILED
    cmds = wf_fail(w, aids[1], TIMEOUT, "w1", 2.0)  # drains w1; t2 retried free
    assert [c for c in cmds if isinstance(c, Drained)]
    assert w.state(2) is State.RUNNING
    cmds = wf_fail(w, aids[2], TIMEOUT, "w1", 3.0)
    assert w.state(3) is State.RUNNING
    assert w.attempts(3)[0].note == "not charged: worker w1 was drained"


def test_environment_failure_gets_one_free_retry_with_draining_on() -> None:
    """A broken node fails everything ENVIRONMENT (a module missing on its image): the
    first ENVIRONMENT failure of a task may be the node's, so it is retried once without
    charge; the second is the task's own (permanent, as without draining)."""
    w = Workflow(backoff=NO_BACKOFF, drain=DrainPolicy(tasks=3))
    a1 = current(w.handle(Submit(1, "t1", (), 0, 0.0)))
    a2 = current(wf_fail(w, a1, ENV, "w1", 1.0))
    assert w.attempts(1)[0].note == "not charged: ENVIRONMENT on worker w1 may be the worker's"
    cmds = wf_fail(w, a2, ENV, "w2", 2.0)
    assert [c for c in cmds if isinstance(c, Reject)] and w.state(1) is State.FAILED


def test_without_draining_environment_is_permanent_as_before() -> None:
    w = Workflow(backoff=NO_BACKOFF)
    a1 = current(w.handle(Submit(1, "t1", (), 3, 0.0)))
    wf_fail(w, a1, ENV, "w1", 1.0)
    assert w.state(1) is State.FAILED and w.attempts(1)[0].note is None


def test_free_retries_are_bounded() -> None:
    """A task that keeps landing on drained places is not retried forever."""
    w = Workflow(backoff=NO_BACKOFF, drain=DrainPolicy(tasks=2))
    other = current(w.handle(Submit(9, "t9", (), 0, 0.0)))
    wf_fail(w, other, TIMEOUT, "w1", 0.5)
    aid = current(w.handle(Submit(1, "t1", (), 0, 0.0)))
    aid = current(wf_fail(w, aid, TIMEOUT, "w1", 1.0))  # drains w1: free
    aid = current(wf_fail(w, aid, TIMEOUT, "w1", 2.0))  # was drained: free (2nd)
    wf_fail(w, aid, TIMEOUT, "w1", 3.0)  # no more free retries, budget 0
    assert w.state(1) is State.FAILED and len(w.attempts(1)) == 3


def test_resume_points_at_the_lost_attempt_across_an_environment_failure() -> None:
    """Attempt 1 is lost with a checkpoint, attempt 2 lands on a broken node
    (ENVIRONMENT, never ran): attempt 3 resumes from attempt 1's files."""
    w = Workflow(backoff=NO_BACKOFF, drain=DrainPolicy(tasks=3))
    a1 = current(w.handle(Submit(1, "t1", (), 3, 0.0)))
    cmds = wf_fail(w, a1, LOST, "w1", 1.0)
    [d2] = [c for c in cmds if isinstance(c, Dispatch)]
    assert d2.resume == (a1, 1)
    [d3] = [c for c in wf_fail(w, d2.attempt, ENV, "w2", 2.0) if isinstance(c, Dispatch)]
    assert d3.resume == (a1, 1)
    w.handle(AttemptStarted(d3.attempt, 3.0, "w3", "h1", 5))
    w.handle(Succeeded(d3.attempt, 4.0, note="resumed from attempt 1: md.cpt, 48 MB"))
    assert w.attempts(1)[2].note == "resumed from attempt 1: md.cpt, 48 MB"


# ------------------------------------------------------------------ the ledger
def test_ledger_drain_requeues_held_and_refuses_new_work() -> None:
    """w1 is drained while it runs attempt 1 and has prefetched 2 and 3: 1 runs on,
    2 and 3 go back on the queue unblamed, and w1 may neither hold nor start again."""
    led = L.Ledger()
    led.handle(L.Submit(tuple((i, f"k{i}", f"item{i}", None) for i in (1, 2, 3, 4))))
    led.handle(L.Hold("w1", (1, 2, 3)))
    led.handle(L.Start("w1", 1, 10, "h", 1.0))
    cmds = led.handle(L.Drain("w1", "3 different tasks timed out", 2.0))
    assert cmds == [L.Requeue(("item2", "item3"))]
    assert led.started_on("w1") == [1]
    assert led.handle(L.Hold("w1", (4,))) == [L.Dropped("w1", 4, "worker w1 is drained")]
    [r] = led.handle(L.Start("w1", 4, 10, "h", 3.0))
    assert isinstance(r, L.Refused) and "drained" in r.reason
    assert [type(c) for c in led.handle(L.Start("w2", 2, 11, "h", 3.0))] == [
        L.Granted,
        L.Report,
    ]
    assert led.handle(L.Finish("w1", 1)) == [L.Accept("w1", 1)]


# ------------------------------------------------------------------ a Session
def _break_first_worker(marker: str) -> None:
    """The session's initializer: the first worker process to start is broken (as a node
    whose image lacks a library); every attempt it is given fails ENVIRONMENT."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    raise ImportError("libcuda.so.1: cannot open shared object file (this node is broken)")


def _member(i: int) -> int:
    import time

    time.sleep(0.05)
    return i


def test_session_drains_a_broken_worker(tmp_path: Path) -> None:
    """One of two local workers is broken (its initializer fails): its tasks fail
    ENVIRONMENT; after two different tasks, it is drained, a HostDrained event names it
    and the tasks, and the failed attempts are marked not charged. With a backend that
    can drain (replace the worker), every member then succeeds."""
    events: list[Any] = []
    with pilotfish.Session(
        workers=2,
        rundir=str(tmp_path / "run"),
        initializer=_break_first_worker,
        initargs=(str(tmp_path / "broken"),),
        drain_after=(2, 60),
        on_event=events.append,
        backoff=pilotfish.Backoff(base=0.01),
    ) as s:
        tasks = [s.submit(_member, i) for i in range(8)]
        pilotfish.wait(tasks, timeout=60)
        can_drain = callable(getattr(s._backend, "drain", None))
    drained = [e for e in events if isinstance(e, pilotfish.HostDrained)]
    env = Category.ENVIRONMENT.value
    shown = [t for t in tasks if any(a.outcome == env for a in t.attempts)]
    if len(shown) < 2:
        pytest.skip("the broken worker was given fewer than two different tasks this time")
    assert len(drained) == 1 and drained[0].kind == "worker"
    assert len(drained[0].keys) >= 2 and "different tasks failed there" in drained[0].reason
    for t in shown:  # each task's first ENVIRONMENT failure was not charged
        first = next(a for a in t.attempts if a.outcome == env)
        assert first.note is not None and first.note.startswith("not charged"), first
    if can_drain:  # the broken worker was replaced: nothing more failed
        assert [t.result() for t in tasks] == list(range(8))


def test_bad_drain_after_is_refused_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(pilotfish.InvalidTask, match="drain_after"):
        pilotfish.Session(drain_after=1, rundir=str(tmp_path), backend="local")


def test_a_worker_name_that_keeps_dying_is_drained() -> None:
    """A Dask nanny restarts worker "3" under the same name after every death, and every
    task sent there dies with it: after two different tasks (two deaths), "3" is drained,
    even on one machine (the host is the last one and is never drained)."""
    rule = DrainRule(DrainPolicy(tasks=2))
    assert fail(rule, "a", LOST, "3", 1, pid=11) == []
    [d] = fail(rule, "b", LOST, "3", 2, pid=12)
    assert (d.kind, d.name, d.keys) == ("worker", "3", ("a", "b"))
