"""The command line at 80 columns (issue 25): `failures` puts the reason first, `show`
prints each path once and whole, the stderr tail once, an attempts table that fits.
The CLI runs in-process on a journal a real Session wrote (on FakeBackend, programs
run for real), at COLUMNS=80."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from rich.cells import cell_len

import pilotfish
from conftest import fake_session
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
            "exit": s.executable([sys.executable, "-c", noisy], key="exit3", retries=0),
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
