"""Pre-flight: an incompatible worker environment is found before work is sent to it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import faulty
import pilotfish
from conftest import environment_attempts
from pilotfish import Category
from pilotfish.tools import cli


def test_missing_module_requirement(session: pilotfish.Session, backend: str) -> None:
    """A task requiring a module the workers lack fails with ENVIRONMENT, naming the
    requirement, the host, the Python and the sys.path searched; not retried; other
    tasks keep running."""
    t = session.submit(pilotfish.task(faulty.ident, requires=["no_such_module_xyz>=1.0"]), 1)
    ok = session.submit(faulty.ident, 2)
    with pytest.raises(pilotfish.EnvironmentMismatch) as info:
        t.result(timeout=30)
    msg = str(info.value)
    assert "no_such_module_xyz>=1.0" in msg and "not installed" in msg
    assert os.uname().nodename in msg and sys.executable in msg and "sys.path" in msg
    assert t.failure is not None and t.failure.category is Category.ENVIRONMENT
    environment_attempts(t, backend)
    assert ok.result(timeout=30) == 2


def test_too_old_version(session: pilotfish.Session) -> None:
    """A version specifier the installed package does not satisfy names what was found."""
    import packaging

    t = session.submit(pilotfish.task(faulty.ident, requires=["packaging>=999"]), 1)
    with pytest.raises(pilotfish.EnvironmentMismatch, match=r"packaging>=999") as info:
        t.result(timeout=30)
    assert f"packaging {packaging.__version__}" in str(info.value)
    fine = session.submit(pilotfish.task(faulty.ident, requires=["packaging>=20"]), 3)
    assert fine.result(timeout=30) == 3


def test_missing_program(session: pilotfish.Session, backend: str) -> None:
    """requires_programs is checked on the worker before the program task runs."""
    t = session.executable(["sh", "-c", "gmx_absent mdrun"], requires_programs=["gmx_absent"])
    with pytest.raises(pilotfish.EnvironmentMismatch, match="gmx_absent") as info:
        t.result(timeout=30)
    assert "PATH searched" in str(info.value)
    environment_attempts(t, backend)


def test_unwritable_sandbox_root(tmp_path: Path) -> None:
    """A worker that cannot write its sandbox root fails pre-flight at start-up: every task
    fails with ENVIRONMENT saying so, nothing hangs."""
    rundir = tmp_path / "run"
    rundir.mkdir()
    (rundir / "sandboxes").write_text("a file where the sandbox directory should be")
    with pilotfish.Session(workers=1, rundir=str(rundir), journal=None) as s:
        t = s.submit(faulty.ident, 1)
        with pytest.raises(pilotfish.EnvironmentMismatch, match="sandbox root") as info:
            t.result(timeout=30)
        assert "not writable" in str(info.value)


def test_session_requires_reports_every_problem_at_once(tmp_path: Path) -> None:
    """Session(requires=...) fails at start with every problem listed, before any task."""
    with pytest.raises(pilotfish.EnvironmentMismatch) as info:
        pilotfish.Session(
            workers=1,
            rundir=str(tmp_path / "r"),
            requires=["no_such_module_abc", "packaging>=999"],
            requires_programs=["no_such_program_q"],
        )
    msg = str(info.value)
    assert "3 pre-flight check(s) failed" in msg
    for needle in ("no_such_module_abc", "packaging>=999", "no_such_program_q"):
        assert needle in msg
    with pilotfish.Session(
        workers=1, rundir=str(tmp_path / "r2"), requires=["packaging"], requires_programs=["sh"]
    ) as s:
        assert s.submit(faulty.ident, 4).result(timeout=30) == 4


def test_pilotfish_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pilotfish check` prints each check with its result and a fix hint; exit status is
    non-zero when any check fails."""
    rundir = str(tmp_path / "r")
    assert (
        cli.main(["check", "--rundir", rundir, "--requires", "packaging", "--program", "sh"]) == 0
    )
    out = capsys.readouterr().out
    assert "pilotfish" in out and "cloudpickle" in out and "sandbox root" in out
    assert "all checks passed" in out
    assert (
        cli.main(
            ["check", "--rundir", rundir, "--requires", "packaging>=999", "--program", "gmx_absent"]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "FAILED" in out and "pip install" in out and "1 check(s) failed" not in out
    assert "2 check(s) failed" in out
