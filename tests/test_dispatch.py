"""Unit tests for the local master's dispatcher (pilotfish.backends.local.dispatch).

The dispatcher is a pure state machine: these tests feed it what the OS and the
sockets would say (hello, results, exits, kernel samples) with explicit times, and
inspect the commands it returns. No processes, no sleeps, no threads.
"""

from __future__ import annotations

import pytest

from pilotfish.backends.local.dispatch import (
    Boot,
    CancelRequest,
    Close,
    Dispatcher,
    DrainRequest,
    GroupFrom,
    HeartbeatFrom,
    HelloFrom,
    InvalidSlotTransition,
    Kill,
    ResultFrom,
    SendWorker,
    SlotState,
    Spawn,
    SubmitAttempts,
    TimePassed,
    ToClient,
    WithdrawnBy,
    WorkerExited,
    describe_exit,
)
from pilotfish.core import ledger as L
from pilotfish.core.machine import InvariantViolation
from pilotfish.errors import InvalidTransition
from pilotfish.wire.messages import (
    CancelAttempt,
    Fatal,
    Lost,
    Result,
    RunAttempt,
    Shutdown,
    Started,
    WorkerReport,
)


@pytest.fixture(autouse=True)
def _validate_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stimulus in these tests ends with ``validate()`` of the dispatcher and of
    its ledger (STYLE 15): a step that breaks an invariant fails the test."""
    monkeypatch.setattr(Dispatcher, "debug", True)
    monkeypatch.setattr(L.Ledger, "debug", True)


def live(d: Dispatcher) -> list[str]:
    """The pool: workers that take (or will take) work; retiring ones are not in it."""
    return [s.name for s in d.slots.values() if s.state in (SlotState.STARTING, SlotState.READY)]


def ra(aid: int, timeout: float | None = None) -> RunAttempt:
    return RunAttempt(aid, f"k{aid}", "call", b"payload", (), timeout)


def res(aid: int, worker: str = "w1", pid: int = 101, ok: bool = True) -> Result:
    return Result(aid, ok, b"value", worker, pid, 0.0, 1.0)


def msgs(cmds, cls) -> list:
    return [c.msg for c in cmds if isinstance(c, ToClient) and isinstance(c.msg, cls)]


def sent(cmds) -> dict[str, list[int]]:
    """worker name -> attempt ids sent to it as RunAttempts."""
    out: dict[str, list[int]] = {}
    for c in cmds:
        if isinstance(c, SendWorker):
            for m in c.msgs:
                if isinstance(m, RunAttempt):
                    out.setdefault(c.name, []).append(m.attempt)
    return out


def started_ids(cmds) -> list[int]:
    return [m.attempt for m in msgs(cmds, Started)]


def of(cmds, cls) -> list:
    return [c for c in cmds if isinstance(c, cls)]


def ready(n: int = 1, **kw) -> Dispatcher:
    """A dispatcher whose n workers w1..wn (pids 101..) all said hello at t=0."""
    d = Dispatcher(n, **kw)
    d.handle(Boot(0.0))
    for i in range(1, n + 1):
        d.handle(HelloFrom(f"w{i}", 100 + i, 0.0))
    return d


# --------------------------------------------------------------------------- start / assign


def test_start_spawns_n_workers():
    """Session start: one Spawn per configured worker, distinct names; no work is
    assigned to a worker before it says hello."""
    d = Dispatcher(3)
    assert d.handle(Boot(0.0)) == [Spawn("w1"), Spawn("w2"), Spawn("w3")]
    assert d.handle(SubmitAttempts([ra(1)], 0.1)) == []
    assert len(d.queue) == 1


def test_workers_must_be_positive():
    """A configuration error is rejected at construction."""
    with pytest.raises(ValueError, match="workers"):
        Dispatcher(0)


def test_hello_assigns_up_to_prefetch_and_starts_only_first():
    """Three attempts queued before the only worker is up (prefetch=2): at hello it gets
    two; only the first is reported Started (it runs them in order), the third waits."""
    d = Dispatcher(1, prefetch=2)
    d.handle(Boot(0.0))
    d.handle(SubmitAttempts([ra(1), ra(2), ra(3)], 0.0))
    cmds = d.handle(HelloFrom("w1", 4242, 1.0))
    assert msgs(cmds, WorkerReport) == [WorkerReport("started", "w1", 4242, 1.0)]
    assert sent(cmds) == {"w1": [1, 2]}
    assert msgs(cmds, Started) == [Started(1, "w1", 4242, 1.0)]
    assert [a.attempt for a in d.queue] == [3]
    assert d.ledger.held_by("w1") == [1, 2]


def test_result_starts_next_held_attempt_and_refills():
    """The worker finishes attempt 1: the result goes to the client first, then attempt 2
    (already prefetched) is reported Started, and attempt 3 is sent to refill the slot."""
    d = ready(1, prefetch=2)
    d.handle(SubmitAttempts([ra(1), ra(2), ra(3)], 0.0))
    cmds = d.handle(ResultFrom("w1", res(1), 2.0))
    assert cmds[0] == ToClient(res(1))
    assert started_ids(cmds) == [2]
    assert sent(cmds) == {"w1": [3]}
    assert d.ledger.get(2).started == 2.0
    cmds = d.handle(ResultFrom("w1", res(2), 3.0))
    assert started_ids(cmds) == [3] and sent(cmds) == {}


def test_attempts_spread_over_idle_workers():
    """Two idle workers, four attempts: each gets two (least loaded first) and each
    reports its first one Started."""
    d = ready(2, prefetch=2)
    cmds = d.handle(SubmitAttempts([ra(i) for i in range(1, 5)], 1.0))
    held = sent(cmds)
    assert sorted(len(v) for v in held.values()) == [2, 2]
    assert sorted(started_ids(cmds)) == sorted(v[0] for v in held.values())


def test_duplicate_hello_is_ignored():
    """A worker's hello delivered twice does not reset it or assign twice."""
    d = ready(1)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    assert d.handle(HelloFrom("w1", 101, 1.0)) == []


# --------------------------------------------------------------------------- worker death


