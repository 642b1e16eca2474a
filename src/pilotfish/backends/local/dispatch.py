"""The master's dispatcher: a pure state machine (events in, commands out).

It knows which attempt each worker holds, in order, and nothing else does
I/O here: the master's runner (``master.py``) feeds it what the OS and the
sockets say and executes the commands it returns. Tested without processes
in ``tests/test_dispatch.py``.

Worker slots hold up to ``prefetch`` attempts; a worker runs them in order, so
the first one held is the one running (``since`` is when it started). When a
worker dies, its results still in the socket are drained first; then only
the first held attempt is blamed (``Lost``), and the others, which never
started, are queued again without blame.

Hung workers (the design the heartbeat needs). A heartbeat thread in the
worker is starved when user code holds the GIL in a long C call
(``sum(range(10**10))``), so a silent heartbeat alone would kill healthy
workers. The runner therefore also samples each worker from the kernel
(``/proc/PID/stat``: scheduler state and CPU time), which user code cannot
starve. A worker is declared hung when

* the kernel says it is stopped (``T``/``t``: SIGSTOP, a debugger) at two
  samples ``heartbeat_interval`` apart, or
* it sent no heartbeat *and* used no CPU for ``heartbeat_timeout`` seconds
  (blocked, e.g. deadlocked in native code while holding the GIL).

A worker silent but burning CPU is busy, not hung: the per-task ``timeout``
is the tool for runaway work. If the master itself was suspended (its ticks
stopped), the clocks are reset rather than blaming the workers.
"""

from __future__ import annotations

import dataclasses
import signal as _signal
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

from ..._wire import CancelAttempt, Lost, Result, RunAttempt, Started, WorkerEvent

# --------------------------------------------------------------------------- commands


class Spawn(NamedTuple):
    name: str


class SendWorker(NamedTuple):
    name: str
    msgs: list[Any]


class Kill(NamedTuple):
    """SIGKILL the worker and the process groups of programs it started."""

    name: str
    pgids: tuple[int, ...]


class ToClient(NamedTuple):
    msg: Any


Cmd = Spawn | SendWorker | Kill | ToClient


def describe_exit(returncode: int | None) -> tuple[str, str | None]:
    """('killed by signal SIGKILL (-9)', 'SIGKILL') or ('exited with code 3', None)."""
    if returncode is None:
        return "vanished (exit status unknown)", None
    if returncode < 0:
        try:
            name = _signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by signal {name} ({returncode})", name
    return f"exited with code {returncode}", None


@dataclasses.dataclass(slots=True)
class Slot:
    name: str
    spawned: float
    state: str = "starting"  # starting | ready | lost | stopping
    pid: int = 0
    held: list[int] = dataclasses.field(default_factory=list)
    since: float = 0.0  # when held[0] started
    last_hb: float = 0.0
    cpu: float = -1.0
    cpu_at: float = 0.0
    stopped_since: float | None = None
    pgids: dict[int, int] = dataclasses.field(default_factory=dict)


