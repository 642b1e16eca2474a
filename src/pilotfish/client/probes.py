"""Probes: checks run on a worker through the backend's ordinary attempt path.

A probe is a :class:`~pilotfish.wire.messages.RunAttempt` with a *negative* attempt id
(-1, -2, ...), so it can never collide with a task's attempt (the workflow core
numbers those from 1). Backends need nothing special for it: they run it like
any attempt (the local master, Dask, RADICAL-Pilot raptor alike) and report its
``Result`` or ``Lost``. The session hands every event with a negative id to
:meth:`Probes.deliver` and never to the workflow core, and a ``Fatal`` from the
backend answers every waiting probe.

The one probe today is the pre-flight (:func:`Probes.preflight`): Python,
pilotfish and cloudpickle versions against the client's, the sandbox root, disk
space, required modules and programs, run where tasks will run.
"""

from __future__ import annotations

import concurrent.futures as cf
import pickle
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import EnvironmentMismatch
from ..wire import messages as _wire

__all__ = ["PREFLIGHT_KEY", "Probes", "is_probe"]

#: the task key a pre-flight probe carries (in backend logs and sandbox names)
PREFLIGHT_KEY = "pilotfish-preflight"


def is_probe(attempt: int) -> bool:
    """Is this attempt id a probe's (negative), not a task attempt's?"""
    return attempt < 0


class Probes:
    """The probes in flight: ``new()`` one, ``deliver()`` its answer, ``fail_all()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, cf.Future[tuple[bool, Any]]] = {}
        self._next = -1

    def new(self) -> tuple[int, cf.Future[tuple[bool, Any]]]:
        """A fresh negative attempt id and the future its answer resolves:
        ``(True, pickled value)`` or ``(False, why it could not run)``."""
        fut: cf.Future[tuple[bool, Any]] = cf.Future()
        with self._lock:
            aid = self._next
            self._next -= 1
            self._waiting[aid] = fut
        return aid, fut

    def deliver(self, ev: Any) -> None:
        """A backend event about a probe (``Result`` or ``Lost``; ``Started`` is ignored)."""
        if not isinstance(ev, _wire.Result | _wire.Lost):
            return
        with self._lock:
            fut = self._waiting.pop(ev.attempt, None)
        if fut is None or fut.done():
            return  # a late or duplicate answer
        if isinstance(ev, _wire.Lost):
            fut.set_result((False, ev.message))
        elif ev.ok:
            fut.set_result((True, ev.data))
        else:
            env: _wire.Envelope = pickle.loads(ev.data)
            fut.set_result((False, f"{env.type_name}: {env.message}\n{env.traceback}"))

    def fail_all(self, message: str) -> None:
        """The backend cannot answer any more (``Fatal``, or it went silent)."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_result((False, message))

    def preflight(
        self,
        submit: Callable[[Sequence[_wire.RunAttempt]], None],
        rundir: str,
        requires: Iterable[str],
        programs: Iterable[str],
        timeout: float,
    ) -> list[Any]:
        """Run the pre-flight checks on a worker; every check, passed or not."""
        from ..runtime import preflight as pf

        aid, fut = self.new()
        payload = _wire.dumps_call(
            (
                pf.session_checks,
                (pf.client_versions(), str(Path(rundir).resolve()), list(requires), list(programs)),
                {},
            ),
            lambda _obj: None,
        )
        submit([_wire.RunAttempt(aid, PREFLIGHT_KEY, "call", payload, (), timeout)])
        try:
            ok, data = fut.result(timeout)
        except cf.TimeoutError:
            with self._lock:
                self._waiting.pop(aid, None)
            raise EnvironmentMismatch(
                f"pre-flight checks got no answer from any worker within {timeout:g} s"
            ) from None
        if not ok:
            raise EnvironmentMismatch(f"pre-flight checks could not run on a worker: {data}")
        checks: list[Any] = pickle.loads(data)
        return checks
