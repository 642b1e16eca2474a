"""The command line for many failures (issue 16, items 1, 2, 3 and 5): `failures` one
line per task that fits the terminal, `failures --group` (and `--json`) the digest,
`report --html`, and the hints `run`/`resume` print after failures. The CLI runs
in-process, on a journal a real Session wrote (on FakeBackend: the journal is the
client's; `run` and `demo` below use the local backend), at 80 columns."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

import pilotfish
from conftest import fake_session
from pilotfish.digest import failure_digest
from pilotfish.store.reader import JournalReader
from pilotfish.tools import cli

LONG_KEY = "member-" + "k" * 100 + "-end"
LONG_MESSAGE = "the solver diverged because " + "the time step was far too large " * 6


def diverge(seed: int, text: str = "") -> None:
    raise ValueError(f"seed {seed}: {text or 'unstable parameters'}")


def ok(x: int) -> int:
    return x


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rundir = tmp_path_factory.mktemp("digest") / "run"
    script = (
        "import sys; [print('warning: step', i, file=sys.stderr) for i in range(50)]; "
        "print('ERROR: Invalid enum 42 for variable integrator', file=sys.stderr); sys.exit(2)"
    )
    with fake_session(rundir, workers=2) as s:
        fn = pilotfish.task(diverge, retries=0)
        long = s.submit(fn.options(key=LONG_KEY), 99, LONG_MESSAGE)
        seeds = [s.submit(fn, seed) for seed in (1, 2, 3)]
        cmd = s.executable([sys.executable, "-c", script], key="mdrun", retries=0)
        down = [s.submit(sum, [seeds[0], s.submit(ok, i)]) for i in range(2)]
        pilotfish.wait([long, *seeds, cmd, *down], timeout=60)
    return {"rundir": str(rundir), "keys": [seeds[0].key, *(d.key for d in down)]}


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_failures_one_line_per_task_at_80_columns(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Seven failed tasks: a title, a header, seven lines and a hint, none wider than 80;
    a key and a message longer than the line are cut with "…", the key's start kept."""
    assert cli.main(["--rundir", run["rundir"], "failures"]) == 0
    lines = _lines(capsys.readouterr().out)
    assert lines[0] == "7 failed task(s)"
    assert lines[1].split() == ["key", "category", "tries", "reason"]
    rows = lines[2:9]
    assert len(lines) == 10 and "pilotfish show KEY" in lines[9]
    assert all(cell_len(ln) <= 80 for ln in lines), [ln for ln in lines if cell_len(ln) > 80]
    long = next(ln for ln in rows if ln.startswith("member-kkk"))
    assert "…" in long and "user_error" in long and "ValueError: seed 99" in long
    assert long.endswith("…")
    mdrun = next(ln for ln in rows if ln.startswith("mdrun "))
    assert "command_failed" in mdrun and "exit 2: ERROR: Invalid enum" in mdrun
    dep = [ln for ln in rows if "dependency_failed" in ln]
    assert len(dep) == 2 and all("input failed: diverge-" in ln for ln in dep)


def test_failures_group(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """`failures --group`: the digest, largest group first, lines within 80 columns."""
    assert cli.main(["--rundir", run["rundir"], "failures", "--group"]) == 0
    out = capsys.readouterr().out
    lines = _lines(out)
    assert all(cell_len(ln) <= 80 for ln in lines)
    assert lines[0] == "7 tasks failed, in 4 groups (largest first):"
    assert lines[1] == "3 tasks: USER_ERROR ValueError: seed <n>: unstable parameters"
    assert lines[2].startswith("    e.g. diverge-")
    assert lines[3] == "    root of 2 dependency failures"
    assert lines[4] == "2 tasks: DEPENDENCY_FAILED from 1 root"
    assert lines[5] == f"    roots: {run['keys'][0]} (2)"
    assert "1 task: COMMAND_FAILED exit 2 'ERROR: Invalid enum <n> for variable" in out


def test_failures_group_json_is_the_digest(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--group --json` is exactly :func:`failure_digest` of the journal's failures."""
    assert cli.main(["--rundir", run["rundir"], "failures", "--group", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    reader = JournalReader(Path(run["rundir"]) / "journal.db")
    assert data == json.loads(json.dumps(failure_digest(reader.failures())))
    assert [g["count"] for g in data["groups"]] == [3, 2, 1, 1]
    assert data["failed"] == 7


def test_status_stays_a_table(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--rundir", run["rundir"], "status"]) == 0
    out = capsys.readouterr().out
    assert "total tasks" in out and "failed: user_error" in out
    assert all(cell_len(ln) <= 80 for ln in out.splitlines())


def test_report_command(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`report --html` writes RUNDIR/report.html by default, `--out` elsewhere (a
    directory means a report.html in it); the file is private (0600)."""
    assert cli.main(["--rundir", run["rundir"], "report", "--html"]) == 0
    default = Path(run["rundir"]) / "report.html"
    assert default.is_file() and (default.stat().st_mode & 0o077) == 0
    out = capsys.readouterr().out
    assert "report written:" in out and default.resolve().as_uri() in out.replace("\n", "")
    assert cli.main(["--rundir", run["rundir"], "report", "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "7 failed" in page


def test_report_without_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--rundir", str(tmp_path / "none"), "report", "--html"]) == cli.EXIT_USAGE
    assert "no journal at" in capsys.readouterr().err


WORKFLOW = """
import pilotfish

def boom(x):
    raise RuntimeError(f"boom {x}")

with pilotfish.Session(workers=1, rundir=RUNDIR) as s:
    pilotfish.wait([s.submit(boom, i) for i in range(2)])
"""


@pytest.mark.timeout(60)
def test_run_and_resume_point_at_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a run with failures, `run` and `resume` say how to group them and where the
    report goes, naming the script's run directory."""
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "wf.py"
    script.write_text(WORKFLOW.replace("RUNDIR", repr("my run")))
    assert cli.main(["run", str(script)]) == cli.EXIT_FAILED
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "grouped: pilotfish --rundir 'my run' failures --group" in out
    assert "report: pilotfish --rundir 'my run' report --html (writes 'my run/report.html')" in out
    assert cli.main(["resume", str(script)]) == cli.EXIT_FAILED
    assert "pilotfish --rundir 'my run' report --html" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_run_without_failures_prints_no_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "wf.py"
    script.write_text(
        "import pilotfish\nwith pilotfish.Session(workers=1) as s:\n"
        "    assert s.submit(abs, -1).result() == 1\n"
    )
    assert cli.main(["run", str(script)]) == 0
    out = capsys.readouterr().out
    assert "report --html" not in out and "failed" not in out.replace("failed │", "")


@pytest.mark.timeout(90)
def test_demo_ends_with_the_digest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pilotfish demo` prints one line per failed task, writes the report and ends with
    the failure digest; at 80 columns no line of the failures list is folded."""
    rundir = tmp_path / "demo"
    assert cli.main(["--rundir", str(rundir), "demo"]) == 0
    lines = _lines(capsys.readouterr().out)
    tail = lines[lines.index("failure digest (`pilotfish failures --group`):") :]
    assert tail[1] == "3 tasks failed, in 3 groups (largest first):"
    assert "1 task: COMMAND_FAILED exit 2 'FATAL: LINCS constraint failure at step <n>'" in tail
    assert tail[-1] == "    root of 1 dependency failure"
    assert (rundir / "report.html").is_file()
    i = lines.index("3 failed task(s)")
    assert all(cell_len(ln) <= 80 for ln in lines[i : i + 6])
