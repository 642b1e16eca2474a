"""Ends what a RADICAL-Pilot backend started when its client dies without stopping it.

RADICAL-Pilot keeps its agent, bridges, master and workers alive for the session's
heartbeat timeout (600 s) after the client is gone (``kill -9``, out of memory, a
crashed interpreter), each one holding cores of the allocation. The backend starts
this watcher (``python -m pilotfish.backends.radical.reaper CLIENT_PID``) in a session
of its own, so a Ctrl-C in the terminal does not reach it, and tells it on stdin what
to end:

* ``session SID``: the backend's own RP session (told before any of its processes
  starts);
* ``token T``: every process whose environment has ``PILOTFISH_RP_TOKEN=T`` and that
  is of a told session (it, or an ancestor, has the session id in its working directory
  or command line). The backend puts the token in its environment only while
  ``rp.PilotManager()`` starts the component that launches the pilot, so the pilot's
  processes inherit it; another process the client started in that second inherits it
  too, but is of no RP session and is spared;
* ``pid P CREATE_TIME``: one process (the raptor master and workers), and its
  children, ended only while ``P`` is still the process created at ``CREATE_TIME`` (a
  recycled pid is another process);
* ``done``: the client stopped the backend itself: one last sweep, then exit.

It polls the client every 0.2 s (a pipe's end-of-file is no signal here: RP forks
client-side processes that inherit the pipe). RP also forks helpers from the client
without exec (its proxy worker): they keep the client's command line and the
environment the client was started with, so the token does not show in them; the
watcher notes the client's descendants with the client's own command line every
second.

RP's bridges and components (``rp.log_pubsub``, ``rp.agent_executing.0000``, ...) do not
show the token either: they set their process title over their environment
(``/proc/PID/environ``), and they are daemons (their parent is init). They end
themselves when the process that started them is gone, but with SIGTERM only when
``PYTEST_VERSION`` is set (radical.utils' ``PWatcher``), and the agent's executor catches
SIGTERM and runs on (``rp.agent_executing.0000`` was still there 50 s after its client
was terminated). So the watcher also ends every ``rp.*`` process whose working
directory is in a told session (the client's session directory or the pilot sandbox),
with its children.

When the client is gone, all of these are sent SIGTERM, then SIGKILL after a second,
and again while new ones show up (a master starts a replacement worker when one ends);
at ``done`` only the token's processes, the session's ``rp.*`` processes left by
``session.close()``, and the pids (the client may have forked children of its own that
must live on).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time

import psutil

from pilotfish.runtime.procs import alive, end_processes, in_places, same_processes, with_env

TOKEN_VAR = "PILOTFISH_RP_TOKEN"
_SESSION_ID = re.compile(r"rp\.session\.[^/\s]+")
_ROUNDS = 5  # sweeps after the client died, while each still finds something


class _Orders:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: set[str] = set()
        self.pids: dict[int, float] = {}
        self.sessions: set[str] = set()  # the backend's RP session ids
        self.done = threading.Event()

    def read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            parts = str(line).split()
            with self.lock:
                if parts[:1] == ["token"] and len(parts) == 2:
                    self.tokens.add(parts[1])
                elif parts[:1] == ["session"] and len(parts) == 2:
                    if _SESSION_ID.fullmatch(parts[1]):
                        self.sessions.add(parts[1])
                elif parts[:1] == ["pid"] and len(parts) == 3:
                    with contextlib.suppress(ValueError):
                        self.pids[int(parts[1])] = float(parts[2])
                elif parts == ["done"]:
                    break
        self.done.set()  # "done", or the client closed the pipe


def _targets(orders: _Orders) -> list[psutil.Process]:
    me = os.getpid()
    with orders.lock:
        tokens, pids, sids = set(orders.tokens), dict(orders.pids), set(orders.sessions)
    found = {p.pid: p for p in same_processes(pids)}
    if tokens and sids:
        for p in with_env(TOKEN_VAR, tokens):
            if p.pid not in found and in_places(p, sids):
                found[p.pid] = p
    for p in _session_daemons(orders):
        found.setdefault(p.pid, p)
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
    return [p for p in found.values() if p.pid != me]


def _session_daemons(orders: _Orders) -> list[psutil.Process]:
    """RP's ``rp.*`` processes (titles over their environment) of the told sessions."""
    with orders.lock:
        sids = set(orders.sessions)
    if not sids:
        return []
    out = []
    for p in psutil.process_iter(["cmdline", "cwd", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE or not p.info["cwd"]:
            continue
        title = " ".join(p.info["cmdline"] or []).strip()
        # the title check: a user's shell that happens to sit in a sandbox lives on
        if title.startswith("rp.") and sids & set(p.info["cwd"].split(os.sep)):
            out.append(p)
    return out


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


def sweep(orders: _Orders, rounds: int = 1) -> int:
    """End the targets; again (up to ``rounds`` times) while new ones show up."""
    n = 0
    for _ in range(rounds):
        procs = _targets(orders)
        if not procs:
            break
        end_processes(procs)
        n += len(procs)
    return n


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = psutil.Process(int(argv[0]))
    created = client.create_time()
    orders = _Orders()
    threading.Thread(target=orders.read, args=(sys.stdin,), daemon=True).start()
    forked: dict[int, float] = {}
    last = 0.0
    while not orders.done.wait(0.2):
        now = time.monotonic()
        if now - last > 1.0:
            forked, last = _forked(client) or forked, now
        if alive(client.pid, created) is None:
            time.sleep(0.2)  # let the last orders in the pipe arrive
            with orders.lock:
                orders.pids.update(forked)
            n = sweep(orders, _ROUNDS)
            print(f"pilotfish reaper: client {argv[0]} died; ended {n} processes", file=sys.stderr)
            return 0
    sweep(orders)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