def test_worker_death_blames_only_running_attempt_and_requeues_rest():
    """A worker holding two attempts is SIGKILLed (OOM killer): only the one it was running
    is reported Lost (worker_lost, naming SIGKILL and the stderr tail); the prefetched one
    never started, so it is requeued unblamed and sent to the other worker; a replacement
    worker is spawned."""
    d = Dispatcher(2, prefetch=2)
    d.handle(Boot(0.0))
    d.handle(HelloFrom("w1", 101, 0.0))
    d.handle(SubmitAttempts([ra(1), ra(2)], 1.0))
    assert d.ledger.held_by("w1") == [1, 2]
    d.handle(HelloFrom("w2", 102, 1.5))

    tail = "Traceback (most recent call last):\nMemoryError"
    cmds = d.handle(WorkerExited("w1", -9, tail, 4.0, goodbye=False))

    (ev,) = [m for m in msgs(cmds, WorkerReport) if m.kind == "lost"]
    assert ev.worker == "w1" and ev.held == (1,) and ev.signal == "SIGKILL"
    (lost,) = msgs(cmds, Lost)
    assert lost.attempt == 1 and lost.category == "worker_lost"
    assert lost.returncode == -9 and lost.signal == "SIGKILL"
    assert lost.started == 1.0 and lost.ended == 4.0
    assert "SIGKILL" in lost.message and "(-9)" in lost.message
    assert "'k1'" in lost.message and "pid 101" in lost.message
    assert "MemoryError" in lost.message and lost.stderr_tail == tail

    assert sent(cmds) == {"w2": [2]}
    assert started_ids(cmds) == [2]
    assert of(cmds, Spawn) == [Spawn("w3")]
    assert any(m.kind == "replaced" and m.worker == "w3" for m in msgs(cmds, WorkerReport))
    assert d.ledger.held_by("w2") == [2]


def test_worker_exit_code_named_in_lost_message():
    """A worker calls os._exit(3) from user code: the message names the exit code."""
    d = ready(1)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    (lost,) = msgs(d.handle(WorkerExited("w1", 3, "", 1.0, goodbye=False)), Lost)
    assert "exited with code 3" in lost.message
    assert lost.signal is None and "stderr" not in lost.message


def test_idle_worker_death_blames_nobody():
    """An idle worker dies: reported lost with nothing held, replaced, no Lost."""
    d = ready(1)
    cmds = d.handle(WorkerExited("w1", -11, "", 1.0, goodbye=False))
    assert msgs(cmds, Lost) == []
    assert of(cmds, Spawn) == [Spawn("w2")]


def test_requeued_attempt_waits_for_replacement_worker():
    """The only worker dies holding two attempts: the second waits at the head of the
    queue and goes to the replacement worker when it says hello, ahead of newer work."""
    d = ready(1, prefetch=2)
    d.handle(SubmitAttempts([ra(1), ra(2)], 0.0))
    cmds = d.handle(WorkerExited("w1", -9, "", 1.0, goodbye=False))
    assert sent(cmds) == {} and of(cmds, Spawn) == [Spawn("w2")]
    d.handle(SubmitAttempts([ra(3)], 1.5))
    cmds = d.handle(HelloFrom("w2", 202, 2.0))
    assert sent(cmds) == {"w2": [2, 3]}
    assert started_ids(cmds) == [2]


def test_describe_exit():
    """Exit statuses are described for humans: signal names, codes, unknown."""
    assert describe_exit(-9) == ("was killed by signal SIGKILL (-9)", "SIGKILL")
    assert describe_exit(-11)[1] == "SIGSEGV"
    assert describe_exit(3) == ("exited with code 3", None)
    assert describe_exit(None)[1] is None and "unknown" in describe_exit(None)[0]
    assert describe_exit(-200)[1] == "signal 200"


# --------------------------------------------------------------------------- timeout


def test_timeout_kills_worker_and_reports_timeout():
    """A task with timeout=5 runs past it: at the first tick at/after since+5 the worker
    (and the program's process group) is killed, the attempt reported Lost with category
    timeout stating the limit and the elapsed time, and a replacement spawned. The exit
    that follows our kill is not reported a second time; a result the worker managed to
    send first is still forwarded (the client's fencing drops it)."""
    d = ready(1)
    d.handle(SubmitAttempts([ra(1, timeout=5.0)], 10.0))
    d.handle(GroupFrom("w1", 1, 777))
    assert d.next_deadline() == 15.0
    assert d.handle(TimePassed(14.9, {}, {})) == []

    cmds = d.handle(TimePassed(15.25, {}, {}))
    assert of(cmds, Kill) == [Kill("w1", (777,))]
    (lost,) = msgs(cmds, Lost)
    assert lost.attempt == 1 and lost.category == "timeout"
    assert "timeout of 5 s" in lost.message and "ran 5.25 s" in lost.message
    assert of(cmds, Spawn) == [Spawn("w2")]
    assert d.next_deadline() is None

    assert d.handle(ResultFrom("w1", res(1), 15.3)) == [ToClient(res(1))]
    assert d.handle(WorkerExited("w1", -9, "", 15.4, goodbye=False)) == []


def test_timeout_clock_starts_when_attempt_becomes_first():
    """A prefetched attempt's timeout counts from when the worker reaches it, not from
    when it was sent."""
    d = ready(1, prefetch=2)
    d.handle(SubmitAttempts([ra(1), ra(2, timeout=5.0)], 0.0))
    d.handle(ResultFrom("w1", res(1), 8.0))
    assert d.next_deadline() == 13.0
    assert of(d.handle(TimePassed(12.0, {}, {})), Kill) == []


# --------------------------------------------------------------------------- hang detection


def test_kernel_stopped_worker_declared_hung():
    """A worker was SIGSTOPped (or a debugger attached): the kernel says 'T' at two
    samples at least heartbeat_interval apart -> killed, its attempt Lost worker_lost
    with 'stopped' and the stderr tail, replacement spawned."""
    d = ready(1, heartbeat_interval=1.0)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    assert d.handle(TimePassed(0.5, {"w1": ("T", 1.0)}, {})) == []
    assert d.handle(TimePassed(1.0, {"w1": ("T", 1.0)}, {})) == []
    cmds = d.handle(TimePassed(1.5, {"w1": ("T", 1.0)}, {"w1": "last words"}))
    assert of(cmds, Kill) == [Kill("w1", ())]
    (lost,) = msgs(cmds, Lost)
    assert lost.category == "worker_lost" and lost.signal == "SIGKILL"
    assert "stopped" in lost.message and "hung" in lost.message
    assert "last words" in lost.message
    assert of(cmds, Spawn) == [Spawn("w2")]


