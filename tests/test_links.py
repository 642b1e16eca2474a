"""Linked dispatch in the pure workflow (``Workflow.links``, issue 26): a task whose
inputs are still running is dispatched *linked* to their attempts, so a backend that
passes values between attempts itself (Dask's scheduler) chains them without a round
trip through the client. These tests drive ``Workflow.handle`` directly (no processes)
and check the ledger's rules for a linked attempt: its end is held until its inputs are
DONE, it is dropped (not charged) when an input's attempt does not succeed, and what was
linked to it is dropped in turn."""

from __future__ import annotations

import pytest

from pilotfish.backends._links import LinkTable
from pilotfish.backends.local.dispatch import (
    Boot,
    CancelRequest,
    Dispatcher,
    HelloFrom,
    ResultFrom,
    SendWorker,
    SubmitAttempts,
    ToClient,
    WorkerExited,
)
from pilotfish.core.states import State
from pilotfish.core.workflow import (
    Abort,
    AttemptStarted,
    Cancel,
    CancelAttempt,
    Cancelled,
    Dispatch,
    Dropped,
    Failed,
    Reject,
    Resolve,
    Submit,
    Succeeded,
    TimePassed,
    Unlinked,
    Workflow,
)
from pilotfish.errors import Category
from pilotfish.wire.messages import Result, RunAttempt
from pilotfish.wire.messages import Unlinked as Unlinked_  # what a master sends
from test_workflow import SLOW, failure, make, of, submit


@pytest.fixture(autouse=True)
def _validate_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Workflow, "debug", True)


def linked(**kw) -> Workflow:
    w = make(**kw)
    w.links = True
    return w


def dispatch_of(cmds, tid: int) -> Dispatch:
    (d,) = [c for c in of(cmds, Dispatch) if c.tid == tid]
    return d


def chain(w: Workflow, n: int, retries: int = 0) -> list[Dispatch]:
    """Tasks 1..n, each the input of the next; their first dispatches."""
    out = [dispatch_of(submit(w, 1, retries=retries), 1)]
    for tid in range(2, n + 1):
        out.append(dispatch_of(submit(w, tid, deps=[tid - 1], retries=retries), tid))
    return out


def test_a_chain_goes_out_at_once_each_link_naming_its_input_attempt():
    w = linked()
    a, b, c = chain(w, 3)
    assert a.links == () and b.links == ((1, a.attempt),) and c.links == ((2, b.attempt),)
    assert all(w.state(t) is State.RUNNING for t in (1, 2, 3))


def test_without_links_a_dependent_waits_for_its_input():
    w = make()
    submit(w, 1)
    assert of(submit(w, 2, deps=[1]), Dispatch) == []
    assert w.state(2) is State.PENDING


def test_an_end_that_comes_before_the_inputs_is_held_then_applied_in_order():
    """The dependent's result arrives first (a small value travels faster than its
    input's large one): nothing is resolved until the input is DONE, then both are."""
    w = linked()
    a, b, c = chain(w, 3)
    assert w.handle(Succeeded(c.attempt, 3.0)) == []
    assert w.handle(Succeeded(b.attempt, 2.0)) == []
    assert w.state(2) is State.RUNNING and w.state(3) is State.RUNNING
    cmds = w.handle(Succeeded(a.attempt, 1.0))
    assert [r.tid for r in of(cmds, Resolve)] == [1, 2, 3]
    assert all(w.state(t) is State.DONE for t in (1, 2, 3))
    assert w.attempts(2)[0].outcome == "done" and w.attempts(2)[0].ended == 2.0


def test_a_held_failure_counts_once_the_input_is_done():
    w = linked()
    a, b = chain(w, 2)
    w.handle(AttemptStarted(b.attempt, 1.0, worker="w1"))
    assert w.handle(Failed(b.attempt, failure(Category.USER_ERROR), 2.0)) == []
    cmds = w.handle(Succeeded(a.attempt, 3.0))
    assert [r.tid for r in of(cmds, Resolve)] == [1]
    assert [r.tid for r in of(cmds, Reject)] == [2]
    assert w.failure(2).category is Category.USER_ERROR


