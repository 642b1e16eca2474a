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
second.

RP's bridges and components (``rp.log_pubsub``, ``rp.agent_executing.0000``, ...) do not
show the token either: they set their process title over their environment
(``/proc/PID/environ``), and they are daemons (their parent is init). They end
themselves when the process that started them is gone, but with SIGTERM only when
``PYTEST_VERSION`` is set (radical.utils' ``PWatcher``), and the agent's executor catches
SIGTERM and runs on (``rp.agent_executing.0000`` was still there 50 s after its client
was terminated). So the watcher learns the RP session ids of the token's processes
(the bootstrapper's command line, the sandboxes they run in) and also ends every
``rp.*`` process whose working directory is in one of those sessions (the client's
session directory or the pilot sandbox), with its children.

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

from pilotfish._procs import alive, end_processes, with_env

TOKEN_VAR = "PILOTFISH_RP_TOKEN"
_SESSION_ID = re.compile(r"\brp\.session\.[^/\s]+")
_ROUNDS = 5  # sweeps after the client died, while each still finds something


class _Orders:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: set[str] = set()
        self.pids: dict[int, float] = {}
        self.sessions: set[str] = set()  # RP session ids seen in the token's processes
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
    for p in _session_daemons(orders):
        found.setdefault(p.pid, p)
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
    return [p for p in found.values() if p.pid != me]


def learn_sessions(orders: _Orders) -> None:
    """Note the RP session ids the token's processes name (RP's bootstrapper has
    ``-s SID`` on its command line; agent, master and workers run in the pilot sandbox
    ``.../SID/pilot.0000``)."""
    with orders.lock:
        tokens = set(orders.tokens)
    if not tokens:
        return
    sids: set[str] = set()
    for p in with_env(TOKEN_VAR, tokens):
        with contextlib.suppress(psutil.Error):
            sids.update(_SESSION_ID.findall(" ".join([*p.cmdline(), p.cwd()])))
    with orders.lock:
        orders.sessions |= sids


def _session_daemons(orders: _Orders) -> list[psutil.Process]:
    """RP's ``rp.*`` processes (titles over their environment) of the learned sessions."""
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
    last = learned = 0.0
    while not orders.done.wait(0.2):
        now = time.monotonic()
        if now - last > 1.0:
            forked, last = _forked(client) or forked, now
        # each second until a session is known, then now and then (a scan of every
        # process's environment)
        if now - learned > (5.0 if orders.sessions else 1.0):
            learn_sessions(orders)
            learned = now
        if alive(client.pid, created) is None:
            time.sleep(0.2)  # let the last orders in the pipe arrive
            with orders.lock:
                orders.pids.update(forked)
            learn_sessions(orders)
            n = sweep(orders, _ROUNDS)
            print(f"pilotfish reaper: client {argv[0]} died; ended {n} processes", file=sys.stderr)
            return 0
    learn_sessions(orders)
    sweep(orders)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