def test_kernel_stop_interrupted_by_running_is_not_hung():
    """Briefly stopped then running again (a profiler's sample): the stop clock resets."""
    d = ready(1, heartbeat_interval=1.0)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    seq = [(0.0, "T"), (0.6, "R"), (1.2, "T"), (1.8, "t")]
    for now, st in seq:
        assert of(d.handle(TimePassed(now, {"w1": (st, 1.0)}, {})), Kill) == [], now


def test_silent_but_busy_worker_is_not_hung():
    """User code holds the GIL in a long C call: no heartbeat for 30 s, but the kernel
    shows its CPU time advancing -> busy, not hung."""
    d = ready(1, heartbeat_interval=1.0, heartbeat_timeout=10.0)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    for t in range(1, 31):
        assert of(d.handle(TimePassed(float(t), {"w1": ("R", float(t))}, {})), Kill) == [], t


def test_silent_and_idle_cpu_worker_declared_hung():
    """A worker deadlocked in native code: no heartbeat and no CPU for more than
    heartbeat_timeout -> killed, Lost worker_lost naming both facts."""
    d = ready(1, heartbeat_interval=1.0, heartbeat_timeout=10.0)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    for t in range(1, 12):  # first sample at t=1 records the CPU; 10 s later is not > 10
        assert of(d.handle(TimePassed(float(t), {"w1": ("S", 5.0)}, {})), Kill) == [], t
    cmds = d.handle(TimePassed(12.0, {"w1": ("S", 5.0)}, {}))
    assert of(cmds, Kill) == [Kill("w1", ())]
    (lost,) = msgs(cmds, Lost)
    assert lost.category == "worker_lost"
    assert "no heartbeat" in lost.message and "no CPU" in lost.message


def test_heartbeating_worker_without_cpu_is_not_hung():
    """A worker sleeping in user code (time.sleep) keeps heartbeating: not hung."""
    d = ready(1, heartbeat_interval=1.0, heartbeat_timeout=10.0)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    for t in range(1, 40):
        d.handle(HeartbeatFrom("w1", float(t)))
        assert of(d.handle(TimePassed(float(t) + 0.5, {"w1": ("S", 5.0)}, {})), Kill) == [], t


def test_master_suspended_resets_clocks_and_blames_nobody():
    """The master itself was suspended for 100 s (its ticks stopped): no heartbeat was
    read and the worker was stopped at the last sample; on resume nobody is blamed, and
    the hang clocks start afresh from the resume."""
    d = ready(2, heartbeat_interval=1.0, heartbeat_timeout=10.0)
    d.handle(SubmitAttempts([ra(1), ra(2)], 0.0))
    for t in range(1, 4):
        d.handle(TimePassed(float(t), {"w1": ("S", 5.0), "w2": ("R", 1.0)}, {}))
    d.handle(TimePassed(3.5, {"w1": ("S", 5.0), "w2": ("T", 1.0)}, {}))
    cmds = d.handle(TimePassed(103.5, {"w1": ("S", 5.0), "w2": ("T", 1.0)}, {}))
    assert of(cmds, Kill) == [] and msgs(cmds, Lost) == []
    for t in range(104, 114):
        assert of(d.handle(TimePassed(float(t), {"w1": ("S", 5.0)}, {})), Kill) == [], t
    # now the clocks are the ones that started at the resume: 10.5 s silent, no CPU
    cmds = d.handle(TimePassed(114.0, {"w1": ("S", 5.0)}, {}))
    assert [k.name for k in of(cmds, Kill)] == ["w1"]


# --------------------------------------------------------------------------- start failures


def test_repeated_start_failures_are_fatal_with_stderr():
    """The worker environment is broken (import error): three workers in a row exit
    before hello -> each is replaced until the third, then Fatal('environment') whose
    message carries the stderr; no further spawn."""
    d = Dispatcher(1, max_start_failures=3)
    assert d.handle(Boot(0.0)) == [Spawn("w1")]
    err = "ModuleNotFoundError: No module named 'numpy'"
    c1 = d.handle(WorkerExited("w1", 1, err, 1.0, goodbye=False))
    assert of(c1, Spawn) == [Spawn("w2")]
    (ev,) = msgs(c1, WorkerReport)
    assert ev.kind == "start_failed" and "start failure 1 of 3" in ev.message
    assert of(d.handle(WorkerExited("w2", 1, err, 2.0, goodbye=False)), Spawn) == [Spawn("w3")]
    c3 = d.handle(WorkerExited("w3", 1, err, 3.0, goodbye=False))
    assert of(c3, Spawn) == []
    (fatal,) = msgs(c3, Fatal)
    assert fatal.category == "environment"
    assert err in fatal.message and "3 consecutive" in fatal.message
    assert d.fatal and msgs(c3, Lost) == []


def test_start_failures_must_be_consecutive():
    """A flaky start now and then is not fatal: a successful hello resets the count."""
    d = Dispatcher(2, max_start_failures=2)
    d.handle(Boot(0.0))
    d.handle(WorkerExited("w1", 1, "", 1.0, goodbye=False))
    d.handle(HelloFrom("w2", 102, 1.5))
    cmds = d.handle(WorkerExited("w3", 1, "", 2.0, goodbye=False))
    assert msgs(cmds, Fatal) == [] and of(cmds, Spawn) == [Spawn("w4")]


# --------------------------------------------------------------------------- shutdown


def test_orderly_shutdown_is_not_a_loss():
    """Session close: every live worker is sent Shutdown; when they exit after saying
    goodbye they are reported stopped, nothing is Lost and nothing is respawned."""
    d = ready(2)
    cmds = d.handle(Close())
    assert sorted(c.name for c in of(cmds, SendWorker)) == ["w1", "w2"]
    assert all(isinstance(c.msgs[0], Shutdown) for c in of(cmds, SendWorker))
    c1 = d.handle(WorkerExited("w1", 0, "", 1.0, goodbye=True))
    assert msgs(c1, WorkerReport) == [WorkerReport("stopped", "w1", 101, 1.0, 0)]
    c2 = d.handle(WorkerExited("w2", None, "", 1.0, goodbye=False))  # stopping: no goodbye needed
    assert [m.kind for m in msgs(c2, WorkerReport)] == ["stopped"]
    assert of(c1 + c2, Spawn) == [] and msgs(c1 + c2, Lost) == []
    assert live(d) == []