def test_an_input_lost_drops_what_was_linked_to_it_uncharged_and_links_its_retry():
    w = linked()
    a, b, c = chain(w, 3, retries=1)
    w.handle(AttemptStarted(a.attempt, 1.0, worker="w1", host="h1"))
    w.handle(Succeeded(c.attempt, 1.5))  # held: dropped with its attempt below
    lost = failure(Category.WORKER_LOST, worker="w1", host="h1")
    cmds = w.handle(Failed(a.attempt, lost, 2.0))
    assert {x.attempt for x in of(cmds, CancelAttempt)} == {b.attempt, c.attempt}
    a2, b2, c2 = (dispatch_of(cmds, t) for t in (1, 2, 3))
    assert b2.links == ((1, a2.attempt),) and c2.links == ((2, b2.attempt),)
    for tid in (2, 3):
        first = w.attempts(tid)[0]
        assert first.outcome == "dropped" and "not charged" in (first.note or "")
        assert w._tasks[tid].retries_used == 0
    assert "'t1' (attempt" in (w.attempts(2)[0].note or "")
    hist = [(f, t) for _, f, t in w.history(2)]
    assert ("RUNNING", "PENDING") in hist
    # a late result of a dropped attempt is fenced off
    assert of(w.handle(Succeeded(b.attempt, 2.5)), Dropped)
    cmds = w.handle(Succeeded(a2.attempt, 3.0))
    cmds += w.handle(Succeeded(b2.attempt, 3.1))
    cmds += w.handle(Succeeded(c2.attempt, 3.2))
    assert all(w.state(t) is State.DONE for t in (1, 2, 3))


def test_an_input_that_fails_for_good_fails_the_linked_chain_with_its_root():
    w = linked()
    a, b, c = chain(w, 3)
    cmds = w.handle(Failed(a.attempt, failure(Category.USER_ERROR, "bad input"), 2.0))
    assert {x.attempt for x in of(cmds, CancelAttempt)} == {b.attempt, c.attempt}
    assert {r.tid for r in of(cmds, Reject)} == {1, 2, 3}
    for tid in (2, 3):
        f = w.failure(tid)
        assert f.category is Category.DEPENDENCY_FAILED and f.root == "t1"
        assert w.attempts(tid)[0].outcome == "dropped"


def test_the_backend_cannot_link_then_the_task_waits_for_done_inputs():
    """Unlinked: the input attempt was not there to take a value from. Nothing ran, no
    charge; the task is sent again only once its input is DONE, with the value."""
    w = linked()
    a, b, c = chain(w, 3)
    cmds = w.handle(Unlinked(b.attempt, "its input's value was lost with its worker", 1.0))
    assert [x.attempt for x in of(cmds, CancelAttempt)] == [c.attempt]
    assert w.state(2) is State.PENDING and w.state(3) is State.PENDING
    assert "lost with its worker" in (w.attempts(2)[0].note or "")
    cmds = w.handle(Succeeded(a.attempt, 2.0))
    b2 = dispatch_of(cmds, 2)
    assert b2.links == ()  # not linked again: it takes the value
    c2 = dispatch_of(cmds, 3)
    assert c2.links == ((2, b2.attempt),)


def test_unlinked_when_the_input_is_already_done_sends_it_again_at_once():
    w = linked()
    a, b = chain(w, 2)
    w.handle(Succeeded(a.attempt, 1.0))
    cmds = w.handle(Unlinked(b.attempt, "gone", 2.0))
    assert dispatch_of(cmds, 2).links == ()


def test_cancelling_a_linked_input_cancels_what_waits_for_it():
    w = linked()
    a, b, c = chain(w, 3)
    cmds = w.handle(Cancel(1, 1.0))
    assert {x.attempt for x in of(cmds, CancelAttempt)} == {a.attempt, b.attempt, c.attempt}
    assert {x.tid for x in of(cmds, Cancelled)} == {1, 2, 3}


