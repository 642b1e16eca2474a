"""Ends what a RADICAL-Pilot backend started when its client dies without stopping it.

RADICAL-Pilot keeps its agent, bridges, master and workers alive for the session's
heartbeat timeout (600 s) after the client is gone (``kill -9``, out of memory, a
crashed interpreter), each one holding cores of the allocation. The backend starts
this watcher (``python -m pilotfish.backends.radical.reaper CLIENT_PID``) in a session
of its own, so a Ctrl-C in the terminal does not reach it, and tells it on stdin what
to end:

* ``token T``: every process whose environment has ``PILOTFISH_RP_TOKEN=T`` (the
  backend sets it while it starts its own RP session and pilot, so every RP process
  of that session inherits it);
* ``pid P CREATE_TIME``: one process (the raptor master and workers on a pilot that
  is not the backend's own), and its children;
* ``done``: the client stopped the backend itself: one last sweep, then exit.

It polls the client every 0.2 s (a pipe's end-of-file is no signal here: RP forks
client-side processes that inherit the pipe). RP also forks helpers from the client
without exec (its proxy worker): they keep the client's command line and the
environment the client was started with, so the token does not show in them; the
watcher notes the client's descendants with the client's own command line every
second. When the client is gone, all of these are sent SIGTERM, then SIGKILL after a
second; at ``done`` only the token's processes and the pids (the client may have forked
children of its own that must live on).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import psutil

from pilotfish._procs import alive, end_processes, with_env

TOKEN_VAR = "PILOTFISH_RP_TOKEN"


class _Orders:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: set[str] = set()
        self.pids: dict[int, float] = {}
        self.done = threading.Event()

    def read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            parts = str(line).split()
            with self.lock:
                if parts[:1] == ["token"] and len(parts) == 2:
                    self.tokens.add(parts[1])
                elif parts[:1] == ["pid"] and len(parts) == 3:
                    with contextlib.suppress(ValueError):
                        self.pids[int(parts[1])] = float(parts[2])
                elif parts == ["done"]:
                    break
        self.done.set()  # "done", or the client closed the pipe


def _targets(orders: _Orders) -> list[psutil.Process]:
    me = os.getpid()
    with orders.lock:
        tokens, pids = set(orders.tokens), dict(orders.pids)
    found: dict[int, psutil.Process] = {}
    for pid, created in pids.items():
        p = alive(pid, created)
        if p is not None:
            found[pid] = p
            with contextlib.suppress(psutil.Error):
                for c in p.children(recursive=True):
                    found[c.pid] = c
    if tokens:
        for p in with_env(TOKEN_VAR, tokens):
            found.setdefault(p.pid, p)
    return [p for p in found.values() if p.pid != me]


def _forked(client: psutil.Process) -> dict[int, float]:
    """The client's descendants that were forked without exec (same command line)."""
    out = {}
    with contextlib.suppress(psutil.Error):
        cmd = client.cmdline()
        for c in client.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if c.cmdline() == cmd:
                    out[c.pid] = c.create_time()
    return out


def sweep(orders: _Orders) -> int:
    procs = _targets(orders)
    end_processes(procs)
    return len(procs)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = psutil.Process(int(argv[0]))
    created = client.create_time()
    orders = _Orders()
    threading.Thread(target=orders.read, args=(sys.stdin,), daemon=True).start()
    forked: dict[int, float] = {}
    last = 0.0
    while not orders.done.wait(0.2):
        if time.monotonic() - last > 1.0:
            forked, last = _forked(client) or forked, time.monotonic()
        if alive(client.pid, created) is None:
            time.sleep(0.2)  # let the last orders in the pipe arrive
            with orders.lock:
                orders.pids.update(forked)
            n = sweep(orders)
            print(f"pilotfish reaper: client {argv[0]} died; ended {n} processes", file=sys.stderr)
            return 0
    sweep(orders)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
