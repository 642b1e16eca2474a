"""Resume continues what the client's death interrupted (issue 22 item 3).

A user's script runs a program with ``resume_files=["ckpt"]`` and a Python task that
checkpoints in ``pilotfish.scratch_dir()``; the script is SIGKILLed (the login node's
session dies, an OOM kill) after both wrote their checkpoint. Re-running the script with
``resume=True`` (what ``pilotfish resume SCRIPT`` does) used to start both fresh, with no
note saying why: a new session could not name an earlier session's attempt. Now the
journal records every attempt when it starts, and the resumed run's first attempt of
each task continues from the interrupted attempt's files; its note says from which
attempt of which run, and names that sandbox, which is left in place.

The client is a real process (as in ``test_fault_matrix.test_client_sigkilled``); the
test waits on files the tasks write and on the journal, never on a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import FAKE_NO_CLIENT, TOKEN_VAR, skip_on, wait_for, with_env
from pilotfish.tools import cli

_CLIENT = """
import os, sys, time
sys.path[:0] = {path!r}
import pilotfish

backend, rundir, tmp, run, address = sys.argv[1:6]

SCRIPT = '''
if [ "$1" = resume ]; then echo "resume from $(cat ckpt)" > result.txt; exit 0; fi
if [ "$RUN" != 1 ]; then echo fresh > result.txt; exit 0; fi
echo 5 > ckpt.tmp && mv ckpt.tmp ckpt
touch "$TMP/ready.prog"
while [ ! -e "$TMP/release" ]; do sleep 0.05; done
'''


def member(tmp, run):
    prev = pilotfish.previous_attempt_files()
    if prev is not None and (prev / "state").exists():
        return "resumed from " + (prev / "state").read_text()
    if run != "1":
        return "fresh"
    here = pilotfish.scratch_dir()
    (here / "state.tmp").write_text("5")
    os.replace(here / "state.tmp", here / "state")
    open(os.path.join(tmp, "ready.py"), "w").close()
    while not os.path.exists(os.path.join(tmp, "release")):  # bounded: the test releases it
        time.sleep(0.05)
    # on Dask an orphaned attempt's thread runs on: it must not succeed (a success removes
    # its scratch directory, and its value has nobody to go to)
    raise RuntimeError("released by the test")


kw = dict(address=address) if backend == "dask" else dict(workers=2)
with pilotfish.Session(backend=backend, rundir=rundir, resume=True, **kw) as s:
    prog = s.executable(
        ["sh", "-c", SCRIPT, "sh", "fresh"],
        resume_argv=["sh", "-c", SCRIPT, "sh", "resume"],
        resume_files=["ckpt"],
        outputs=["result.txt"],
        env={{"TMP": tmp, "RUN": run}},
        key="member-prog",
    )
    py = s.submit(pilotfish.task(member, key="member-py"), tmp, run)
    text = prog.result(timeout=60).outputs["result.txt"].read_text().strip()
    print(text + " | " + py.result(timeout=60), flush=True)
