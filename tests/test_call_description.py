"""Which member failed (issue 25 item 2): a task is named after the function a library
wraps, and the journal keeps a short, bounded description of each call (``call``),
shown by ``pilotfish show KEY`` and ``failures --json``; older journals still open."""

from __future__ import annotations

import functools
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

import pilotfish
from conftest import fake_session
from pilotfish.client.describe import (
    ARG_MAX,
    CALL_MAX,
    describe_argv,
    describe_call,
    task_name,
    unwrap,
)
from pilotfish.tools import cli


def model(x: float, *args: Any, **kwargs: Any) -> float:
    raise ValueError(f"no convergence at x={x}")


class _FunctionWrapper:
    """As scipy's and emcee's: the user's function in ``.f``."""

    def __init__(self, f: Any, args: tuple[Any, ...] = ()) -> None:
        self.f, self.args = f, args

    def __call__(self, x: Any) -> Any:
        return self.f(x, *self.args)


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class NotStrRepr:
    def __repr__(self) -> Any:
        return 42


class Slippery:
    """Every attribute read raises (a proxy to something gone)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(name)

    def __call__(self) -> None:
        pass


def decorated(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        return fn(*a, **k)

    wrapper.__qualname__ = "wrapper"  # as a decorator without functools.wraps names it
    return wrapper


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


def test_task_name_unwraps_library_wrappers() -> None:
    assert task_name(_FunctionWrapper(model, (1,))) == "model"
    assert task_name(functools.partial(model, 2)) == "model"
    assert task_name(functools.partial(_FunctionWrapper(model), 2)) == "model"
    assert task_name(decorated(model)) == "model"
    assert unwrap(model) is model
    assert task_name(abs) == "abs"
    assert task_name(Slippery()) == "Slippery"  # its attributes raise: its type's name
    loop = _FunctionWrapper(model)
    loop.f = loop  # a wrapper of itself: no endless unwrapping
    assert task_name(loop) == "_FunctionWrapper"


def test_describe_call_is_bounded_and_never_fails() -> None:
    assert describe_call(model, (0.5, "a"), {"n": 3}) == "model(0.5, 'a', n=3)"
    assert describe_call(functools.partial(model, 2, k=1), (3,), {}) == "model(2, 3, k=1)"
    long = describe_call(model, ("x" * 10_000, list(range(10_000))), {"w": BadRepr()})
    assert len(long) <= CALL_MAX and long.startswith("model('xxx")
    assert describe_call(model, (BadRepr(), NotStrRepr()), {}) == (
        "model(<BadRepr object>, <NotStrRepr object>)"
    )
    many = describe_call(model, tuple("y" * ARG_MAX for _ in range(100)), {})
    assert len(many) == CALL_MAX and many.endswith("…")
    assert describe_argv(["gmx", "mdrun", "-s", "my topol.tpr"]) == "gmx mdrun -s 'my topol.tpr'"


def test_a_task_in_a_call_shows_as_its_key_and_only_a_task_does(tmp_path: Any) -> None:
    """A session's Task among the arguments (top level or nested) shows as ``<its key>``;
    a user's own class that happens to be named ``Task`` and has a ``key`` attribute is
    shown by its own repr (it was taken for a session's Task by its type's name)."""

    class Task:  # the user's, not pilotfish's
        key = "not-a-pilotfish-task"

        def __repr__(self) -> str:
            return "Task(mine)"

    with fake_session(tmp_path / "run", workers=1) as s:
        t = s.submit(abs, -1)
        assert (
            describe_call(model, (t, [t], Task()), {})
            == f"model(<{t.key}>, [<{t.key}>], Task(mine))"
        )
        t.result(timeout=30)
    assert len(describe_argv(["prog", *["z" * 500] * 10])) <= CALL_MAX


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rundir = tmp_path_factory.mktemp("call") / "run"
    with fake_session(rundir, workers=2) as s:
        wrapped = s.submit(pilotfish.task(_FunctionWrapper(model, (1,)), retries=0), 0.25)
        part = s.submit(pilotfish.task(functools.partial(model, 7), retries=0), w=BadRepr())
        prog = s.executable(
            [sys.executable, "-c", "import sys; sys.exit(5)", "a b"], key="prog", retries=0
        )
        dep = s.submit(model, wrapped)
        pilotfish.wait([wrapped, part, prog, dep], timeout=60)
    return {
        "rundir": str(rundir),
        "keys": [wrapped.key, part.key, prog.key, dep.key],
        "names": [wrapped.name, part.name],
    }


def test_wrapped_tasks_are_named_after_the_function(run: dict[str, Any]) -> None:
    assert run["names"] == ["model", "model"]
    assert all(k.startswith("model-") for k in run["keys"][:2])


def test_show_and_failures_json_carry_the_call(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    wrapped, part, prog, dep = run["keys"]
    assert cli.main(["--rundir", run["rundir"], "failures", "--json"]) == 0
    calls = {f["key"]: f["call"] for f in json.loads(capsys.readouterr().out)}
    assert calls[wrapped] == "model(0.25)"
    assert calls[part] == "model(7, w=<BadRepr object>)"
    assert calls[prog].endswith("-c 'import sys; sys.exit(5)' 'a b'")
    assert calls[dep] == f"model(<{wrapped}>)"  # a Task argument: its key
    for key, call in ((wrapped, "model(0.25)"), (prog, "'a b'")):
        assert cli.main(["--rundir", run["rundir"], "show", key, "--no-pager"]) == 0
        out = capsys.readouterr().out
        line = next(ln for ln in out.splitlines() if ln.startswith("call: "))
        assert call in line and cell_len(line) <= 80


def test_a_journal_without_the_call_column_still_opens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A journal written before ``call`` existed: the CLI reads it (no call line, call
    None), and a new session on it adds the column without a schema version change."""
    rundir = tmp_path / "old"
    with fake_session(rundir, workers=1) as s:
        t = s.submit(pilotfish.task(model, retries=0), 1)
        pilotfish.wait([t], timeout=30)
    db = rundir / "journal.db"
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE tasks DROP COLUMN call")
    conn.close()
    assert cli.main(["--rundir", str(rundir), "show", t.key, "--no-pager"]) == 0
    assert "call:" not in capsys.readouterr().out
    assert cli.main(["--rundir", str(rundir), "failures", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["call"] is None
    with fake_session(rundir, workers=1, resume=True) as s:
        t2 = s.submit(pilotfish.task(model, retries=0), 2)
        pilotfish.wait([t2], timeout=30)
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT key, call FROM tasks"))
        version = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    conn.close()
    assert rows == {t.key: None, t2.key: "model(2)"} and version == ("1",)


def ok(x: float) -> float:
    return x


def slow(x: float) -> float:
    time.sleep(1.5)  # longer than the journal's flush interval (0.5 s)
    return x


def test_the_call_is_kept_whether_its_task_ends_in_the_submit_rows_batch_or_later(
    tmp_path: Path,
) -> None:
    """The task hands its description to the journal's submit record and keeps no copy:
    a later record of the same flush carries it on, a later flush's row keeps the one
    written (issue 26: memory per held future)."""
    with fake_session(tmp_path / "r") as s:
        quick = [s.submit(ok, i / 4) for i in range(50)]  # submitted and done in one batch
        late = s.submit(slow, 9.5)  # its submit row is written before it ends
        pilotfish.wait([*quick, late], timeout=30)
        assert not any(hasattr(t, "_call_text") for t in [*quick, late])  # not even a slot
    conn = sqlite3.connect(tmp_path / "r" / "journal.db")
    calls = dict(conn.execute("SELECT key, call FROM tasks"))
    conn.close()
    assert [calls[t.key] for t in quick] == [f"ok({i / 4})" for i in range(50)]
    assert calls[late.key] == "slow(9.5)"
