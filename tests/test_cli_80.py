"""The command line at 80 columns (issue 25): `failures` puts the reason first, `show`
prints each path once and whole, the stderr tail once, an attempts table that fits.
The CLI runs in-process on a journal a real Session wrote (on FakeBackend, programs
run for real), at COLUMNS=80."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

import pilotfish
from conftest import fake_session
from pilotfish.store.reader import JournalReader
from pilotfish.tools import cli

WIDTH = 80


def fails(seed: int, text: str = "") -> None:
    raise ValueError(f"seed {seed} diverged\nsecond line of the message")


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # a deep run directory: every sandbox path is far wider than 80 columns
    rundir = tmp_path_factory.mktemp("cli80") / ("a-long-directory-name-" * 3) / "run"
    noisy = "import sys; [print('line', i, file=sys.stderr) for i in range(40)]; sys.exit(3)"
    with fake_session(rundir, workers=2) as s:
        user = s.submit(pilotfish.task(fails, retries=0), 7, "x" * 300)
        tasks = {
            "user": user,
            "exit": s.executable(
                [sys.executable, "-c", noisy], key="exit3", retries=1, retry_exit_codes=[3]
            ),
            "segv": s.executable(
                ["sh", "-c", "echo crashing >&2; kill -SEGV $$"], key="segv", retries=0
            ),
            "timeout": s.executable(["sleep", "30"], key="slow", timeout=0.5, retries=0),
            "missing": s.executable(["true"], key="noout", outputs=["x.dat"], retries=0),
            "dep": s.submit(sum, [user, 1]),
        }
        pilotfish.wait(list(tasks.values()), timeout=60)
    return {"rundir": str(rundir), "keys": {k: t.key for k, t in tasks.items()}}


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _too_wide(lines: list[str], allowed: tuple[str, ...] = ()) -> list[str]:
    return [ln for ln in lines if cell_len(ln) > WIDTH and ln.strip() not in allowed]


def test_failures_reason_first(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """Item 3: each line says why first (exit code, signal, time limit, missing output,
    exception), with no sandbox path, within 80 columns."""
    assert cli.main(["--rundir", run["rundir"], "failures"]) == 0
    lines = _lines(capsys.readouterr().out)
    assert not _too_wide(lines), _too_wide(lines)
    by_key = {ln.split()[0]: ln for ln in lines[2:]}
    keys = run["keys"]
    assert "exit 3: line 39" in by_key[keys["exit"]]
    assert "signal SIGSEGV" in by_key[keys["segv"]]
    assert "timed out after 0.5 s" in by_key[keys["timeout"]]
    assert "missing output x.dat" in by_key[keys["missing"]]
    assert "ValueError: seed 7 diverged" in by_key[keys["user"]]
    assert f"input failed: {keys['user']}" in by_key[keys["dep"]]
    assert not any("/" in ln for ln in lines[2:-1])  # no path in the one-line view


def _show(run: dict[str, Any], key: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["--rundir", run["rundir"], "show", run["keys"][key], "--no-pager"]) == 0
    return capsys.readouterr().out


def test_show_paths_once_whole_and_the_tail_once(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 6: a program retried once (exit 3 listed in retry_exit_codes): each path of
    each attempt printed once, whole, on a line of its own (the only lines wider than 80
    columns); each attempt's stderr tail once; the attempts table within 80 columns, its
    outcome whole."""
    out = _show(run, "exit", capsys)
    lines = out.splitlines()
    reader = JournalReader(Path(run["rundir"]) / "journal.db")
    attempts = reader.attempts(run["keys"]["exit"])
    reader.close()
    assert len(attempts) == 2
    paths = []
    for a in attempts:
        f = a["failure"]
        paths += [f["sandbox"], f["stdout_path"], f["stderr_path"]]
    assert len(set(paths)) == 6
    for p in paths:
        assert lines.count(p) == 1, p  # a line of its own, whole
        assert out.count(p) == 1 + sum(q != p and q.startswith(p) for q in paths), p
    assert not _too_wide(lines, tuple(paths)), _too_wide(lines, tuple(paths))
    assert out.count("\nline 39\n") == 2 and out.count("\nline 0\n") == 2  # once per attempt
    assert "last lines of stderr" not in out
    rows = [ln for ln in lines if "command_failed" in ln and "2 " in ln[:12]]
    assert any(ln.split()[:2] == ["1", "1"] for ln in lines if "command_failed" in ln)
    assert rows and all(ln.rstrip().endswith("command_failed") for ln in rows)
    assert "failure of attempt 1 (run 1): command_failed: exit 3: line 39" in out


@pytest.mark.parametrize("which", ["missing", "timeout", "user", "dep", "segv"])
def test_show_each_kind_fits(
    run: dict[str, Any], which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every kind of failure: no line wider than 80 columns but a whole path, and each
    path once."""
    out = _show(run, which, capsys)
    lines = out.splitlines()
    reader = JournalReader(Path(run["rundir"]) / "journal.db")
    row = reader.task(run["keys"][which])
    reader.close()
    assert row is not None
    f = json.loads(row["failure"])
    paths = tuple(str(f[k]) for k in ("sandbox", "stdout_path", "stderr_path") if f.get(k))
    assert not _too_wide(lines, paths), _too_wide(lines, paths)
    for p in paths:
        assert lines.count(p) == 1, p
    assert f"{f['category']}: " in out
