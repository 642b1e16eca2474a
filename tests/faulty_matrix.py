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
