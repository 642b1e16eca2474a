"""The kit every client-side backend uses: owned threads, one stimulus queue, one
runner for the attempt ledger's commands, the master-restart budget.

::

    Session ── submit/cancel ──> backend ── put(stimulus) ──> Stimuli ─┐ one consumer thread
    engine callbacks ─────────────────────── put(stimulus) ──>         │ handle(batch)
                                                                       v
                        Ledger.handle(event) -> commands ──> carry_out(commands, hooks)
                                                                       │ report / send / withdraw
                                                                       │ kill_groups / expire
    Session <── sink(events) <── Driver.emit <─────────────────────────┘

* :class:`Nursery`: every thread a backend starts, owned by one object and joined
  together by ``stop()`` (trio's nurseries). A thread that crashes is reported once,
  with its traceback, as one ``Fatal`` event: the session never waits on a backend
  whose event thread died.
* :class:`Stimuli`: a queue with one consumer thread; everything that piled up is
  handled as one batch, and an idle consumer still wakes every ``tick`` (timers).
* :func:`carry_out`: the one runner for :data:`pilotfish.core.ledger.Command`, a
  ``match`` with ``assert_never``: a command the ledger gains and this runner does not
  handle is a mypy error, and every backend answers each command through
  :class:`Hooks` (a hook a backend has nothing to do for says so in its own code),
  never by skipping it.
* :class:`RestartBudget`: ``max_master_restarts`` and its messages.
* :func:`runtime_lost`, :func:`environment_result` and :meth:`Driver.fatal`: the
  reports for an attempt the backend cannot take, an attempt the engine could not
  run, and a backend that cannot run anything any more.

Threads stay daemons: user code that cannot be stopped in-process (the fake's worker
threads, a hung RP call) must not keep the interpreter alive; their owner still joins
them (within a timeout) when it stops.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from ..core import ledger as L
from ..wire import messages as _wire
from ..wire.messages import Fatal, Lost, Result, RunAttempt
from .base import BackendEvent, Sink

__all__ = [
    "Driver",
    "Hooks",
    "Nursery",
    "Outcome",
    "RestartBudget",
    "Stimuli",
    "carry_out",
    "environment_result",
    "runtime_lost",
]

log = logging.getLogger("pilotfish.backends")

T = TypeVar("T")


# --------------------------------------------------------------------------- threads


class Nursery:
    """Threads owned by one object and joined together.

    ``start(name, fn, *args)`` runs ``fn(*args)`` in a new thread; ``stop(timeout)``
    joins every thread (but the caller's own) within ``timeout`` in all. The first
    thread to raise calls ``on_crash(name, exc, traceback_text)`` once; a later crash is
    only logged (one backend failure, one report)."""

    def __init__(
        self, owner: str, on_crash: Callable[[str, BaseException, str], None] | None = None
    ) -> None:
        self.owner = owner
        self._on_crash = on_crash
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.crashed: tuple[str, BaseException] | None = None

    def start(self, name: str, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        t = threading.Thread(target=self._run, args=(name, fn, args), name=name, daemon=True)
        with self._lock:  # finished ones go: a long session starts many short threads
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return t

    def _run(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except BaseException as e:
            text = traceback.format_exc()
            with self._lock:
                first = self.crashed is None
                if first:
                    self.crashed = (name, e)
            log.error("pilotfish: thread %s of %s crashed:\n%s", name, self.owner, text)
            if first and self._on_crash is not None:
                self._on_crash(name, e, text)

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return [t for t in self._threads if t.is_alive()]

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Join every thread (not the calling one); the names of those still running
        after ``timeout`` seconds in all (stuck in code that cannot be stopped)."""
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for t in self.threads():
            if t is not me:
                t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self.threads() if t is not me]


class Stimuli(Generic[T]):
    """A queue of stimuli with one consumer thread.

    ``put`` from any thread; the consumer calls ``handle(batch)`` with everything that
    piled up (at most ``max_batch``, in order), or with ``[]`` when nothing came for
    ``tick`` seconds, so timers run in the same thread. ``close()`` ends it: what is
    still queued then is not handled."""

    def __init__(self, handle: Callable[[list[T]], None], tick: float, max_batch: int = 5000):
        self._handle = handle
        self.tick = tick
        self.max_batch = max_batch
        self._q: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._closed = threading.Event()

    def put(self, item: T) -> None:
        self._q.put(item)

    def start(self, nursery: Nursery, name: str) -> threading.Thread:
        return nursery.start(name, self._consume)

    def empty(self) -> bool:
        """Nothing waits (for tests that call a backend's callbacks without its thread)."""
        return self._q.empty()

    def get_nowait(self) -> T | None:
        """Take the next stimulus without handling it (tests); raises ``queue.Empty``."""
        return self._q.get_nowait()

    def close(self) -> None:
        self._closed.set()
        self._q.put(None)  # wake the consumer

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _consume(self) -> None:
        q, closed = self._q, self._closed
        while not closed.is_set():
            try:
                items = [q.get(timeout=self.tick)]
            except queue.Empty:
                items = []
            with contextlib.suppress(queue.Empty):
                while len(items) < self.max_batch:
                    items.append(q.get_nowait())
            if closed.is_set():
                return
            self._handle([it for it in items if it is not None])


