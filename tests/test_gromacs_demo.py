"""The real GROMACS ensemble (``pilotfish demo --gromacs``, issue 17): a bad .mdp, a
blow-up, a member whose node dies and one that hits its walltime, both continued from
md.cpt on retry, and an analysis whose input failed. Runs when ``gmx`` is installed
(.ci/run installs Debian's gromacs), in well under a minute on 2 cores."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pilotfish.store.reader import JournalReader

pytestmark = [
    pytest.mark.skipif(
        shutil.which("gmx") is None,
        reason="GROMACS is not installed (`gmx` not on PATH; Debian: apt-get install gromacs)",
    ),
    pytest.mark.timeout(240),
]


def test_demo_gromacs(tmp_path: Path) -> None:
    """The whole demo through the command line, as a user runs it, then its journal."""
    rundir = tmp_path / "demo"
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "pilotfish.tools.cli", "--rundir", str(rundir), "demo", "--gromacs"],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert elapsed < 120, f"the demo took {elapsed:.0f} s"
    # the member whose node died continued from its checkpoint
    assert "node-lost: ok  (attempts: worker_lost, done)" in out
    assert "attempt 2: resumed from attempt 1: md.cpt, md.log, md.edr" in out
    # the walltime member continued (at least once) from its checkpoint
    assert "walltime: ok" in out and "resumed from attempt 1: md.cpt" in out
    # the bad .mdp: grompp's complete error kept; the blow-up: SIGSEGV
    assert "bad-mdp: CommandFailed" in out and "complete stderr kept" in out
    assert "blow-up: CommandFailed" in out and "SIGSEGV" in out
    assert "analysis: ok" in out and "analysis of blow-up: DependencyFailed" in out
    assert "failure digest" in out and "DEPENDENCY_FAILED from 2 roots" in out

    reader = JournalReader(rundir / "journal.db")
    failures = {  # "grompp-bad-mdp-HASH" -> its record (not its outputs' "KEY:md.tpr")
        f["key"].rsplit("-", 1)[0]: f for f in reader.failures() if ":" not in f["key"]
    }
    bad = failures["grompp-bad-mdp"]
    stderr = Path(bad["stderr_path"]).read_text()
    assert "Invalid enum 'mdx' for variable integrator" in stderr
    assert "mdrun-bad-mdp" in failures and failures["mdrun-bad-mdp"]["category"] == (
        "dependency_failed"
    )
    assert failures["mdrun-blow-up"]["signal"] == "SIGSEGV"
    [lost] = [
        r for r in reader.tasks() if r["key"].startswith("mdrun-node-lost") and ":" not in r["key"]
    ]
    attempts = reader.attempts(lost["key"])
    assert [a["outcome"] for a in attempts] == ["worker_lost", "done"]
    if "note" in attempts[1]:  # the journal stores attempt notes
        assert attempts[1]["note"].startswith("resumed from attempt 1: md.cpt")
    reader.close()
    _check_report(rundir)


def _check_report(rundir: Path) -> None:
    """The demo's HTML report (issue 25 item 9): the walltime member's exit 75 (in its
    retry_exit_codes) that a later attempt continued is 'continued', not 'command failed';
    the legend's failed counts agree with the failed-tasks table, which lists the two root
    causes first and no ``.output()`` reference; the references are not counted."""
    import json
    import re

    from pilotfish.tools import report

    reader = JournalReader(rundir / "journal.db")
    try:
        tasks = sum(reader.counts().values())
        failed = reader.counts().get("FAILED", 0)
        page = report.build_report(reader)
    finally:
        reader.close()
    assert f"{tasks} tasks, {failed} failed</title>" in page
    rows = re.findall(r'<details class="failure"[^>]* data-key="([^"]+)"', page)
    assert len(rows) == failed and not [k for k in rows if ":" in k], rows
    cats = re.findall(
        r'<details class="failure".*?<span class="c"><span class="badge o-(\w+)"', page
    )
    assert cats[:2] == ["command_failed", "command_failed"]  # the roots first
    assert set(cats[2:]) == {"dependency_failed"}
    data = json.loads(re.search(r'id="pf-data">(.*?)</script>', page, re.S).group(1))  # type: ignore[union-attr]
    ids = [o["id"] for o in data["outcomes"]]
    walltime = [
        ids[b[3]] for b in data["bars"] if data["keys"][str(b[4])].startswith("mdrun-walltime")
    ]
    assert walltime[0] == "retried" and walltime[-1] == "done", walltime
    legend = re.search(r'data-outcome="command_failed".*?<span class="n">\((\d+)\)', page)
    assert legend and int(legend.group(1)) == cats.count("command_failed")
