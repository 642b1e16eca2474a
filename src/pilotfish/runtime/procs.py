"""Finding processes by an environment marker, sampling and ending them (psutil, /proc;
no pilotfish imports), and containing what an attempt starts (:class:`Containment`).

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
import select
import signal
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil
else:

    class _LazyPsutil:
        """psutil, imported on first use: a worker that never needs it (every attempt's
        containment reads /proc itself) does not pay for importing it."""

        def __getattr__(self, name: str) -> Any:
            import psutil as real

            globals()["psutil"] = real
            return getattr(real, name)

    psutil = _LazyPsutil()


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


def _running(p: psutil.Process) -> bool:
    """``p`` still runs: a zombie does not (it has exited; only its parent, or init
    once it is an orphan, can reap it)."""
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _settle(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` seconds for ``procs`` to exit; those still running.

    psutil's ``wait_procs`` alone waits for a process that is not our child until its
    pid is gone: an orphan's zombie stays until init reaps it, which takes seconds on
    some machines (a VM's init), although it ended long before."""
    deadline = time.monotonic() + timeout
    while True:
        _, procs = psutil.wait_procs(procs, timeout=0)  # reaps those that are our children
        procs = [p for p in procs if _running(p)]
        if not procs or time.monotonic() >= deadline:
            return procs
        time.sleep(0.02)


