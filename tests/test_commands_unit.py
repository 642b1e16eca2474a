"""Unit tests for pilotfish.runtime.programs: one program attempt in a sandbox."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pilotfish.core.ledger import signal_name
from pilotfish.runtime.programs import (
    CommandOutcome,
    CommandSpec,
    make_sandbox,
    run_command,
    tail_lines,
)

PY = sys.executable


def _procs_with_marker(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(p.info["cmdline"] or ()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _wait_gone(marker: str, timeout: float = 3.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = _procs_with_marker(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _kill_leftovers(marker: str) -> None:
    for p in _procs_with_marker(marker):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _marker() -> str:
    """A unique sleep duration, e.g. '1000.4711', findable in process command lines."""
    return f"1000.{uuid.uuid4().int % 10**6:06d}1"


@pytest.mark.timeout(30)
def test_large_stderr_is_complete_and_exit_code_reported(tmp_path: Path) -> None:
    """A program dumps 5 MB of diagnostics then exits 3: a pipe-based runner would
    deadlock or truncate; the stderr file must be byte-exact and the message must
    quote the last line."""
    code = (
        "import sys\n"
        "chunk = bytes(range(256)) * 64\n"
        "for i in range(320):\n"
        "    sys.stderr.buffer.write(chunk)\n"
        "sys.stderr.buffer.write(b'\\nFINAL: disk quota exceeded\\n')\n"
        "sys.exit(3)\n"
    )
    chunk = bytes(range(256)) * 64
    expected = chunk * 320 + b"\nFINAL: disk quota exceeded\n"
    out = run_command(CommandSpec(argv=(PY, "-c", code), inputs={}), tmp_path / "box")
    assert out.kind == "failed"
    assert out.returncode == 3
    assert out.signal is None
    assert out.stderr_path is not None
    data = Path(out.stderr_path).read_bytes()
    assert len(data) == len(expected) > 5_000_000
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert "FINAL: disk quota exceeded" in out.message
    assert "3" in out.message
    assert out.stderr_path in out.message
    assert str(tmp_path / "box") in out.message
    assert out.host == socket.gethostname()


@pytest.mark.timeout(30)
def test_killed_by_signal_is_named(tmp_path: Path) -> None:
    """A native tool segfaults: users need 'SIGSEGV', not a bare -11."""
    out = run_command(CommandSpec(argv=("sh", "-c", "kill -SEGV $$"), inputs={}), tmp_path / "box")
    assert out.kind == "failed"
    assert out.returncode == -11
    assert out.signal == "SIGSEGV"
    assert "SIGSEGV" in out.message
    assert "killed by signal SIGSEGV (-11)" in out.message


@pytest.mark.timeout(30)
def test_missing_declared_output(tmp_path: Path) -> None:
    """The program exits 0 but wrote 'result.csv' under another name: must not be 'ok'."""
    box = tmp_path / "box"
    spec = CommandSpec(
        argv=("sh", "-c", "echo x > other.csv; echo x > present.txt"),
        inputs={},
        outputs=("present.txt", "result.csv"),
    )
    out = run_command(spec, box)
    assert out.kind == "missing_output"
    assert out.missing == ("result.csv",)
    assert "result.csv" in out.message
    assert str(box) in out.message
    assert out.outputs == {}


@pytest.mark.timeout(30)
def test_missing_program_is_environment(tmp_path: Path) -> None:
    """A worker lacks a tool the submitting host has: report host, program and PATH."""
    prog = "pilotfish-no-such-program-xyz"
    out = run_command(
        CommandSpec(argv=(prog, "--help"), inputs={}, env={"PATH": "/nonexistent/bin:/usr/bin"}),
        tmp_path / "box",
    )
    assert out.kind == "environment"
    assert prog in out.message
    assert socket.gethostname() in out.message
    assert "/nonexistent/bin:/usr/bin" in out.message
    assert out.returncode is None


@pytest.mark.timeout(30)
def test_missing_cwd_is_environment(tmp_path: Path) -> None:
    """A command is configured with a working directory that is not mounted on the worker."""
    missing = tmp_path / "not-mounted"
    out = run_command(CommandSpec(argv=("true",), inputs={}, cwd=str(missing)), tmp_path / "box")
    assert out.kind == "environment"
    assert str(missing) in out.message


@pytest.mark.timeout(30)
def test_non_executable_program_is_environment(tmp_path: Path) -> None:
    """A script was copied without its +x bit (e.g. via a zip or a careless cp)."""
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    out = run_command(CommandSpec(argv=(str(script),), inputs={}), tmp_path / "box")
    assert out.kind == "environment"
    assert str(script) in out.message
    assert "executable" in out.message


@pytest.mark.timeout(30)
def test_timeout_kills_whole_process_group(tmp_path: Path) -> None:
    """A hung program with a background child: killing only the direct child would
    leak the grandchild forever on the worker."""
    marker = _marker()
    spec = CommandSpec(
        argv=("sh", "-c", f"sleep {marker} & sleep {marker}"),
        inputs={},
        timeout=1.0,
    )
    pids: list[int] = []

    def on_start(pid: int) -> None:
        assert os.getpgid(pid) == pid  # the pid handed out is the group to kill
        pids.append(pid)

    t0 = time.monotonic()
    try:
        out = run_command(spec, tmp_path / "box", on_start=on_start)
        took = time.monotonic() - t0
        assert out.kind == "timeout"
        assert took < 1.0 + 3.0
        assert "1s" in out.message
        assert str(tmp_path / "box") in out.message
        assert out.returncode is not None and out.returncode < 0
        assert (tmp_path / "box").is_dir()
        assert len(pids) == 1
        assert _wait_gone(marker) == []
    finally:
        _kill_leftovers(marker)


@pytest.mark.timeout(30)
def test_timeout_escalates_to_sigkill_when_sigterm_ignored(tmp_path: Path) -> None:
    """A program (and its children) ignore SIGTERM: after the grace period the whole
    group must get SIGKILL instead of the worker hanging forever."""
    marker = _marker()
    spec = CommandSpec(
        argv=("sh", "-c", f"trap '' TERM; sleep {marker} & sleep {marker}"),
        inputs={},
        timeout=0.5,
    )
    t0 = time.monotonic()
    try:
        out = run_command(spec, tmp_path / "box")
        took = time.monotonic() - t0
        assert out.kind == "timeout"
        assert out.returncode == -9
        assert out.signal == "SIGKILL"
        assert 0.5 + 1.5 < took < 0.5 + 3.0
        assert _wait_gone(marker) == []
    finally:
        _kill_leftovers(marker)


@pytest.mark.timeout(30)
def test_on_start_error_still_kills_group(tmp_path: Path) -> None:
    """The supervisor registration fails: the program must not keep running unowned."""
    marker = _marker()

    def on_start(pid: int) -> None:
        raise RuntimeError("supervisor unreachable")

    try:
        with pytest.raises(RuntimeError, match="supervisor unreachable"):
            run_command(
                CommandSpec(argv=("sh", "-c", f"sleep {marker} & sleep {marker}"), inputs={}),
                tmp_path / "box",
                on_start=on_start,
            )
        assert _wait_gone(marker) == []
    finally:
        _kill_leftovers(marker)


@pytest.mark.timeout(30)
def test_background_grandchild_killed_after_normal_exit(tmp_path: Path) -> None:
    """A script forgets to 'wait' for a background job and exits 0: the job must not
    outlive the attempt and keep consuming the worker."""
    marker = _marker()
    try:
        out = run_command(
            CommandSpec(argv=("sh", "-c", f"sleep {marker} & exit 0"), inputs={}),
            tmp_path / "box",
        )
        assert out.kind == "ok"
        assert _wait_gone(marker) == []
    finally:
        _kill_leftovers(marker)


@pytest.mark.timeout(30)
def test_non_utf8_stderr_does_not_crash(tmp_path: Path) -> None:
    """A tool prints Latin-1 / binary garbage on stderr before failing."""
    code = "import sys; sys.stderr.buffer.write(b'\\xff\\xfe bad \\x80\\n'); sys.exit(1)"
    out = run_command(CommandSpec(argv=(PY, "-c", code), inputs={}), tmp_path / "box")
    assert out.kind == "failed"
    assert "\ufffd\ufffd bad \ufffd" in out.message
    json.dumps(out.to_dict())


@pytest.mark.timeout(30)
def test_file_input_is_staged_and_readable(tmp_path: Path) -> None:
    """The program reads its input by a relative name under a nested directory."""
    src = tmp_path / "data.txt"
    src.write_text("hello input\n")
    spec = CommandSpec(
        argv=("sh", "-c", "cat in/sub/data.txt > copy.txt"),
        inputs={"in/sub/data.txt": str(src)},
        outputs=("copy.txt",),
    )
    out = run_command(spec, tmp_path / "box")
    assert out.kind == "ok", out.message
    assert (tmp_path / "box" / "in" / "sub" / "data.txt").is_symlink()
    assert Path(out.outputs["copy.txt"]).read_text() == "hello input\n"


@pytest.mark.timeout(30)
def test_missing_input_is_staging(tmp_path: Path) -> None:
    """An upstream step's output was deleted/never written before this step ran."""
    gone = tmp_path / "gone.csv"
    out = run_command(
        CommandSpec(argv=("true",), inputs={"table.csv": str(gone)}), tmp_path / "box"
    )
    assert out.kind == "staging"
    assert "table.csv" in out.message
    assert str(gone) in out.message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/evil"])