def test_goodbye_exit_without_shutdown_is_stopped():
    """A worker that says goodbye and exits (e.g. max tasks reached) is not a loss."""
    d = ready(1)
    cmds = d.handle(WorkerExited("w1", 0, "", 1.0, goodbye=True))
    assert [m.kind for m in msgs(cmds, WorkerReport)] == ["stopped"]
    assert of(cmds, Spawn) == [] and msgs(cmds, Lost) == []


# --------------------------------------------------------------------------- cancel


def test_cancel_queued_attempt_is_never_sent():
    """A task is cancelled while its attempt waits in the master's queue: when a slot
    frees up the attempt is skipped and the next one sent instead."""
    d = ready(1, prefetch=1)
    d.handle(SubmitAttempts([ra(1), ra(2), ra(3)], 0.0))
    assert d.handle(CancelRequest(tuple([2]), 0.5)) == []
    cmds = d.handle(ResultFrom("w1", res(1), 1.0))
    assert sent(cmds) == {"w1": [3]} and started_ids(cmds) == [3]
    assert 2 not in d.ledger


def test_cancel_prefetched_attempt_withdrawn_from_worker():
    """A task is cancelled after its attempt was prefetched by a busy worker (held[1]):
    the worker is told CancelAttempt; its Withdrawn frees the slot for queued work."""
    d = ready(1, prefetch=2)
    d.handle(SubmitAttempts([ra(1), ra(2), ra(3)], 0.0))
    cmds = d.handle(CancelRequest(tuple([2]), 0.5))
    assert cmds == [SendWorker("w1", [CancelAttempt(2)])]
    cmds = d.handle(WithdrawnBy("w1", 2, 0.6))
    assert sent(cmds) == {"w1": [3]}
    assert started_ids(cmds) == []  # attempt 1 is still the one running
    assert d.ledger.held_by("w1") == [1, 3]


def test_cancel_started_attempt_does_nothing():
    """The attempt already runs: cancel sends nothing; its result is still forwarded."""
    d = ready(1)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    assert d.handle(CancelRequest(tuple([1]), 0.5)) == []
    assert d.handle(ResultFrom("w1", res(1), 1.0))[0] == ToClient(res(1))


def test_cancel_unknown_attempt_ignored():
    """Cancelling an attempt that already finished is harmless."""
    d = ready(1)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    d.handle(ResultFrom("w1", res(1), 1.0))
    assert d.handle(CancelRequest(tuple([1, 99]), 2.0)) == []


def test_cancelled_prefetched_attempt_not_rerun_when_worker_dies():
    """The user cancels a prefetched attempt; before the worker can answer Withdrawn, the
    attempt it is running times out and the worker is killed. The cancelled attempt must
    not be requeued and run on another worker (a cancelled task would run)."""
    d = Dispatcher(2, prefetch=2)
    d.handle(Boot(0.0))
    d.handle(HelloFrom("w1", 101, 0.0))
    d.handle(SubmitAttempts([ra(1, timeout=5.0), ra(2)], 0.0))
    assert d.ledger.held_by("w1") == [1, 2]
    d.handle(HelloFrom("w2", 102, 0.5))  # idle, ready to take requeued work
    assert d.handle(CancelRequest(tuple([2]), 1.0)) == [SendWorker("w1", [CancelAttempt(2)])]
    cmds = d.handle(TimePassed(5.0, {}, {}))
    assert [m.attempt for m in msgs(cmds, Lost)] == [1]
    assert sent(cmds) == {}  # attempt 2 must not go to the idle w2
    assert started_ids(cmds) == []
    assert 2 not in [a.attempt for a in d.queue]


def test_worker_hung_at_startup_is_killed_and_counted() -> None:
    """A worker that never says hello (an import stuck on a dead NFS mount) is killed after
    start_timeout; its exit counts as a start failure, so tasks never wait forever."""
    d = Dispatcher(1, heartbeat_interval=1.0, heartbeat_timeout=5.0, start_timeout=30.0)
    (spawn,) = d.handle(Boot(0.0))
    d.slots[spawn.name].pid = 4242
    assert d.handle(TimePassed(10.0, {}, {})) == []
    cmds = d.handle(TimePassed(31.0, {}, {}))
    assert Kill(spawn.name, ()) in cmds
    out = d.handle(WorkerExited(spawn.name, -9, "", 31.1, False))
    assert any(isinstance(c, ToClient) and c.msg.kind == "start_failed" for c in out)
    assert any(isinstance(c, Spawn) for c in out)  # tried again, up to max_start_failures


# --------------------------------------------------------------------------- max_tasks_per_child


def shutdowns(cmds) -> dict[str, int]:
    """worker name -> position of the Shutdown in the messages sent to it (RunAttempts
    before it run first: the worker handles its messages in order)."""
    out: dict[str, int] = {}
    for c in cmds:
        if isinstance(c, SendWorker):
            for i, m in enumerate(c.msgs):
                if isinstance(m, Shutdown):
                    out[c.name] = i
    return out


def test_max_tasks_per_child_must_be_positive_or_none():
    """A configuration error is rejected at construction (the local backend has already
    turned it into InvalidTask for the user; this is the dispatcher's own guard)."""
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        Dispatcher(1, max_tasks_per_child=0)
    assert Dispatcher(1, max_tasks_per_child=None).max_tasks is None


