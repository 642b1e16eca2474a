"""The backends' kit (pilotfish.backends._driver): the command runner, the nursery, the
stimulus queue and the restart budget. Pure and fast: no processes."""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
import typing
from typing import Any

import pytest

from pilotfish.backends._driver import (
    Driver,
    Nursery,
    RestartBudget,
    Stimuli,
    carry_out,
    environment_result,
    runtime_lost,
)
from pilotfish.backends.base import Fatal, RunAttempt
from pilotfish.core import ledger as L
from pilotfish.wire import messages as _wire

pytestmark = pytest.mark.timeout(10)


class Recorder:
    """Hooks that write down what they were asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def report(self, msg: L.Started | L.Lost) -> None:
        self.calls.append(("report", msg.attempt))

    def send(self, items: tuple[Any, ...], resend: bool) -> None:
        self.calls.append(("send", items, resend))

    def withdraw(self, worker: str, attempt: int) -> None:
        self.calls.append(("withdraw", worker, attempt))

    def kill_groups(self, worker: str, pgids: tuple[int, ...]) -> None:
        self.calls.append(("kill_groups", worker, pgids))

    def expire(
        self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...], key: str = ""
    ) -> None:
        self.calls.append(("expire", worker, attempt, pid, pgids, key))


def _example(cls: type) -> Any:
    """An instance of a ledger command with placeholder fields."""
    fill = {"msg": L.Started(7, "w1", 11, 0.0), "items": ("x",), "pgids": (5,)}
    args = {}
    for f in dataclasses.fields(cls):
        args[f.name] = fill.get(f.name, 7 if f.name in ("attempt", "pid") else "w1")
    return cls(**args)


def test_every_ledger_command_is_carried_out() -> None:
    """A command the ledger gains must reach a hook or the outcome: a runner that
    skipped it would leave, say, a timed-out attempt running (mypy checks the match
    with assert_never; this checks that each case does something)."""
    for cls in typing.get_args(L.Command):
        rec = Recorder()
        out = carry_out([_example(cls)], rec)
        answered = out.granted + out.refused + out.accepted + out.dropped
        assert len(rec.calls) + len(answered) == 1, cls


def test_commands_go_to_their_hooks_in_order() -> None:
    rec = Recorder()
    cmds: list[L.Command] = [
        L.Report(L.Started(1, "w1", 9, 0.0)),
        L.Requeue(("a",)),
        L.Resend(("b",)),
        L.Withdraw("w2", 3),
        L.KillGroups("w1", (44,)),
        L.Expired("w1", 4, 9, (45,), "k4"),
        L.Granted("w1", 1),
        L.Refused("w3", 2, "it is held by w1"),
        L.Accept("w1", 1),
        L.Ignored("w3", 2, "late"),
    ]
    out = carry_out(cmds, rec)
    assert rec.calls == [
        ("report", 1),
        ("send", ("a",), False),
        ("send", ("b",), True),
        ("withdraw", "w2", 3),
        ("kill_groups", "w1", (44,)),
        ("expire", "w1", 4, 9, (45,), "k4"),
    ]
    assert [c.attempt for c in out.granted] == [1] and [c.attempt for c in out.accepted] == [1]
    assert out.reasons() == "it is held by w1; late"


def test_a_real_ledger_step() -> None:
    """A worker dies running one attempt and holding another: the started one is
    reported lost, the held one goes back unblamed, its program group is killed."""
    led = L.Ledger()
    led.handle(L.Enqueue(((1, "a", "item-1", None), (2, "b", "item-2", None))))
    led.handle(L.Hold("w1", (1, 2)))
    carry_out(led.handle(L.Start("w1", 1, 10, "h", 0.0)), Recorder())
    led.handle(L.Group("w1", 1, 99))
    rec = Recorder()
    carry_out(led.handle(L.WorkerLost("w1", "worker w1 was killed", 1.0)), rec)
    assert rec.calls == [("report", 1), ("kill_groups", "w1", (99,)), ("send", ("item-2",), False)]


def test_nursery_crash_is_one_fatal_with_its_traceback() -> None:
    """An event thread that dies (a bug, an engine's surprise) must not leave the
    session waiting for events that never come: the first crash is one Fatal naming
    the thread, with its traceback; a second crash is not reported again."""
    got: list[Any] = []
    d = Driver("test")
    d.sink = got.extend
    release = threading.Event()

    def boom(what: str) -> None:
        release.wait(5)
        raise RuntimeError(what)

    d.nursery.start("t-one", boom, "first")
    d.nursery.start("t-two", boom, "second")
    release.set()
    assert d.nursery.stop(5) == []
    (fatal,) = got
    assert isinstance(fatal, Fatal) and fatal.category == "runtime_lost"
    assert "test backend failed" in fatal.message and "Traceback" in fatal.message
    assert "RuntimeError" in fatal.message and d.dead
    assert d.nursery.crashed is not None


def test_nursery_stop_joins_every_thread_and_names_the_stuck() -> None:
    n = Nursery("test")
    done = threading.Event()
    stuck = threading.Event()
    n.start("quick", done.wait, 5)
    n.start("stuck", stuck.wait, 5)
    done.set()
    t0 = time.monotonic()
    assert n.stop(0.2) == ["stuck"]
    assert time.monotonic() - t0 < 1
    stuck.set()
    assert n.stop(5) == [] and n.threads() == []


def test_a_crash_while_stopping_is_not_reported() -> None:
    """A thread that fails because its backend is being torn down is no news."""
    got: list[Any] = []
    d = Driver("test")
    d.sink = got.extend
    d.stopping.set()
    d.nursery.start("t", lambda: 1 / 0)
    d.nursery.stop(5)
    assert got == [] and not d.dead


def test_stimuli_are_handled_in_batches_by_one_thread() -> None:
    seen: list[list[int]] = []
    threads: set[str] = set()
    gate = threading.Event()

    def handle(batch: list[int]) -> None:
        threads.add(threading.current_thread().name)
        gate.wait(5)
        seen.append(batch)

    n = Nursery("test")
    s: Stimuli[int] = Stimuli(handle, tick=0.01)
    s.start(n, "consumer")
    s.put(1)
    time.sleep(0.05)  # the consumer took [1] and waits at the gate; 2 and 3 pile up
    s.put(2)
    s.put(3)
    gate.set()
    deadline = time.monotonic() + 5
    while [x for b in seen for x in b] != [1, 2, 3] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [b for b in seen if b][:2] == [[1], [2, 3]]
    while [] not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [] in seen  # an idle consumer ticks (timers run in the same thread)
    s.close()
    assert n.stop(5) == [] and threads == {"consumer"}


def test_restart_budget_and_its_words() -> None:
    b = RestartBudget(2)
    assert b.take() and b.note() == "restart 1 of max_master_restarts=2"
    assert b.take() and not b.take()
    assert b.spent() == (
        "it was lost 2 times before (max_master_restarts=2), so pilotfish does not start "
        "another any more"
    )
    zero = RestartBudget(0)
    assert not zero.take()
    assert zero.spent("wait for it") == "max_master_restarts=0, so pilotfish does not wait for it"


def test_reports_for_attempts_the_backend_cannot_run() -> None:
    m = RunAttempt(attempt=5, key="k", kind="call", payload=b"", deps=(), timeout=None)
    lost = runtime_lost(m, "backend stopped", worker="scheduler", pid=3)
    assert lost.category == "runtime_lost" and lost.worker == "scheduler" and lost.pid == 3
    assert lost.message == "task 'k' (attempt id 5) was lost: backend stopped"
    d = Driver("test")
    d.fatal("the pilot is gone")
    assert d.refuse(m).message.endswith("was lost: the pilot is gone")

    res = environment_result(5, "pilotfish is not importable there")
    env = pickle.loads(res.data)
    assert not res.ok and env.category == "environment" and env.exc is None
    try:
        raise ImportError("no module named pilotfish")
    except ImportError as e:
        res = environment_result(5, "Dask could not run it", exc=e)
    env = pickle.loads(res.data)
    assert env.message == "Dask could not run it" and "ImportError" in env.traceback
    assert isinstance(env, _wire.Envelope)
