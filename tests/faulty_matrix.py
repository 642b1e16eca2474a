"""Task functions of the fault matrix (tests/test_fault_matrix.py), imported by workers.

Every body first appends one line (its pid) to a *count file* of its task, so the test
can compare how often user code really ran with how many attempts pilotfish started.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil


def body_pids(countfile: str) -> list[int]:
    """The pid of every run of a body that recorded itself in ``countfile``."""
    try:
        with open(countfile) as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _record(countfile: str) -> int:
    """Append this run; returns how many runs came before it."""
    before = len(body_pids(countfile))
    with open(countfile, "a") as f:
        f.write(f"{os.getpid()}\n")
    return before


def record(countfile: str, value: int) -> int:
    _record(countfile)
    return value


def publish_chain(chainfile: str) -> None:
    """Write this process and its ancestors (pid, name, command line), innermost first."""
    me = psutil.Process()
    chain = []
    for p in [me, *me.parents()]:
        try:
            chain.append({"pid": p.pid, "name": p.name(), "cmdline": " ".join(p.cmdline())})
        except psutil.Error:
            chain.append({"pid": p.pid, "name": "?", "cmdline": ""})
    tmp = f"{chainfile}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(chain, f)
    os.replace(tmp, chainfile)


def chain_then_sleep(countfile: str, chainfile: str, first: float, then: float, value: int) -> int:
    """Publish the process chain above user code, then work: ``first`` seconds on the
    first run of the body, ``then`` seconds on any later run."""
    before = _record(countfile)
    publish_chain(chainfile)
    time.sleep(first if before == 0 else then)
    return value


def kill_own_process(countfile: str) -> None:
    """Kill the process running this call, every time (a native crash, the OOM killer)."""
    _record(countfile)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)  # the signal is delivered at once; never return normally


# ---------------------------------------------------------------- containment (issue 22)


def leave_children(countfile: str, marker: str, hang: float) -> list[int]:
    """Start children every way a process detaches, never wait for them, then return
    (``hang`` 0) or hang ``hang`` seconds (to time out): a plain ``Popen``, one in a new
    session, and a double fork (its parent exits: it is re-parented). Each runs
    ``sleep 1000.<marker>``, so the test finds them by command line."""
    import subprocess

    _record(countfile)
    sleep = ["sleep", f"1000.{marker}"]
    plain = subprocess.Popen(sleep)
    session = subprocess.Popen(sleep, start_new_session=True)
    # a double fork: the shell starts sleep in the background and exits at once
    subprocess.run(["sh", "-c", f"(setsid sleep 1000.{marker} &) ; sleep 1000.{marker} &"])
    if hang:
        time.sleep(hang)
    return [plain.pid, session.pid]


def close_stdio(countfile: str) -> str:
    """Close the process's file descriptors 0, 1 and 2 (a library daemonizing itself)."""
    _record(countfile)
    for fd in (0, 1, 2):
        os.close(fd)
    return "closed"


def say(countfile: str, text: str) -> str:
    """Print ``text`` (to the worker's stdout and stderr) and return it."""
    import sys

    _record(countfile)
    print(text)
    print(text, file=sys.stderr)
    return text


def record_then_hang(countfile: str, seconds: float) -> str:
    """Hangs (past its timeout) every time it runs."""
    _record(countfile)
    time.sleep(seconds)
    return "woke"


def plus(countfile: str, x: int, n: int) -> int:
    """A link of a chain: record this run, return ``x + n``."""
    _record(countfile)
    return x + n