# --------------------------------------------------------------------------- commands


# Hooks, Outcome and carry_out, the one runner of the ledger's commands, live with the
# ledger (pure: the local master's dispatcher uses them too); re-exported here.
Hooks = L.Hooks
Outcome = L.Outcome
carry_out = L.carry_out


# --------------------------------------------------------------------------- reports


class RestartBudget:
    """``max_master_restarts``: how often a lost master (or scheduler) is replaced (or
    waited for), and the words for it. ``take()`` at each loss: True while the budget
    lasts."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def spent(self, again: str = "start another") -> str:
        """Why there is no restart (``again``: what pilotfish does not do)."""
        if self.limit == 0:
            return f"max_master_restarts=0, so pilotfish does not {again}"
        return (
            f"it was lost {self.used} times before (max_master_restarts={self.limit}), "
            f"so pilotfish does not {again} any more"
        )

    def note(self) -> str:
        """Which restart this is: 'restart 2 of max_master_restarts=3'."""
        return f"restart {self.used} of max_master_restarts={self.limit}"


def runtime_lost(
    m: RunAttempt, why: str, *, worker: str = "", pid: int = 0, entry: L.Entry | None = None
) -> Lost:
    """``Lost(runtime_lost)`` for an attempt the backend could not take or keep (it is
    stopped, its master or scheduler is gone, the engine refused it); ``entry``: where
    the ledger saw it run."""
    if entry is not None:
        worker, pid = entry.worker or worker, entry.pid or pid
    return Lost(
        m.attempt,
        "runtime_lost",
        f"task {m.key!r} (attempt id {m.attempt}) was lost: {why}",
        worker,
        pid,
        None,
        None,
        "",
        entry.started if entry is not None else None,
        time.time(),
        entry.host if entry is not None else "",
    )


def environment_result(
    attempt: int, message: str, entry: L.Entry | None = None, exc: BaseException | None = None
) -> Result:
    """The engine could not run the attempt (pilotfish not importable there, a task it
    failed itself): an ENVIRONMENT error, not retried. ``exc``: the engine's exception
    (its traceback is kept), else a plain ``EnvironmentMismatch``."""
    if exc is not None:
        env = _wire.envelope_for(exc, "environment", message=message)
    else:
        env = _wire.Envelope("environment", "pilotfish.EnvironmentMismatch", message, "", None, {})
    now = time.time()
    e = entry
    return Result(
        attempt,
        False,
        pickle.dumps(env, _wire.PROTOCOL),
        e.worker if e else "",
        e.pid if e else 0,
        (e.started if e else None) or now,
        now,
        e.host if e else "",
    )


# --------------------------------------------------------------------------- the driver


class Driver:
    """One backend's plumbing: its sink, its :class:`Nursery` (a crash is one ``Fatal``),
    its :class:`RestartBudget`, and whether it is dead (and why)."""

    def __init__(self, backend: str, max_restarts: int = 0) -> None:
        self.backend = backend
        self.nursery = Nursery(f"the {backend} backend", self._crashed)
        self.budget = RestartBudget(max_restarts)
        self.sink: Sink | None = None
        self.dead = False
        self.fatal_message = ""
        self.stopping = threading.Event()

    def emit(self, events: Sequence[BackendEvent]) -> None:
        if self.sink is not None and events:
            self.sink(events)

    def fatal(self, why: str, category: str = "runtime_lost") -> Fatal:
        """The backend cannot run anything any more: remembered (later submissions are
        lost with ``why``); returns the ``Fatal`` to send."""
        self.dead, self.fatal_message = True, why
        return Fatal(category, why)

    def refuse(self, m: RunAttempt, *, worker: str = "", pid: int = 0) -> Lost:
        """An attempt submitted to a dead or stopped backend."""
        return runtime_lost(m, self.fatal_message or "backend stopped", worker=worker, pid=pid)

    def _crashed(self, name: str, exc: BaseException, text: str) -> None:
        if self.stopping.is_set():
            return  # stopping: nobody waits for it any more
        why = (
            f"pilotfish's {self.backend} backend failed: its thread {name} crashed with "
            f"{exc!r}\n{text}"
        )
        self.emit([self.fatal(why)])