def test_escaping_input_name_is_staging(tmp_path: Path, name: str) -> None:
    """A hostile or buggy input name would write a symlink outside the sandbox."""
    src = tmp_path / "src.txt"
    src.write_text("x")
    box = tmp_path / "box"
    out = run_command(CommandSpec(argv=("true",), inputs={name: str(src)}), box)
    assert out.kind == "staging"
    assert name in out.message
    assert not (tmp_path / "evil").exists()


@pytest.mark.timeout(30)
def test_stdin_env_and_outputs(tmp_path: Path) -> None:
    """A filter program reads stdin and depends on an env var; outputs are returned
    as absolute paths that exist."""
    feed = tmp_path / "feed.txt"
    feed.write_text("line1\nline2\n")
    spec = CommandSpec(
        argv=("sh", "-c", 'wc -l > count.txt; printf "%s" "$PF_TEST_VAR" > var.txt'),
        inputs={},
        outputs=("count.txt", "var.txt"),
        env={"PF_TEST_VAR": "value-42"},
        stdin=str(feed),
    )
    out = run_command(spec, tmp_path / "box")
    assert out.kind == "ok", out.message
    assert set(out.outputs) == {"count.txt", "var.txt"}
    for path in out.outputs.values():
        assert os.path.isabs(path)
        assert os.path.exists(path)
    assert Path(out.outputs["count.txt"]).read_text().strip() == "2"
    assert Path(out.outputs["var.txt"]).read_text() == "value-42"
    assert out.stdout_path is not None and Path(out.stdout_path).exists()


