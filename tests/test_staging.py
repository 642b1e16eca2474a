"""Stage on error: a failed program's complete stdout/stderr travel with its failure and
are written under RUNDIR/staged/ when the client cannot read the worker's sandbox (a
node's private disk), so `pilotfish show KEY --full` and the report read them here."""

from __future__ import annotations

import os
import pickle
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from pilotfish.client.staging import STAGE_ENV, stage_failure
from pilotfish.runtime.programs.ship import pack_failure_files
from pilotfish.tools import cli
from pilotfish.wire import messages as _wire

PY = sys.executable
NOISY = (
    "import sys; print('out-start'); "
    "[print(f'err line {i}', file=sys.stderr) for i in range(60)]; sys.exit(3)"
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_failed_program_output_staged_when_sandbox_unreadable(
    make_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The client copies a failed attempt's files (here: always, as if the sandbox were on
    a node's own disk); after the sandboxes are gone, `show --full` prints all 60 lines of
    stderr from the copy, which is private; a successful program stages nothing."""
    monkeypatch.setenv(STAGE_ENV, "always")
    rundir = tmp_path / "run"
    s = make_session(workers=1, rundir=str(rundir))
    bad = s.executable([PY, "-c", NOISY], key="noisy", retries=0)
    good = s.executable(["sh", "-c", "echo fine; echo fine >&2"], key="fine")
    pilotfish.wait([bad, good], timeout=60)
    assert good.result().returncode == 0
    f = bad.failure
    assert f is not None and f.category is pilotfish.Category.COMMAND_FAILED
    s.shutdown(wait=True)

    staged = rundir / "staged"
    assert f.stderr_path and Path(f.stderr_path).parent.parent == staged.resolve()
    # the originals are still named: the sandbox on its host
    assert f.sandbox and "sandboxes" in f.sandbox and f.host
    assert f.staged and f"sandbox {f.sandbox}" in f.staged and f"host {f.host}" in f.staged
    err = Path(f.stderr_path).read_text()
    assert err.splitlines() == [f"err line {i}" for i in range(60)]
    assert Path(f.stdout_path or "").read_text() == "out-start\n"
    # private: staged/ and its attempt directory 0700, the files 0600
    box = Path(f.stderr_path).parent
    assert _mode(staged) == 0o700 and _mode(box) == 0o700
    assert _mode(box / "stderr.txt") == 0o600 and _mode(box / "stdout.txt") == 0o600
    # only the failure shipped anything
    assert [p.name for p in staged.iterdir()] == [box.name]

    # the worker's disk is out of reach: the copy is what is read
    (rundir / "sandboxes").rename(tmp_path / "gone")
    capsys.readouterr()
    assert cli.main(["--rundir", str(rundir), "show", "noisy", "--full", "--no-pager"]) == 0
    out = capsys.readouterr().out
    assert "err line 0\n" in out and "err line 59" in out and "cannot read" not in out
    assert "staged" in out
    # and the HTML report
    assert cli.main(["--rundir", str(rundir), "report", "--html"]) == 0
    html = (rundir / "report.html").read_text()
    assert "err line 59" in html


def _result(tmp_path: Path, files: tuple[_wire.ShippedFile, ...]) -> _wire.Result:
    sandbox = str(tmp_path / "node" / "sandboxes" / "k.abc123")
    extra = {
        "stdout_path": f"{sandbox}/stdout.txt",
        "stderr_path": f"{sandbox}/stderr.txt",
        "sandbox": sandbox,
        "host": "node7",
        "shipped": files,
    }
    env = _wire.Envelope("command_failed", "CommandFailed", "failed", "", None, extra)
    return _wire.Result(5, False, pickle.dumps(env), "w1", 1, 0.0, 1.0, "node7")


def _extra(res: _wire.Result) -> dict[str, Any]:
    env = pickle.loads(res.data)
    assert "shipped" not in env.extra  # the bytes are never kept in the record
    return dict(env.extra)


def test_auto_copies_only_what_is_not_readable_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default a file readable here as shipped is not copied (local disk, shared
    filesystem); one that is not (a node's own disk) is."""
    monkeypatch.delenv(STAGE_ENV, raising=False)
    here = tmp_path / "here.txt"
    here.write_bytes(b"same\n")
    rundir = tmp_path / "run"
    rundir.mkdir()
    readable = _wire.ShippedFile("stdout", "stdout.txt", str(here), 5, b"same\n")
    res = _result(tmp_path, (readable,))
    extra = _extra(stage_failure(res, rundir))
    assert extra["stdout_path"].endswith("k.abc123/stdout.txt") and "staged" not in extra
    assert not (rundir / "staged").exists()

    away = _wire.ShippedFile("stderr", "stderr.txt", "/nonexistent/x/stderr.txt", 4, b"bad\n")
    extra = _extra(stage_failure(_result(tmp_path, (readable, away)), rundir))
    assert extra["stderr_path"] == str(rundir / "staged" / "k.abc123" / "stderr.txt")
    assert Path(extra["stderr_path"]).read_bytes() == b"bad\n"
    assert extra["stdout_path"].startswith(str(tmp_path / "node"))  # readable: left alone
    assert "host node7 (not readable here)" in extra["staged"]


def test_cut_file_is_marked_and_write_failure_keeps_the_node_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream longer than the limit ships its first and last halves and the copy says
    how much was cut; a run directory where nothing can be staged loses nothing: the
    record keeps the worker's paths and says why there is no copy."""
    monkeypatch.setenv(STAGE_ENV, "always")
    big = tmp_path / "stderr.txt"
    big.write_bytes(b"A" * 1000 + b"B" * 5000 + b"C" * 1000)
    (f,) = pack_failure_files(None, str(big), limit=2000)
    assert (f.size, f.head, f.tail) == (7000, b"A" * 1000, b"C" * 1000)
    rundir = tmp_path / "run"
    rundir.mkdir()
    extra = _extra(stage_failure(_result(tmp_path, (f,)), rundir))
    copy = Path(extra["stderr_path"]).read_bytes()
    assert copy.startswith(b"A" * 1000) and copy.endswith(b"C" * 1000)
    assert b"[pilotfish: 5,000 bytes cut here" in copy
    assert "5,000 cut" in extra["staged"]

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "staged").write_text("not a directory")
    extra = _extra(stage_failure(_result(tmp_path, (f,)), blocked))
    assert extra["stderr_path"].startswith(str(tmp_path / "node"))
    assert extra["staged"].startswith("not copied") and "host node7" in extra["staged"]


def test_shipping_is_bounded_and_says_what_it_could_not_read(tmp_path: Path) -> None:
    """A few MB per stream at most; a stream the worker cannot read ships a note."""
    from pilotfish.runtime.programs.ship import SHIP_LIMIT

    assert SHIP_LIMIT <= 8 * 1024 * 1024  # bounded: a few MB per stream
    missing = pack_failure_files(str(tmp_path / "none.txt"), None)
    assert missing[0].note.startswith("not read") and not missing[0].head
    assert os.path.basename(missing[0].path) == "none.txt"
