"""Command-line programs as tasks: sandboxes, complete output, exit codes and signals,
declared outputs, timeouts that kill the whole tree, stage on error."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import pilotfish
from conftest import FAKE_NO_WORKER, environment_attempts, skip_on, wait_for
from pilotfish import Category, State

PY = sys.executable


def test_program_success_result(session: pilotfish.Session, tmp_path: Path) -> None:
    """A program's value is a CommandResult with complete stdout/stderr and its outputs."""
    t = session.executable(
        ["sh", "-c", "echo out; echo err >&2; echo $GREETING > result.txt"],
        outputs=["result.txt"],
        env={"GREETING": "hi"},
    )
    r = t.result(timeout=30)
    assert isinstance(r, pilotfish.CommandResult) and r.returncode == 0
    assert r.stdout.read_text() == "out\n" and r.stderr.read_text() == "err\n"
    assert r.outputs["result.txt"].read_text() == "hi\n"
    # default keep_sandboxes="failed": results moved out, sandbox removed
    assert r.sandbox is None and "results" in r.stdout.parts


def test_keep_all_sandboxes(make_session: Any, tmp_path: Path) -> None:
    """keep_sandboxes='all' keeps successful sandboxes too (private to the user)."""
    with make_session(workers=1, keep_sandboxes="all") as s:
        r = s.executable(["sh", "-c", "echo x > o"], outputs=["o"]).result(timeout=30)
        assert r.sandbox is not None and r.sandbox.is_dir()
        assert r.outputs["o"].parent == r.sandbox
        assert stat.S_IMODE(r.sandbox.stat().st_mode) == 0o700


def test_exit_3_with_5mb_stderr(session: pilotfish.Session) -> None:
    """A program writes 5 MB of diagnostics then exits 3: all of it is kept byte for byte,
    the message holds the last line, the sandbox is kept and named."""
    script = (
        "import sys, hashlib\n"
        "data = b''.join(b'diagnostic line %07d ' % i + b'x' * 40 + b'\\n' "
        "for i in range(80000))\n"
        "data += b'FINAL: solver diverged at step 9\\n'\n"
        "sys.stderr.buffer.write(data); sys.stderr.flush()\n"
        "print(hashlib.sha256(data).hexdigest(), len(data))\n"
        "sys.exit(3)\n"
    )
    t = session.executable([PY, "-c", script], retries=2)
    with pytest.raises(pilotfish.CommandFailed) as info:
        t.result(timeout=60)
    e = info.value
    assert e.returncode == 3 and "FINAL: solver diverged at step 9" in str(e)
    assert e.stderr_path and e.stdout_path and e.sandbox
    digest, size = Path(e.stdout_path).read_text().split()
    data = Path(e.stderr_path).read_bytes()
    assert len(data) == int(size) > 5_000_000
    assert hashlib.sha256(data).hexdigest() == digest
    f = t.failure
    assert f is not None and f.category is Category.COMMAND_FAILED and not f.transient
    assert f.sandbox == e.sandbox and Path(f.sandbox).is_dir()
    assert len(t.attempts) == 1  # permanent: not retried although retries=2


def test_signal_is_named(session: pilotfish.Session) -> None:
    """`kill -SEGV $$`: death by signal names the signal."""
    t = session.executable(["sh", "-c", "echo crashing >&2; kill -SEGV $$"])
    with pytest.raises(pilotfish.CommandFailed, match="SIGSEGV") as info:
        t.result(timeout=30)
    assert info.value.failure is not None and info.value.failure.signal == "SIGSEGV"
    assert info.value.returncode == -11


def test_missing_declared_output(session: pilotfish.Session) -> None:
    """Exit 0 without a declared output is MissingOutput naming the file and sandbox."""
    t = session.executable(["sh", "-c", "echo done > other.gro"], outputs=["confout.gro"])
    with pytest.raises(pilotfish.MissingOutput, match=r"confout\.gro") as info:
        t.result(timeout=30)
    assert info.value.sandbox and info.value.sandbox in str(info.value)
    assert t.failure is not None and t.failure.category is Category.MISSING_OUTPUT
    assert Path(info.value.sandbox, "other.gro").exists()  # stage on error


