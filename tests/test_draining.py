"""Bad-node draining (issue 17): a worker or host on which several *different* tasks
fail (WORKER_LOST, ENVIRONMENT, TIMEOUT) within a window is drained, and those attempts
are not charged to the tasks' retry budgets.

The rule is pure (:mod:`pilotfish.core.drain`), fed by the workflow core
(:class:`pilotfish.core.workflow.Workflow`, which refunds and emits ``Drained``); the
attempt ledger refuses new work on a drained worker (``ledger.Drain``). Most tests
drive them with explicit events and times; the last ones run a Session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


@pytest.fixture(autouse=True)
def _validate_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pure machines check their invariants after every stimulus (STYLE 15)."""
    monkeypatch.setattr(Workflow, "debug", True)
    monkeypatch.setattr(L.Ledger, "debug", True)


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
    assert w.drain is not None and w.drain.is_drained("w1", None)


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
    led.handle(L.Enqueue(tuple((i, f"k{i}", f"item{i}", None) for i in (1, 2, 3, 4))))
    led.handle(L.Hold("w1", (1, 2, 3)))
    led.handle(L.Start("w1", 1, 10, "h", 1.0))
    cmds = led.handle(L.Drain("w1", "3 different tasks timed out", 2.0))
    assert cmds == [L.Requeue(("item2", "item3"))]
    assert led.started_on("w1") == [1]
    assert led.handle(L.Hold("w1", (4,))) == [L.Ignored("w1", 4, "worker w1 is drained")]
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
    # the broken worker was replaced (the local master replaces a drained worker)
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


# ------------------------------------------------------------------ a Session on Dask
def _dies_on_worker(bad: str, markers: str, i: int, secs: float = 0.3) -> int:
    """A member that kills its Dask worker process when it runs on worker ``bad`` (a node
    whose memory kills every process); elsewhere it leaves one marker file per run."""
    import time
    import uuid

    import distributed

    if str(distributed.get_worker().name) == bad:
        os._exit(9)
    time.sleep(secs)
    Path(markers, f"{i}.{uuid.uuid4().hex}").touch()
    return i


@contextlib.contextmanager
def _dask_cluster() -> Iterator[tuple[Any, Any]]:
    """A LocalCluster of two worker processes (names 0 and 1, with nannies) and a client
    of the test's own, both closed at the end."""
    import multiprocessing.resource_tracker

    distributed = pytest.importorskip("distributed")
    from conftest import TOKEN_VAR

    token = os.environ.pop(TOKEN_VAR, None)  # the tracker outlives the test: no token
    try:
        multiprocessing.resource_tracker.ensure_running()
    finally:
        if token is not None:
            os.environ[TOKEN_VAR] = token
    # dashboard_address=None still binds :8787 in distributed 2026.8; ":0" does not
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield cluster, client


def _nanny_of(client: Any, name: str) -> str:
    info = client.scheduler_info()["workers"]
    return str(next(w["nanny"] for w in info.values() if str(w["name"]) == name))


def _has_place(client: Any, place: str) -> bool:
    return any(w.get("nanny") == place for w in client.scheduler_info()["workers"].values())


def _runs(markers: Path) -> list[int]:
    """Which members' bodies finished, one entry per run."""
    return sorted(int(p.name.split(".")[0]) for p in markers.iterdir())