@pytest.mark.timeout(30)
def test_no_stdin_means_dev_null(tmp_path: Path) -> None:
    """A program that reads stdin must not hang waiting on the worker's terminal."""
    out = run_command(
        CommandSpec(
            argv=("sh", "-c", "cat > got.txt"), inputs={}, outputs=("got.txt",), timeout=10
        ),
        tmp_path / "box",
    )
    assert out.kind == "ok", out.message
    assert Path(out.outputs["got.txt"]).read_bytes() == b""


@pytest.mark.timeout(30)
def test_cancel_kills_group_promptly(tmp_path: Path) -> None:
    """The user aborts a run: a long-running program and its children must stop now."""
    marker = _marker()
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    t0 = time.monotonic()
    try:
        out = run_command(
            CommandSpec(argv=("sh", "-c", f"sleep {marker} & sleep {marker}"), inputs={}),
            tmp_path / "box",
            cancel=cancel,
        )
        took = time.monotonic() - t0
        assert out.kind == "failed"
        assert out.message.startswith("cancelled:")
        assert out.returncode is not None and out.returncode < 0
        assert took < 0.5 + 2.5
        assert _wait_gone(marker) == []
    finally:
        timer.cancel()
        _kill_leftovers(marker)


@pytest.mark.timeout(30)
def test_tail_lines_reads_only_the_end(tmp_path: Path) -> None:
    """Quoting stderr of a multi-GB log must not load the file into memory."""
    p = tmp_path / "log.txt"
    lines = [f"line {i:06d} " + "x" * 50 for i in range(20000)]
    p.write_text("\n".join(lines) + "\n")
    assert p.stat().st_size > 65536
    assert tail_lines(p, n=20) == "\n".join(lines[-20:])
    assert tail_lines(p, n=5, max_bytes=1000) == "\n".join(lines[-5:])
    # Window holds fewer lines than asked: the cut first line is dropped.
    got = tail_lines(p, n=100, max_bytes=200).split("\n")
    assert got == lines[-len(got) :]
    assert tail_lines(tmp_path / "nope.txt") == ""
    (tmp_path / "empty.txt").write_bytes(b"")
    assert tail_lines(tmp_path / "empty.txt") == ""


def test_signal_name() -> None:
    """Return codes from subprocess: only negatives are signals."""
    assert signal_name(-11) == "SIGSEGV"
    assert signal_name(-9) == "SIGKILL"
    assert signal_name(0) is None
    assert signal_name(139) is None


@pytest.mark.timeout(30)
def test_sandbox_mode_and_uniqueness(tmp_path: Path) -> None:
    """Sandboxes on shared workers must not be readable by other users, and two
    attempts of the same task must never share a directory."""
    root = tmp_path / "root"
    a = make_sandbox(root, "task/1")
    b = make_sandbox(root, "task/1")
    assert a != b
    assert a.parent == root and b.parent == root
    for d in (root, a, b):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    box = tmp_path / "fresh"
    out = run_command(CommandSpec(argv=("true",), inputs={}), box)
    assert out.kind == "ok"
    assert stat.S_IMODE(box.stat().st_mode) == 0o700
    assert box.is_dir()  # never deleted


@pytest.mark.timeout(30)
def test_to_dict_from_dict_round_trip(tmp_path: Path) -> None:
    """Specs and outcomes travel between scheduler and worker as JSON."""
    spec = CommandSpec(
        argv=("prog", "-x"),
        inputs={"a.txt": "/data/a.txt"},
        outputs=("o.txt",),
        env={"K": "V"},
        stdin="/data/in.txt",
        cwd="sub",
        timeout=12.5,
    )
    assert CommandSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    bare = CommandSpec(argv=("true",), inputs={})
    assert CommandSpec.from_dict(json.loads(json.dumps(bare.to_dict()))) == bare

    out = run_command(CommandSpec(argv=("sh", "-c", "exit 2"), inputs={}), tmp_path / "box")
    again = CommandOutcome.from_dict(json.loads(json.dumps(out.to_dict())))
    assert again == out
    with pytest.raises(ValueError):
        CommandOutcome.from_dict({**out.to_dict(), "kind": "bogus"})