def test_worker_given_k_attempts_retires_with_shutdown_after_them():
    """max_tasks_per_child=3, prefetch=2: the worker is given 1, 2, then 3 (its third,
    counting the prefetched one); 3 goes out with Shutdown behind it in the same message,
    the worker is given nothing more, and its replacement is spawned at once (not when the
    old one exits), reported 'replaced' with the reason. Attempt 4 waits for w2."""
    d = ready(1, prefetch=2, max_tasks_per_child=3)
    d.handle(SubmitAttempts([ra(i) for i in range(1, 6)], 0.0))
    assert d.ledger.held_by("w1") == [1, 2]
    cmds = d.handle(ResultFrom("w1", res(1), 1.0))
    (send,) = of(cmds, SendWorker)
    assert send.name == "w1" and [type(m) for m in send.msgs] == [RunAttempt, Shutdown]
    assert send.msgs[0].attempt == 3
    assert of(cmds, Spawn) == [Spawn("w2")]
    (rep,) = msgs(cmds, WorkerReport)
    assert rep.kind == "replaced" and rep.worker == "w2" and "max_tasks_per_child=3" in rep.message
    assert d.slots["w1"].state is SlotState.RETIRING and live(d) == ["w2"]
    # w1 finishes what it holds; it gets nothing more, w2 is not up yet
    cmds = d.handle(ResultFrom("w1", res(2), 2.0))
    assert sent(cmds) == {} and started_ids(cmds) == [3] and of(cmds, Spawn) == []
    cmds = d.handle(ResultFrom("w1", res(3), 3.0))
    assert sent(cmds) == {} and of(cmds, Spawn) == []
    assert [a.attempt for a in d.queue] == [4, 5]
    cmds = d.handle(HelloFrom("w2", 202, 3.5))
    assert sent(cmds) == {"w2": [4, 5]} and shutdowns(cmds) == {}


def test_retired_worker_goodbye_exit_is_stopped_not_lost():
    """The retired worker ran its three attempts, said Goodbye and exited 0: reported
    'stopped' (saying why), no Lost, nothing requeued, no second replacement."""
    d = ready(1, prefetch=1, max_tasks_per_child=2)
    d.handle(SubmitAttempts([ra(1), ra(2), ra(3)], 0.0))
    d.handle(ResultFrom("w1", res(1), 1.0))
    d.handle(ResultFrom("w1", res(2), 2.0))
    cmds = d.handle(WorkerExited("w1", 0, "", 2.1, goodbye=True))
    (rep,) = msgs(cmds, WorkerReport)
    assert rep.kind == "stopped" and rep.pid == 101 and rep.returncode == 0
    assert "max_tasks_per_child=2" in rep.message
    assert msgs(cmds, Lost) == [] and of(cmds, Spawn) == [] and sent(cmds) == {}
    assert [a.attempt for a in d.queue] == [3]
    assert d.slots["w1"].state is SlotState.DEAD and live(d) == ["w2"]


def test_k_1_every_worker_gets_exactly_one_attempt():
    """max_tasks_per_child=1 with prefetch=2 and two workers: each worker is given one
    attempt and Shutdown; two replacements start; the queue waits for them."""
    d = ready(2, prefetch=2, max_tasks_per_child=1)
    cmds = d.handle(SubmitAttempts([ra(i) for i in range(1, 5)], 0.0))
    assert sent(cmds) == {"w1": [1], "w2": [2]}
    assert shutdowns(cmds) == {"w1": 1, "w2": 1}
    assert of(cmds, Spawn) == [Spawn("w3"), Spawn("w4")]
    assert started_ids(cmds) == [1, 2]
    assert [a.attempt for a in d.queue] == [3, 4]
    cmds = d.handle(HelloFrom("w3", 303, 1.0)) + d.handle(HelloFrom("w4", 304, 1.0))
    assert sent(cmds) == {"w3": [3], "w4": [4]}
    assert of(cmds, Spawn) == [Spawn("w5"), Spawn("w6")]


def test_failed_attempt_counts_like_a_successful_one():
    """A task that raised (a user error) ran on the worker: it counts toward the limit."""
    d = ready(1, prefetch=1, max_tasks_per_child=2)
    d.handle(SubmitAttempts([ra(1), ra(2), ra(3)], 0.0))
    cmds = d.handle(ResultFrom("w1", res(1, ok=False), 1.0))
    assert sent(cmds) == {"w1": [2]} and shutdowns(cmds) == {"w1": 1}


def test_no_limit_never_retires():
    """max_tasks_per_child=None (the default): a worker takes any number of attempts."""
    d = ready(1, prefetch=1)
    d.handle(SubmitAttempts([ra(i) for i in range(1, 202)], 0.0))
    for i in range(1, 201):
        cmds = d.handle(ResultFrom("w1", res(i), float(i)))
        assert sent(cmds) == {"w1": [i + 1]} and shutdowns(cmds) == {} and of(cmds, Spawn) == []
    assert d.slots["w1"].given == 0


def test_cancelled_queued_attempt_is_not_counted():
    """A task cancelled while its attempt waits in the master's queue never reaches a
    worker: the worker's count is of the attempts it was given (1 and 3)."""
    d = ready(1, prefetch=1, max_tasks_per_child=2)
    d.handle(SubmitAttempts([ra(1), ra(2), ra(3), ra(4)], 0.0))
    d.handle(CancelRequest(tuple([2]), 0.5))
    cmds = d.handle(ResultFrom("w1", res(1), 1.0))
    assert sent(cmds) == {"w1": [3]} and shutdowns(cmds) == {"w1": 1}


def test_withdrawn_prefetched_attempt_is_given_back():
    """A prefetched attempt is cancelled and the worker withdraws it without running
    it: it does not count, so the worker still runs three attempts (1, 3, 4)."""
    d = ready(1, prefetch=2, max_tasks_per_child=3)
    d.handle(SubmitAttempts([ra(i) for i in range(1, 6)], 0.0))
    d.handle(CancelRequest(tuple([2]), 0.5))
    cmds = d.handle(WithdrawnBy("w1", 2, 0.6))
    assert sent(cmds) == {"w1": [3]} and shutdowns(cmds) == {}
    cmds = d.handle(ResultFrom("w1", res(1), 1.0))
    assert sent(cmds) == {"w1": [4]} and shutdowns(cmds) == {"w1": 1}


def test_withdrawn_after_retirement_leaves_worker_retired():
    """The worker was given its last attempt (Shutdown already sent behind it), then that
    attempt is cancelled and withdrawn: the worker stays retired (it cannot take the
    Shutdown back, and its replacement is already starting); it just ran one fewer."""
    d = ready(1, prefetch=2, max_tasks_per_child=2)
    d.handle(SubmitAttempts([ra(1), ra(2), ra(3)], 0.0))
    assert d.slots["w1"].state is SlotState.RETIRING
    d.handle(CancelRequest(tuple([2]), 0.5))
    cmds = d.handle(WithdrawnBy("w1", 2, 0.6))
    assert sent(cmds) == {} and of(cmds, Spawn) == []
    assert d.slots["w1"].state is SlotState.RETIRING
    cmds = d.handle(ResultFrom("w1", res(1), 1.0))
    assert sent(cmds) == {} and [a.attempt for a in d.queue] == [3]