def test_a_task_that_takes_inputs_settled_is_never_linked():
    from pilotfish.core.workflow import Settled

    w = linked()
    submit(w, 1)
    cmds = w.handle(Submit(2, "t2", (1,), 0, 0.0, Settled(frozenset({1}), ((((1,), 0)),))))
    assert of(cmds, Dispatch) == []


def test_a_task_with_an_input_not_yet_sent_waits_then_links_when_it_is():
    """Every input not DONE must be RUNNING: one waiting out a retry's backoff keeps the
    task waiting, and it links to the retry once that is sent."""
    w = linked(backoff=SLOW)
    (a,) = chain(w, 1, retries=1)
    w.handle(Failed(a.attempt, failure(Category.WORKER_LOST), 1.0))
    assert w.state(1) is State.RETRYING
    assert of(submit(w, 2, deps=[1], now=1.5), Dispatch) == []
    cmds = w.handle(TimePassed(100.0))
    a2, b = dispatch_of(cmds, 1), dispatch_of(cmds, 2)
    assert b.links == ((1, a2.attempt),)


def test_abort_fails_linked_tasks_too():
    w = linked()
    chain(w, 3)
    cmds = w.handle(Abort(Category.RUNTIME_LOST, "gone", 1.0))
    assert {r.tid for r in of(cmds, Reject)} == {1, 2, 3}


def test_a_long_chain_whose_head_is_sent_again_does_not_recurse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """5,000 linked tasks: the head lost and retried re-links every one, and their held
    ends resolve at once when the head is DONE (loops, not recursion)."""
    w = linked()
    monkeypatch.setattr(Workflow, "debug", False)  # validate() is O(tasks) per step
    n = 5000
    ds = chain(w, n, retries=1)
    for d in reversed(ds[1:]):
        w.handle(Succeeded(d.attempt, 1.0))
    cmds = w.handle(Failed(ds[0].attempt, failure(Category.WORKER_LOST), 2.0))
    assert len(of(cmds, CancelAttempt)) == n - 1 and len(of(cmds, Dispatch)) == n
    again = {d.tid: d for d in of(cmds, Dispatch)}
    for tid in range(n, 1, -1):
        w.handle(Succeeded(again[tid].attempt, 3.0))
    cmds = w.handle(Succeeded(again[1].attempt, 4.0))
    assert len(of(cmds, Resolve)) == n
    w.validate()


# --------------------------------------------------------------------------- at a master
# The local master resolves links itself (pilotfish.backends._links.LinkTable, fed by
# its dispatcher): a linked attempt waits off the queue and is queued with its inputs'
# values in place as their results come through the master.


def _ra(aid: int, links: tuple[tuple[int, int], ...] = (), n: int = 1) -> RunAttempt:
    deps = tuple(b"" if any(i == j for j, _ in links) else b"v" for i in range(n))
    return RunAttempt(aid, f"k{aid}", "call", b"payload", deps if links else (), None, links=links)


def _res(aid: int, data: bytes, worker: str = "w1", ok: bool = True) -> Result:
    return Result(aid, ok, data, worker, 101, 0.0, 1.0)


def _master(monkeypatch: pytest.MonkeyPatch, n: int = 1, links: bool = True) -> Dispatcher:
    monkeypatch.setattr(Dispatcher, "debug", True)
    d = Dispatcher(n, prefetch=1, links=links)
    d.handle(Boot(0.0))
    for i in range(1, n + 1):
        d.handle(HelloFrom(f"w{i}", 100 + i, 0.0))
    return d


def _sent(cmds) -> list[RunAttempt]:
    return [
        m for c in cmds if isinstance(c, SendWorker) for m in c.msgs if isinstance(m, RunAttempt)
    ]


def _unlinked(cmds) -> list[Unlinked_]:
    return [c.msg for c in cmds if isinstance(c, ToClient) and isinstance(c.msg, Unlinked_)]