class Dispatcher:
    def __init__(
        self,
        workers: int,
        *,
        prefetch: int = 2,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_start_failures: int = 3,
        start_timeout: float = 60.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.n = workers
        self.prefetch = max(1, prefetch)
        self.hb_interval = heartbeat_interval
        self.hb_timeout = heartbeat_timeout
        self.max_start_failures = max_start_failures
        self.start_timeout = start_timeout
        self.slots: dict[str, Slot] = {}
        self.queue: deque[RunAttempt] = deque()
        self.attempts: dict[int, RunAttempt] = {}  # queued or held
        self.cancelled: set[int] = set()
        self.start_failures = 0
        self.stopping = False
        self.fatal = False
        self._seq = 0
        self._last_tick: float | None = None

    # ------------------------------------------------------------------ helpers
    def _new_slot(self, now: float) -> Spawn:
        self._seq += 1
        name = f"w{self._seq}"
        self.slots[name] = Slot(name, now, last_hb=now, cpu_at=now)
        return Spawn(name)

    def start(self, now: float) -> list[Cmd]:
        return [self._new_slot(now) for _ in range(self.n)]

    def live(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.state in ("starting", "ready")]

    def _assign(self, now: float, out: list[Cmd]) -> None:
        ready = [s for s in self.slots.values() if s.state == "ready"]
        if not ready or not self.queue:
            return
        batches: dict[str, list[Any]] = {}
        while self.queue:
            s = min(ready, key=lambda x: len(x.held))
            if len(s.held) >= self.prefetch:
                break
            a = self.queue.popleft()
            if a.attempt in self.cancelled:
                self.cancelled.discard(a.attempt)
                self.attempts.pop(a.attempt, None)
                continue
            s.held.append(a.attempt)
            batches.setdefault(s.name, []).append(a)
            if len(s.held) == 1:
                self._begin(s, now, out)
        for name, msgs in batches.items():
            out.append(SendWorker(name, msgs))

    def _begin(self, s: Slot, now: float, out: list[Cmd]) -> None:
        s.since = now
        out.append(ToClient(Started(s.held[0], s.name, s.pid, now)))

    # ------------------------------------------------------------------ events
    def submit(self, attempts: Iterable[RunAttempt], now: float) -> list[Cmd]:
        out: list[Cmd] = []
        for a in attempts:
            self.attempts[a.attempt] = a
            self.queue.append(a)
        self._assign(now, out)
        return out

    def cancel(self, ids: Iterable[int], now: float) -> list[Cmd]:
        """Withdraw attempts not yet started; a started one runs on (its result is fenced)."""
        out: list[Cmd] = []
        for aid in ids:
            if aid not in self.attempts:
                continue
            # remembered in every case: a worker that dies before answering Withdrawn
            # must not have the cancelled attempt requeued (_lose drops it)
            for s in self.slots.values():
                if s.held and s.held[0] == aid:
                    break  # started: it runs on, its result is fenced by the client
                if aid in s.held[1:]:
                    self.cancelled.add(aid)
                    out.append(SendWorker(s.name, [CancelAttempt(aid)]))
                    break
            else:
                self.cancelled.add(aid)
        return out

    def on_hello(self, name: str, pid: int, now: float) -> list[Cmd]:
        s = self.slots[name]
        out: list[Cmd] = []
        if s.state != "starting":
            return out
        s.state, s.pid, s.last_hb, s.cpu_at = "ready", pid, now, now
        self.start_failures = 0
        out.append(ToClient(WorkerEvent("started", name, pid, now)))
        self._assign(now, out)
        return out

    def on_preflight_failed(self, name: str, problems: tuple[str, ...], now: float) -> list[Cmd]:
        """The worker's environment cannot run anything: fail everything, clearly, at once
        (all local workers share one environment, so starting more would not help)."""
        s = self.slots[name]
        s.state = "stopping"
        self.fatal = True
        lines = "\n".join(f"  - {p}" for p in problems)
        return [
            ToClient(WorkerEvent("start_failed", name, s.pid, now, message="pre-flight failed")),
            ToClient(_fatal("environment", f"pre-flight checks failed on worker {name}:\n{lines}")),
        ]

    def on_heartbeat(self, name: str, now: float) -> None:
        s = self.slots.get(name)
        if s is not None:
            s.last_hb = now

    def on_command_group(self, name: str, attempt: int, pgid: int) -> None:
        s = self.slots.get(name)
        if s is not None and attempt in s.held:
            s.pgids[attempt] = pgid

    def _finish(self, s: Slot, attempt: int, now: float, out: list[Cmd]) -> bool:
        if attempt not in s.held:
            return False
        first = s.held[0] == attempt
        s.held.remove(attempt)
        s.pgids.pop(attempt, None)
        self.attempts.pop(attempt, None)
        self.cancelled.discard(attempt)
        if first and s.held:
            self._begin(s, now, out)
        return True

    def on_result(self, name: str, res: Result, now: float) -> list[Cmd]:
        out: list[Cmd] = []
        s = self.slots[name]
        s.last_hb = now
        if self._finish(s, res.attempt, now, out) or s.state == "lost":
            # a result from a worker already declared lost is still forwarded: the
            # client's fencing decides (it was reported lost, so it will be dropped)
            out.insert(0, ToClient(res))
        self._assign(now, out)
        return out

    def on_withdrawn(self, name: str, attempt: int, now: float) -> list[Cmd]:
        out: list[Cmd] = []
        self._finish(self.slots[name], attempt, now, out)
        self._assign(now, out)
        return out

    def on_exit(
        self, name: str, returncode: int | None, stderr_tail: str, now: float, goodbye: bool
    ) -> list[Cmd]:
        """The OS says the worker process is gone (its socket already drained)."""
        s = self.slots[name]
        out: list[Cmd] = []
        if s.state == "lost":  # we killed it and already reported it
            s.state = "dead"
            return out
        if goodbye or s.state == "stopping":
            s.state = "dead"
            out.append(ToClient(WorkerEvent("stopped", name, s.pid, now, returncode)))
            return out
        how, sig = describe_exit(returncode)
        if s.state == "starting":
            s.state = "dead"
            self.start_failures += 1
            msg = (
                f"worker {name} {how} before it finished starting "
                f"(start failure {self.start_failures} of {self.max_start_failures})"
            )
            out.append(
                ToClient(WorkerEvent("start_failed", name, s.pid, now, returncode, sig, (), msg))
            )
            if self.start_failures >= self.max_start_failures:
                self.fatal = True
                out.append(
                    ToClient(
                        _fatal(
                            "environment",
                            f"no worker could start: {self.start_failures} consecutive "
                            f"start-up failures; the last one {how}. Its stderr:\n"
                            f"{stderr_tail or '(empty)'}",
                        )
                    )
                )
                return out
            if not self.stopping:
                out.append(self._new_slot(now))
            return out
        self._lose(
            s,
            now,
            "worker_lost",
            f"worker {name} (pid {s.pid}) {how}",
            out,
            returncode=returncode,
            sig=sig,
            stderr_tail=stderr_tail,
        )
        return out

    def _lose(
        self,
        s: Slot,
        now: float,
        category: str,
        why: str,
        out: list[Cmd],
        *,
        returncode: int | None = None,
        sig: str | None = None,
        stderr_tail: str = "",
    ) -> None:
        """Report exactly the attempt the worker was running; requeue the rest unblamed."""
        held = tuple(s.held)
        if s.pgids:  # programs it started must not outlive it
            out.append(Kill(s.name, tuple(s.pgids.values())))
            s.pgids.clear()
        s.state = "lost"
        out.append(
            ToClient(WorkerEvent("lost", s.name, s.pid, now, returncode, sig, held[:1], why))
        )
        if held:
            running = held[0]
            a = self.attempts.pop(running)
            elapsed = now - s.since
            if category == "worker_lost":
                msg = (
                    f"{why} while running task {a.key!r} (attempt id {running}, "
                    f"after {elapsed:.2f} s)"
                )
            else:
                msg = why
            if stderr_tail and category == "worker_lost":
                msg += f"; last lines of its stderr:\n{stderr_tail}"
            out.append(
                ToClient(
                    Lost(
                        running,
                        category,
                        msg,
                        s.name,
                        s.pid,
                        returncode,
                        sig,
                        stderr_tail,
                        s.since,
                        now,
                    )
                )
            )
            for aid in reversed(held[1:]):
                if aid in self.cancelled:
                    self.cancelled.discard(aid)
                    self.attempts.pop(aid, None)
                else:
                    self.queue.appendleft(self.attempts[aid])
        s.held.clear()
        if not self.stopping and not self.fatal:
            new = self._new_slot(now)
            out.append(new)
            out.append(
                ToClient(WorkerEvent("replaced", new.name, 0, now, message=f"replaces {s.name}"))
            )
        self._assign(now, out)

    def _kill(self, s: Slot, out: list[Cmd]) -> None:
        out.append(Kill(s.name, tuple(s.pgids.values())))
        s.pgids.clear()

    # ------------------------------------------------------------------ time
    def next_deadline(self) -> float | None:
        best: float | None = None
        for s in self.slots.values():
            if s.state == "ready" and s.held:
                t = self.attempts[s.held[0]].timeout
                if t is not None:
                    d = s.since + t
                    best = d if best is None else min(best, d)
        return best

    def tick(
        self, now: float, samples: dict[str, tuple[str, float]], stderr_tails: dict[str, str]
    ) -> list[Cmd]:
        """Timeouts and hang checks. ``samples``: worker -> (kernel state, CPU seconds)."""
        out: list[Cmd] = []
        if self._last_tick is not None and now - self._last_tick > 3 * self.hb_interval + 1:
            for s in self.slots.values():  # we were suspended ourselves: nobody is to blame
                s.last_hb, s.cpu_at, s.stopped_since = now, now, None
        self._last_tick = now
        for s in list(self.slots.values()):
            if s.state == "starting" and s.pid and now - s.spawned > self.start_timeout:
                # hung while starting (an import stuck on a dead filesystem, say): kill it;
                # its exit is then counted as a start failure, so nothing waits forever
                out.append(Kill(s.name, ()))
                s.spawned = now  # one kill per timeout
                continue
            if s.state != "ready":
                continue
            if s.held:
                a = self.attempts[s.held[0]]
                if a.timeout is not None and now >= s.since + a.timeout:
                    self._kill(s, out)
                    self._lose(
                        s,
                        now,
                        "timeout",
                        f"task {a.key!r} exceeded its timeout of {a.timeout:g} s "
                        f"(ran {now - s.since:.2f} s); pilotfish stopped it by killing "
                        f"worker {s.name} (pid {s.pid}), which is replaced",
                        out,
                    )
                    continue
            sample = samples.get(s.name)
            if sample is None:
                continue
            st, cpu = sample
            if st in ("T", "t"):
                if s.stopped_since is None:
                    s.stopped_since = now
                elif now - s.stopped_since >= self.hb_interval:
                    self._hung(
                        s,
                        now,
                        f"is stopped (kernel state {st!r}: SIGSTOP or a "
                        f"debugger) for {now - s.stopped_since:.1f} s",
                        stderr_tails,
                        out,
                    )
                    continue
            else:
                s.stopped_since = None
            if cpu > s.cpu:
                s.cpu, s.cpu_at = cpu, now
            silent = now - s.last_hb
            if silent > self.hb_timeout and now - s.cpu_at > self.hb_timeout:
                self._hung(
                    s,
                    now,
                    f"sent no heartbeat and used no CPU for {silent:.1f} s "
                    f"(heartbeat_timeout={self.hb_timeout:g})",
                    stderr_tails,
                    out,
                )
        return out

    def _hung(self, s: Slot, now: float, why: str, tails: dict[str, str], out: list[Cmd]) -> None:
        self._kill(s, out)
        self._lose(
            s,
            now,
            "worker_lost",
            f"worker {s.name} (pid {s.pid}) {why}; declared hung and killed",
            out,
            sig="SIGKILL",
            stderr_tail=tails.get(s.name, ""),
        )

    def shutdown(self) -> list[Cmd]:
        from ..._wire import Shutdown

        self.stopping = True
        out: list[Cmd] = []
        for s in self.slots.values():
            if s.state in ("starting", "ready"):
                s.state = "stopping"
                out.append(SendWorker(s.name, [Shutdown("session closed")]))
        return out


def _fatal(category: str, message: str) -> Any:
    from ..._wire import Fatal

    return Fatal(category, message)
