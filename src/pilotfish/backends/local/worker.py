"""A local worker: a process that runs attempts one at a time.

Forked by the master (:mod:`.forking`), or started as ``python -m
pilotfish.backends.local.worker FD`` when it runs another interpreter, with one end of
a Unix socket pair. Never forked from a process with threads, and never re-imports the
user's ``__main__`` (functions from it travel by value).

Threads: the main thread reads the socket and runs user code: before each
attempt it takes what the master sent meanwhile without blocking, and blocks
only when it has nothing to run; no thread hand-off per attempt. A second
thread sends ``Heartbeat`` every interval (see the master for why a silent
heartbeat alone never condemns a worker) and, once an attempt has run for
20 ms, reads the socket in its place, so a cancel or a request to give a held
attempt back is seen while a long attempt runs. The master's writes never wait
on a busy worker (they are non-blocking there).

The worker dies with its master (``PR_SET_PDEATHSIG`` on Linux, and EOF on
the socket), so it is never orphaned. It says ``Goodbye`` before an orderly
exit, so the master never takes a clean exit for a crash.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Any

from ...runtime.execute import run_attempt
from ...runtime.procs import die_with_parent
from ...wire import messages as _wire
from ...wire.messages import Channel, RunAttempt

_EXIT_PARENT_GONE = 70
_TICK = 0.02  # how often the heartbeat thread looks at the socket while user code runs


class Worker:
    def __init__(self, ch: Channel, cfg: _wire.Config) -> None:
        self.ch = ch
        self.cfg = cfg
        self.name = cfg.name
        self.host = _wire.host_name()
        self.inbox: collections.deque[Any] = collections.deque()
        self.parent = os.getppid()
        self._rlock = threading.Lock()  # one reader of the socket (and of the inbox) at a time
        self._busy_since = 0.0  # when the running attempt started (monotonic), else 0

    # -- threads ---------------------------------------------------------------
    def _watch(self) -> None:
        """Heartbeats, and the socket while user code runs: what the master sent since
        (a cancel, or a request to give back a held attempt for an idle worker) is taken
        after ``_TICK`` of a running attempt, so it is seen before that attempt ends.
        Short attempts never wait for this thread: the main thread reads between them."""
        interval = self.cfg.heartbeat_interval
        tick = min(_TICK, interval)
        next_beat = time.monotonic() + interval
        while True:
            time.sleep(tick)
            now = time.monotonic()
            since = self._busy_since
            if since and now - since >= tick and self._rlock.acquire(blocking=False):
                try:
                    self._read(block=False)
                finally:
                    self._rlock.release()
            if now < next_beat:
                continue
            next_beat = now + interval
            if os.getppid() != self.parent:
                os._exit(_EXIT_PARENT_GONE)
            try:
                self.ch.send([_wire.Heartbeat(time.time())])
            except OSError:
                os._exit(_EXIT_PARENT_GONE)

    # -- main loop -------------------------------------------------------------
    def _take(self, msgs: list[Any]) -> None:
        """Queue what the master sent (under ``_rlock``). A cancel names an attempt sent
        earlier on this socket: still queued here, it is dropped and ``Withdrawn`` at once
        (even while another attempt runs); otherwise it runs or ran already."""
        for m in msgs:
            if isinstance(m, _wire.CancelAttempt):
                for i, queued in enumerate(self.inbox):
                    if isinstance(queued, RunAttempt) and queued.attempt == m.attempt:
                        del self.inbox[i]
                        self.ch.send([_wire.Withdrawn(m.attempt)])
                        break
            else:
                self.inbox.append(m)

    def _read(self, block: bool) -> None:
        """Take what the master sent (the caller holds ``_rlock``); exit if it is gone."""
        try:
            self._take(self.ch.recv() if block else self.ch.recv_nowait())
        except (EOFError, OSError):
            os._exit(_EXIT_PARENT_GONE)  # master gone: nobody can use our results

    def _next(self) -> Any:
        """The next message to act on: what the master sent meanwhile is taken first
        without blocking; block only when there is nothing to run."""
        with self._rlock:
            self._read(block=not self.inbox)
            return self.inbox.popleft() if self.inbox else None

    def run(self) -> None:
        threading.Thread(target=self._watch, name="pilotfish-heartbeat", daemon=True).start()
        from ...runtime.preflight import worker_checks

        checks = worker_checks(self.cfg.versions or {}, self.cfg.rundir)
        problems = tuple(c.message() for c in checks if not c.ok)
        if problems:
            self.ch.send([_wire.PreflightFailed(problems)])
            os._exit(0)
        self.ch.send([_wire.Hello(os.getpid(), self.host, self.name)])
        while True:
            msg = self._next()
            if isinstance(msg, RunAttempt):
                self._busy_since = time.monotonic()
                result = self.execute(msg)
                self._busy_since = 0.0
                self.ch.send([result])
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


def _preload(modules: tuple[str, ...], name: str) -> None:
    from ...runtime.preflight import preload  # here: its imports are not the worker's start

    preload(modules, name)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    ch = Channel.from_fd(int(argv[0]))
    try:
        cfg, *early = ch.recv()  # what came with the Config in one read follows it
    except EOFError:
        os._exit(_EXIT_PARENT_GONE)
    sys.path[:] = list(cfg.sys_path)
    os.chdir(cfg.cwd)
    if cfg.preload:  # beside the first tasks: one that needs a module waits for its import
        threading.Thread(
            target=_preload, args=(cfg.preload, cfg.name), daemon=True, name="pilotfish-preload"
        ).start()
    w = Worker(ch, cfg)
    with w._rlock:
        w._take(early)
    w.run()


if __name__ == "__main__":
    main()
