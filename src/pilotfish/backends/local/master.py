"""The local master: one process that owns N worker processes.

::

    client (Session)                       master (this module)                 workers
    ----------------                       --------------------                 -------
    RunAttempt / CancelAttempt / Shutdown   Dispatcher (pure, dispatch.py)
       ==== socketpair ====>  runner loop: selectors.select over  ==== socketpair ====> run
    <==== Started / Result / Lost /          - the client socket                       attempts
          WorkerReport / Heartbeat ====       - each worker's socket        <==== Result/Heartbeat
                                             - each worker's stderr pipe (tail kept, passed on)
                                             - each worker's pidfd (process sentinel)

Death is seen at once through the pidfd (``os.pidfd_open``), not by polling;
before acting on it the worker's socket is drained, so a result that was
already written is never lost nor blamed. Hangs are found by the dispatcher's
``tick`` from heartbeats plus kernel samples (see dispatch.py).

Messages to the client are batched: everything produced while handling one
round of ready file descriptors goes out in one frame.

The master runs in its own session (no terminal signals), dies with its
client (``PR_SET_PDEATHSIG`` and EOF on the client socket) and takes its
workers with it (they die with it the same way, and it kills them on exit).

The master is a child subreaper (``PR_SET_CHILD_SUBREAPER``), as every worker is: what
an attempt started and detached (a new session, a double fork) is re-parented to its
worker, and if that worker dies (SIGKILL, a timeout that killed it), to the master,
which kills and reaps every child of its own that is not a worker (``sweep``) as soon as
a worker exits, at every tick, and when it leaves.
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

from ...runtime.procs import (
    become_subreaper,
    children,
    descendants,
    die_with_parent,
    kill_and_reap,
    proc_sample,
)
from ...wire import messages as _wire
from ...wire.messages import Channel
from .dispatch import (
    Boot,
    CancelRequest,
    Close,
    Cmd,
    Dispatcher,
    DrainRequest,
    GroupFrom,
    HeartbeatFrom,
    HelloFrom,
    Kill,
    PreflightFailedOn,
    ResultFrom,
    SendWorker,
    Spawn,
    SubmitAttempts,
    TimePassed,
    ToClient,
    WithdrawnBy,
    WorkerExited,
)
from .forking import Forked, can_fork, fork_worker

_WORKER_MODULE = "pilotfish.backends.local.worker"
_TAIL_BYTES = 16384
_TAIL_LINES = 20


class _Proc:
    def __init__(
        self, name: str, popen: subprocess.Popen[bytes] | Forked, ch: Channel, pidfd: int
    ) -> None:
        self.name = name
        self.popen = popen
        self.ch = ch
        self.pidfd = pidfd
        self.tail: collections.deque[bytes] = collections.deque()
        self.tail_size = 0
        self.goodbye = False
        self.closed = False

    def add_stderr(self, data: bytes) -> None:
        self.tail.append(data)
        self.tail_size += len(data)
        while self.tail_size > _TAIL_BYTES and len(self.tail) > 1:
            self.tail_size -= len(self.tail.popleft())

    def stderr_tail(self) -> str:
        text = b"".join(self.tail).decode("utf-8", errors="replace")
        return "\n".join(text.rstrip("\n").splitlines()[-_TAIL_LINES:])


class Master:
    def __init__(
        self, client: Channel, cfg: _wire.Config, max_tasks_per_child: int | None = None
    ) -> None:
        self.client = client
        self.cfg = cfg
        self.disp = Dispatcher(
            cfg.workers,
            prefetch=cfg.prefetch,
            heartbeat_interval=cfg.heartbeat_interval,
            heartbeat_timeout=cfg.heartbeat_timeout,
            max_tasks_per_child=max_tasks_per_child,
            links=cfg.links,
        )
        self.sel = selectors.DefaultSelector()
        self.procs: dict[str, _Proc] = {}
        self.outbox: list[Any] = []
        self.env = dict(os.environ)
        self.fork = can_fork(cfg.worker_python)
        self.stopping = False

    # ------------------------------------------------------------------ commands
    def run_cmds(self, cmds: list[Cmd]) -> None:
        for c in cmds:
            if isinstance(c, ToClient):
                self.outbox.append(c.msg)
            elif isinstance(c, SendWorker):
                p = self.procs.get(c.name)
                if p is not None and not p.closed:
                    self.send_worker(p, c.msgs)
            elif isinstance(c, Spawn):
                self.spawn(c.name)
            elif isinstance(c, Kill):
                self.kill(c.name, c.pgids)

    def send_worker(self, p: _Proc, msgs: list[Any]) -> None:
        """Never blocks: a worker busy in a long task reads its socket only between
        attempts, so what its socket does not take now is written when it is writable."""
        had = p.ch.backlog
        try:
            done = p.ch.queue(msgs)
        except OSError:  # it died; its pidfd will tell
            return
        if not done and not had:
            with contextlib.suppress(KeyError, ValueError):  # unregistered: it is gone
                self.sel.modify(p.ch, selectors.EVENT_READ | selectors.EVENT_WRITE, ("worker", p))

    def flush_worker(self, p: _Proc) -> None:
        try:
            done = p.ch.flush()
        except OSError:
            done = True  # it died; its pidfd will tell
        if done:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.modify(p.ch, selectors.EVENT_READ, ("worker", p))

    def spawn(self, name: str) -> None:
        ch, child_fd = Channel.pair()
        try:
            popen: subprocess.Popen[bytes] | Forked
            if self.fork:  # our own interpreter: a fork is its start (forking.py)
                popen = fork_worker(child_fd, self.cfg.cwd)
            else:
                popen = subprocess.Popen(
                    [self.cfg.worker_python, "-m", _WORKER_MODULE, str(child_fd)],
                    pass_fds=(child_fd,),
                    stdin=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    cwd=self.cfg.cwd,
                    env=self.env,
                )
        except OSError as e:
            os.close(child_fd)
            ch.close()
            now = time.time()
            self.disp.slots[name].pid = 0
            self.run_cmds(
                self.disp.handle(WorkerExited(name, 127, f"cannot execute worker: {e}", now, False))
            )
            return
        os.close(child_fd)
        pidfd = os.pidfd_open(popen.pid)
        p = _Proc(name, popen, ch, pidfd)
        self.procs[name] = p
        self.disp.slots[name].pid = popen.pid
        assert popen.stderr is not None
        os.set_blocking(popen.stderr.fileno(), False)
        self.sel.register(ch, selectors.EVENT_READ, ("worker", p))
        self.sel.register(popen.stderr, selectors.EVENT_READ, ("stderr", p))
        self.sel.register(pidfd, selectors.EVENT_READ, ("exit", p))
        self.send_worker(p, [self.cfg._replace(name=name)])

    def sweep(self) -> None:
        """Kill and reap our children that are not workers: orphans of a dead worker's
        attempts, re-parented to us (we are a subreaper), and their descendants."""
        workers = {p.popen.pid for p in self.procs.values()}
        orphans = children(os.getpid()) - workers
        if orphans:
            kill_and_reap(descendants(orphans), settle=0.5)

    def kill(self, name: str, pgids: tuple[int, ...]) -> None:
        p = self.procs.get(name)
        for g in pgids:
            with contextlib.suppress(OSError):
                os.killpg(g, signal.SIGKILL)
        if p is not None:
            with contextlib.suppress(OSError):
                p.popen.kill()

    # ------------------------------------------------------------------ inputs
    def on_client(self, msgs: list[Any]) -> None:
        now = time.time()
        runs = [m for m in msgs if isinstance(m, _wire.RunAttempt)]
        if runs:
            self.run_cmds(self.disp.handle(SubmitAttempts(runs, now)))
        for m in msgs:
            if isinstance(m, _wire.CancelAttempt):
                self.run_cmds(self.disp.handle(CancelRequest((m.attempt,), now)))
            elif isinstance(m, _wire.DrainWorker):
                self.run_cmds(self.disp.handle(DrainRequest(m.name, m.why, now)))
            elif isinstance(m, _wire.Shutdown):
                self.stopping = True
                self.run_cmds(self.disp.handle(Close()))

    def on_worker(self, p: _Proc, msgs: list[Any]) -> None:
        now = time.time()
        for m in msgs:
            if isinstance(m, _wire.Result):
                self.run_cmds(self.disp.handle(ResultFrom(p.name, m, now)))
            elif isinstance(m, _wire.Heartbeat):
                self.disp.handle(HeartbeatFrom(p.name, now))
            elif isinstance(m, _wire.Hello):
                self.run_cmds(self.disp.handle(HelloFrom(p.name, m.pid, now)))
            elif isinstance(m, _wire.Withdrawn):
                self.run_cmds(self.disp.handle(WithdrawnBy(p.name, m.attempt, now)))
            elif isinstance(m, _wire.CommandGroup):
                self.disp.handle(GroupFrom(p.name, m.attempt, m.pgid))
            elif isinstance(m, _wire.Goodbye):
                p.goodbye = True
            elif isinstance(m, _wire.PreflightFailed):
                p.goodbye = True  # it exits on purpose
                self.run_cmds(self.disp.handle(PreflightFailedOn(p.name, tuple(m.problems), now)))

    def read_stderr(self, p: _Proc) -> None:
        assert p.popen.stderr is not None
        while True:
            try:
                data = os.read(p.popen.stderr.fileno(), 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(Exception):
                    self.sel.unregister(p.popen.stderr)
                return
            p.add_stderr(data)
            with contextlib.suppress(OSError):
                os.write(2, data)

    def on_exit(self, p: _Proc) -> None:
        # drain what it wrote before dying: results first, then blame
        if not p.closed:
            try:
                while p.ch.poll():
                    self.on_worker(p, p.ch.recv())
            except (EOFError, OSError):
                pass
        self.read_stderr(p)
        rc = p.popen.wait()
        for obj in (p.ch, p.popen.stderr, p.pidfd):
            with contextlib.suppress(Exception):
                self.sel.unregister(obj)  # type: ignore[arg-type]
        p.ch.close()
        p.closed = True
        os.close(p.pidfd)
        if p.popen.stderr is not None:
            p.popen.stderr.close()
        del self.procs[p.name]
        self.sweep()  # what its attempts left, re-parented to us when it died
        self.run_cmds(
            self.disp.handle(WorkerExited(p.name, rc, p.stderr_tail(), time.time(), p.goodbye))
        )

    # ------------------------------------------------------------------ loop
    def flush(self) -> None:
        if self.outbox:
            msgs, self.outbox = self.outbox, []
            self.client.send(msgs)

    def run(self, early: list[Any] | None = None) -> None:
        self.sel.register(self.client, selectors.EVENT_READ, ("client", None))
        now = time.time()
        self.run_cmds(self.disp.handle(Boot(now)))
        self.outbox.append(
            _wire.Hello(
                os.getpid(),
                _wire.host_name(),
                "master",
                tuple(p.popen.pid for p in self.procs.values()),
            )
        )
        self.flush()
        if early:
            self.on_client(early)
        interval = self.cfg.heartbeat_interval
        next_tick = now + interval
        while True:
            if self.stopping and not self.procs:
                self.outbox.append(_wire.Goodbye("shutdown"))
                self.flush()
                return
            deadline = self.disp.next_deadline()
            wake = next_tick if deadline is None else min(next_tick, deadline)
            for key, mask in self.sel.select(max(0.0, wake - time.time())):
                kind, p = key.data
                if kind == "client":
                    try:
                        self.on_client(self.client.recv())
                    except (EOFError, OSError):
                        self.abandon()
                        return
                elif kind == "worker":
                    if p.closed:
                        continue
                    if mask & selectors.EVENT_WRITE:
                        self.flush_worker(p)
                    if not mask & selectors.EVENT_READ:
                        continue
                    try:
                        self.on_worker(p, p.ch.recv())
                    except (EOFError, OSError):
                        with contextlib.suppress(Exception):
                            self.sel.unregister(p.ch)
                elif kind == "stderr":
                    self.read_stderr(p)
                elif kind == "exit" and p.name in self.procs:
                    self.on_exit(p)
            now = time.time()
            if now >= next_tick or (deadline is not None and now >= deadline):
                samples: dict[str, tuple[str, float]] = {}
                tails: dict[str, str] = {}
                for name, pr in self.procs.items():
                    s = proc_sample(pr.popen.pid)
                    if s is not None:
                        samples[name] = s
                    tails[name] = pr.stderr_tail()
                self.run_cmds(self.disp.handle(TimePassed(now, samples, tails)))
                self.sweep()
                if now >= next_tick:
                    self.outbox.append(_wire.Heartbeat(now))
                    next_tick = now + interval
            try:
                self.flush()
            except OSError:
                self.abandon()
                return

    def abandon(self) -> None:
        """The client is gone: nobody can use our results. Take the workers with us, and
        the programs they run: those known from CommandGroup messages, and any process
        group a worker's descendant leads (a program whose CommandGroup message is still
        unread, or not sent yet, when the client died)."""
        # the client's death arrives several times (EOF, and one PDEATHSIG SIGTERM per
        # thread of the client, see _client_gone): none may interrupt this clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in list(self.procs.values()):
            self.kill(p.name, self.disp.pgids(p.name) + _led_groups(p.popen.pid))
        for p in list(self.procs.values()):
            with contextlib.suppress(Exception):
                p.popen.wait(5)
        with contextlib.suppress(Exception):
            self.sweep()  # what the killed workers' attempts left, re-parented to us


def _led_groups(pid: int) -> tuple[int, ...]:
    """Process groups led by descendants of ``pid`` (programs start in sessions of their
    own); never our own group, which may be the client's shell job."""
    import psutil

    ours = os.getpgrp()
    out = []
    with contextlib.suppress(psutil.Error):
        for c in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(OSError):
                if os.getpgid(c.pid) == c.pid != ours:
                    out.append(c.pid)
    return tuple(out)


