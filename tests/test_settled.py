"""``pilotfish.settled(tasks, at_least=None)``: analyse what succeeded while other
members fail (issue 25 item 5; DESIGN.md section 2). Conformance: on every backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import pilotfish
from conftest import fake_session
from pilotfish import Category, State


def member(seed: int) -> float:
    if seed % 3 == 0:
        raise ValueError(f"member {seed} diverged")
    return seed * 0.5


def summarise(outcomes: list[Any]) -> dict[str, Any]:
    """An analysis over an ensemble: the values it got, and which members failed."""
    values = [o for o in outcomes if not isinstance(o, pilotfish.Failure)]
    failed = [o for o in outcomes if isinstance(o, pilotfish.Failure)]
    return {
        "values": values,
        "failed": [(f.key, f.name, f.category, f.message) for f in failed],
        "order": ["F" if isinstance(o, pilotfish.Failure) else "v" for o in outcomes],
    }


def mean_of(values: list[float], outcomes: list[Any]) -> tuple[float, int]:
    good = [o for o in outcomes if not isinstance(o, pilotfish.Failure)]
    return sum(values) / len(values), len(good)


def test_an_analysis_runs_on_what_succeeded(session: pilotfish.Session) -> None:
    members = [session.submit(member, i) for i in range(7)]
    summary = session.submit(summarise, pilotfish.settled(members))
    got = summary.result(timeout=120)
    assert got["values"] == [i * 0.5 for i in range(7) if i % 3]
    assert got["order"] == ["F", "v", "v", "F", "v", "v", "F"]
    keys = {m.key for m in members if m.state is State.FAILED}
    assert {k for k, *_ in got["failed"]} == keys and len(keys) == 3
    for _key, name, category, message in got["failed"]:
        assert name == "member" and category is Category.USER_ERROR
        assert "diverged" in message
    assert summary.state is State.DONE and len(summary.attempts) == 1


def test_too_few_successes_fail_the_analysis_without_running_it(
    session: pilotfish.Session,
) -> None:
    members = [session.submit(member, i) for i in range(6)]  # 0 and 3 fail: 4 of 6
    enough = session.submit(summarise, pilotfish.settled(members, at_least=4))
    short = session.submit(summarise, pilotfish.settled(members, at_least=0.9))
    assert len(enough.result(timeout=120)["values"]) == 4
    with pytest.raises(pilotfish.DependencyFailed) as info:
        short.result(timeout=120)
    f = info.value.failure
    assert f is not None and f.category is Category.DEPENDENCY_FAILED
    assert f.upstream == members[0].key and f.root == members[0].key
    assert "4 of its 6 settled inputs succeeded" in f.message and "at least 6" in f.message
    assert short.attempts == []  # it never ran
    assert isinstance(info.value.__cause__, ValueError)  # the root exception, as ever


def test_plain_and_settled_inputs_together(session: pilotfish.Session) -> None:
    """A plain input's failure still fails the call; settled ones do not; a dependent of
    the analysis runs as usual."""
    ok, bad = session.submit(member, 1), session.submit(member, 3)
    stats = session.submit(mean_of, [ok, ok], pilotfish.settled([ok, bad]))
    assert stats.result(timeout=120) == (0.5, 1)
    follow = session.submit(mean_of, [bad], pilotfish.settled([ok]))
    with pytest.raises(pilotfish.DependencyFailed):
        follow.result(timeout=120)
    assert follow.failure is not None and follow.failure.upstream == bad.key


def test_bad_settled_arguments_are_refused_at_submit(tmp_path: Path) -> None:
    with fake_session(tmp_path / "r") as s:
        t = s.submit(member, 1)
        for bad, words in [
            (lambda: pilotfish.settled(t), "takes a list of tasks"),
            (lambda: pilotfish.settled(5), "takes a list of tasks"),  # type: ignore[arg-type]
            (lambda: pilotfish.settled([t, 2]), "item 1 is 2"),  # type: ignore[list-item]
            (lambda: pilotfish.settled([t], at_least=2), "from 0 to 1"),
            (lambda: pilotfish.settled([t], at_least=1.5), "fraction must be in (0, 1]"),
            (lambda: pilotfish.settled([t], at_least="all"), "a count"),  # type: ignore[arg-type]
        ]:
            with pytest.raises(pilotfish.InvalidTask, match="settled") as info:
                bad()
            assert words in str(info.value), info.value
        with pytest.raises(pilotfish.InvalidTask, match="must be a path or a Task"):
            s.executable(["true"], inputs={"x": pilotfish.settled([t])})  # type: ignore[dict-item]
        assert t.result(timeout=30) == 0.5


def test_a_settled_analysis_resumes_from_the_journal(tmp_path: Path) -> None:
    """Its key is stable across runs: a resumed run takes it from the journal."""
    rundir = tmp_path / "r"
    keys = []
    for resume in (False, True):
        with fake_session(rundir, resume=resume) as s:
            members = [s.submit(member, i) for i in range(4)]
            summary = s.submit(summarise, pilotfish.settled(members, at_least=2))
            assert summary.result(timeout=30)["order"] == ["F", "v", "v", "F"]
            keys.append(summary.key)
            ran = len(summary.attempts)
    assert keys[0] == keys[1] and ran == 0
