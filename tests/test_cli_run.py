"""`pilotfish run`, `resume`, `check` and `--help` for a scientist at 80 columns (issue
25 items 10-13): progress on stderr (each failure with its reason, lost workers with
their tasks, count lines), hints naming the run directory the script really used,
`--rundir` as the scripts' default, a `check` that creates nothing, help with examples."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from pilotfish.client.events import TaskEvent, WorkerEvent
from pilotfish.core.states import State
from pilotfish.errors import Category, FailureRecord
from pilotfish.tools import cli

WIDTH = 80


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))


def _wide(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if cell_len(ln) > WIDTH]


PROGRESS = """
import os, pilotfish

def die(x):
    os.kill(os.getpid(), 9)

def boom(x):
    raise ValueError(f"bad {x}")

print("script says hello")
with pilotfish.Session(workers=2) as s:
    ts = [s.submit(pilotfish.task(die, retries=0), 1), s.submit(pilotfish.task(boom, retries=0), 2)]
    ts += [s.submit(abs, -i) for i in range(5)]
    pilotfish.wait(ts)
print("script says goodbye")
"""


@pytest.mark.timeout(90)
def test_run_progress_goes_to_stderr_with_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 11: the script's stdout is its own; on stderr each failure has its category
    and reason, the lost worker names its task, and count lines say how far it is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wf.py").write_text(PROGRESS)
    assert cli.main(["run", "wf.py"]) == cli.EXIT_FAILED
    cap = capsys.readouterr()
    out_lines = cap.out.splitlines()
    assert out_lines[:2] == ["script says hello", "script says goodbye"]
    assert "failed:" not in cap.out and "submitted" not in cap.out
    err = " ".join(cap.err.split())  # unwrapped
    assert re.search(r"failed: boom-\w+ \(user_error: ValueError: bad 2\)", err), err
    assert re.search(r"failed: die-\w+ \(worker_lost: worker lost: signal SIGKILL\)", err), err
    assert re.search(r"worker w\d+ lost while running die-\w+:", err), err
    assert re.search(r"\[\d+\.\d s\] 5 done, 2 failed of 7 submitted \(100%\)", err), err
    assert not _wide(cap.err) and not _wide(cap.out), _wide(cap.err) + _wide(cap.out)


def _failure(key: str) -> FailureRecord:
    return FailureRecord(
        key=key,
        category=Category.COMMAND_FAILED,
        transient=False,
        message=f"task {key!r}: program 'sh' exited with code 3\n  complete stderr: /x/stderr",
        returncode=3,
    )


def test_progress_count_lines_every_interval(capsys: pytest.CaptureFixture[str]) -> None:
    """A count line after each failure, and at most every `every` seconds while tasks
    move (a clock the test sets); a lost worker names the tasks it held."""
    now = [0.0]
    prog = cli.Progress(Console(width=WIDTH), every=5.0, clock=lambda: now[0])
    for i in range(3):
        prog.on_event(TaskEvent(f"t{i}", "t", State.PENDING, State.RUNNING, 0.0))
    assert capsys.readouterr().out == ""
    now[0] = 6.0
    prog.on_event(TaskEvent("t0", "t", State.RUNNING, State.DONE, 6.0, 1))
    assert (
        capsys.readouterr().out.strip()
        == "[6.0 s] 1 done, 0 failed, 2 running of 3 submitted (33%)"
    )
    prog.on_event(TaskEvent("t1", "t", State.RUNNING, State.DONE, 6.0, 1))
    assert capsys.readouterr().out == ""  # within the interval
    prog.on_event(TaskEvent("t2", "t", State.RUNNING, State.FAILED, 7.0, 1, _failure("t2")))
    now[0] = 7.0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "failed: t2 (command_failed: exit 3)"
    assert out[1].endswith("2 done, 1 failed of 3 submitted (100%)")
    prog.on_event(WorkerEvent("lost", "w3", 12, 8.0, signal="SIGKILL", held=("a", "b")))
    assert capsys.readouterr().out.startswith("worker w3 lost while running a, b:")


@pytest.mark.timeout(90)
def test_check_fits_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 13: `check` at 80 columns: one check per line, the searched sys.path one entry
    per line (whole); the current directory is left as it was (no ./.pilotfish)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli.main(["check", "--requires", "no_such_module_pf25"])
    assert code == cli.EXIT_FAILED
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "pre-flight checks (local backend)"
    assert any(ln.startswith("ok      python ") for ln in lines)
    failed = [ln for ln in lines if ln.startswith("FAILED  module no_such_module_pf25")]
    assert len(failed) == 1
    i = lines.index("        sys.path searched:")
    entries = []
    for ln in lines[i + 1 :]:
        if not ln.startswith(" " * 10):
            break
        entries.append(ln.strip())
    assert len(entries) >= 3 and all(e.startswith("/") for e in entries)
    assert "        fix: install it on the workers: pip install 'no_such_module_pf25'" in lines
    wide = [ln for ln in _wide(out) if ln.strip() not in entries]
    assert not wide, wide


@pytest.mark.timeout(90)
def test_check_looks_at_the_run_directory_without_making_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`check --rundir DIR` says whether DIR can be made or written, and makes nothing;
    a file where the directory should be fails with the fix."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check", "--rundir", "new/run"]) == 0
    out = capsys.readouterr().out
    assert "ok      run directory new/run:" in out and "does not exist yet" in out
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    assert cli.main(["check", "--rundir", "afile"]) == cli.EXIT_FAILED
    out = capsys.readouterr().out
    assert "FAILED  run directory afile:" in out and "not a directory you can write" in out
    assert "fix: give a run directory you can write" in out


OWN_RUNDIR = """
import pilotfish

def boom(x):
    raise RuntimeError(f"boom {x}")

with pilotfish.Session(workers=1, **KW) as s:
    pilotfish.wait([s.submit(boom, 1)])
"""


@pytest.mark.timeout(90)
def test_run_rundir_is_the_scripts_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 10: `run --rundir X` makes X the run directory of a Session made without
    one, and the hints name it; a script that names its own run directory is told
    apart, and the hints name the one it used."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.py").write_text(OWN_RUNDIR.replace("**KW", ""))
    assert cli.main(["run", "--rundir", "other", "plain.py"]) == cli.EXIT_FAILED
    out = " ".join(capsys.readouterr().out.split())
    assert (tmp_path / "other" / "journal.db").is_file()
    assert not (tmp_path / ".pilotfish").exists()
    assert "pilotfish --rundir other failures --group" in out and "note:" not in out
    (tmp_path / "own.py").write_text(OWN_RUNDIR.replace("**KW", "rundir='mine'"))
    assert cli.main(["run", "--rundir", "other", "own.py"]) == cli.EXIT_FAILED
    cap = capsys.readouterr()
    out = " ".join(cap.out.split())
    assert "note: --rundir other was not used" in out and "its journal is in mine" in out
    assert "pilotfish --rundir mine failures --group" in out
    assert not _wide(cap.out)


def test_help_has_examples_and_every_argument_explained(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Item 12: each command's --help ends with examples, every argument has help, no
    line is wider than 80 columns; demo's help names the run directory it uses."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {
        "run",
        "resume",
        "status",
        "failures",
        "report",
        "show",
        "check",
        "demo",
    }
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.dest)
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert "examples:\n  pilotfish " in out, name
        assert not _wide(out), (name, _wide(out))
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "./.pilotfish-demo" in " ".join(capsys.readouterr().out.split())