def end_processes(procs: Iterable[psutil.Process], grace: float = 0.0) -> None:
    """Give ``procs`` ``grace`` seconds to exit, then SIGTERM, then SIGKILL a second later."""
    alive = [p for p in procs if _running(p)]
    if not alive:
        return
    if grace > 0:
        alive = _settle(alive, grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    alive = _settle(alive, 1.0)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _settle(alive, 1.0)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None if
    there is no such process. The name is skipped by its last ')': it may hold spaces."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def proc_sample(pid: int) -> tuple[str, float] | None:
    """(kernel state letter, CPU seconds) from /proc, or None if unavailable."""
    rest = _stat_fields(pid)
    if rest is None:
        return None
    return rest[0].decode(), (int(rest[11]) + int(rest[12])) / _CLK_TCK


# ------------------------------------------------------------------ containment
#
# Nothing an attempt starts outlives it, however it detaches (a new session, a new
# process group, a double fork). A worker process makes itself a *child subreaper*
# (Linux ``PR_SET_CHILD_SUBREAPER``): a descendant whose parent dies is re-parented to
# the worker, not to init, so every process an attempt started is a descendant of the
# worker until it is reaped. When the attempt ends (done, failed, timed out, cancelled)
# its descendants are SIGKILLed and reaped (:meth:`Containment.end`). Which ones are the
# attempt's: those the attempt's own thread started (``/proc/PID/task/TID/children``
# lists the children of one thread) and their descendants; and, once no other attempt
# runs in this process, every descendant that was not there when the process was last
# idle (orphans re-parented to us land on our main thread and cannot be told apart per
# attempt). What the worker itself keeps running (multiprocessing's resource tracker or
# fork server, started by an attempt or not) is never touched. Standard library and
# /proc only: it runs after every attempt.

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_prctl: Any = None  # libc's prctl, looked up once (a process forked later inherits it)


def libc_prctl() -> Any:
    """libc's ``prctl`` (Linux), looked up on first use; None elsewhere."""
    global _prctl
    if _prctl is None and os.path.exists("/proc/self/stat"):
        with contextlib.suppress(Exception):
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send us ``sig`` when our parent dies (Linux); a no-op elsewhere.
    (The kernel means the parent *thread*: see the local master's ``_client_gone``.)"""
    prctl = libc_prctl()
    if prctl is not None:
        with contextlib.suppress(Exception):
            prctl(_PR_SET_PDEATHSIG, sig)


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux): orphaned descendants are re-parented
    to it instead of init. Returns whether it is one."""
    prctl = libc_prctl()
    if prctl is None:
        return False
    try:
        return bool(prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except Exception:
        return False


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, parent pid, start time in clock ticks: its identity with the pid)
    of process ``pid`` from /proc, or None if there is no such process."""
    rest = _stat_fields(pid)
    if rest is None:
        return None
    return rest[0].decode(), int(rest[1]), int(rest[19])


def _start_time(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[2]


def _children_of_task(pid: int, tid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
            return {int(x) for x in f.read().split()}
    except (OSError, ValueError):
        return set()


def has_children() -> bool:
    """Whether this process has a child (any thread's), alive or not yet reaped: one
    ``waitid(P_ALL, WNOHANG | WNOWAIT)``, which reaps nothing. False means there is no
    child, and so, for a subreaper, no descendant at all: no scan of /proc is needed."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    except OSError:
        return True  # cannot tell: scan
    return True


def children(pid: int) -> set[int]:
    """The direct children of process ``pid`` (all its threads)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (OSError, ValueError):
        return set()
    out: set[int] = set()
    for tid in tids:
        out |= _children_of_task(pid, tid)
    return out


def descendants(roots: Iterable[int]) -> dict[int, int]:
    """``roots`` and all their descendants that exist, pid -> start time."""
    out: dict[int, int] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        st = _start_time(pid)
        if st is None:
            continue
        out[pid] = st
        todo.extend(children(pid))
    return out


def _kill(pid: int, start: int) -> None:
    """SIGKILL ``pid`` only while it is the process that started at ``start`` (a pidfd
    pins the process between the check and the signal)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    send = getattr(signal, "pidfd_send_signal", None)
    if pidfd_open is None or send is None:
        if _start_time(pid) == start:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return
    try:
        fd = pidfd_open(pid)
    except OSError:
        return
    try:
        if _start_time(pid) == start:
            with contextlib.suppress(OSError):
                send(fd, signal.SIGKILL)
    finally:
        os.close(fd)


def _exempt() -> set[int]:
    """Helpers of this process that outlive attempts on purpose: multiprocessing's
    resource tracker and fork server (whoever started them)."""
    import sys

    out: set[int] = set()
    rt = sys.modules.get("multiprocessing.resource_tracker")
    pid = getattr(getattr(rt, "_resource_tracker", None), "_pid", None)
    if isinstance(pid, int):
        out.add(pid)
    fs = sys.modules.get("multiprocessing.forkserver")
    pid = getattr(getattr(fs, "_forkserver", None), "_forkserver_pid", None)
    if isinstance(pid, int):
        out.add(pid)
    return out


#: Longest wait for SIGKILLed processes to be gone (a process in uninterruptible sleep on
#: a dead filesystem may never go; the worker does not wait for it forever).
KILL_SETTLE = 2.0


def kill_and_reap(procs: Mapping[int, int], settle: float = KILL_SETTLE) -> list[int]:
    """SIGKILL every process of ``procs`` (pid -> start time) that is still that process,
    then reap those that are (or become, re-parented) our children, for up to ``settle``
    seconds. Returns the pids still not gone."""
    me = os.getpid()
    for pid, start in procs.items():
        if pid != me:
            _kill(pid, start)
    left = {p: s for p, s in procs.items() if p != me}
    deadline = time.monotonic() + settle
    delay = 0.0005
    while left:
        for pid in list(left):
            st = _stat(pid)
            if st is None or st[2] != left[pid]:
                del left[pid]  # gone: reaped, by us or by its parent
            elif st[1] == me:  # ours (or re-parented to us): reap it once it is dead
                with contextlib.suppress(ChildProcessError, OSError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        del left[pid]
            elif st[0] in ("Z", "X") and st[1] not in left:
                del left[pid]  # dead; its parent, which lives on, reaps it
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return sorted(left)


class Containment:
    """What attempts start in this process, ended with them (see the section comment).

    ``token = c.begin()`` in the thread about to run an attempt, ``c.end(token)`` in the
    same thread once it ended, however it ended. Thread-safe: Dask runs several attempts
    of one process in threads at once."""

    def __init__(self, shared: bool = False) -> None:
        """``shared``: this process is also a client (a ``FakeBackend``, a Dask worker
        in the client's process), so it is not made a subreaper and an attempt's
        processes are only those its own thread started (the user's other processes
        are none of its business)."""
        self.me = os.getpid()
        self.shared = shared
        self.subreaper = False if shared else become_subreaper()
        self._lock = threading.Lock()
        self._running = 0
        self._idle: dict[int, int] = {}  # descendants when no attempt ran

    def begin(self) -> int:
        """Note that an attempt starts in this thread; returns its token."""
        with self._lock:
            if self._running == 0:
                # one system call in the common case (a worker with no child at all)
                idle = not self.shared and has_children()
                self._idle = descendants(children(self.me)) if idle else {}
            self._running += 1
        return threading.get_native_id()

    def alone(self) -> bool:
        """Whether exactly one attempt (the caller's, after :meth:`begin`) runs here."""
        with self._lock:
            return self._running == 1

    def started(self, tid: int) -> dict[int, int]:
        """What the attempt running in thread ``tid`` started so far (pid -> start time):
        the children of its thread and their descendants, and, if it is the only attempt
        running, every descendant that was not there when this process was idle."""
        if not has_children():  # a subreaper with no child has no descendant either
            return {}
        with self._lock:
            idle, alone = self._idle, self._running <= 1 and not self.shared
        # alone: all our children, those of its thread among them
        mine = descendants(children(self.me) if alone else _children_of_task(self.me, tid))
        exempt = _exempt()
        return {
            p: s for p, s in mine.items() if idle.get(p) != s and p not in exempt and p != self.me
        }

    def end(self, tid: int) -> list[int]:
        """Kill and reap what the attempt of thread ``tid`` started (:meth:`started`);
        returns the pids that would not go within :data:`KILL_SETTLE` seconds."""
        try:
            procs = self.started(tid)
            return kill_and_reap(procs) if procs else []
        finally:
            with self._lock:
                self._running -= 1


def exited_within(pid: int, timeout: float) -> bool | None:
    """Wait up to ``timeout`` s for child ``pid`` to exit, without reaping it: True once it
    has (or it is gone), False after ``timeout``, None where this cannot tell (no pidfd:
    the caller waits its own way). A pidfd wakes us the moment it exits;
    ``Popen.wait(timeout)`` polls with sleeps that grow to 50 ms, which a session's
    shutdown paid for every time (~30 ms)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd = pidfd_open(pid)
    except OSError:
        return True  # no such process (reaped already)
    try:
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        return bool(ready)
    finally:
        os.close(fd)