def test_missing_program_is_environment(session: pilotfish.Session, backend: str) -> None:
    """A program not on the worker's PATH is ENVIRONMENT, naming host, program, PATH."""
    t = session.executable(["gmx_not_installed", "mdrun"])
    with pytest.raises(pilotfish.EnvironmentMismatch) as info:
        t.result(timeout=30)
    msg = str(info.value)
    assert "gmx_not_installed" in msg and "PATH" in msg and os.uname().nodename in msg
    assert t.failure is not None and t.failure.category is Category.ENVIRONMENT
    environment_attempts(t, backend)


def test_bad_cwd_is_environment(session: pilotfish.Session) -> None:
    """A working directory that does not exist on the worker is ENVIRONMENT."""
    t = session.executable(["true"], cwd="/nonexistent/dir/for/test")
    with pytest.raises(pilotfish.EnvironmentMismatch, match="/nonexistent/dir"):
        t.result(timeout=30)


def test_timeout_kills_the_whole_tree(session: pilotfish.Session) -> None:
    """timeout= kills the program's process group, grandchildren included; the sandbox is
    kept; TaskTimeout says so."""
    marker = str(random.randint(10**8, 10**9 - 1))  # sleep 1000.<marker> is a valid time
    t = session.executable(
        ["sh", "-c", f"sleep 1000.{marker} & echo started; sleep 1001.{marker}"],
        timeout=1.0,
        retries=0,
    )
    t0 = time.monotonic()
    with pytest.raises(pilotfish.TaskTimeout) as info:
        t.result(timeout=30)
    assert time.monotonic() - t0 < 10
    assert info.value.failure is not None and info.value.failure.sandbox
    assert Path(info.value.failure.sandbox).is_dir()

    def leftovers() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline", "status"]):
            if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(
                p.info["cmdline"] or []
            ):
                out.append(p)
        return out

    wait_for(lambda: not leftovers(), timeout=5)


def test_non_utf8_stderr(session: pilotfish.Session) -> None:
    """Binary garbage on stderr is kept as bytes and shown with replacement characters."""
    t = session.executable(
        [
            PY,
            "-c",
            "import sys; sys.stderr.buffer.write(b'bad \\xff\\xfe bytes \\x80\\n'); sys.exit(1)",
        ]
    )
    with pytest.raises(pilotfish.CommandFailed) as info:
        t.result(timeout=30)
    assert "bad" in str(info.value) and "\ufffd" in str(info.value)
    assert info.value.stderr_path
    assert Path(info.value.stderr_path).read_bytes() == b"bad \xff\xfe bytes \x80\n"


def test_retry_exit_codes(session: pilotfish.Session, tmp_path: Path) -> None:
    """Exit code 75 (EX_TEMPFAIL) listed in retry_exit_codes is retried, then succeeds;
    the failed attempt's sandbox is kept and recorded."""
    counter = tmp_path / "count"
    script = (
        f"c={counter}; n=$(cat $c 2>/dev/null || echo 0); echo $((n+1)) > $c; "
        'if [ "$n" -lt 2 ]; then echo "license server busy" >&2; exit 75; fi; echo ok'
    )
    t = session.executable(["sh", "-c", script], retries=3, retry_exit_codes=[75])
    r = t.result(timeout=30)
    assert r.stdout.read_text() == "ok\n"
    assert [a.outcome for a in t.attempts] == ["command_failed", "command_failed", "done"]
    first = t.attempts[0].failure
    assert first is not None and first.returncode == 75 and first.sandbox
    assert "license server busy" in Path(first.sandbox, "stderr.txt").read_text()


def test_three_program_chain(session: pilotfish.Session, tmp_path: Path) -> None:
    """prep -> simulate -> analyse passing files through Task.output()."""
    src = tmp_path / "params.txt"
    src.write_text("temperature 300\n")
    prep = session.executable(
        ["sh", "-c", "cat params.txt > topol.tpr; echo prepared >> topol.tpr"],
        inputs={"params.txt": src},
        outputs=["topol.tpr"],
    )
    md = session.executable(
        ["sh", "-c", "tr a-z A-Z < topol.tpr > confout.gro"],
        inputs={"topol.tpr": prep.output("topol.tpr")},
        outputs=["confout.gro"],
    )
    ana = session.executable(["wc", "-l", md.output("confout.gro")])
    r = ana.result(timeout=30)
    assert r.stdout.read_text().split()[0] == "2"
    assert md.result().outputs["confout.gro"].read_text() == "TEMPERATURE 300\nPREPARED\n"


