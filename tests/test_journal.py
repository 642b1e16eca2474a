"""The durable journal, resume, and the command line that reads them."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import faulty
import pilotfish
from conftest import fake_session, wait_for
from pilotfish.store.journal import Journal
from pilotfish.store.reader import JournalReader
from pilotfish.store.schema import JournalError
from pilotfish.tools import cli


def counted(marker_dir: str, name: str, value: int, fail: bool | str = False) -> int:
    """Appends one line per execution to marker_dir/name, so tests count runs. Fails
    if ``fail`` is True, or is the path of a file that exists."""
    with open(os.path.join(marker_dir, name), "a") as f:
        f.write("x\n")
    if fail is True or (isinstance(fail, str) and os.path.exists(fail)):
        raise RuntimeError(f"{name} failed on purpose")
    return value


def runs_of(marker_dir: Path, name: str) -> int:
    p = marker_dir / name
    return len(p.read_text().splitlines()) if p.exists() else 0


def stored_value(r: JournalReader, key: str) -> Any:
    """The value of DONE task ``key``, read back as resume reads it."""
    data = r.done_value(key)
    assert data is not None, f"{key} has no stored value"
    return pickle.loads(data)


def mixed_run(rundir: Path, marks: Path, fake: bool = False) -> dict[str, str]:
    """One DONE, one user error, one DONE dependant, one dependency failure, one failed
    program; on the local backend, or (``fake``) on FakeBackend, for tests of the journal
    and its readers, which the client alone writes."""
    open_session = fake_session if fake else pilotfish.Session
    with open_session(workers=2, rundir=str(rundir)) as s:
        a = s.submit(counted, str(marks), "a", 1)
        b = s.submit(counted, str(marks), "b", 2, True)
        c = s.submit(counted, str(marks), "c", a)  # depends on a
        d = s.submit(sum, [b, c])  # depends on a failed task
        e = s.executable(["sh", "-c", "echo oops >&2; exit 4"])
        pilotfish.wait([a, b, c, d, e], timeout=60)
        return {"a": a.key, "b": b.key, "c": c.key, "d": d.key, "e": e.key}


def test_journal_contents_after_mixed_run(tmp_path: Path) -> None:
    """Every task, attempt, transition and failure is in the journal, in full, 0600."""
    rundir, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    keys = mixed_run(rundir, marks)
    path = rundir / "journal.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
    r = JournalReader(path)
    assert r.counts() == {"DONE": 2, "FAILED": 3}
    assert r.failure_counts() == {
        "user_error": 1,
        "dependency_failed": 1,
        "command_failed": 1,
    }
    row = r.task(keys["c"])
    assert row is not None and json.loads(row["deps"]) == [keys["a"]]
    assert json.loads(row["options"])["retries"] == 3
    assert stored_value(r, keys["c"]) == 1
    att = r.attempts(keys["a"])
    assert len(att) == 1 and att[0]["outcome"] == "done" and att[0]["pid"]
    assert att[0]["worker"] and att[0]["started"] and att[0]["ended"] >= att[0]["started"]
    states = [b for _run, _t, _a, b in r.transitions(keys["a"])]
    assert states == ["PENDING", "READY", "RUNNING", "DONE"]
    fails = {f["key"]: f for f in r.failures()}
    assert "failed on purpose" in fails[keys["b"]]["traceback"]
    assert fails[keys["d"]]["root"] == keys["b"] and fails[keys["d"]]["upstream"] == keys["b"]
    e = fails[keys["e"]]
    assert e["returncode"] == 4 and Path(e["stderr_path"]).read_text() == "oops\n"
    assert Path(e["sandbox"]).is_dir()
    runs = r.runs()
    assert len(runs) == 1 and runs[0]["status"] == "failed" and runs[0]["ended"]


def test_resume_reruns_only_what_failed(tmp_path: Path) -> None:
    """A partly failed workflow run again with resume=True reruns the failed task (and
    what depended on it) only; DONE tasks come from the journal with their values.
    (Resume is the client's: FakeBackend; the client killed and resumed on the local
    backend is test_resume_after_client_sigkill.)"""
    rundir, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    flag = tmp_path / "broken"
    flag.write_text("1")

    def workflow(resume: bool) -> list[object]:
        with fake_session(workers=2, rundir=str(rundir), resume=resume) as s:
            a = s.submit(counted, str(marks), "a", 10)
            b = s.submit(counted, str(marks), "b", 20, str(flag))
            c = s.submit(counted, str(marks), "c", a)
            d = s.submit(sum, [b, c])
            out = []
            for t in (a, b, c, d):
                try:
                    out.append(t.result(timeout=60))
                except Exception as e:
                    out.append(type(e).__name__)
            return out

    assert workflow(False) == [10, "RuntimeError", 10, "DependencyFailed"]
    flag.unlink()  # the bug is fixed; same arguments, so same keys
    assert workflow(True) == [10, 20, 10, 30]
    assert runs_of(marks, "a") == 1 and runs_of(marks, "c") == 1
    assert runs_of(marks, "b") == 2
    r = JournalReader(rundir / "journal.db")
    assert r.counts() == {"DONE": 4}
    b_key = [row["key"] for row in r.tasks() if row["key"].startswith("counted")]
    assert len(b_key) == 3
    # the failed attempt of the first run is still on record
    outcomes = [a["outcome"] for k in b_key for a in r.attempts(k)]
    assert outcomes.count("user_error") == 1
    assert len(r.runs()) == 2


def test_changed_argument_makes_a_new_key(tmp_path: Path) -> None:
    """resume reruns a task whose arguments changed (new key), not the old one (keys and
    resume are the client's: FakeBackend)."""
    rundir, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    for value in (1, 1, 2):
        with fake_session(workers=1, rundir=str(rundir), resume=True) as s:
            assert s.submit(counted, str(marks), "x", value).result(timeout=30) == value
    assert runs_of(marks, "x") == 2


def test_resume_after_client_sigkill(tmp_path: Path) -> None:
    """The client is SIGKILLed mid-run: the journal opens cleanly, shows what finished,
    and resume finishes the workflow without running any DONE task again."""
    rundir, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "flow.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path[:0] = {sys.path!r}
        import pilotfish, test_journal, faulty
        with pilotfish.Session(workers=2, rundir={str(rundir)!r}) as s:
            ts = [s.submit(test_journal.counted, {str(marks)!r}, f"t{{i}}", i)
                  for i in range(40)]
            slow = [s.submit(faulty.slow, i, 0.25) for i in range(40)]
            total = s.submit(sum, ts + slow)
            print("total", total.result(), flush=True)
    """)
    )
    env = dict(os.environ)
    with subprocess.Popen(
        [sys.executable, str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
    ) as proc:
        # wait until some tasks are DONE in the journal, then kill the client
        def some_done() -> bool:
            try:
                r = JournalReader(rundir / "journal.db")
                return r.counts().get("DONE", 0) >= 45
            except (JournalError, sqlite3.Error):
                return False

        wait_for(some_done, timeout=60, interval=0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    r = JournalReader(rundir / "journal.db")
    done_before = {row["key"] for row in r.tasks("DONE")}
    assert len(done_before) >= 45
    # issue 25 item 7: the killed run's workers are not shown as "started" for ever
    assert {w["state"] for w in r.workers() if w["run"] == 1} == {"unknown"}
    runs_before = {f"t{i}": runs_of(marks, f"t{i}") for i in range(40)}
    out = subprocess.run(
        [sys.executable, "-m", "pilotfish.tools.cli", "resume", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"total {sum(range(40)) * 2}" in out.stdout
    r2 = JournalReader(rundir / "journal.db")
    assert r2.counts() == {"DONE": 81}
    # the resumed session found run 1 "running" with its client gone: "client died"
    assert [(row["id"], row["status"]) for row in r2.runs()] == [
        (1, "client died"),
        (2, "finished"),
    ]
    status = subprocess.run(
        [sys.executable, "-m", "pilotfish.tools.cli", "--rundir", str(rundir), "status"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert "run 1 (client died)" in status.stdout and "not closed" not in status.stdout
    for row in r2.tasks("DONE"):
        if row["key"] in done_before:
            assert row["run"] == 1, f"{row['key']} was DONE but ran again"
    finished = [stored_value(r, row["key"]) for row in r.tasks("DONE") if row["name"] == "counted"]
    assert finished
    for i in finished:  # a task that was DONE did not run again
        assert runs_of(marks, f"t{i}") == 1, f"t{i} ran again"
    assert runs_before  # recorded before the resume


def test_foreign_and_corrupt_journals_are_refused(tmp_path: Path) -> None:
    """A file that is not a pilotfish journal is refused with a clear error."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(JournalError, match="not a pilotfish journal"):
        Journal(junk)
    with pytest.raises(JournalError, match="not a pilotfish journal"):
        JournalReader(junk)
    other = tmp_path / "other.db"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE invoices (id INTEGER)")
    c.commit()
    c.close()
    with pytest.raises(JournalError, match="invoices"):
        pilotfish.Session(workers=1, rundir=str(tmp_path / "r"), journal=other)


def test_newer_journal_is_refused(tmp_path: Path) -> None:
    """A journal written by a newer pilotfish says so instead of misreading it."""
    path = tmp_path / "journal.db"
    j = Journal(path)
    j.close()
    c = sqlite3.connect(path)
    c.execute("UPDATE meta SET value='999' WHERE name='schema_version'")
    c.commit()
    c.close()
    with pytest.raises(JournalError, match="newer pilotfish"):
        JournalReader(path)


# ------------------------------------------------------------------ command line


def test_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status, failures (--json) and show, called in-process (on a journal FakeBackend's
    run wrote; `pilotfish run` on the local backend is test_cli_as_subprocess)."""
    rundir, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    keys = mixed_run(rundir, marks, fake=True)
    assert cli.main(["--rundir", str(rundir), "status"]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "failed: command_failed" in out
    assert cli.main(["failures", "--json", "--rundir", str(rundir)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {f["key"] for f in data} == {keys["b"], keys["d"], keys["e"]}
    assert all("category" in f and "attempts" in f for f in data)
    assert cli.main(["--rundir", str(rundir), "show", keys["b"], "--no-pager"]) == 0
    out = capsys.readouterr().out
    assert "failed on purpose" in out and "Traceback" in out and "attempts" in out
    assert cli.main(["--rundir", str(rundir), "show", keys["e"], "--no-pager"]) == 0
    assert "oops" in capsys.readouterr().out  # complete stderr shown


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No journal, unknown key: one clear line, exit status 2, no traceback."""
    assert cli.main(["--rundir", str(tmp_path / "nothing"), "status"]) == 2
    err = capsys.readouterr().err
    assert "no journal" in err and "Traceback" not in err
    rundir, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    keys = mixed_run(rundir, marks, fake=True)
    assert cli.main(["--rundir", str(rundir), "show", "nope"]) == 2
    assert "no task with key 'nope'" in capsys.readouterr().err
    assert cli.main(["--rundir", str(rundir), "show", keys["a"][:5], "--no-pager"]) == 2
    assert keys["a"] in capsys.readouterr().err  # suggestions by prefix


def test_cli_as_subprocess(tmp_path: Path) -> None:
    """`pilotfish run` exits non-zero when a task failed; `failures --json` parses."""
    script = tmp_path / "flow.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path[:0] = {sys.path!r}
        import pilotfish, faulty
        with pilotfish.Session(workers=2) as s:
            print(s.submit(faulty.ident, 5).result())
            s.submit(faulty.exit_hard, 3)
    """)
    )
    run = subprocess.run(
        [sys.executable, "-m", "pilotfish.tools.cli", "run", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "5" in run.stdout and "failed" in run.stdout
    fl = subprocess.run(
        [sys.executable, "-m", "pilotfish.tools.cli", "failures", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fl.returncode == 0, fl.stderr
    (f,) = json.loads(fl.stdout)
    assert f["category"] == "worker_lost" and "poison" in f["message"]


@pytest.mark.timeout(120)
def test_demo_runs(tmp_path: Path) -> None:
    """`pilotfish demo` exercises the product end to end and prints both tables."""
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "pilotfish.tools.cli", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - t0 < 60
    text = out.stdout
    for needle in (
        "worker",
        "lost",
        "command_failed",
        "dependency_failed",
        "user_error",
        "failed task(s)",
        "['worker_lost', 'done']",
    ):
        assert needle in text, needle
    assert faulty  # imported for the scripts above


def test_unusable_rundir_or_journal_path(tmp_path: Path) -> None:
    """A run directory or journal that cannot be created is a clear error at once."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(pilotfish.EnvironmentMismatch, match="cannot create the run directory"):
        pilotfish.Session(workers=1, rundir=str(blocker / "run"))
    with pytest.raises(JournalError, match="cannot open the journal"):
        pilotfish.Session(workers=1, rundir=str(tmp_path / "r"), journal=blocker / "j.db")


def read_text(path: str) -> str:
    return Path(path).read_text()


def test_output_references_are_not_counted_as_tasks(tmp_path: Path) -> None:
    """Issue 25 item 4: every ``.output(name)`` was a task in the counts (52 submitted,
    status said 62) and a failed program's reference showed as one more failure. Two
    programs (one fails) and an analysis of each one's output: 4 tasks in the journal's
    counts, 2 failures (the program, and the analysis whose root it is), one reference
    each in the journal as kind "output"; the session's failures agree."""
    rundir = tmp_path / "run"
    with pilotfish.Session(workers=2, rundir=str(rundir)) as s:
        ok = s.executable(["sh", "-c", "echo hi > out.txt"], outputs=["out.txt"])
        bad = s.executable(["sh", "-c", "exit 3"], outputs=["out.txt"], retries=0)
        good = s.submit(read_text, ok.output("out.txt"))
        lost = s.submit(read_text, bad.output("out.txt"))
        assert good.result(timeout=60) == "hi\n"
        with pytest.raises(pilotfish.DependencyFailed):
            lost.result(timeout=60)
        assert {f.key for f in s.failures()} == {bad.key, lost.key}
    r = JournalReader(rundir / "journal.db")
    try:
        assert r.counts() == {"DONE": 2, "FAILED": 2}
        failures = {f["key"]: f for f in r.failures()}
        assert set(failures) == {bad.key, lost.key}
        assert failures[lost.key]["root"] == bad.key
        assert r.failure_counts() == {"command_failed": 1, "dependency_failed": 1}
        kinds = sorted(row["kind"] for row in r.tasks())
        assert kinds == ["call", "call", "command", "command", "output", "output"]
    finally:
        r.close()
