"""A local worker: a fresh interpreter that runs attempts one at a time.

Started by the master as ``python -m pilotfish.backends.local.worker FD`` with
one end of a Unix socket pair. Never forked from a process with threads, and
never re-imports the user's ``__main__`` (functions from it travel by value).

Threads: the main thread runs user code; a reader thread drains the socket
into a queue (so the master's writes never block on a busy worker); a
heartbeat thread sends ``Heartbeat`` every interval (see the master for why a
silent heartbeat alone never condemns a worker).

The worker dies with its master (``PR_SET_PDEATHSIG`` on Linux, and EOF on
the socket), so it is never orphaned. It says ``Goodbye`` before an orderly
exit, so the master never takes a clean exit for a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

from ... import _wire
from ..._wire import Channel, RunAttempt
from ..execute import run_attempt

_EXIT_PARENT_GONE = 70


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send us ``sig`` when our parent dies (Linux); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, sig)


class Worker:
    def __init__(self, ch: Channel, cfg: _wire.Config) -> None:
        self.ch = ch
        self.cfg = cfg
        self.name = cfg.name
        self.host = _wire.host_name()
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.parent = os.getppid()
        self.cancelled: set[int] = set()

    # -- threads ---------------------------------------------------------------
    def _reader(self) -> None:
        try:
            while True:
                for m in self.ch.recv():
                    if isinstance(m, _wire.CancelAttempt):
                        self.cancelled.add(m.attempt)
                    else:
                        self.inbox.put(m)
        except (EOFError, OSError):
            os._exit(_EXIT_PARENT_GONE)  # master gone: nobody can use our results

    def _heartbeat(self) -> None:
        while True:
            time.sleep(self.cfg.heartbeat_interval)
            if os.getppid() != self.parent:
                os._exit(_EXIT_PARENT_GONE)
            try:
                self.ch.send([_wire.Heartbeat(time.time())])
            except OSError:
                os._exit(_EXIT_PARENT_GONE)

    # -- main loop -------------------------------------------------------------
    def run(self) -> None:
        threading.Thread(target=self._reader, name="pilotfish-reader", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="pilotfish-heartbeat", daemon=True).start()
        from ...preflight import worker_checks

        checks = worker_checks(self.cfg.versions or {}, self.cfg.rundir)
        problems = tuple(c.message() for c in checks if not c.ok)
        if problems:
            self.ch.send([_wire.PreflightFailed(problems)])
            os._exit(0)
        self.ch.send([_wire.Hello(os.getpid(), self.host, self.name)])
        while True:
            msg = self.inbox.get()
            if isinstance(msg, RunAttempt):
                if msg.attempt in self.cancelled:
                    self.cancelled.discard(msg.attempt)
                    self.ch.send([_wire.Withdrawn(msg.attempt)])
                else:
                    self.ch.send([self.execute(msg)])
            elif isinstance(msg, _wire.Shutdown):
                self.ch.send([_wire.Goodbye(msg.reason)])
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)

    def execute(self, m: RunAttempt) -> _wire.Result:
        def on_group(pgid: int) -> None:
            self.ch.send([_wire.CommandGroup(m.attempt, pgid)])

        return run_attempt(
            m, worker=self.name, host=self.host, rundir=self.cfg.rundir, on_group=on_group
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    ch = Channel.from_fd(int(argv[0]))
    try:
        (cfg,) = ch.recv()
    except EOFError:
        os._exit(_EXIT_PARENT_GONE)
    sys.path[:] = list(cfg.sys_path)
    os.chdir(cfg.cwd)
    Worker(ch, cfg).run()


if __name__ == "__main__":
    main()
