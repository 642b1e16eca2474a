"""The program's process: finding its executable, starting it in its own process group,
waiting for it, and killing what is left of the group.

*Process groups.*  The program starts in a new session, hence in its own process
group whose id is its pid.  Killing the group (``os.killpg``) kills the whole tree,
including grandchildren started in the background, which killing only the direct
child would orphan.  ``on_start(pid)`` hands that group id to the caller right after
the spawn so a supervisor can kill the tree even if this worker process dies.  On
timeout or cancellation the group gets SIGTERM, a short grace period, then SIGKILL
(:func:`kill_group`).  After a normal exit, anything left in the group is killed with
SIGKILL so nothing leaks.  (A program that calls ``setsid()`` itself leaves the
group: the worker, a child subreaper, finds it when the attempt ends, see
:class:`pilotfish.runtime.procs.Containment`.)

*No pid-reuse races.*  The exit of the main program is observed with ``waitid(...,
WNOWAIT)`` (:class:`ExitWatcher`): the child stays an unreaped zombie, which keeps its
pid and therefore the process-group id reserved, until the group has been killed.
Only then is it reaped, so ``killpg`` can never hit an unrelated group that happened
to be given a recycled id.  While a group is being killed, members that are already
zombies (possible in containers whose init does not reap orphans) are treated as gone.
An exit status lost to someone else's ``wait`` (ECHILD, e.g. SIGCHLD ignored) is
reported (:attr:`Ended.lost`), never read as success.

*No busy waiting.*  Waiting blocks on a pidfd (Linux) or sleeps in short slices; when
a ``cancel`` event is given, the wait is cut into 50 ms slices so cancellation is
noticed promptly.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Literal

#: Seconds between SIGTERM and SIGKILL when a group is killed.
KILL_GRACE = 2.0
#: Longest wait for SIGKILLed processes to actually disappear.
_KILL_SETTLE = 1.0
#: Wait slice used when a cancel event must be polled.
_SLICE = 0.05


def resolve_program(argv0: str, cwd: str, env: Mapping[str, str]) -> tuple[str | None, str]:
    """Find the executable.  Returns (path, "") or (None, reason)."""
    search_path = env.get("PATH", os.defpath)
    if not argv0:
        return None, "the program name (argv[0]) is empty"
    if "/" not in argv0:
        found = shutil.which(argv0, path=search_path)
        if found is None:
            return None, (
                f"program {argv0!r} was not found on PATH (or is not executable); "
                f"PATH searched: {search_path}"
            )
        return os.path.abspath(found), ""
    full = argv0 if os.path.isabs(argv0) else os.path.join(cwd, argv0)
    if not os.path.exists(full):
        return None, f"program {argv0!r} does not exist (looked at {full})"
    if os.path.isdir(full):
        return None, f"program {argv0!r} is a directory ({full})"
    if not os.access(full, os.X_OK):
        return None, (
            f"program {argv0!r} is not executable ({full}); check its permissions (chmod +x)"
        )
    return full, ""


def start(
    argv: tuple[str, ...],
    executable: str,
    cwd: str,
    env: Mapping[str, str],
    stdin: IO[bytes] | None,
    stdout: IO[bytes],
    stderr: IO[bytes],
) -> subprocess.Popen[bytes]:
    """Start the program in a new session, hence in its own process group (whose id is
    its pid), with these open files as its stdio (no stdin: /dev/null) and no other
    descriptor of ours. Raises OSError if it cannot start."""
    return subprocess.Popen(
        list(argv),
        executable=executable,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
    )


def group_alive(pgid: int) -> bool:
    """True while the process group has a member that is not a zombie.

    Zombies are ignored because in containers whose init does not reap orphans
    they never go away; they hold no resources beyond a process-table slot.
    Uses /proc where available, otherwise ``killpg(pgid, 0)``.
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        entries = []
    if entries and os.path.exists("/proc/self/stat"):
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ExitWatcher:
    """Waits for a child to exit WITHOUT reaping it (see module docstring)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = None
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self._pidfd = int(pidfd_open(pid))
            except OSError:
                self._pidfd = None
        self._delay = 0.001
        #: The exit status was lost: someone else reaped the child (ECHILD), e.g.
        #: because SIGCHLD is ignored in this process.  Never read as success.
        self.lost = False

    def exited(self) -> bool:
        try:
            res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            self.lost = True  # already reaped by someone else: status unknown
            return True
        return res is not None

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True once the child has exited."""
        if self.exited():
            return True
        if timeout <= 0:
            return False
        if self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            with contextlib.suppress(InterruptedError):
                poller.poll(max(1, int(timeout * 1000)))
            return self.exited()
        # Portable fallback: short sleeps growing to 50 ms.
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self.exited()
            time.sleep(min(self._delay, remaining))
            self._delay = min(self._delay * 2, _SLICE)
            if self.exited():
                return True

    def close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def kill_group(proc: subprocess.Popen[bytes], watcher: ExitWatcher) -> None:
    """SIGTERM the group, grace period, SIGKILL, wait for it to die, reap the child.

    The child is reaped only at the end so its zombie keeps the group id reserved.
    """
    pgid = proc.pid
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while group_alive(pgid) and time.monotonic() < deadline:
        # Block on the main child first (cheap), then poll the rest of the group.
        if not watcher.exited():
            watcher.wait(min(_SLICE, max(0.0, deadline - time.monotonic())))
        else:
            time.sleep(0.02)
    signal_group(pgid, signal.SIGKILL)
    settle = time.monotonic() + _KILL_SETTLE
    while group_alive(pgid) and time.monotonic() < settle:
        time.sleep(0.01)
    proc.wait()


