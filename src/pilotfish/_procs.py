"""Finding processes by an environment marker, sampling and ending them (psutil, /proc;
no pilotfish imports).

A process started with ``VAR=value`` in its environment keeps it (``/proc/PID/environ``)
whoever its parent becomes, so a marker finds every process of one run: the RADICAL-Pilot
backend's own RP processes, the reaper's targets, a test's leftovers.

A pid alone is never ended: pids are recycled, and the one remembered may by now be the
user's shell. Every pid is remembered with its creation time (:func:`create_time`, read
when the pid is first learned) and ended only while :func:`alive` finds that same
process (:func:`end_trees`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Collection, Iterable, Mapping

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


def create_time(pid: int) -> float | None:
    """The creation time of process ``pid`` (what :func:`alive` compares), or None if
    there is no such process."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def same_processes(pids: Mapping[int, float]) -> list[psutil.Process]:
    """The processes of ``pids`` (pid -> creation time) that are still the ones
    remembered, with their descendants; a pid now used by another process is left out,
    and so are its children."""
    found: dict[int, psutil.Process] = {}
    for pid, created in pids.items():
        p = alive(pid, created) if pid > 0 else None
        if p is None:
            continue
        found[p.pid] = p
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
    return [p for p in found.values() if p.pid != os.getpid()]


def end_trees(pids: Mapping[int, float], grace: float = 0.0) -> None:
    """End the processes of ``pids`` (pid -> creation time) and their descendants, each
    only while it is still the process remembered (see :func:`same_processes`)."""
    end_processes(same_processes(pids), grace)


def in_places(p: psutil.Process, names: Collection[str]) -> bool:
    """Whether ``p`` or one of its ancestors has one of ``names`` as a component of its
    working directory or as (part of) a word of its command line: a process inside a
    session's directories, or started by one that is."""
    if isinstance(names, str):
        raise TypeError("in_places(p, names): names is a collection of strings, not one")
    if not names:
        return False
    chain = [p]
    with contextlib.suppress(psutil.Error):
        chain.extend(p.parents())
    for q in chain:
        if q.pid <= 1:
            break
        with contextlib.suppress(psutil.Error, OSError):
            if set(q.cwd().split(os.sep)) & set(names):
                return True
        with contextlib.suppress(psutil.Error, OSError):
            if any(n in word for word in q.cmdline() for n in names):
                return True
    return False


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
