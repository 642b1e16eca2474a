"""Finding processes by an environment marker, sampling and ending them (psutil, /proc;
no pilotfish imports).

A process started with ``VAR=value`` in its environment keeps it (``/proc/PID/environ``)
whoever its parent becomes, so a marker finds every process of one run: the RADICAL-Pilot
backend's own RP processes, the reaper's targets, a test's leftovers.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Collection, Iterable

import psutil


def with_env(var: str, values: Collection[str]) -> list[psutil.Process]:
    """Live (non-zombie) processes other than this one whose ``var`` is one of ``values``."""
    if isinstance(values, str):
        raise TypeError("with_env(var, values): values is a collection of strings, not one")
    me = os.getpid()
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        if p.pid == me or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if p.environ().get(var) in values:
                out.append(p)
    return out


def alive(pid: int, created: float) -> psutil.Process | None:
    """The process ``pid`` if it still runs and is the one created at ``created`` (a
    recycled pid is another process), else None."""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - created) < 1.0 and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except psutil.Error:
        pass
    return None


def end_processes(procs: Iterable[psutil.Process], grace: float = 0.0) -> None:
    """Give ``procs`` ``grace`` seconds to exit, then SIGTERM, then SIGKILL a second later."""
    alive = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    if not alive:
        return
    if grace > 0:
        _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(alive, timeout=1.0)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=1.0)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_sample(pid: int) -> tuple[str, float] | None:
    """(kernel state letter, CPU seconds) from /proc, or None if unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), (int(rest[11]) + int(rest[12])) / _CLK_TCK