def test_a_master_queues_a_linked_attempt_with_its_inputs_value(monkeypatch):
    d = _master(monkeypatch)
    d.handle(SubmitAttempts([_ra(1), _ra(2, ((0, 1),)), _ra(3, ((0, 2),))], 0.0))
    assert set(d.links.waiting) == {2, 3} and not d.queue
    cmds = d.handle(ResultFrom("w1", _res(1, b"one"), 1.0))
    (m2,) = _sent(cmds)
    assert m2.attempt == 2 and m2.deps == (b"one",) and m2.links == ()
    (m3,) = _sent(d.handle(ResultFrom("w1", _res(2, b"two"), 2.0)))
    assert m3.deps == (b"two",)


def test_a_master_unlinks_what_waits_for_a_failed_or_lost_input(monkeypatch):
    d = _master(monkeypatch)
    d.handle(SubmitAttempts([_ra(1), _ra(2, ((0, 1),)), _ra(3, ((0, 2),))], 0.0))
    cmds = d.handle(ResultFrom("w1", _res(1, b"err", ok=False), 1.0))
    assert {u.attempt for u in _unlinked(cmds)} == {2, 3} and not _sent(cmds)
    assert "failed" in _unlinked(cmds)[0].reason
    d = _master(monkeypatch)
    d.handle(SubmitAttempts([_ra(1), _ra(2, ((0, 1),))], 0.0))
    cmds = d.handle(WorkerExited("w1", -9, "", 1.0, False))
    assert [u.attempt for u in _unlinked(cmds)] == [2] and "was lost" in _unlinked(cmds)[0].reason
    assert not d.links.waiting


def test_a_master_takes_a_value_that_came_just_before_the_link(monkeypatch):
    """The input ended here just before its linked attempt arrived: its value is kept a
    while, so the attempt is queued with it rather than unlinked; an input the master
    never saw is unlinked."""
    d = _master(monkeypatch)
    d.handle(SubmitAttempts([_ra(1)], 0.0))
    d.handle(ResultFrom("w1", _res(1, b"one"), 1.0))
    (m2,) = _sent(d.handle(SubmitAttempts([_ra(2, ((0, 1),))], 2.0)))
    assert m2.deps == (b"one",)
    cmds = d.handle(SubmitAttempts([_ra(3, ((0, 99),))], 3.0))
    assert [u.attempt for u in _unlinked(cmds)] == [3]


def test_a_master_of_a_session_that_does_not_link_keeps_no_values(monkeypatch):
    """``links=False`` (the master's Config says so): no result's value is kept for a
    linked attempt that might come later."""
    d = _master(monkeypatch, links=False)
    d.handle(SubmitAttempts([_ra(1)], 0.0))
    d.handle(ResultFrom("w1", _res(1, b"one"), 1.0))
    cmds = d.handle(SubmitAttempts([_ra(2, ((0, 1),))], 2.0))
    assert [u.attempt for u in _unlinked(cmds)] == [2] and not _sent(cmds)


def test_a_master_drops_a_waiting_attempt_the_session_cancels(monkeypatch):
    d = _master(monkeypatch)
    d.handle(SubmitAttempts([_ra(1), _ra(2, ((0, 1),))], 0.0))
    d.handle(CancelRequest((2,), 0.5))
    assert not d.links.waiting
    cmds = d.handle(ResultFrom("w1", _res(1, b"one"), 1.0))
    assert not _sent(cmds) and not _unlinked(cmds)


def test_the_table_keeps_recent_values_within_its_bounds():
    t = LinkTable(recent=(2, 10, 4))
    t.succeeded(1, b"aaaa")
    t.succeeded(2, b"bbbbb")  # larger than 4 bytes: not kept
    t.succeeded(3, b"cc")
    t.succeeded(4, b"dd")  # 1 evicted (count 2)
    assert isinstance(t.take(_ra(9, ((0, 1),)), lambda a: False), str)
    got = t.take(_ra(8, ((0, 3), (1, 4)), n=2), lambda a: False)
    assert isinstance(got, RunAttempt) and got.deps == (b"cc", b"dd")