"""


def _started(journal: Path) -> set[str]:
    """Keys whose attempts the journal has recorded as started (read-only)."""
    if not journal.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as c:
        try:
            return {r[0] for r in c.execute("SELECT key FROM started")}
        except sqlite3.OperationalError:  # not created yet
            return set()


def _show(rundir: Path, key: str, capsys: pytest.CaptureFixture[str]) -> str:
    """``pilotfish show KEY``, on a line wide enough for a note with a path."""
    capsys.readouterr()
    assert cli.main(["--rundir", str(rundir), "show", key]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("found", ["journal", "search"])
def test_resume_continues_an_attempt_the_client_death_interrupted(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    found: str,
) -> None:
    """The client is SIGKILLed while a program (resume_files=["ckpt"]) and a Python task
    (scratch_dir()) run, each after writing its checkpoint; the same script run again with
    resume=True continues both from their checkpoints: the program with resume_argv, the
    Python task through previous_attempt_files(). Each attempt's note says which attempt
    of which run it continued and names the sandbox, left in place. ``search``: the
    journal lost the starts (the client died within the writer's 0.5 s flush interval;
    simulated by deleting them): the key's newest sandbox is found, and the note says so."""
    if backend == "radical":
        pytest.skip("the RADICAL-Pilot client-kill matrix is tests/test_fault_matrix.py's")
    skip_on(backend, "fake", reason=FAKE_NO_CLIENT)
    address = request.getfixturevalue("dask_cluster").scheduler_address if backend == "dask" else ""
    rundir = tmp_path / "run"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(_CLIENT.format(path=[str(Path(__file__).parent), *sys.path])))
    token = os.environ[TOKEN_VAR]

    def client(run: str) -> list[str]:
        return [sys.executable, str(script), backend, str(rundir), str(tmp_path), run, address]

    proc = subprocess.Popen(client("1"), cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(
            lambda: (tmp_path / "ready.prog").exists() and (tmp_path / "ready.py").exists(), 60
        )
        wait_for(lambda: _started(rundir / "journal.db") >= {"member-prog", "member-py"}, 30)
    finally:
        proc.kill()  # SIGKILL: no shutdown, no final journal flush
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        (tmp_path / "release").touch()  # a task still running (Dask's thread) returns
    wait_for(lambda: not with_env(TOKEN_VAR, token), 30, 0.1)
    if found == "search":
        with contextlib.closing(sqlite3.connect(rundir / "journal.db")) as c:
            c.execute("DELETE FROM started")
            c.commit()
    sandboxes = sorted((rundir / "sandboxes").iterdir())

    monkeypatch.setenv("COLUMNS", "1000")
    out = subprocess.run(client("2"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "resume from 5 | resumed from 5"

    for key, what in (
        ("member-prog", ": ckpt, 2 B; its sandbox, left in place: "),
        ("member-py", ": "),
    ):
        shown = _show(rundir, key, capsys)
        if found == "journal":
            origin = "attempt 1 of run 1 (interrupted when the client died)"
        else:
            origin = (
                "an attempt of an earlier run (interrupted when the client died; its start "
                f"was not journaled: its sandbox was found by searching {rundir / 'sandboxes'})"
            )
        head = "resumed from " if key == "member-prog" else "previous_attempt_files() is "
        assert f"attempt 1 (run 2): {head}{origin}{what}" in shown, shown
    # the interrupted attempts' sandboxes are the user's data: still there, as they were
    for box in sandboxes:
        assert box.is_dir()
    assert any((box / "ckpt").read_text() == "5\n" for box in sandboxes if (box / "ckpt").exists())
    assert any((box / "state").exists() for box in sandboxes)


def test_an_attempt_that_ended_is_not_continued(tmp_path: Path) -> None:
    """The last journaled attempt of a task ended (its run was stopped after it failed,
    before its retry started): resume does not take it for an interrupted one; the
    task's newest sandbox belongs to that journaled attempt, so the search does not
    either (a fresh start, no note)."""
    import pilotfish

    rundir = tmp_path / "run"
    with pilotfish.Session(workers=1, rundir=str(rundir)) as s:
        t = s.executable(["sh", "-c", "echo 5 > ckpt; exit 1"], resume_files=["ckpt"], key="member")
        with pytest.raises(pilotfish.CommandFailed):
            t.result(timeout=30)
    with pilotfish.Session(workers=1, rundir=str(rundir), resume=True) as s:
        t = s.executable(["sh", "-c", "exit 0"], resume_files=["ckpt"], key="member")
        t.result(timeout=30)
    assert t.attempts[0].note is None


_WAITING_CLIENT = """
import sys
sys.path[:0] = {path!r}
import pilotfish

rundir, run = sys.argv[1:3]
SCRIPT = '''
if [ "$1" = resume ]; then echo "resume from $(cat ckpt)" > result.txt; exit 0; fi
if [ "$RUN" != 1 ]; then echo fresh > result.txt; exit 0; fi
echo 7 > ckpt.tmp && mv ckpt.tmp ckpt
exec sleep 60
'''
# run 1: the attempt times out after writing its checkpoint, and its retry waits out a
# long backoff, during which the client is killed
backoff = pilotfish.Backoff(base=120.0, maximum=120.0, jitter=0.0)
with pilotfish.Session(workers=1, rundir=rundir, resume=True, backoff=backoff) as s:
    prog = s.executable(
        ["sh", "-c", SCRIPT, "sh", "fresh"],
        resume_argv=["sh", "-c", SCRIPT, "sh", "resume"],
        resume_files=["ckpt"],
        outputs=["result.txt"],
        env={{"RUN": run}},
        key="member-waiting",
        timeout=1.0,
        retries=2,
    )
    print(prog.result(timeout=60).outputs["result.txt"].read_text().strip(), flush=True)
"""


def _state(journal: Path, key: str) -> str | None:
    if not journal.exists():
        return None
    with (
        contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as c,
        contextlib.suppress(sqlite3.OperationalError),
    ):
        row = c.execute("SELECT state FROM tasks WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])
    return None


def test_resume_continues_an_attempt_whose_retry_the_client_death_prevented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A program (resume_files=["ckpt"]) timed out after writing its checkpoint; its retry
    would have continued from it, but the client was killed during the retry's backoff.
    The resumed run started that task fresh: the attempt had *ended* (timeout), so it was
    not taken for an interrupted one. An attempt that ended lost or timed out, whose task
    was waiting for its retry, is continued by the resumed run's first attempt, and the
    note says why."""
    rundir = tmp_path / "run"
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(_WAITING_CLIENT.format(path=[str(Path(__file__).parent), *sys.path]))
    )
    journal = rundir / "journal.db"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(rundir), "1"], cwd=tmp_path, stdout=subprocess.PIPE
    )
    try:
        wait_for(lambda: _state(journal, "member-waiting") == "RETRYING", 60, 0.05)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    out = subprocess.run(
        [sys.executable, str(script), str(rundir), "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "resume from 7"
    shown = " ".join(_show(rundir, "member-waiting", capsys).split())
    assert "ended timeout and its retry had not started when the client died" in shown, shown
