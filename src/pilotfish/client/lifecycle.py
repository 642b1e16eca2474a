"""A session's life in the process: registered while it lives, kept alive while busy,
run to the end at interpreter exit, and closed exactly once (also when collected).

Module state, on purpose, as in ``concurrent.futures.thread``: the interpreter's exit hook
must reach every session of the process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import workflow as wf
from ..core.states import State
from ..store import rundir as _rundir

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..store.journal import Journal
    from .session import Session

log = logging.getLogger("pilotfish")

__all__ = [
    "Closer",
    "add_listener",
    "busy",
    "exiting",
    "idle",
    "live_journals",
    "register",
    "remove_listener",
    "unregister",
]

#: the open sessions of this process, and the path of each one's journal (None: none)
_live: weakref.WeakKeyDictionary[Session, Path | None] = weakref.WeakKeyDictionary()
#: sessions with unfinished work keep themselves alive (the user may drop every
#: reference, as with ``pool.submit(print, "x")``: the work still runs, as in
#: concurrent.futures); an idle session is freed once the user lets go of it
_busy: set[Any] = set()
#: listeners added to every Session created in this process (``pilotfish run``'s progress)
_global_listeners: list[Callable[[Any], None]] = []
_exiting = False


def exiting() -> bool:
    """The interpreter is exiting: new submits are refused."""
    return _exiting


def register(session: Session, journal: Path | None) -> None:
    _live[session] = journal


def unregister(session: Session) -> None:
    _live.pop(session, None)


def live_journals() -> list[Path]:
    """The journals of this process's open sessions (``pilotfish run`` names their run
    directories in its hints)."""
    return [p for p in list(_live.values()) if p is not None]


def busy(owner: Any) -> None:
    """``owner`` has unfinished work: hold it even if the user holds it no more."""
    _busy.add(owner)


def idle(owner: Any) -> None:
    _busy.discard(owner)


def global_listeners() -> list[Callable[[Any], None]]:
    return list(_global_listeners)


def add_listener(fn: Callable[[Any], None]) -> None:
    """Every Session created from now on calls ``fn(event)`` (as ``on_event=``)."""
    _global_listeners.append(fn)


def remove_listener(fn: Callable[[Any], None]) -> None:
    with contextlib.suppress(ValueError):
        _global_listeners.remove(fn)


def _python_exit() -> None:
    """At interpreter exit (before non-daemon threads are joined and before ``atexit``),
    as concurrent.futures does: every session runs its pending work to the end, then
    stops; new submits raise. Ctrl-C while waiting cancels what has not started."""
    global _exiting
    _exiting = True
    for s in sorted(_live, key=id):
        try:
            s.shutdown(wait=True)
        except KeyboardInterrupt:
            s.shutdown(wait=False, cancel_futures=True, _stop_now=True)
        except Exception:
            log.exception("pilotfish: shutting down %r at exit", s)


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


@atexit.register
def _shutdown_all() -> None:
    """Backstop: whatever is still running when atexit runs is stopped now."""
    for s in list(_live):
        with contextlib.suppress(Exception):
            s.shutdown(wait=False, cancel_futures=True, _stop_now=True)


class Closer:
    """What closing a session does, kept apart from the session so that it also runs
    when the session is garbage-collected (``weakref.finalize``): stop the backend, close
    the journal with the run's status, release the run directory (last, once nothing
    writes)."""

    def __init__(
        self,
        backend: Backend,
        journal: Journal | None,
        core: wf.Workflow,
        timer_cv: threading.Condition,
        locks: list[_rundir.RundirLock],
    ) -> None:
        self.backend = backend
        self.journal = journal
        self.locks = locks
        self.core = core
        self.timer_cv = timer_cv
        self.stop_timeout: float | None = None  # set when the backend was given up
        self.collected = True  # until the session closes itself

    def __call__(self) -> None:
        with self.timer_cv:
            self.timer_cv.notify_all()  # the timer thread sees its driver gone, and ends
        if self.collected:
            # collected by the garbage collector, perhaps on one of the backend's own
            # threads, which stop() joins: stop it from a thread of its own
            threading.Thread(target=self.close, name="pilotfish-close", daemon=True).start()
        else:
            self.close()

    def close(self) -> None:
        if self.stop_timeout is not None:
            self.backend.stop(self.stop_timeout)
        else:
            self.backend.stop()
        if self.journal is not None:
            counts = self.core.counts
            status = (
                "failed"
                if counts[State.FAILED]
                else ("finished" if not self.core.unfinished() else "interrupted")
            )
            self.journal.close(status)
        _rundir.release(self.locks)