@pytest.mark.timeout(180)
def test_dask_drains_a_worker_that_keeps_dying(tmp_path: Path) -> None:
    """Two Dask workers, one of which dies with every task it starts; its nanny restarts
    it under the same name and a new address after each death. pilotfish names an
    attempt's worker by its nanny's address (its place), so the deaths count against one
    place: after two different tasks it is drained (HostDrained names it), the start
    fence refuses it any further start and it is retired, the attempts lost there are not
    charged, and every member succeeds on the other worker, exactly once."""
    from conftest import wait_for

    markers = tmp_path / "markers"
    markers.mkdir()
    events: list[Any] = []
    with _dask_cluster() as (cluster, client):
        place = _nanny_of(client, "0")
        with pilotfish.Session(
            backend="dask",
            address=cluster.scheduler_address,
            rundir=str(tmp_path / "run"),
            drain_after=(2, 60),
            on_event=events.append,
            backoff=pilotfish.Backoff(base=0.01),
        ) as s:
            member = pilotfish.task(_dies_on_worker, retries=3)
            tasks = [s.submit(member, "0", str(markers), i) for i in range(16)]
            results = [t.result(timeout=120) for t in tasks]
            refused = s.processes()["refused_starts"]
        # the drained worker was retired, with its nanny: no worker of that place is left
        wait_for(lambda: not _has_place(client, place), timeout=30)
    assert results == list(range(16))
    assert _runs(markers) == list(range(16))  # every member's body finished once
    drained = [e for e in events if isinstance(e, pilotfish.HostDrained)]
    assert len(drained) == 1, drained
    d = drained[0]
    assert (d.kind, d.name) == ("worker", place) and len(d.keys) >= 2
    assert "different tasks failed there" in d.reason
    lost = [a for t in tasks for a in t.attempts if a.outcome == Category.WORKER_LOST.value]
    assert len({t.key for t in tasks if any(a in lost for a in t.attempts)}) >= 2
    for a in lost:  # every loss was on the broken worker, and none was charged
        assert a.worker == place, a
        assert a.note is not None and a.note.startswith("not charged"), a
        assert a.failure is not None and place in a.failure.message
    assert all(t.attempts[-1].outcome == "done" for t in tasks)
    print(f"\nlost attempts {len(lost)}, starts refused after the drain {refused}")


@pytest.mark.timeout(180)
def test_dask_drain_of_a_busy_worker_runs_nothing_twice(tmp_path: Path) -> None:
    """Draining a Dask worker (the backend's part, as ``on_drained`` asks it) while it
    runs an attempt and has work queued: it gets no new Dask tasks, what it had not
    started goes to the other worker, unblamed (a start it asks for is refused: its user
    code does not run), what it runs finishes there, then it is retired (with its nanny);
    nothing fails and every member's body finishes exactly once."""
    import time

    from conftest import wait_for

    markers = tmp_path / "markers"
    markers.mkdir()
    from pilotfish.backends.dask import DaskBackend

    with _dask_cluster() as (cluster, client):
        place = _nanny_of(client, "1")
        backend = DaskBackend(address=cluster.scheduler_address, rundir=str(tmp_path / "run"))
        with pilotfish.Session(
            backend=backend,
            rundir=str(tmp_path / "run"),
            backoff=pilotfish.Backoff(base=0.01),
        ) as s:
            member = pilotfish.task(_dies_on_worker, retries=0)
            tasks = [s.submit(member, "none", str(markers), i, 0.2) for i in range(24)]
            wait_for(lambda: sum(t.done() for t in tasks) >= 4, timeout=60)
            when = time.time()
            backend.drain(place, kind="worker")  # what the driver does for a Drained
            results = [t.result(timeout=120) for t in tasks]
            refused = s.processes()["refused_starts"]
        wait_for(lambda: not _has_place(client, place), timeout=30)
    assert results == list(range(24))
    assert _runs(markers) == list(range(24))
    assert all([a.outcome for a in t.attempts] == ["done"] for t in tasks)
    there = [t.attempts[0] for t in tasks if t.attempts[0].worker == place]
    late = [a for a in there if a.started is not None and a.started > when + 1.0]
    assert there and not late, late  # it ran members before the drain, none well after
    print(f"\nmembers run on the drained worker {len(there)}, starts refused {refused}")


class _FakeWorkerState:
    def __init__(self, nanny: str | None) -> None:
        self.nanny = nanny


class _FakeTask:
    def __init__(self, on: str) -> None:
        self.processing_on = type("WS", (), {"address": on})()
        self.state = "processing"


