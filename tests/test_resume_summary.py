"""What resume did (issue 25 item 8): a resumed session says once, at the end of its
run, how many tasks it took from the journal (DONE before), how many failed before and
ran again (by category), how many were unfinished, how many are new; `pilotfish
resume` prints it. The rule: every task that did not end DONE runs again, failed ones
included."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from rich.cells import cell_len

import pilotfish
from conftest import fake_session
from pilotfish.client.resume import SUMMARY
from pilotfish.tools import cli


def flaky(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


def test_session_resume_logs_the_summary_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rundir = tmp_path / "run"
    fn = pilotfish.task(flaky, retries=0)
    with fake_session(rundir, workers=1) as s:
        pilotfish.wait([s.submit(fn, x) for x in (1, 2, -1, -2)], timeout=30)
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="pilotfish"),
        fake_session(rundir, workers=1, resume=True) as s,
    ):
        pilotfish.wait([s.submit(fn, x) for x in (1, 2, -1, -2, 3)], timeout=30)
    records = [r for r in caplog.records if hasattr(r, SUMMARY)]
    assert len(records) == 1
    text = records[0].getMessage()
    assert "5 task(s)" in text
    assert "2 DONE before, taken from the journal" in text
    assert "2 failed before, run again (user_error 2)" in text
    assert "1 new, run for the first time" in text
    assert "failed ones included" in text


WORKFLOW = """
import os, pilotfish

def flaky(x):
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x

xs = [1, 2, -1] + ([3, 4] if os.environ.get("MORE") else [])
with pilotfish.Session(workers=1, rundir="wf-run") as s:
    pilotfish.wait([s.submit(pilotfish.task(flaky, retries=0), x) for x in xs])
"""


@pytest.mark.timeout(90)
def test_pilotfish_resume_prints_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    script = tmp_path / "wf.py"
    script.write_text(WORKFLOW)
    assert cli.main(["run", str(script)]) == cli.EXIT_FAILED
    assert "pilotfish resume of" not in capsys.readouterr().out  # not a resumed run
    monkeypatch.setenv("MORE", "1")
    assert cli.main(["resume", str(script)]) == cli.EXIT_FAILED
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert "pilotfish resume of wf-run: 5 task(s)" in out
    assert "2 DONE before, taken from the journal (not run)" in out
    assert "1 failed before, run again (user_error 1)" in out
    assert "2 new, run for the first time" in out
    assert out.count("pilotfish resume of") == 1
    assert "pilotfish resume of" not in captured.err  # said once, by the CLI
    wide = [ln for ln in captured.out.splitlines() if cell_len(ln) > 80]
    assert not wide, wide