def test_chain_failing_in_the_middle(session: pilotfish.Session) -> None:
    """The middle program fails: downstream gets DependencyFailed naming the root, and the
    failed sandbox is kept."""
    prep = session.executable(["sh", "-c", "echo x > a.txt"], outputs=["a.txt"])
    md = session.executable(
        ["sh", "-c", "echo 'segmentation fault in nonbonded kernel' >&2; exit 139"],
        inputs={"a.txt": prep.output("a.txt")},
        outputs=["b.txt"],
    )
    ana = session.executable(["cat", md.output("b.txt")])
    with pytest.raises(pilotfish.DependencyFailed) as info:
        ana.result(timeout=30)
    assert info.value.root == md.key
    assert isinstance(info.value.__cause__, pilotfish.CommandFailed)
    assert md.failure is not None and md.failure.sandbox
    assert Path(md.failure.sandbox).is_dir()
    assert prep.state is State.DONE


def test_invalid_program_tasks_rejected_at_submit(
    session: pilotfish.Session, tmp_path: Path
) -> None:
    """Mistakes in executable() are caught at once, naming what is wrong."""
    with pytest.raises(pilotfish.InvalidTask, match="argv"):
        session.executable("gmx mdrun")  # type: ignore[arg-type]
    with pytest.raises(pilotfish.InvalidTask, match="argv"):
        session.executable([])
    with pytest.raises(pilotfish.InvalidTask, match="does not exist"):
        session.executable(["cat", "x"], inputs={"x": tmp_path / "absent"})
    with pytest.raises(pilotfish.InvalidTask, match="relative"):
        session.executable(["cat", "x"], inputs={"../x": tmp_path})
    with pytest.raises(pilotfish.InvalidTask, match="retry_exit_codes"):
        session.executable(["true"], retry_exit_codes=[0])
    with pytest.raises(pilotfish.InvalidTask, match="timeout"):
        session.executable(["true"], timeout=-1)
    t = session.executable(["true"], outputs=["a"])
    with pytest.raises(pilotfish.InvalidTask, match="not a declared output"):
        t.output("b")
    with pytest.raises(pilotfish.InvalidTask, match="not a program task"):
        session.submit(abs, 1).output("a")
    t.cancel()


def test_worker_killed_running_a_program_kills_the_program(
    make_session: Any, backend: str, tmp_path: Path
) -> None:
    """The worker running a program is SIGKILLed: the program's process group dies too,
    and the task is retried on a new worker."""
    skip_on(
        backend,
        "dask",
        reason="a SIGKILLed Dask worker cannot take the program's "
        "process group with it (no pilotfish master watches Dask workers); documented "
        "in pilotfish.backends.dask",
    )
    skip_on(backend, "fake", reason=FAKE_NO_WORKER)
    marker = str(random.randint(10**8, 10**9 - 1))  # sleep 1000.<marker> is a valid time
    pidfile = tmp_path / "pid"
    counter = tmp_path / "n"
    script = (
        f"if [ ! -e {counter} ]; then touch {counter}; echo $PPID > {pidfile}; "
        f"sleep 1000.{marker}; fi; echo second"
    )
    with make_session(workers=1) as s:
        t = s.executable(["sh", "-c", script])
        worker = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip()))
        os.kill(worker, 9)
        assert t.result(timeout=30).stdout.read_text() == "second\n"
        assert [a.outcome for a in t.attempts] == ["worker_lost", "done"]

        def gone() -> bool:
            return not any(
                marker in " ".join(p.info["cmdline"] or [])
                for p in psutil.process_iter(["cmdline", "status"])
                if p.info["status"] != psutil.STATUS_ZOMBIE
            )

        wait_for(gone, timeout=5)
