"""Issue 22, item 1: one run at a time per run directory.

A second ``Session(resume=True)`` (or ``pilotfish resume``) on the run directory of a
run still going ran all of its tasks a second time, silently: nothing stopped two
sessions from sharing one journal. Each test names the real-world case it reproduces."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import pilotfish
from conftest import wait_for
from pilotfish.backends.fake import FakeBackend
from pilotfish.store.reader import JournalReader
from pilotfish.store.rundir import LOCK_NAME, RundirBusy
from pilotfish.tools import cli

TESTS = Path(__file__).parent

HOLDER = """
import sys
sys.path[:0] = {path!r}
import pilotfish
with pilotfish.Session(workers=1, rundir={rundir!r}) as s:
    assert s.submit(abs, -4).result(timeout=60) == 4
    print("ready", flush=True)
    sys.stdin.readline()  # held until the test says so (or SIGKILLs it)
"""


def fake(rundir: Path, **kw: object) -> pilotfish.Session:
    return pilotfish.Session(backend=FakeBackend(1), rundir=str(rundir), **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def holder(tmp_path: Path, rundir: Path) -> Iterator[subprocess.Popen[str]]:
    """A real session (local backend: master and worker processes) in another process,
    holding ``rundir`` until the block ends; killed and reaped whatever happens."""
    script = tmp_path / "holder.py"
    script.write_text(
        textwrap.dedent(HOLDER.format(path=[str(TESTS), *sys.path], rundir=str(rundir)))
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 50)
        assert ready and proc.stdout.readline().strip() == "ready", "the holder did not start"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def test_second_session_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second session (and `pilotfish resume`) on the run directory of a run still going
    is refused by Session(...) itself, naming host, pid and start of the holder; the
    journal is readable meanwhile; after the holder is SIGKILLed (its master and workers
    may still be alive for a moment) a new session proceeds at once."""
    rundir = tmp_path / "run"
    with holder(tmp_path, rundir) as proc:
        for resume in (False, True):
            with pytest.raises(RundirBusy) as info:
                fake(rundir, resume=resume)
            msg = str(info.value)
            assert f"pid {proc.pid}" in msg and socket.gethostname() in msg, msg
            assert "since 20" in msg and str(rundir) in msg and "--rundir" in msg
            assert isinstance(info.value, pilotfish.PilotfishError)
        with pytest.raises(RundirBusy):  # journal=None: the run directory is still its
            fake(rundir, journal=None)
        # readers work while the run holds it
        capsys.readouterr()
        assert cli.main(["--rundir", str(rundir), "status"]) == 0
        assert "run 1 (running)" in capsys.readouterr().out
        assert cli.main(["--rundir", str(rundir), "failures"]) == 0
        # readable while written: the holder's one task, in whatever state it has reached
        counts = JournalReader(rundir / "journal.db").counts()
        assert sum(counts.values()) <= 1 and set(counts) <= {"PENDING", "RUNNING", "DONE"}
        # `pilotfish resume` gets the same refusal, as one line, exit status 2
        script = tmp_path / "wf.py"
        script.write_text(
            "import pilotfish\n"
            f"with pilotfish.Session(workers=1, rundir={str(rundir)!r}) as s:\n"
            "    print(s.submit(abs, -1).result())\n"
        )
        out = subprocess.run(
            [sys.executable, "-m", "pilotfish.tools.cli", "resume", str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=50,
            env=dict(os.environ, COLUMNS="400"),
        )
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        err = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and f"pid {proc.pid}" in err[0], out.stderr
        proc.kill()  # SIGKILL: the kernel releases the lock with the process
        proc.wait()
    with fake(rundir, resume=True) as s:
        assert s.submit(abs, -4).result(timeout=30) == 4
    runs = JournalReader(rundir / "journal.db").runs()
    # the killed holder's run was left "running"; the next session found its client gone
    assert [r["status"] for r in runs] == ["client died", "finished"]


def test_sessions_of_one_process_exclude_each_other_until_shutdown(tmp_path: Path) -> None:
    """Two Session objects in one script on the same rundir (a notebook cell run twice
    while the first session is still open) wrote one journal and one results/ tree."""
    rundir = tmp_path / "run"
    first = fake(rundir)
    try:
        with pytest.raises(RundirBusy, match="a session of this very process"):
            fake(rundir)
        assert first.submit(abs, -2).result(timeout=30) == 2
    finally:
        first.shutdown()
    with fake(rundir) as s:  # released at shutdown
        assert s.submit(abs, -3).result(timeout=30) == 3
    info = json.loads((rundir / LOCK_NAME).read_text() or "null")
    assert info is None  # the holder's name goes with the lock


def test_a_journal_outside_the_run_directory_is_locked_too(tmp_path: Path) -> None:
    """Two sessions with different run directories but one journal= path wrote one
    journal at once."""
    journal = tmp_path / "shared" / "journal.db"
    journal.parent.mkdir()
    with fake(tmp_path / "a", journal=journal), pytest.raises(RundirBusy, match="the journal"):
        fake(tmp_path / "b", journal=journal)


def test_a_stale_lock_file_never_blocks(tmp_path: Path) -> None:
    """The holder's lock file is left behind with its name in it when the holder dies
    (SIGKILL, a node crash): only a live lock counts, never the file."""
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    (rundir / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "gone", "since": 0}))
    with fake(rundir) as s:
        assert s.submit(abs, -1).result(timeout=30) == 1


def _opened(pid: int, path: Path) -> bool | None:
    """Whether process ``pid`` has ``path`` open (None: cannot tell)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


def test_children_do_not_keep_the_lock(tmp_path: Path) -> None:
    """The client was SIGKILLed but a process it had started (a program run with exec, a
    child forked without exec) lived on and kept the run directory locked, so the next
    session was refused: the lock file is close-on-exec and a forked child drops it."""
    rundir = tmp_path / "run"
    s = fake(rundir)
    exec_child = subprocess.Popen(  # close_fds=False: inherits every inheritable fd
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        close_fds=False,
    )
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
        pid = os.fork()
    if pid == 0:  # the child only waits for the pipe to close, then exits
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        lock = (rundir / "session.lock").resolve()
        for child in (exec_child.pid, pid):  # neither holds the lock file open
            wait_for(lambda c=child: _opened(c, lock) is False, 10)  # type: ignore[misc]
        s.shutdown()
        with fake(rundir) as s2:  # both children are still alive
            assert s2.submit(abs, -5).result(timeout=30) == 5
        assert exec_child.poll() is None and os.waitpid(pid, os.WNOHANG) == (0, 0)
    finally:
        os.close(w)
        os.waitpid(pid, 0)
        assert exec_child.stdin is not None
        exec_child.stdin.close()
        exec_child.wait()


def test_lock_is_released_when_the_session_fails_to_start(tmp_path: Path) -> None:
    """A Session whose backend could not start (a bad backend option) left the run
    directory locked for the rest of the process."""
    rundir = tmp_path / "run"
    with pytest.raises(TypeError):
        pilotfish.Session(workers=1, rundir=str(rundir), no_such_option=1)  # type: ignore[call-arg]
    with fake(rundir) as s:
        assert s.submit(abs, -1).result(timeout=30) == 1