def test_retiring_worker_killed_is_lost_but_not_replaced_twice():
    """A worker SIGKILLed (OOM killer) while it retires, running attempt 2 and holding 3:
    attempt 2 is Lost (worker_lost, charged as any loss), 3 goes back unblamed, and no
    second replacement is spawned: the one started at retirement keeps the pool at N."""
    d = ready(1, prefetch=2, max_tasks_per_child=3)
    d.handle(SubmitAttempts([ra(i) for i in range(1, 5)], 0.0))
    d.handle(ResultFrom("w1", res(1), 1.0))  # given 1, 2, 3: retiring; w2 spawned
    cmds = d.handle(WorkerExited("w1", -9, "", 1.5, goodbye=False))
    assert [(m.attempt, m.category) for m in msgs(cmds, Lost)] == [(2, "worker_lost")]
    (rep,) = msgs(cmds, WorkerReport)
    assert rep.kind == "lost" and rep.held == (2,) and rep.signal == "SIGKILL"
    assert of(cmds, Spawn) == [] and sent(cmds) == {}
    assert [a.attempt for a in d.queue] == [3, 4]
    assert live(d) == ["w2"]
    cmds = d.handle(HelloFrom("w2", 202, 2.0))
    assert sent(cmds) == {"w2": [3, 4]}


def test_retiring_worker_still_watched_for_hangs_and_timeouts():
    """A retiring worker runs user code: it is still killed when SIGSTOPped (hung) and
    when its attempt times out, and neither spawns a second replacement."""
    d = ready(1, prefetch=1, max_tasks_per_child=1, heartbeat_interval=1.0)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    assert d.slots["w1"].state is SlotState.RETIRING
    d.handle(TimePassed(0.5, {"w1": ("T", 1.0)}, {}))
    cmds = d.handle(TimePassed(1.5, {"w1": ("T", 1.0)}, {}))
    assert of(cmds, Kill) == [Kill("w1", ())] and of(cmds, Spawn) == []
    assert [m.attempt for m in msgs(cmds, Lost)] == [1]

    d = ready(1, prefetch=1, max_tasks_per_child=1)
    d.handle(SubmitAttempts([ra(1, timeout=5.0)], 0.0))
    cmds = d.handle(TimePassed(5.5, {}, {}))
    assert of(cmds, Kill) == [Kill("w1", ())] and of(cmds, Spawn) == []
    assert [(m.attempt, m.category) for m in msgs(cmds, Lost)] == [(1, "timeout")]


def test_session_shutdown_while_a_worker_retires():
    """Session close while w1 retires: Shutdown goes only to the live pool (w1 has its
    own already); both exits after Goodbye are 'stopped', nothing Lost or respawned."""
    d = ready(1, prefetch=1, max_tasks_per_child=1)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    d.handle(ResultFrom("w1", res(1), 1.0))
    d.handle(HelloFrom("w2", 202, 1.0))
    cmds = d.handle(Close())
    assert [c.name for c in of(cmds, SendWorker)] == ["w2"]
    out = d.handle(WorkerExited("w1", 0, "", 1.1, goodbye=True)) + d.handle(
        WorkerExited("w2", 0, "", 1.2, goodbye=True)
    )
    assert [m.kind for m in msgs(out, WorkerReport)] == ["stopped", "stopped"]
    assert of(out, Spawn) == [] and msgs(out, Lost) == []


def test_replacement_start_failure_is_counted_and_retried():
    """The fresh worker that replaces a retired one fails to start: a start failure like
    any other (counted, retried), not a loss of the retired worker's attempts."""
    d = ready(1, prefetch=1, max_tasks_per_child=1)
    d.handle(SubmitAttempts([ra(1), ra(2)], 0.0))
    cmds = d.handle(WorkerExited("w2", 1, "ImportError", 0.5, goodbye=False))
    assert [m.kind for m in msgs(cmds, WorkerReport)] == ["start_failed"]
    assert of(cmds, Spawn) == [Spawn("w3")] and msgs(cmds, Lost) == []
    assert d.ledger.held_by("w1") == [1] and [a.attempt for a in d.queue] == [2]


def test_retirement_waits_for_answer_about_cancelled_prefetched_attempt():
    """The user cancels prefetched attempt 2 while 1 runs; the worker can only answer
    Withdrawn after 1 ends, and 1's result makes the master give it 3, its third. It is
    not retired yet (2 may never run): it takes no more work until the answer; 2 is
    withdrawn, given back, so it takes 4 and retires then: it runs 1, 3 and 4."""
    d = ready(1, prefetch=2, max_tasks_per_child=3)
    d.handle(SubmitAttempts([ra(i) for i in range(1, 6)], 0.0))
    d.handle(CancelRequest(tuple([2]), 0.5))
    cmds = d.handle(ResultFrom("w1", res(1), 1.0))
    assert sent(cmds) == {"w1": [3]} and shutdowns(cmds) == {} and of(cmds, Spawn) == []
    assert d.slots["w1"].state is SlotState.READY and [a.attempt for a in d.queue] == [4, 5]
    cmds = d.handle(WithdrawnBy("w1", 2, 1.1))
    assert sent(cmds) == {"w1": [4]} and shutdowns(cmds) == {"w1": 1}
    assert started_ids(cmds) == [3] and of(cmds, Spawn) == [Spawn("w2")]
    assert d.slots["w1"].state is SlotState.RETIRING and [a.attempt for a in d.queue] == [5]


def test_cancelled_prefetched_attempt_that_ran_anyway_counts():
    """The same cancel, but the worker had already started attempt 2 when the cancel
    reached it (it answers with a Result, not Withdrawn): 2 ran, so it counts and the
    worker, given 1, 2 and 3, retires now with a Shutdown of its own."""
    d = ready(1, prefetch=2, max_tasks_per_child=3)
    d.handle(SubmitAttempts([ra(i) for i in range(1, 6)], 0.0))
    d.handle(CancelRequest(tuple([2]), 0.5))
    d.handle(ResultFrom("w1", res(1), 1.0))
    cmds = d.handle(ResultFrom("w1", res(2), 1.1))
    assert cmds[0] == ToClient(res(2))  # the client's fencing drops it (task cancelled)
    assert sent(cmds) == {} and shutdowns(cmds) == {"w1": 0}
    assert of(cmds, Spawn) == [Spawn("w2")] and d.slots["w1"].state is SlotState.RETIRING


