"""Local workers forked from the master (backends/local/forking.py) are what an executed
worker is: only their own descriptors, default signal handling, the user's sys.path and
working directory; a worker running another interpreter (``worker_python``) is still
executed, and both run the same tasks."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

import pilotfish

pytestmark = pytest.mark.timeout(60)


def _worker_state() -> dict[str, Any]:
    kinds: list[str] = []
    fd_dir = "/proc/self/fd"
    for name in os.listdir(fd_dir):
        try:
            mode = os.stat(f"{fd_dir}/{name}").st_mode
        except OSError:
            continue  # the directory listing's own descriptor, closed by now
        kinds.append(
            "socket"
            if stat.S_ISSOCK(mode)
            else "pipe"
            if stat.S_ISFIFO(mode)
            else "dir"
            if stat.S_ISDIR(mode)
            else "other"
        )
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "forked": "pilotfish.backends.local.dispatch" in sys.modules,
        "sockets": kinds.count("socket"),
        "pipes": kinds.count("pipe"),
        "fds": len(kinds),
        "sigterm": signal.getsignal(signal.SIGTERM),
        "cwd": os.getcwd(),
        "argv0": sys.argv[0],
        "path0": sys.path[0],
    }


def _run(tmp_path: Path, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    with pilotfish.Session(workers=2, rundir=str(tmp_path / "r"), **kw) as s:
        state = s.submit(_worker_state).result(timeout=30)
        procs = s.processes()
    return state, procs


def test_a_forked_worker_is_what_an_executed_one_is(tmp_path: Path) -> None:
    forked, procs = _run(tmp_path)
    assert forked["forked"], "workers running the master's interpreter are forked from it"
    assert forked["ppid"] == procs["master"]
    assert forked["pid"] in procs["workers"]

    # another path to the same interpreter: not the master's own, so it is executed
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    executed, _ = _run(tmp_path, worker_python=str(python))
    assert not executed["forked"]

    for state in (forked, executed):
        # the worker's socket to the master, stdio; nothing of the master's (its client
        # socket, other workers' sockets and stderr pipes, its epoll and pidfds)
        assert state["sockets"] == 1, state
        assert state["sigterm"] == signal.SIG_DFL, state
        assert state["cwd"] == os.getcwd(), state
        assert state["argv0"].endswith(os.path.join("local", "worker.py")), state
    assert forked["fds"] == executed["fds"], (forked, executed)
    assert forked["pipes"] == executed["pipes"], (forked, executed)


def _stderr_line() -> int:
    print("a line from a forked worker", file=sys.stderr, flush=True)
    os._exit(3)


def test_a_forked_worker_that_dies_is_reported_with_its_stderr(tmp_path: Path) -> None:
    with pilotfish.Session(workers=1, rundir=str(tmp_path / "r"), poison_after=1) as s:
        f = s.submit(_stderr_line)
        with pytest.raises(pilotfish.WorkerLost) as ei:
            f.result(timeout=30)
        assert "a line from a forked worker" in str(ei.value)
        assert "3" in str(ei.value)
        assert s.submit(os.getpid).result(timeout=30) > 0  # its replacement works