@dataclass(frozen=True, slots=True)
class Ended:
    """How the wait for a program ended: its exit status, whether its group was killed
    for a ``"timeout"`` or because it was ``"cancelled"``, the seconds it ran, and
    whether its status was ``lost`` (reaped by someone else: never success)."""

    returncode: int
    killed: Literal["timeout", "cancelled"] | None
    ran: float
    lost: bool


def wait_for(
    proc: subprocess.Popen[bytes],
    timeout: float | None,
    on_start: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Ended:
    """Hand the group id to ``on_start``, wait for the program (up to ``timeout``
    seconds, or until ``cancel`` is set), then kill its group and reap it. If
    ``on_start`` raises, or this thread is interrupted, the group is killed first."""
    spawned = time.monotonic()
    watcher = ExitWatcher(proc.pid)
    killed: Literal["timeout", "cancelled"] | None = None
    try:
        if on_start is not None:
            on_start(proc.pid)
        deadline = None if timeout is None else spawned + timeout
        killed = _wait_until(watcher, deadline, cancel)
        if killed is not None:
            kill_group(proc, watcher)
        else:
            # Main program exited; its zombie still reserves the group id, so
            # killing leftovers (background grandchildren) is race-free.
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    except BaseException:
        if proc.returncode is None:
            kill_group(proc, watcher)
        raise
    finally:
        watcher.close()
    ran = time.monotonic() - spawned
    assert proc.returncode is not None
    return Ended(proc.returncode, killed, ran, watcher.lost)


def _wait_until(
    watcher: ExitWatcher, deadline: float | None, cancel: threading.Event | None
) -> Literal["timeout", "cancelled"] | None:
    """Block until the child exits (None), ``deadline`` passes (``"timeout"``) or
    ``cancel`` is set (``"cancelled"``)."""
    while True:
        if cancel is not None and cancel.is_set():
            return "cancelled"
        if deadline is None:
            slice_ = _SLICE if cancel is not None else 3600.0
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None if watcher.exited() else "timeout"
            slice_ = min(_SLICE, remaining) if cancel is not None else remaining
        if watcher.wait(slice_):
            return None