def test_a_retry_keeps_its_place_in_the_queue():
    """Retries keep their place: an attempt of a task submitted earlier (a retry) goes
    before the queued tasks submitted after it, not behind the whole queue."""
    d = ready(1, prefetch=1)
    first = [RunAttempt(i, f"k{i}", "call", b"", (), None, order=i) for i in range(1, 6)]
    d.handle(SubmitAttempts(list(first), 0.0))  # w1 holds attempt 1 (task 1); tasks 2..5 queued
    retry = RunAttempt(9, "k1", "call", b"", (), None, order=1)  # task 1 again
    d.handle(SubmitAttempts([retry], 0.1))
    assert [a.attempt for a in d.queue] == [9, 2, 3, 4, 5]
    again = RunAttempt(10, "k0", "call", b"", (), None, order=1)  # same place: FIFO among equals
    d.handle(SubmitAttempts([again], 0.2))
    assert [a.attempt for a in d.queue] == [9, 10, 2, 3, 4, 5]
    fresh = RunAttempt(11, "k6", "call", b"", (), None, order=6)
    d.handle(SubmitAttempts([fresh], 0.3))
    assert [a.attempt for a in d.queue] == [9, 10, 2, 3, 4, 5, 11]


# --------------------------------------------------------------------------- depth and balance


def named(aid: int, name: str) -> RunAttempt:
    return RunAttempt(aid, f"k{aid}", "call", b"", (), None, order=aid, name=name)


def took(aid: int, seconds: float, worker: str = "w1", start: float = 0.0) -> Result:
    return Result(aid, True, b"v", worker, 101, start, start + seconds)


def test_unknown_run_time_holds_only_prefetch():
    """Attempts of a name nothing ran yet are held ``prefetch`` deep, as always."""
    d = ready(1, prefetch=2)
    cmds = d.handle(SubmitAttempts([named(i, "f") for i in range(1, 11)], 0.0))
    assert sent(cmds) == {"w1": [1, 2]}
    assert sent(d.handle(ResultFrom("w1", took(1, 5.0), 5.0))) == {"w1": [3]}  # 5 s: never deeper


def test_short_attempts_travel_in_batches_with_hysteresis():
    """Once a name is known to run in microseconds, a worker holds up to 64 of them and is
    refilled only when down to half: one message per ~32 results, not one per result."""
    d = ready(1, prefetch=2)
    d.handle(SubmitAttempts([named(1, "f")], 0.0))
    d.handle(ResultFrom("w1", took(1, 1e-5), 0.0))  # the estimate: 10 microseconds
    cmds = d.handle(SubmitAttempts([named(i, "f") for i in range(2, 202)], 0.0))
    assert len(sent(cmds)["w1"]) == 64
    refills = []
    for aid in range(2, 40):
        got = sent(d.handle(ResultFrom("w1", took(aid, 1e-5), 0.0))).get("w1", [])
        if got:
            refills.append(len(got))
    assert refills == [32]  # one refill, at 32 held, back up to 64
    assert d.ledger.count("w1") == 64 - 38 + 32


def test_attempts_that_turn_long_end_deep_holding():
    """When a name's attempts turn out long, the estimate follows within a result or two
    and the worker is refilled to ``prefetch`` only, not to 64."""
    d = ready(1, prefetch=2)
    d.handle(SubmitAttempts([named(1, "f")], 0.0))
    d.handle(ResultFrom("w1", took(1, 1e-5), 0.0))
    d.handle(SubmitAttempts([named(i, "f") for i in range(2, 202)], 0.0))
    t = 0.0
    refills = []
    while d.queue or d.ledger.count("w1"):
        t += 1.0
        got = sent(d.handle(ResultFrom("w1", took(d.ledger.held_by("w1")[0], 1.0, start=t - 1), t)))
        if got:
            refills.append(len(got["w1"]))
    assert refills and set(refills) == {1}  # one attempt per result: prefetch depth
    assert sum(refills) == 200 - 64


def late_second_worker() -> Dispatcher:
    """w1 took attempts 1 (running since t=0) and 2 (held); w2 said hello at t=0.01."""
    d = Dispatcher(2, prefetch=2)
    d.handle(Boot(0.0))
    d.handle(HelloFrom("w1", 101, 0.0))
    cmds = d.handle(SubmitAttempts([named(1, "long"), named(2, "long")], 0.0))
    assert sent(cmds) == {"w1": [1, 2]}
    assert started_ids(cmds) == [1]
    assert sent(d.handle(HelloFrom("w2", 102, 0.01))) == {}
    return d


def test_idle_worker_takes_back_attempts_held_behind_a_long_one():
    """w1 runs a long attempt with another held behind it; w2 is idle and nothing is
    queued. After 50 ms the held one is asked back, withdrawn, and runs on w2; it is
    reported started once, on w2."""
    d = late_second_worker()
    assert d.next_deadline() == pytest.approx(0.05)
    assert d.handle(TimePassed(0.01, {}, {})) == []  # not yet: w2 idle, but attempt 1 is young
    cmds = d.handle(TimePassed(0.06, {}, {}))
    asked = [c for c in cmds if isinstance(c, SendWorker)]
    assert asked == [SendWorker("w1", [CancelAttempt(2)])]
    cmds = d.handle(WithdrawnBy("w1", 2, 0.07))
    assert sent(cmds) == {"w2": [2]}
    assert started_ids(cmds) == [2]
    assert msgs(cmds, Lost) == []
    done = d.handle(ResultFrom("w2", took(2, 0.1, "w2", 0.07), 0.2))
    assert [m.attempt for m in msgs(done, Result)] == [2]
    assert d.ledger.count("w1") == 1


def test_asked_back_after_the_one_before_it_ended():
    """The race that once lost a task: attempt 2 is asked back, then attempt 1 ends (the
    master must not mark 2 started), then the worker withdraws 2: it is queued again and
    runs elsewhere; the client never hears that 2 started on w1."""
    d = late_second_worker()
    assert of(d.handle(TimePassed(0.06, {}, {})), SendWorker) == [
        SendWorker("w1", [CancelAttempt(2)])
    ]
    cmds = d.handle(ResultFrom("w1", took(1, 0.07), 0.07))
    assert [m.attempt for m in msgs(cmds, Result)] == [1]
    assert 2 not in started_ids(cmds)
    cmds = d.handle(WithdrawnBy("w1", 2, 0.08))
    assert sent(cmds) in ({"w2": [2]}, {"w1": [2]})
    assert started_ids(cmds) == [2]


