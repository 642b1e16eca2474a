"""Ending processes by pid (issue 13, item 10): a remembered pid is ended only while it
is still the process remembered (its creation time), and the RADICAL-Pilot reaper ends a
token's process only when it belongs to the backend's RP session. Real processes, no
RADICAL-Pilot needed (the backend's own checks are in test_radical_backend.py)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import pid_alive, wait_for
from pilotfish.backends.radical import reaper
from pilotfish.runtime import procs as _procs


@pytest.fixture
def spawn() -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
        procs.append(p)
        return p  # type: ignore[no-any-return]

    yield start
    for p in procs:
        if p.poll() is None:
            kids = _procs.same_processes({p.pid: psutil.Process(p.pid).create_time()})
            for k in kids:
                k.kill()
        p.wait()


def _children(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def test_recycled_pid_is_not_ended(spawn: object) -> None:
    """A remembered pid whose process now has another creation time (a recycled pid:
    the user's shell) is not ended, nor its children; the remembered one is."""
    shell = spawn(["sh", "-c", "sleep 60 & wait"])  # type: ignore[operator]
    wait_for(lambda: _children(shell.pid), timeout=10, interval=0.02)
    child = _children(shell.pid)[0]
    created = psutil.Process(shell.pid).create_time()
    _procs.end_trees({shell.pid: created - 5.0})  # remembered: an older process
    time.sleep(0.2)
    assert shell.poll() is None and pid_alive(child)
    assert _procs.same_processes({shell.pid: created + 5.0}) == []
    _procs.end_trees({shell.pid: created})  # the very process: it and its child end
    assert shell.wait(5) is not None
    wait_for(lambda: not pid_alive(child), timeout=5, interval=0.02)


def test_create_time_of_a_gone_pid_is_none(spawn: object) -> None:
    """The creation time is read when a pid is learned; a pid already gone has none, so
    nothing is remembered for it (a later process on that pid is not it)."""
    p = spawn(["true"])  # type: ignore[operator]
    p.wait()
    assert _procs.create_time(p.pid) is None
    assert _procs.create_time(os.getpid()) == psutil.Process().create_time()


def test_reaper_spares_a_recycled_pid(spawn: object) -> None:
    """The reaper's ``pid P CREATE_TIME`` order with a creation time that is not the
    live process's: the process is not a target."""
    p = spawn(["sleep", "60"])  # type: ignore[operator]
    orders = reaper._Orders()
    orders.read(iter([f"pid {p.pid} {psutil.Process(p.pid).create_time() - 10!r}\n", "done\n"]))
    assert p.pid not in {q.pid for q in reaper._targets(orders)}
    assert reaper.sweep(orders) == 0 and p.poll() is None


def test_reaper_spares_a_token_process_outside_the_session(spawn: object, tmp_path: Path) -> None:
    """A process that inherited the backend's token while ``rp.PilotManager()`` started
    (another thread of the client started it: a local Session's worker) is not of the RP
    session and is spared; one running inside the session's directory, or started by one
    that does, is a target. Hostile orders (a session id that is a path, no session at
    all) select nothing."""
    token = "tok" + os.urandom(4).hex()
    sid = "rp.session.test." + os.urandom(4).hex()
    sbox = tmp_path / sid / "pilot.0000"
    sbox.mkdir(parents=True)
    env = {**os.environ, reaper.TOKEN_VAR: token}
    stray = spawn(["sleep", "60"], env=env, cwd=tmp_path)  # type: ignore[operator]
    agent = spawn(["sh", "-c", "sleep 60 & wait"], env=env, cwd=sbox)  # type: ignore[operator]
    wait_for(lambda: _children(agent.pid), timeout=10, interval=0.02)
    task = _children(agent.pid)[0]  # the agent's child: in the session by its parent
    wait_for(lambda: len(_procs.with_env(reaper.TOKEN_VAR, {token})) == 3, 10, 0.02)

    no_session = reaper._Orders()
    no_session.read(iter([f"token {token}\n", "session ../..\n", "session /\n", "done\n"]))
    assert no_session.sessions == set()
    assert reaper._targets(no_session) == []

    orders = reaper._Orders()
    orders.read(iter([f"token {token}\n", f"session {sid}\n", "done\n"]))
    targets = {q.pid for q in reaper._targets(orders)}
    assert agent.pid in targets and task in targets and stray.pid not in targets
    reaper.sweep(orders)
    assert agent.wait(5) is not None and not pid_alive(task)
    assert stray.poll() is None


def test_in_places_follows_ancestors(spawn: object, tmp_path: Path) -> None:
    """``in_places``: by working directory component, by command-line word, by an
    ancestor; not by a name that is only a prefix of a directory."""
    sid = "rp.session.x.1"
    (tmp_path / sid).mkdir()
    (tmp_path / (sid + "0")).mkdir()
    inside = spawn(["sh", "-c", "sleep 60 & wait"], cwd=tmp_path / sid)  # type: ignore[operator]
    near = spawn(["sleep", "60"], cwd=tmp_path / (sid + "0"))  # type: ignore[operator]
    wait_for(lambda: _children(inside.pid), timeout=10, interval=0.02)
    kid = psutil.Process(_children(inside.pid)[0])
    assert _procs.in_places(psutil.Process(inside.pid), {sid})
    assert _procs.in_places(kid, {sid})
    assert not _procs.in_places(psutil.Process(near.pid), {sid})
    assert not _procs.in_places(psutil.Process(), {sid})
    with pytest.raises(TypeError):
        _procs.in_places(kid, sid)
