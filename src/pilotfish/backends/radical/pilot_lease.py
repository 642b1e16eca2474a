"""The RP session, pilot and task manager the radical backend runs on, start to end.

Its own (``pilot=None``): :meth:`PilotLease.open` starts an RP session, a pilot
manager (with the backend's token in ``os.environ`` only meanwhile) and a pilot, and
:meth:`PilotLease.close` closes the session. The caller's (``pilot=``): borrowed, only
the backend's callbacks are registered and unregistered. A task manager is the
lease's own unless the caller gave one (an RP pilot can belong to one task manager
only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import radical.pilot as rp

from .plumbing import Reaper, bounded, ensure_venv_env, pilot_details, with_token

__all__ = ["PilotLease"]


class PilotLease:
    """See the module docstring. ``task_cb`` and ``pilot_cb`` are the backend's RP
    callbacks, kept here as the very objects registered (RP unregisters by ``id()``,
    and a bound method is a new object on every access)."""

    def __init__(
        self,
        pilot: Any,
        task_manager: Any,
        task_cb: Callable[..., Any],
        pilot_cb: Callable[..., Any],
    ) -> None:
        self.own_pilot = pilot is None
        self.pilot: Any = pilot
        self.session: Any = pilot.session if pilot is not None else None
        self.pmgr: Any = None
        self.tmgr: Any = task_manager
        self._own_tmgr = task_manager is None
        self._task_cb = task_cb
        self._pilot_cb = pilot_cb

    def open(
        self, token: str, reaper: Reaper, description: dict[str, Any], start_timeout: float
    ) -> None:
        """The pilot active (started from ``description`` if it is the lease's own, or
        RuntimeError) and the task manager on it, with the callbacks registered."""
        if self.own_pilot:
            ensure_venv_env()
            self.session = rp.Session()
            # the reaper ends the session's RP processes (client components, bridges,
            # agent) by their session id, and the token's processes only when they are
            # of this session
            reaper.tell(f"session {self.session.uid}")
            self.pmgr = with_token(token, lambda: rp.PilotManager(self.session))
            self.pilot = self.pmgr.submit_pilots(rp.PilotDescription(description))
            self.pilot.wait([rp.PMGR_ACTIVE, *rp.FINAL], timeout=start_timeout)
            if self.pilot.state != rp.PMGR_ACTIVE:
                raise RuntimeError(
                    f"pilot {self.pilot.uid} is {self.pilot.state} after "
                    f"{start_timeout:g} s; {pilot_details(self.pilot)}"
                )
        self.pilot.register_callback(self._pilot_cb)
        if self.tmgr is None:  # an RP pilot can belong to one TaskManager only
            self.tmgr = rp.TaskManager(self.session)
            self.tmgr.add_pilots(self.pilot)
        self.tmgr.register_callback(self._task_cb)

    def active(self) -> bool:
        return self.pilot is not None and self.pilot.state == rp.PMGR_ACTIVE

    def close(self, timeout: float) -> str:
        """The task manager closed if it is the lease's own (else the callback
        unregistered), likewise the session (else the pilot's callback); the session's
        uid ('' if none)."""
        if self._own_tmgr:
            bounded(lambda: self.tmgr and self.tmgr.close(), 15, "tmgr.close")
        elif self.tmgr is not None:  # RP finds a callback by id(): the very same object
            with contextlib.suppress(Exception):
                self.tmgr.unregister_callback(self._task_cb)
        if not self.own_pilot and self.pilot is not None:
            with contextlib.suppress(Exception):
                self.pilot.unregister_callback(self._pilot_cb)
        if self.own_pilot:
            bounded(
                lambda: self.session and self.session.close(download=False),
                max(30.0, timeout),
                "session.close",
            )
        return str(getattr(self.session, "uid", "") or "")