def _client_gone(signum: int, frame: Any) -> None:
    """The client died: leave through ``abandon()`` (main's ``finally``).

    The kernel sends the parent-death signal once per *thread* of the client that was
    our parent: when the client dies, each of its threads exits in turn and we are
    re-parented to the next one, getting a SIGTERM each time. A second SIGTERM must never
    interrupt the clean-up the first one started (nor kill us with the default action
    once the interpreter is finalizing): the first one ignores the rest."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """``python -m pilotfish.backends.local.master FD [MAX_TASKS_PER_CHILD]``."""
    argv = sys.argv[1:] if argv is None else argv
    # the local backend checked it (LocalBackend.__init__); absent means never recycle
    max_tasks = int(argv[1]) if len(argv) > 1 else None
    # The client died (SIGKILL, OOM): SIGTERM, not SIGKILL, so that abandon() below still
    # kills the workers' program process groups, which run in sessions of their own and
    # would otherwise outlive everyone (the workers die by their own PDEATHSIG).
    signal.signal(signal.SIGTERM, _client_gone)
    die_with_parent(signal.SIGTERM)
    become_subreaper()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = Channel.from_fd(int(argv[0]))
    try:
        cfg, *early = client.recv()  # what came with the Config in one read follows it
    except EOFError:
        return
    master = Master(client, cfg, max_tasks)
    try:
        master.run(early)
    finally:
        master.abandon()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown of every module (~25 ms a session's
    # shutdown waited for): the workers are reaped, what we wrote is flushed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
