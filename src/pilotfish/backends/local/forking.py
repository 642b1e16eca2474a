"""Workers forked from the master: a worker that starts in milliseconds, not ~100 ms.

A worker started as ``python -m pilotfish.backends.local.worker`` spends most of its
start importing Python and pilotfish; the master has done both already. When the workers
run the master's own interpreter (the default: no ``worker_python`` of another
environment) the master imports what a worker needs once (:func:`prepare`) and forks
each worker from itself, which is safe because the master has one thread (its
``selectors`` loop) and nothing else. Replacement workers (a worker killed, recycled
after ``max_tasks_per_child``) start just as fast, so a killed worker's tasks run again
sooner.

The child is made what an executed worker would be: standard error to its own pipe,
every descriptor of the master's closed but its own socket, the master's SIGTERM
handler gone, its objects frozen (``gc.freeze``: never finalized, so no master socket is
closed again under a number the worker reuses), and it never returns into the master's
code (``os._exit`` whatever happens).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import IO

from ...runtime.procs import exited_within

__all__ = ["Forked", "can_fork", "fork_worker", "prepare"]

_prepared = False


def can_fork(worker_python: str) -> bool:
    """May workers be forked from this process, rather than run as ``worker_python``?"""
    return worker_python == sys.executable and hasattr(os, "fork")


def prepare() -> None:
    """Import the worker's modules here, once, so that forked workers find them loaded
    (a worker's start then costs a fork, not an interpreter and its imports)."""
    global _prepared
    if not _prepared:
        from ...runtime import execute, preflight  # noqa: F401
        from . import worker  # noqa: F401

        _prepared = True


class Forked:
    """A forked worker, with the part of ``subprocess.Popen`` the master uses."""

    def __init__(self, pid: int, stderr: IO[bytes]) -> None:
        self.pid = pid
        self.stderr: IO[bytes] | None = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    return None
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code (``-signal`` if a signal ended it), as ``Popen.wait``."""
        if timeout is None:
            if self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    self.returncode = os.waitstatus_to_exitcode(status)
                except ChildProcessError:  # reaped by someone else: its code is unknown
                    self.returncode = -signal.SIGKILL
            return self.returncode
        if self.returncode is None and exited_within(self.pid, timeout) is not None:
            rc = self.poll()
            if rc is None:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            return rc
        deadline = time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.005)
        return rc

    def kill(self) -> None:
        if self.returncode is None:  # never a pid that was reaped (and may be reused)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def fork_worker(child_fd: int, cwd: str) -> Forked:
    """Fork a worker that talks to the master on ``child_fd``; the master keeps what it
    returns (pid, standard error's read end)."""
    prepare()
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        _worker_child(child_fd, w, cwd)
    os.close(w)
    return Forked(pid, os.fdopen(r, "rb", buffering=0))


def _worker_child(child_fd: int, stderr_fd: int, cwd: str) -> None:
    code = 1
    try:
        gc.freeze()  # the master's objects are never finalized here (see the docstring)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from ...runtime.execute import fresh_worker

        fresh_worker()  # what the attempts' signal reset puts back: this, not the master's
        os.dup2(stderr_fd, 2)
        _close_all_but(child_fd)
        with contextlib.suppress(OSError):
            os.chdir(cwd)
        from . import worker

        sys.argv = [worker.__file__, str(child_fd)]
        worker.main([str(child_fd)])  # it leaves through os._exit
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _close_all_but(fd: int) -> None:
    """Close every descriptor from 3 up but ``fd``: those listed in /proc/self/fd (a
    kernel without close_range would make closerange() try each of up to a million)."""
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(3, fd)
        os.closerange(fd + 1, _max_fd())
        return
    for n in open_fds:
        if n > 2 and n != fd:
            with contextlib.suppress(OSError):  # the listing's own, closed by now
                os.close(n)


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        return 65536
