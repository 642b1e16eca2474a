"""Where a no-op task's microseconds go: each piece of pilotfish's local path timed
alone, in one process, so the numbers add up and nothing waits on anything else.

    python benchmarks/profile_noop.py            # 20,000 tasks per piece, medians of 5

Pieces (per task):

* client submit: ``Session.submit(noop)`` up to the backend's ``submit`` (a backend
  that only collects the attempts): key derivation, pickling, the core's transitions,
  the journal's queued row;
* client result: the backend's ``Result`` for each attempt, from the session's event
  sink to a resolved future (value unpickled, core transitions, journal row queued);
* journal flush: writing the queued rows (the writer thread's work);
* master dispatch: the local master's dispatcher (submit, assign, start, result) for
  one attempt, without pipes;
* worker execute: ``run_attempt`` for a no-op (unpickle the call, run it, pickle the
  result);
* pipe: the ``Channel`` messages of one attempt through a socket pair (client ->
  master -> worker -> master -> client is four of these), pickling included.

The sum is the CPU time one no-op costs end to end; the processes run in parallel, so
throughput is bounded by the busiest one (the client: submit + result + journal).
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tasks import noop

import pilotfish
from pilotfish.backends.base import Result, RunAttempt, Sink
from pilotfish.backends.local.dispatch import (
    Boot,
    Dispatcher,
    HelloFrom,
    ResultFrom,
    SubmitAttempts,
)
from pilotfish.runtime.execute import run_attempt
from pilotfish.wire import messages as _wire

N = 20_000
REPEAT = 5


class Collect:
    """A backend that keeps what it is given and runs nothing."""

    name = "collect"

    def __init__(self) -> None:
        self.sink: Sink | None = None
        self.attempts: list[RunAttempt] = []

    def start(self, sink: Sink) -> None:
        self.sink = sink

    def submit(self, attempts: Sequence[RunAttempt]) -> None:
        self.attempts.extend(attempts)

    def cancel(self, attempts: Sequence[int]) -> None:
        pass

    def stop(self, timeout: float = 10.0) -> None:
        pass

    def processes(self) -> dict[str, Any]:
        return {}


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) / N * 1e6


def client(journal: bool) -> dict[str, list[float]]:
    tag = "" if journal else ", no journal"
    out: dict[str, list[float]] = {f"client submit{tag}": [], f"client result{tag}": []}
    if journal:
        out["journal write"] = []
    value = _wire.dumps_value(None)
    for _ in range(REPEAT):
        with tempfile.TemporaryDirectory() as tmp:
            b = Collect()
            s = pilotfish.Session(backend=b, rundir=tmp, journal=journal)  # type: ignore[arg-type]
            fs: list[Any] = []
            out[f"client submit{tag}"].append(
                timed(lambda: fs.extend(s.submit(noop) for _ in range(N)))  # noqa: B023
            )
            results = [Result(a.attempt, True, value, "w1", 1, 0.0, 0.0, "h") for a in b.attempts]
            assert b.sink is not None
            sink = b.sink
            out[f"client result{tag}"].append(timed(lambda: [sink([r]) for r in results]))  # noqa: B023
            assert all(f.done() for f in fs)
            # the journal's writer thread flushes every 0.5 s; shutdown writes what is left
            if journal:
                out["journal write"].append(timed(s.shutdown))
            else:
                s.shutdown()
    return out


def master() -> list[float]:
    out = []
    value = _wire.dumps_value(None)
    for _ in range(REPEAT):
        d = Dispatcher(2)
        d.handle(Boot(0.0))
        d.handle(HelloFrom("w1", 101, 0.0))
        d.handle(HelloFrom("w2", 102, 0.0))
        atts = [RunAttempt(i, f"k{i}", "call", b"", (), None) for i in range(1, N + 1)]

        def run(d: Dispatcher = d, atts: list[RunAttempt] = atts) -> None:
            d.handle(SubmitAttempts(atts, 0.0))
            for a in atts:
                w = "w1" if a.attempt % 2 else "w2"
                r = Result(a.attempt, True, value, w, 1, 0.0, 0.0, "h")
                d.handle(ResultFrom(w, r, 0.0))

        out.append(timed(run))
    return out


def worker() -> list[float]:
    payload, _ = _wire.dumps_call((noop, (), {}), lambda x: None), None
    m = RunAttempt(1, "k", "call", payload, (), None)
    out = []
    for _ in range(REPEAT):
        out.append(
            timed(lambda: [run_attempt(m, worker="w1", host="h", rundir="/tmp") for _ in range(N)])
        )
    return out


def pipe() -> list[float]:
    a, b = socket.socketpair()
    ca, cb = _wire.Channel(a), _wire.Channel(b)
    payload = _wire.dumps_call((noop, (), {}), lambda x: None)
    m = RunAttempt(1, "k", "call", payload, (), None)
    out = []
    for _ in range(REPEAT):
        done = threading.Event()

        def reader(done: threading.Event = done) -> None:
            n = 0
            while n < N:
                n += len(cb.recv())
            done.set()

        t = threading.Thread(target=reader)
        t.start()
        out.append(timed(lambda: [ca.send([m]) for _ in range(N)]))
        done.wait()
        t.join()
    a.close()
    b.close()
    return out


def main() -> int:
    rows: dict[str, list[float]] = {}
    rows.update(client(journal=False))
    rows.update(client(journal=True))
    rows["master dispatch"] = master()
    rows["worker execute"] = worker()
    rows["pipe, one message"] = pipe()
    print(
        f"pilotfish {pilotfish.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; {N:,} tasks per piece, median of {REPEAT}"
    )
    print(f"{'piece':<22} {'us/task':>8}")
    for name, vals in rows.items():
        print(f"{name:<22} {statistics.median(vals):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