class _FakeScheduler:
    """What the start fence uses of distributed's Scheduler (no cluster)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.tasks: dict[str, _FakeTask] = {}
        self.workers: dict[str, _FakeWorkerState] = {}
        self.plugins: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    def log_event(self, topic: str, msg: dict[str, Any]) -> None:
        self.events.append(msg)


def test_dask_start_fence_refuses_a_drained_place() -> None:
    """The fence names a worker with a nanny by the nanny's address (its place): a drain
    of that place refuses every later start there, also from the worker process the
    nanny starts next (a new address), and publishes which workers it matched; a drained
    host refuses the workers that said they run there. Other workers start as before."""
    import asyncio

    from pilotfish.backends.dask.fence import StartFence

    sched = _FakeScheduler()
    fence = StartFence("tok", 1, "pilotfish-tok")
    asyncio.run(fence.start(sched))
    sched.workers = {
        "tcp://a:1": _FakeWorkerState("tcp://a:9"),
        "tcp://b:1": _FakeWorkerState(None),
    }

    def ask(key: str, worker: str, host: str = "h1") -> dict[str, Any]:
        sched.tasks[key] = _FakeTask(worker)
        out: dict[str, Any] = sched.handlers["pilotfish_start_tok_1"](
            key=key, attempt=1, worker=worker, pid=7, host=host, when=1.0
        )
        return out

    assert ask("k1", "tcp://a:1")["granted"]
    assert sched.events[-1]["place"] == "tcp://a:9"  # named by its nanny
    assert ask("k2", "tcp://b:1")["granted"] and "place" not in sched.events[-1]
    drain = sched.handlers["pilotfish_fence_drain_tok_1"]
    assert drain(kind="worker", place="tcp://a:9", why="2 tasks died there") == ["tcp://a:1"]
    assert sched.events[-1] == {
        "op": "drained", "kind": "worker", "name": "tcp://a:9", "workers": ["tcp://a:1"],
        "why": "2 tasks died there",
    }  # fmt: skip
    r = ask("k3", "tcp://a:1")
    assert not r["granted"] and "worker tcp://a:9 is drained (2 tasks died there)" in r["reason"]
    assert r["drained"] is True and sched.events[-1]["drained"] is True
    sched.workers["tcp://a:2"] = _FakeWorkerState("tcp://a:9")  # the nanny's next worker
    fence.add_worker(sched, "tcp://a:2")  # the client is told that one is drained too
    assert sched.events[-1] == {
        "op": "drained", "kind": "worker", "name": "tcp://a:9", "workers": ["tcp://a:2"],
        "why": "2 tasks died there",
    }  # fmt: skip
    assert not ask("k4", "tcp://a:2")["granted"]
    r = ask("k5", "tcp://b:1")
    assert r["granted"] and r["drained"] is False
    assert fence.retiring == {"tcp://a:1", "tcp://a:2"}  # (retired on the scheduler's loop)
    # a host: the workers that said they run there
    assert drain(kind="host", place="h2", why="bad disk") == []
    assert not ask("k6", "tcp://b:1", host="h2")["granted"]
    assert ask("k7", "tcp://c:1", host="h3")["granted"]


def test_attempts_that_never_ran_never_make_a_task_poison() -> None:
    """Issue 22 item 6: with every Dask worker drained, healthy tasks' attempts were given
    back unstarted until the backend gave up on them as WORKER_LOST with no worker and no
    pid; three such made the task "poison: its attempts killed 3 workers" listing
    "on ? (pid None)", though no worker died. The rule: only an attempt lost with a
    worker it ran on (a pid, or a start) counts toward ``poison_after``; others use the
    retry budget as any transient loss does, and the final failure is theirs, not poison."""
    w = Workflow(poison_after=2, backoff=NO_BACKOFF, rand=lambda: 0.0)
    d = current(w.handle(Submit(1, "healthy", (), 5, 0.0)))
    for i in range(4):  # never ran: no AttemptStarted, no worker, no pid
        f = FailureRecord(
            key="healthy", category=LOST, message="given back without running",
            transient=True, time=float(i),
        )  # fmt: skip
        cmds = w.handle(Failed(d, f, float(i)))
        assert not [c for c in cmds if isinstance(c, Reject)], cmds
        d = current(cmds)
    # attempts that ran and were lost with their worker still make it poison
    for i, pid in enumerate((11, 12)):
        w.handle(AttemptStarted(d, 10.0 + i, f"w{i}", "h1", pid))
        f = FailureRecord(
            key="healthy", category=LOST, message="killed", transient=True, time=10.0 + i,
            worker=f"w{i}", pid=pid, signal="SIGKILL",
        )  # fmt: skip
        cmds = w.handle(Failed(d, f, 10.5 + i))
        if i == 0:
            d = current(cmds)
    [rej] = [c for c in cmds if isinstance(c, Reject)]
    assert "its attempts killed 2 different workers" in rej.failure.message
    assert "pid None" not in rej.failure.message and " on ? " not in rej.failure.message
    assert w.state(1) is State.FAILED


def _ok(i: int) -> int:
    return i


def _hang_then_healthy(s: pilotfish.Session) -> tuple[list[Any], list[Any]]:
    """The user's run (issue 22 item 6): four programs that hang time out (twice each)
    on two workers, so ``drain_after=2`` drains both; then healthy tasks are submitted."""
    hangs = [s.executable(["sleep", "60"], timeout=1, retries=1, key=f"hang{i}") for i in range(4)]
    pilotfish.wait(hangs, timeout=120)
    oks = [s.submit(_ok, i) for i in range(3)]
    pilotfish.wait(oks, timeout=120)
    return hangs, oks


def _never_poison(tasks: list[Any]) -> None:
    for t in tasks:
        assert t.failure is None or "poison" not in t.failure.message, t.failure
        for a in t.attempts:  # a WORKER_LOST always names the worker and pid it ran on
            if a.outcome == Category.WORKER_LOST.value:
                assert a.worker and a.pid, a


@pytest.mark.timeout(180)
def test_dask_every_worker_drained_waits_then_says_so(tmp_path: Path) -> None:
    """Issue 22 item 6, as reported: on Dask with ``drain_after=2``, four hanging programs
    (timeouts) drained both workers; the healthy tasks submitted next failed WORKER_LOST
    "poison: its attempts killed 3 workers" with attempts "on ? (pid None)" (the start
    fence refused every start on the drained workers, each refusal counted as a give-back,
    each give-up as a worker death). Now: while every worker is drained, attempts wait
    (a WorkersGone event says why); after ``no_workers_timeout`` they fail RUNTIME_LOST
    saying every worker was drained, why, and which tasks showed it; nothing is poison."""
    events: list[Any] = []
    with (
        _dask_cluster() as (cluster, _client),
        pilotfish.Session(
            backend="dask",
            address=cluster.scheduler_address,
            rundir=str(tmp_path / "run"),
            drain_after=(2, 600),
            no_workers_timeout=3,
            on_event=events.append,
            backoff=pilotfish.Backoff(base=0.01),
        ) as s,
    ):
        hangs, oks = _hang_then_healthy(s)
    drained = [e for e in events if isinstance(e, pilotfish.HostDrained)]
    assert len(drained) == 2, drained
    gone = [e for e in events if isinstance(e, pilotfish.WorkersGone)]
    assert any("every Dask worker" in e.message and "drained" in e.message for e in gone), gone
    _never_poison(hangs + oks)
    for t in oks:
        assert t.state is State.FAILED
        f = t.failure
        assert f is not None and f.category is Category.RUNTIME_LOST, f
        assert "every Dask worker" in f.message and "was drained by pilotfish" in f.message
        assert "no_workers_timeout=3" in f.message and "hang" in f.message


@pytest.mark.timeout(180)
def test_local_every_worker_drained_is_replaced(tmp_path: Path) -> None:
    """Issue 22 item 6 on the local backend: the same run drains both local workers (and
    their replacements); the master replaces every drained worker with a fresh one, so
    the healthy tasks submitted next succeed, and no attempt is counted as poison."""
    events: list[Any] = []
    with pilotfish.Session(
        workers=2,
        rundir=str(tmp_path / "run"),
        drain_after=(2, 600),
        on_event=events.append,
        backoff=pilotfish.Backoff(base=0.01),
    ) as s:
        hangs, oks = _hang_then_healthy(s)
    assert len([e for e in events if isinstance(e, pilotfish.HostDrained)]) >= 2
    _never_poison(hangs + oks)
    assert [t.result() for t in oks] == [0, 1, 2]


def test_dask_fence_removes_a_worker_that_went_silent_while_running_attempts() -> None:
    """Issue 24 item 3: a network partition was invisible for as long as Dask's worker
    TTL (5 minutes). The fence removes a worker the scheduler has not heard from for
    longer than the session's heartbeat_timeout, only while it runs attempts it granted
    (an idle silent worker is Dask's business), once, saying how long it was silent."""
    import asyncio
    import time as _time

    from pilotfish.backends.dask.fence import StartFence

    sched = _FakeScheduler()
    removed: list[tuple[str, str, bool]] = []

    async def remove_worker(address: str, stimulus_id: str, close: bool) -> None:
        removed.append((address, stimulus_id, close))

    sched.remove_worker = remove_worker  # type: ignore[attr-defined]
    fence = StartFence("tok", 1, "pilotfish-tok", unreachable_after=5.0)
    now = _time.time()
    busy, idle, alive = (_FakeWorkerState(None) for _ in range(3))
    busy.last_seen, idle.last_seen, alive.last_seen = now - 7, now - 60, now - 1  # type: ignore[attr-defined]
    busy.processing = []  # type: ignore[attr-defined]
    idle.processing = []  # type: ignore[attr-defined]
    alive.processing = []  # type: ignore[attr-defined]

    async def scenario() -> None:
        await fence.start(sched)
        sched.workers = {"tcp://b:1": busy, "tcp://i:1": idle, "tcp://a:1": alive}
        for key, w, ws in (("k1", "tcp://b:1", busy), ("k2", "tcp://a:1", alive)):
            sched.tasks[key] = _FakeTask(w)
            assert sched.handlers["pilotfish_start_tok_1"](
                key=key, attempt=1, worker=w, pid=7, host="node2", when=1.0
            )["granted"]
            ws.processing.append(type("TS", (), {"key": key})())  # type: ignore[attr-defined]
        assert [w for w, _ in fence.unreachable(now)] == ["tcp://b:1"]
        for addr, silent in fence.unreachable(now):
            await fence._remove_unreachable(addr, silent)
        assert fence.unreachable(now) == []  # once
        fence.remove()

    asyncio.run(scenario())
    assert removed == [("tcp://b:1", "pilotfish-unreachable-pilotfish-fence-tok-1", False)]
    msg = sched.events[-1]
    assert msg["op"] == "unreachable" and msg["worker"] == "tcp://b:1" and msg["silent"] >= 7


def test_dask_a_start_the_fence_granted_counts_on_a_worker_drained_meanwhile() -> None:
    """The client drains a Dask worker in its own ledger before the scheduler's fence
    hears of it, and a start (the fence's grant, or a worker's reserved start that took
    its reservation just before the drain revoked it) can cross that: the attempt runs
    there, so the client records it as started (a later loss of it is a loss with a pid,
    its result is accepted), and the worker stays drained for every later attempt."""
    from pilotfish.backends._driver import Driver
    from pilotfish.backends.dask.flight import Flight
    from pilotfish.core import ledger as L

    fl = Flight(Driver("dask"), "tok", True)
    fl.ledger.handle(L.Enqueue(((1, "k1", "item1", None), (2, "k2", "item2", None))))
    fl.ledger.handle(L.Drain("tcp://a:1", "3 tasks died there", 1.0))
    cmds = fl.start_granted_locked(L.Start("tcp://a:1", 1, 77, "h", 2.0))
    assert [type(c).__name__ for c in cmds] == ["Granted", "Report"]  # Report: Started
    assert fl.ledger.get(1).where == "started" and fl.ledger.get(1).pid == 77
    assert fl.ledger.drained == {"tcp://a:1": "3 tasks died there"}
    (finish,) = fl.ledger.handle(L.Finish("tcp://a:1", 1))
    assert type(finish).__name__ == "Accept"
    # a start the fence did not grant (no grant behind it) is still refused there
    (refused,) = fl.ledger.handle(L.Start("tcp://a:1", 2, 78, "h", 3.0))
    assert type(refused).__name__ == "Refused" and "drained" in refused.reason
