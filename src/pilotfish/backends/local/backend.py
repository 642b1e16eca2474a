"""The client side of the local backend: starts, watches and restarts the master.

Threads (owned by the backend's :class:`~pilotfish.backends._driver.Nursery` and
joined by ``stop``; a thread that crashes is one ``Fatal``):

* ``writer``  sends queued ``RunAttempt``/``CancelAttempt`` messages in batches;
* ``reader``  receives frames from the master and passes their events to the sink;
  EOF means the master is gone;
* ``stderr``  keeps the tail of the master's stderr (for ``RuntimeLost`` messages)
  and passes it through to ours;
* ``monitor`` watches the master's heartbeat and kernel state; a master that is
  stopped or silent for ``heartbeat_timeout`` is killed and handled as lost. While
  the master's last message is that recent (or it is starting, within
  ``start_timeout``), it tells the session with an ``Alive`` event every tick; if
  this backend itself ever falls silent (a dead reader thread), the session's
  wait at shutdown ends ``heartbeat_timeout`` later instead of never.

On master loss the attempts the master had *started* are reported ``Lost``
(RUNTIME_LOST, with the master's exit status and stderr); attempts it had
not started are simply sent again to the replacement master. After
``max_master_restarts`` losses, or when a master dies before it finished
starting, the backend emits ``Fatal`` and every unfinished task fails.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ...core import ledger as L
from ...core.ledger import describe_exit
from ...errors import InvalidTask
from ...runtime.preflight import client_versions
from ...runtime.procs import exited_within, proc_sample
from ...wire import messages as _wire
from ...wire.messages import Channel, RunAttempt
from .._driver import Driver, carry_out
from .._links import check_links
from ..base import Alive, BackendEvent, MasterReport, Sink

_STDERR_TAIL = 16384
_QUIET = 0.0002  # a submit this long after the previous one is written at once (see submit)


def _package_root() -> str:
    import pilotfish

    return str(Path(pilotfish.__file__).resolve().parent.parent)


class _Step:
    """The client side's hooks for its ledger's commands (:func:`.._driver.carry_out`).
    That ledger mirrors what the master has, for one rule: on master loss, started
    attempts are lost and the others go to the next master (``resend``)."""

    __slots__ = ("events", "resend")

    def __init__(self, events: list[BackendEvent]) -> None:
        self.events = events
        self.resend: tuple[RunAttempt, ...] = ()

    def report(self, msg: L.Started | L.Lost) -> None:
        self.events.append(msg)

    def send(self, items: tuple[Any, ...], resend: bool) -> None:
        self.resend += tuple(items)  # never started: to the next master, unblamed

    def withdraw(self, worker: str, attempt: int) -> None:
        pass  # the master withdraws it: cancel() sends it a CancelAttempt for every id

    def kill_groups(self, worker: str, pgids: tuple[int, ...]) -> None:
        pass  # never asked: the master watches its workers' program groups

    def expire(
        self, worker: str, attempt: int, pid: int, pgids: tuple[int, ...], key: str = ""
    ) -> None:
        pass  # never asked: the master enforces timeouts (no TimePassed here)


class LocalBackend:
    name = "local"
    drains_by_default = False  # one host: a worker that keeps failing is the task's doing

    def __init__(
        self,
        workers: int | None = None,
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_master_restarts: int = 3,
        rundir: str = ".pilotfish",
        python: str | None = None,
        worker_python: str | None = None,
        prefetch: int = 2,
        start_timeout: float = 60.0,
        max_tasks_per_child: int | None = None,
        preload: Iterable[str] = (),
        links: bool = True,
    ) -> None:
        #: chains go to the master linked (see :mod:`pilotfish.backends.base`): a task
        #: whose inputs still run waits at the master, which puts their values in place
        #: as they arrive from the workers; ``links=False``: sent once they are DONE
        self.links = check_links("local", links)
        self.preload = tuple(preload)
        if max_tasks_per_child is not None and (
            not isinstance(max_tasks_per_child, int)
            or isinstance(max_tasks_per_child, bool)
            or max_tasks_per_child < 1
        ):
            raise InvalidTask(
                f"Session(max_tasks_per_child={max_tasks_per_child!r}) is invalid: give an "
                "int >= 1 (each worker process is replaced by a fresh one after that many "
                "tasks), or None to keep workers for the whole session"
            )
        self.max_tasks_per_child = max_tasks_per_child
        self.workers = workers or os.cpu_count() or 1
        self.hb_interval = heartbeat_interval
        self.hb_timeout = heartbeat_timeout
        self.max_restarts = max_master_restarts
        self.rundir = rundir
        self.python = python or sys.executable
        self.worker_python = worker_python or self.python
        self.prefetch = prefetch
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._outbox: list[Any] = []
        # what the master has: queued there, or started (the ledger's rule on master loss)
        self._ledger = L.Ledger()
        self._resend: tuple[RunAttempt, ...] = ()  # unstarted, for the next master
        self._sink: Sink | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._ch: Channel | None = None
        self._gen = 0
        # owned threads (a crash is one Fatal), the restart budget, dead or not
        self._driver = Driver("local", max_master_restarts)
        self._driver.sink = self._emit_crash
        self._ready = False
        self._last_msg = 0.0
        self._last_submit = 0.0
        self._sending = False  # a frame is being written (by submit() or the writer)
        self._stopping = False
        self._said_goodbye = False
        self._tail: collections.deque[bytes] = collections.deque()
        self._worker_pids: dict[int, str] = {}  # pid -> worker name
        self._stop_event = self._driver.stopping
        self._ready_event = threading.Event()

    # ------------------------------------------------------------------ protocol
    def start(self, sink: Sink) -> None:
        self._sink = sink
        self._launch()
        self._driver.nursery.start("pilotfish-writer", self._writer)
        self._driver.nursery.start("pilotfish-monitor", self._monitor)

    def submit(self, attempts: Sequence[RunAttempt]) -> None:
        """Queue ``attempts`` for the master. An attempt submitted alone (none in the last
        ``_QUIET`` seconds, nothing queued or being written) is written here and now: no
        hand-off to the writer thread on the way of a single task's round trip; in a burst
        the writer thread sends what piled up in one message."""
        with self._lock:
            entries = tuple((a.attempt, a.key, a, a.timeout) for a in attempts)
            self._ledger.handle(L.Enqueue(entries))
            now = time.monotonic()
            quiet = now - self._last_submit > _QUIET
            self._last_submit = now
            ch = self._ch
            if not quiet or self._outbox or self._sending or ch is None or self._stopping:
                self._outbox.extend(attempts)
                self._wake.notify()
                return
            self._sending = True
        self._write(ch, attempts)

    def _write(self, ch: Channel, msgs: Sequence[Any]) -> None:
        """Write one frame; the caller set ``_sending`` (so frames go out in order), and it
        is cleared here for the next writer, submit() or the writer thread."""
        try:
            ch.send(msgs)
        except OSError:
            pass  # master gone: _master_gone resends what it had not started
        finally:
            with self._lock:
                self._sending = False
                if self._outbox:
                    self._wake.notify()

    def cancel(self, attempts: Sequence[int]) -> None:
        with self._lock:
            # not resent if the master dies; the master withdraws it
            carry_out(self._ledger.handle(L.Revoke(tuple(attempts))), _Step([]))
            self._outbox.extend(_wire.CancelAttempt(a) for a in attempts)
            self._wake.notify()

    def drain(self, name: str, kind: str = "worker", why: str = "") -> None:
        """The session drained worker ``name`` (see :mod:`pilotfish.core.drain`): the
        master gives it no more work and replaces it; never blocks. A host is never
        drained here (one machine is the last host)."""
        if kind != "worker":
            return
        with self._lock:
            self._outbox.append(_wire.DrainWorker(name, why or "drained"))
            self._wake.notify()

    def processes(self) -> dict[str, Any]:
        self._ready_event.wait(self.start_timeout)
        with self._lock:
            pid = self._popen.pid if self._popen and self._popen.poll() is None else None
            return {"master": pid, "workers": sorted(self._worker_pids)}

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            popen, ch = self._popen, self._ch
            self._wake.notify_all()
        self._stop_event.set()
        if popen is not None and ch is not None and popen.poll() is None:
            with contextlib.suppress(OSError):
                ch.send([_wire.Shutdown("session closed")])
            try:
                gone = exited_within(popen.pid, timeout)  # at once; popen.wait() polls
                popen.wait(timeout if gone is None else 5.0 if gone else 0.0)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        self._kill_leftover_workers()
        self._driver.nursery.stop(timeout)
        if ch is not None:
            ch.close()

    # ------------------------------------------------------------------ master life
    def _launch(self) -> None:
        ch, child_fd = Channel.pair()
        env = dict(os.environ)
        root = _package_root()
        env["PYTHONPATH"] = os.pathsep.join(
            [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        cfg = _wire.Config(
            sys_path=list(sys.path),
            cwd=os.getcwd(),
            workers=self.workers,
            heartbeat_interval=self.hb_interval,
            heartbeat_timeout=self.hb_timeout,
            worker_python=self.worker_python,
            rundir=str(Path(self.rundir).resolve()),
            prefetch=self.prefetch,
            versions=client_versions(),
            preload=self.preload,
            links=self.links,
        )
        try:
            argv = [self.python, "-m", "pilotfish.backends.local.master", str(child_fd)]
            if self.max_tasks_per_child is not None:
                argv.append(str(self.max_tasks_per_child))
            popen = subprocess.Popen(
                argv,
                pass_fds=(child_fd,),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            os.close(child_fd)
            ch.close()
            self._emit([self._driver.fatal(f"cannot start the master ({self.python}): {e}")])
            return
        os.close(child_fd)
        with contextlib.suppress(OSError):
            ch.send([cfg])
        with self._lock:
            self._gen += 1
            gen = self._gen
            self._popen, self._ch = popen, ch
            self._ready = False
            self._said_goodbye = False
            self._last_msg = time.monotonic()
            self._tail = collections.deque()
            self._worker_pids = {}
            # attempts the previous master never started go to this one unblamed
            self._outbox = [m for m in self._outbox if not isinstance(m, RunAttempt)]
            self._outbox[:0] = self._resend
            self._resend = ()
            self._wake.notify()
        err = self._driver.nursery.start("pilotfish-stderr", self._stderr, popen, self._tail)
        self._driver.nursery.start("pilotfish-reader", self._reader, gen, popen, ch, err)

    def _emit(self, events: Sequence[BackendEvent]) -> None:
        if self._sink is not None and events:
            self._sink(events)

    def _emit_crash(self, events: Sequence[BackendEvent]) -> None:
        """The driver's sink: a thread's crash (its ``Fatal``), sent as every event is."""
        self._emit(events)

    def _reader(
        self, gen: int, popen: subprocess.Popen[bytes], ch: Channel, err: threading.Thread
    ) -> None:
        try:
            while True:
                msgs = ch.recv()
                events: list[BackendEvent] = []
                with self._lock:
                    self._last_msg = time.monotonic()
                    for m in msgs:
                        if isinstance(m, _wire.Result | _wire.Lost):
                            e = self._ledger.get(m.attempt)
                            if e is not None:  # the master fenced it; mirror its end
                                self._ledger.handle(L.Finish(e.worker, m.attempt))
                            events.append(m)
                        elif isinstance(m, _wire.Started):
                            self._ledger.handle(L.Start(m.worker, m.attempt, m.pid, m.host, m.time))
                            events.append(m)
                        elif isinstance(m, _wire.Unlinked):  # never ran: the master let go
                            self._ledger.handle(L.Revoke((m.attempt,)))
                            events.append(m)
                        elif isinstance(m, _wire.Heartbeat):
                            pass
                        elif isinstance(m, _wire.WorkerReport):
                            if m.kind == "started":
                                self._worker_pids[m.pid] = m.worker
                            elif m.kind in ("lost", "stopped", "start_failed"):
                                self._worker_pids.pop(m.pid, None)
                            events.append(m)
                        elif isinstance(m, _wire.Hello):
                            self._ready = True
                            self._ready_event.set()
                            for pid in m.workers:
                                self._worker_pids.setdefault(pid, "")
                            restarted = self._driver.budget.used > 0
                            events.append(
                                MasterReport(
                                    "restarted" if restarted else "started", m.pid, time.time()
                                )
                            )
                        elif isinstance(m, _wire.Goodbye):
                            self._said_goodbye = True
                        elif isinstance(m, _wire.Fatal):
                            self._driver.fatal(m.message, m.category)
                            events.append(m)
                self._emit(events)
        except (EOFError, OSError):
            pass
        ch.close()  # this master's channel is done with (stop() may close it too)
        self._master_gone(gen, popen, err)  # if it fails, the nursery's Fatal says so

    def _stderr(self, popen: subprocess.Popen[bytes], tail: collections.deque[bytes]) -> None:
        assert popen.stderr is not None
        fd = popen.stderr.fileno()
        size = 0
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            tail.append(data)
            size += len(data)
            while size > _STDERR_TAIL and len(tail) > 1:
                size -= len(tail.popleft())
            with contextlib.suppress(Exception):
                sys.stderr.write(data.decode("utf-8", errors="replace"))
                sys.stderr.flush()
        with contextlib.suppress(OSError):
            popen.stderr.close()

    def _stderr_tail(self, tail: collections.deque[bytes], lines: int = 20) -> str:
        text = b"".join(tail).decode("utf-8", errors="replace")
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def _master_gone(self, gen: int, popen: subprocess.Popen[bytes], err: threading.Thread) -> None:
        try:
            rc = popen.wait(5)
        except subprocess.TimeoutExpired:
            popen.kill()
            rc = popen.wait()
        self._kill_leftover_workers()
        err.join(1.0)  # let the stderr thread read the master's last words
        with self._lock:
            if gen != self._gen:
                return
            if self._stopping or self._said_goodbye:
                return
            tail = self._stderr_tail(self._tail)
            was_ready = self._ready
            how, sig = describe_exit(rc)
            now = time.time()
            what = f"the pilotfish master (pid {popen.pid}) {how}"
            if not was_ready:
                what += " before it finished starting"
            # started attempts are lost with it; the others go to the next master unblamed
            events: list[BackendEvent] = [MasterReport("lost", popen.pid, now, rc, sig, tail, what)]
            step = _Step(events)
            carry_out(
                self._ledger.handle(L.RuntimeLost(what, now, "master", popen.pid, rc, sig, tail)),
                step,
            )
            can_restart = was_ready and not self._driver.dead and self._driver.budget.take()
            if can_restart:
                self._resend = step.resend
        detail = f"; last lines of its stderr:\n{tail}" if tail else " (its stderr was empty)"
        if can_restart:
            self._emit(events)
            self._launch()
            return
        if was_ready:
            why = f"{what}; {self._driver.budget.spent('start another master')}"
        else:
            why = f"{what}; the master cannot be started"
        with self._lock:
            events.append(self._driver.fatal(why + detail))
        self._ready_event.set()
        self._emit(events)

    def _kill_leftover_workers(self) -> None:
        """Workers die with their master (PDEATHSIG); this is the belt to those braces."""
        with self._lock:
            pids = list(self._worker_pids)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)

    # ------------------------------------------------------------------ threads
    def _writer(self) -> None:
        while True:
            with self._lock:
                while (not self._outbox or self._sending) and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                msgs, self._outbox = self._outbox, []
                ch = self._ch
                self._sending = ch is not None  # submit() writes nothing meanwhile: in order
            if ch is not None:
                self._write(ch, msgs)

    def _monitor(self) -> None:
        stopped_since: float | None = None
        gone_since: float | None = None
        while not self._stop_event.wait(self.hb_interval / 2):
            with self._lock:
                if self._stopping:
                    return
                popen, last, ready = self._popen, self._last_msg, self._ready
                dead = self._driver.dead
            now = time.monotonic()
            if popen is None or popen.poll() is not None:
                # the reader is handling the master's exit (its events follow within a
                # second or so); vouch for that, but not forever
                gone_since = gone_since or now
                if not dead and now - gone_since <= self.hb_timeout:
                    self._emit([Alive(time.time())])
                continue
            gone_since = None
            sample = proc_sample(popen.pid)
            stopped_since = stopped_since or now if sample and sample[0] in ("T", "t") else None
            limit = self.hb_timeout if ready else self.start_timeout
            if now - last <= limit:
                # the master answers (or this monitor is about to handle it): we are working
                self._emit([Alive(time.time())])
            if (stopped_since is not None and now - stopped_since >= self.hb_interval) or (
                now - last > limit
            ):
                with contextlib.suppress(OSError):
                    print(
                        f"pilotfish: master (pid {popen.pid}) stopped answering "
                        f"(no message for {now - last:.1f} s); killing it",
                        file=sys.stderr,
                    )
                    popen.kill()
                stopped_since = None
