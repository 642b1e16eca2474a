"""Nothing a task starts outlives its attempt, and nothing a task does breaks its worker
(issue 22 items 10, 11, 12, 15): the rules themselves, on one process, without a
backend (the fault matrix runs them on every backend's workers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pilotfish
from pilotfish.runtime import programs as commands
from pilotfish.runtime.files import NotRegularFile, open_regular

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (own signal handlers, own subreaper flag)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=tmp_path,
    )


def test_repeated_parent_death_signals_never_interrupt_the_masters_cleanup(
    tmp_path: Path,
) -> None:
    """The kernel sends the parent-death signal once per thread of the dying client (the
    master is re-parented to each remaining thread in turn), so a SIGKILLed client gives
    its master several SIGTERMs. Issue 22 item 15: the second one interrupted the
    master's clean-up before it had killed the programs running in their own sessions
    (or, once the interpreter was finalizing, killed the master outright), and a program
    outlived everything in 1 run of 6 of test_client_sigkilled[local]. The first SIGTERM
    starts the clean-up; the rest are ignored."""
    r = _python(
        """
        import os, signal
        from pilotfish.backends.local import master
        signal.signal(signal.SIGTERM, master._client_gone)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
        except SystemExit as e:
            code = e.code
        for _ in range(3):  # the clean-up runs while the other threads of the client exit
            os.kill(os.getpid(), signal.SIGTERM)
        print("cleanup finished", code)
        """,
        tmp_path,
    )
    assert r.stdout.split() == ["cleanup", "finished", "143"], (r.stdout, r.stderr)


def test_containment_ends_what_an_attempt_started_and_spares_the_rest(tmp_path: Path) -> None:
    """What an attempt starts, however it detaches (a plain child it never waited for, a
    new session, a double fork whose parent exits), is killed and reaped when the
    attempt ends (issue 22 item 10); a process the worker had before the attempt (say
    multiprocessing's resource tracker) is left alone."""
    r = _python(
        """
        import os, subprocess, time
        from pilotfish.runtime import procs as _procs
        keep = subprocess.Popen(["sleep", "1000"])  # the worker's own, from before
        c = _procs.Containment()
        assert c.subreaper
        token = c.begin()
        plain = subprocess.Popen(["sleep", "1000"])
        session = subprocess.Popen(["sleep", "1000"], start_new_session=True)
        subprocess.run(["sh", "-c", "(setsid sleep 1000 &) ; echo"], stdout=subprocess.DEVNULL)
        orphans = _procs.children(os.getpid()) - {keep.pid, plain.pid, session.pid}
        assert len(orphans) == 1, orphans  # the double-forked one, re-parented to us
        started = c.started(token)
        assert set(started) == {plain.pid, session.pid, *orphans}, started
        assert c.end(token) == []
        gone = [p for p in (plain.pid, session.pid, *orphans) if _procs._stat(p) is not None]
        print("left", gone, "kept", keep.poll() is None)
        keep.kill(); keep.wait()
        """,
        tmp_path,
    )
    assert r.stdout.split() == ["left", "[]", "kept", "True"], (r.stdout, r.stderr)


def test_each_attempt_starts_with_the_workers_stdio_cwd_and_environment(tmp_path: Path) -> None:
    """A task closes or replaces what its worker process shares with later attempts:
    file descriptors 0-2 and ``sys.stdout`` (issue 22 item 11: the next task failed with
    ``OSError: Bad file descriptor`` when it printed), the working directory, the
    environment. The next attempt on that worker sees them as they were."""
    with pilotfish.Session(workers=1, rundir=str(tmp_path / "run")) as s:
        before = s.submit(_state).result()
        assert s.submit(_spoil, str(tmp_path)).result() == "spoiled"
        after = s.submit(_state).result()
    assert after == before
    assert after[0] != str(tmp_path) and after[1] is None


def _state() -> tuple[str, str | None, bool]:
    print("printing works")
    return os.getcwd(), os.environ.get("PILOTFISH_TEST_SPOILED"), sys.stdout.closed


def _spoil(where: str) -> str:
    os.chdir(where)
    os.environ["PILOTFISH_TEST_SPOILED"] = "1"
    sys.stdout.close()
    for fd in (0, 1, 2):
        os.close(fd)
    return "spoiled"


def test_sandbox_streams_are_read_only_when_regular_files(tmp_path: Path) -> None:
    """A program replaced its ``stderr.txt`` with a FIFO (issue 22 item 12): opening it to
    quote its tail blocked the worker for ever. Every reader of a sandbox stream reads
    regular files only and never blocks, and the failure message says why it quoted
    nothing."""
    fifo = tmp_path / "stderr.txt"
    os.mkfifo(fifo)
    assert commands.tail_lines(fifo) == ""
    text = commands.excerpt(fifo)
    assert "not a regular file" in text and "FIFO" in text, text
    with pytest.raises(NotRegularFile):
        open_regular(fifo)
    regular = tmp_path / "out.txt"
    regular.write_bytes(b"one\ntwo\n")
    assert commands.excerpt(regular, "stdout") == "last lines of stdout:\none\ntwo"


def test_a_pid_is_killed_only_while_it_is_the_process_remembered() -> None:
    """Pids are recycled: between the moment containment lists an attempt's processes and
    the moment it kills them, one may have exited and its pid gone to an unrelated
    process (the user's shell). A pid is killed only while its start time is the one
    read with it."""
    from pilotfish.runtime import procs as _procs

    p = subprocess.Popen(["sleep", "1000"])
    try:
        start = _procs.descendants([p.pid])[p.pid]
        assert _procs.kill_and_reap({p.pid: start + 1}, settle=0.0) == []
        assert p.poll() is None, "a process with another start time was killed"
        assert _procs.kill_and_reap({p.pid: start}) == []
        assert _procs._stat(p.pid) is None, "killed and reaped: the pid is free again"
    finally:
        p.kill()
        p.wait()


def _wait_for_file(path: str) -> int:
    import time as _time

    deadline = _time.monotonic() + 30
    while not os.path.exists(path) and _time.monotonic() < deadline:
        _time.sleep(0.01)
    return 7


def test_attempts_in_the_clients_own_process_leave_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``FakeBackend`` (and a Dask worker inside the client's process) run attempts in the
    user's own process. Putting back "the worker's" ``sys.stdout``, working directory and
    environment there undid the user's own changes (pytest's capsys lost the output of a
    CLI call made after a session ran), and ending "every process that was not there
    when idle" could kill a process the user started while an attempt ran. In the
    client's process an attempt owns only what its own thread started."""
    from pilotfish.backends.fake import FakeBackend

    go = tmp_path / "go"
    with pilotfish.Session(backend=FakeBackend(1, rundir=str(tmp_path)), rundir=tmp_path) as s:
        assert s.submit(abs, -1).result() == 1  # the process has seen an attempt
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("PILOTFISH_USERS_OWN", "1")
        t = s.submit(_wait_for_file, str(go))
        user = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            go.touch()
            assert t.result(timeout=30) == 7
            assert s.submit(abs, -2).result() == 2
            print("the user's own line")
            assert user.poll() is None, "the user's process was killed by containment"
            assert os.getcwd() == str(tmp_path)
            assert os.environ.get("PILOTFISH_USERS_OWN") == "1"
            assert "the user's own line" in capsys.readouterr().out
        finally:
            user.kill()
            user.wait()