def test_asked_back_too_late_still_reports_started_before_the_result():
    """The worker had started attempt 2 before the request reached it: its result is
    accepted, and the client hears Started(2) first."""
    d = late_second_worker()
    d.handle(TimePassed(0.06, {}, {}))
    d.handle(ResultFrom("w1", took(1, 0.07), 0.07))
    cmds = d.handle(ResultFrom("w1", took(2, 0.01, start=0.071), 0.09))
    order = [type(c.msg).__name__ for c in cmds if isinstance(c, ToClient)]
    assert order[:2] == ["Started", "Result"]
    assert d.ledger.count("w1") == 0 and not d.ledger.entries


# --------------------------------------------------------------------------- validate()


def test_an_exit_reported_twice_is_an_impossible_transition():
    """A runner bug reports a worker's exit twice: the second would 'lose' a worker that
    is already gone. The slot's transition table refuses (DEAD -> LOST), and the error
    carries the dispatcher's recent stimuli."""
    d = ready(1)
    d.handle(WorkerExited("w1", 0, "", 1.0, True))
    with pytest.raises(InvalidSlotTransition, match="'w1': invalid transition DEAD -> LOST") as ei:
        d.handle(WorkerExited("w1", -9, "", 2.0, False))
    assert "WorkerExited(name='w1', returncode=0" in str(ei.value)
    assert isinstance(ei.value, InvalidTransition)


def test_validate_catches_a_queued_attempt_missing_from_the_queue():
    """An attempt the ledger has queued but the dispatcher's queue lost would never be
    sent: the task hangs. validate() says so and shows the stimuli."""
    d = ready(1, prefetch=1)
    d.handle(SubmitAttempts([ra(1), ra(2)], 0.0))
    d.queue.clear()
    with pytest.raises(
        InvariantViolation, match="attempt 2 is queued in the ledger but not on the queue"
    ) as ei:
        d.validate()
    assert "SubmitAttempts(attempts=" in str(ei.value)


def test_validate_catches_a_dead_worker_holding_work():
    """A slot marked dead while the ledger says it holds an attempt: nobody would report
    that attempt lost."""
    d = ready(1)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    d.slots["w1"].state = SlotState.DEAD
    with pytest.raises(InvariantViolation, match=r"worker w1 is DEAD but holds attempts \[1\]"):
        d.validate()


def test_validate_checks_the_ledger_too():
    """The dispatcher's validate() includes its ledger's invariants."""
    d = ready(1)
    d.handle(SubmitAttempts([ra(1)], 0.0))
    d.ledger._by_worker["w2"] = {1: None}
    with pytest.raises(InvariantViolation, match=r"attempt ledger: .*held by both w1 and w2"):
        d.validate()


@pytest.mark.parametrize("seed", range(20))
def test_random_stimuli_keep_every_invariant(seed):
    """Random hellos, submissions, results (of the running attempt, and stale ones),
    withdrawals of what was asked back, cancels, drains, crashes, orderly exits, ticks
    (with timeouts and stopped workers) and a shutdown, against random pool settings:
    the dispatcher and its ledger validate after every stimulus (the fixture), and no
    attempt is reported lost twice."""
    import random

    rng = random.Random(seed)
    d = Dispatcher(
        rng.randint(1, 3),
        prefetch=rng.randint(1, 3),
        max_tasks_per_child=rng.choice([None, 2, 3]),
        heartbeat_interval=1.0,
        heartbeat_timeout=3.0,
    )
    d.handle(Boot(0.0))
    now, nxt, asked, closed = 0.0, 1, set(), False
    done: list[int] = []
    lost: list[int] = []
    for step in range(400):
        now += rng.random() * 0.3
        name = rng.choice(list(d.slots))
        s = d.slots[name]
        held = d.ledger.held_by(name)
        r = rng.random()
        if r < 0.15:
            if s.state is SlotState.STARTING:
                cmds = d.handle(HelloFrom(name, 100 + step, now))
            else:
                cmds = d.handle(HeartbeatFrom(name, now))
        elif r < 0.3:
            n = rng.randint(1, 4)
            cmds = d.handle(
                SubmitAttempts(
                    [ra(a, rng.choice([None, None, 1.0])) for a in range(nxt, nxt + n)], now
                )
            )
            nxt += n
        elif r < 0.55 and held:
            cmds = d.handle(
                ResultFrom(name, Result(held[0], True, b"v", name, 1, now - 0.01, now), now)
            )
        elif r < 0.58:
            cmds = d.handle(
                ResultFrom(name, res(rng.randint(1, nxt), name), now)
            )  # stale or foreign
        elif r < 0.65 and asked & set(held[1:]):
            aid = rng.choice(sorted(asked & set(held[1:])))
            asked.discard(aid)
            cmds = d.handle(WithdrawnBy(name, aid, now))
        elif r < 0.7:
            cmds = d.handle(CancelRequest(tuple([rng.randint(1, nxt)]), now))
        elif r < 0.73:
            cmds = d.handle(DrainRequest(name, "broken", now))
        elif r < 0.78 and s.state is not SlotState.DEAD:
            orderly = s.state in (SlotState.RETIRING, SlotState.STOPPING) and not held
            cmds = d.handle(WorkerExited(name, 0 if orderly else -9, "", now, orderly))
        elif r < 0.97:
            state = "T" if rng.random() < 0.1 else "S"
            cmds = d.handle(TimePassed(now, {n: (state, float(step)) for n in d.slots}, {}))
        elif not closed and r > 0.995:
            closed = True
            cmds = d.handle(Close())
        else:
            continue
        for c in cmds:
            if isinstance(c, SendWorker):
                asked |= {m.attempt for m in c.msgs if isinstance(m, CancelAttempt)}
            elif isinstance(c, ToClient) and isinstance(c.msg, Result) and c.msg.ok:
                done.append(c.msg.attempt)
            elif isinstance(c, ToClient) and isinstance(c.msg, Lost):
                lost.append(c.msg.attempt)
    assert len(lost) == len(set(lost))  # an attempt is reported lost at most once
    assert d.slots
