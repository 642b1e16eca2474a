"""What an RP task's final state means for its attempt: the events for the session.

The radical backend's table (see :mod:`.backend`'s docstring) written once, as one
function of the task and the attempt's ledger entry: :func:`final_events`. No state of
its own; the backend has already taken the attempt out of its ledger. Which states wake
the backend at all: :func:`wakes`.
"""

from __future__ import annotations

import base64
import pickle
import time
from typing import Any

import radical.pilot as rp

from ...core import ledger as L
from ...wire.messages import Lost, Result, Started
from .._driver import environment_result, runtime_lost
from .plumbing import local_path

__all__ = ["final_events", "wakes"]

_WAKING = frozenset({rp.AGENT_EXECUTING, *rp.FINAL})


def wakes(state: str) -> bool:
    """Whether a task reaching ``state`` means anything to the backend's event thread:
    its start (where it runs) or its end. RP calls the task manager's callback for every
    state a task passes (~15 per task); the others would wake the thread for nothing."""
    return state in _WAKING


def _env_result(e: L.Entry, why: str, *, plain: bool = False) -> Result:
    msg = why if plain else f"task {e.key!r} (attempt id {e.attempt}): {why}"
    return environment_result(e.attempt, msg, e)


def final_events(task: Any, state: str, e: L.Entry) -> list[Any]:
    """The events for RP task ``task``, final in ``state``, of the attempt ``e`` (its
    item is the backend's record of the attempt: ``.m``, the ``RunAttempt``)."""
    m = e.item.m
    started = e.where == "started"
    now = time.time()
    rv = task.return_value
    info = rv if isinstance(rv, dict) and "pilotfish" in rv else None
    if state == rp.DONE and isinstance(rv, str):
        return _result(rv, e, started)
    kind = info.get("pilotfish") if info is not None else None
    if info is not None and kind in ("worker_lost", "task_process_lost"):
        return _lost_with_worker(info, e, started, now)
    if info is not None and kind == "environment":
        return [_env_result(e, info.get("message", ""), plain=True)]
    exc = str(task.exception or "")
    detail = str(task.exception_detail or "")
    if state == rp.FAILED and (kind == "timeout" or "TimeoutError" in exc) and m.timeout:
        lost = Lost(
            m.attempt,
            "timeout",
            f"task {m.key!r} exceeded its timeout of {m.timeout:g} s; "
            "pilotfish's raptor worker killed the process running it",
            e.worker,
            e.pid,
            None,
            None,
            str(task.stderr or "")[-2000:],
            e.started,
            now,
            e.host,
        )
        return [lost]
    if state == rp.CANCELED:
        return [runtime_lost(m, f"RADICAL-Pilot cancelled its task {task.uid}", entry=e)]
    sbox = local_path(task.sandbox)
    why = (
        f"RADICAL-Pilot could not run it (task {task.uid} {state}, exit code "
        f"{task.exit_code}): {exc}\n{detail}\nstderr:\n{str(task.stderr or '')[-2000:]}\n"
        f"task sandbox: {sbox}. Is pilotfish (the client's version) installed in the "
        "pilot's Python environment?"
    )
    return [_env_result(e, why)]


def _result(rv: str, e: L.Entry, started: bool) -> list[Any]:
    """A DONE task's return value: the pickled ``Result`` (base64)."""
    try:
        res = pickle.loads(base64.b64decode(rv))
    except Exception as bad:
        return [_env_result(e, f"its result could not be decoded: {bad!r}")]
    if not isinstance(res, Result):
        return [_env_result(e, f"unexpected task result {res!r}")]
    if started:
        return [res]
    return [Started(res.attempt, res.worker, res.pid, res.started, res.host), res]


def _lost_with_worker(info: dict[str, Any], e: L.Entry, started: bool, now: float) -> list[Any]:
    """The worker died, or the process the worker forked for this task did."""
    m = e.item.m
    worker, pid, host = (
        info.get("worker") or e.worker,
        int(info.get("pid") or e.pid or 0),
        info.get("host") or e.host,
    )
    events: list[Any] = []
    if not started:
        events.append(Started(m.attempt, worker, pid, e.started or now, host))
    events.append(
        Lost(
            m.attempt,
            "worker_lost",
            f"task {m.key!r} (attempt id {m.attempt}) was lost: " + str(info.get("message", "")),
            worker,
            pid,
            info.get("returncode"),
            info.get("signal"),
            info.get("stderr_tail") or "",
            e.started or now,
            now,
            host,
        )
    )
    return events
