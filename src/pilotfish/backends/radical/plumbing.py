"""RADICAL-Pilot plumbing of the radical backend: the processes of its RP session, and
the pieces of RP it reaches past RP's API.

* :func:`with_token`: the backend's token in ``os.environ`` only while RP's pilot
  launcher starts (what marks the pilot's processes as the backend's);
* :class:`Reaper`: the watcher process that ends them if the client dies without
  ``stop()`` (:mod:`.reaper`);
* :func:`end_pids`, :func:`token_pids`: ending what RP left behind, never a recycled pid;
* :func:`raptor_rpc`: RP's raptor rpc with a timeout (RP's own waits forever);
* :func:`cancel_launched`: cancelling RP tasks without losing the pilot's cores;
* :func:`bounded`, :func:`tail`, :func:`local_path`, :func:`pilot_details`,
  :func:`master_details`: a bounded RP call, and what a sandbox shows of a failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import radical.utils as ru

from ...runtime.procs import end_trees, in_places, with_env

__all__ = [
    "TOKEN_VAR",
    "Reaper",
    "bounded",
    "cancel_launched",
    "end_pids",
    "ensure_venv_env",
    "local_path",
    "master_details",
    "pilot_details",
    "raptor_rpc",
    "tail",
    "token_pids",
    "with_token",
]

log = logging.getLogger("pilotfish.radical")

T = TypeVar("T")

TOKEN_VAR = "PILOTFISH_RP_TOKEN"
# os.environ holds a backend's token only while it starts RP's PilotManager (see
# with_token); one backend at a time
_ENV_LOCK = threading.Lock()


def tail(path: str, n: int = 4000) -> str:
    """The last ``n`` bytes of a file ('' if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def local_path(url: Any) -> str:
    """The path of an RP sandbox URL."""
    s = str(url or "")
    with contextlib.suppress(Exception):
        return str(ru.Url(s).path)
    return s


def master_details(task: Any) -> tuple[str, str]:
    """The sandbox of RP task ``task`` (the raptor master's) and the tail of its stderr."""
    sbox = local_path(getattr(task, "sandbox", ""))
    err = ""
    if sbox:
        err = tail(os.path.join(sbox, f"{task.uid}.err"), 2000)
    err = err or str(getattr(task, "stderr", "") or "")[-2000:]
    return sbox, err


def pilot_details(pilot: Any) -> str:
    """The pilot's sandbox and the tails of its bootstrapper's and agent's logs."""
    sbox = local_path(getattr(pilot, "pilot_sandbox", ""))
    err = ""
    for name in ("bootstrap_0.err", "agent_0.err", "bootstrap_0.out"):
        t = tail(os.path.join(sbox, name), 1500) if sbox else ""
        if t.strip():
            err += f"\n--- {name} (tail) ---\n{t}"
    return f"pilot sandbox: {sbox}{err}"


def ensure_venv_env() -> None:
    """RP's local resource runs the agent from the client's *activated* venv."""
    if sys.prefix != sys.base_prefix and not os.environ.get("VIRTUAL_ENV"):
        os.environ["VIRTUAL_ENV"] = sys.prefix
    bindir = os.path.join(sys.prefix, "bin")
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [bindir]:
        os.environ["PATH"] = os.pathsep.join([bindir] + [p for p in path if p != bindir])
    os.environ.setdefault("RADICAL_REPORT_ANIME", "0")


def with_token(token: str, spawn: Callable[[], T]) -> T:
    """``spawn()`` with ``token`` in ``os.environ``, and only then.

    The token must reach the pilot's processes (bootstrapper, agent, master, workers,
    their tasks): what the reaper ends if this client dies. RP's pilot description
    has no environment of its own; the pilot job is launched (PSI/J, inheriting the
    environment on local resources) by the PilotManager's ``pmgr_launching``
    component, a process ``rp.PilotManager()`` starts (``radical-pilot-component``)
    and waits for. So that constructor is the one spawn that needs the token; the
    pilot's start (``submit_pilots`` and the wait for it, most of the start-up) and
    the Session's and TaskManager's components run without it.

    Why this is safe: the window is that one constructor (about a second, not the
    whole start), backends take it one at a time (``_ENV_LOCK``), and a process another
    thread of the client starts meanwhile (a local Session's workers) inherits the
    token but is never ended for it: the backend and the reaper end a token's process
    only when it or one of its ancestors is inside this RP session (its id in the
    working directory or command line, see :func:`pilotfish.runtime.procs.in_places`).
    """
    with _ENV_LOCK:
        old = os.environ.get(TOKEN_VAR)
        os.environ[TOKEN_VAR] = token
        try:
            return spawn()
        finally:
            if old is None:
                os.environ.pop(TOKEN_VAR, None)
            else:
                os.environ[TOKEN_VAR] = old


def token_pids(token: str, sid: str) -> dict[int, float]:
    """The live processes with ``token`` that are of RP session ``sid`` (a process that
    inherited the token from the client while :func:`with_token` held it, but is not
    RP's, is not), with their creation times."""
    import psutil

    out: dict[int, float] = {}
    for p in with_env(TOKEN_VAR, {token}):
        with contextlib.suppress(psutil.Error):
            if sid and in_places(p, {sid}):
                out[p.pid] = p.create_time()
    return out


def end_pids(pids: dict[int, float], grace: float = 1.0) -> None:
    """End processes RP left behind (whole trees: the workers' task children), each pid
    only while it is the process remembered: ``pids`` maps a pid to its creation time,
    and a recycled pid (another process by now: the user's shell) is spared. Returns
    once what it ended has exited."""
    end_trees(pids, grace)


def bounded(fn: Callable[[], Any], timeout: float, what: str) -> None:
    """``fn()`` in a thread of its own, waited for ``timeout`` seconds at most (an RP
    call that hangs must not hang the backend's stop)."""

    def run() -> None:
        try:
            fn()
        except Exception as e:
            log.info("pilotfish: %s failed: %r", what, e)

    t = threading.Thread(target=run, name=f"pilotfish-rp-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        log.warning("pilotfish: %s did not return within %g s", what, timeout)


def _launched(task: Any) -> bool:
    import radical.pilot as rp

    return task.state in rp.FINAL or task.state in (
        rp.AGENT_EXECUTING,
        rp.AGENT_STAGING_OUTPUT_PENDING,
        rp.AGENT_STAGING_OUTPUT,
        rp.TMGR_STAGING_OUTPUT_PENDING,
        rp.TMGR_STAGING_OUTPUT,
    )


def cancel_launched(tmgr: Any, tasks: list[Any], timeout: float = 10.0) -> None:
    """Cancel the RP ``tasks`` (a master, workers) that are not final, once each has been
    launched (waited for ``timeout`` seconds at most): RP's agent loses the cores of a
    task cancelled after its scheduler placed it and before its executor launched it
    (pinned RP 1.103: the executor drops it on arrival, never unscheduled), and a pilot
    that many short sessions use runs out of cores. A task still on its way to the agent,
    or launched, is cancelled without that loss."""
    deadline = time.monotonic() + timeout
    while not all(_launched(t) for t in tasks) and time.monotonic() < deadline:
        time.sleep(0.02)
    import radical.pilot as rp

    live = [t.uid for t in tasks if t.state not in rp.FINAL]
    if live:
        bounded(lambda: tmgr.cancel_tasks(live), 10, "cancel")


def raptor_rpc(pilot: Any, master: Any, cmd: str, timeout: float, **kwargs: Any) -> Any:
    """RP's ``Raptor.rpc`` to ``master`` with a timeout (RP's own waits forever: pinned
    RP 1.103)."""
    from radical.pilot import constants as rpc_const
    from radical.pilot.messages import RPCRequestMessage

    rid = ru.generate_id(f"{pilot.uid}.pfrpc")
    kwargs["raptor_cmd"] = cmd
    req = RPCRequestMessage(uid=rid, cmd="raptor_rpc", addr=master.uid, args=[], kwargs=kwargs)
    slot = {"req": req, "res": None, "evt": threading.Event(), "time": time.time()}
    pilot._rpc_reqs[rid] = slot
    try:
        pilot._ctrl_pub.put(rpc_const.CONTROL_PUBSUB, req)
        if not slot["evt"].wait(timeout):
            raise TimeoutError(f"no answer to {cmd} within {timeout:g} s")
        res = slot["res"]
        if res.exc:
            raise RuntimeError(f"rpc {cmd} failed: {res.exc}")
        return res.val
    finally:
        pilot._rpc_reqs.pop(rid, None)


class Reaper:
    """A watcher process that ends the backend's RP processes if this client dies
    without ``stop()`` (:mod:`.reaper`); told what to end line by line."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pilotfish.backends.radical.reaper", str(os.getpid())],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C in the terminal must not end it first
            env=env,
        )

    def tell(self, line: str) -> None:
        """One line for the reaper: ``session SID``, ``token TOKEN`` or ``pid PID CREATED``."""
        r = self._proc
        if r is not None and r.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                r.stdin.write(line + "\n")
                r.stdin.flush()

    def reap(self, pid: int, created: float) -> None:
        """End ``pid`` (while it is the process created at ``created``) if the client dies."""
        self.tell(f"pid {pid} {created!r}")

    def stop(self) -> None:
        """The client stopped in order: the reaper ends nothing, and exits."""
        r, self._proc = self._proc, None
        if r is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert r.stdin is not None
            r.stdin.write("done\n")
            r.stdin.close()
        try:
            r.wait(10)
        except Exception:
            r.kill()
            r.wait()
