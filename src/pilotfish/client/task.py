"""``Task``: a submitted task, a ``concurrent.futures.Future`` with pilotfish's record of it.

Its own fields are written by its session and driver only (under the driver's lock); what
it knows of its attempts, state and failure it reads from the driver's workflow core. It is cheap
on purpose: no Condition until someone waits on it alone (``_condition``), one shared
Condition once it is finished, so 100,000 held futures stay small.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._rare import Rare
from ..core import workflow as wf
from ..core.states import State
from ..errors import FailureRecord, InvalidTask
from .keyed import Keyed
from .keyset import HashSet
from .options import TaskOptions
from .programs import output_path

if TYPE_CHECKING:
    from .driver import Driver
    from .session import Session

__all__ = ["Task", "TaskTable"]


class _ListWhenAsked:
    """A ``Future`` list (``_waiters``, ``_done_callbacks``) kept in slot ``slot`` and made
    the first time someone asks for it: most tasks never need one."""

    def __init__(self, slot: str, make: Callable[[Any], list[Any]]) -> None:
        self.slot = slot
        self.make = make  # the task -> its new list

    def __get__(self, task: Any, owner: Any = None) -> list[Any]:
        items: list[Any] | None = getattr(task, self.slot)
        if items is None:
            items = self.make(task)
            setattr(task, self.slot, items)
        return items

    def __set__(self, task: Any, items: list[Any]) -> None:
        setattr(task, self.slot, items)


class _Waiters(list):  # type: ignore[type-arg]
    """A task's ``Future._waiters`` while someone waits (``concurrent.futures.wait`` and
    ``as_completed`` add and remove theirs under the task's Condition): when the last is
    removed, the task drops the list (56 bytes per held task that was waited for)."""

    __slots__ = ("task",)

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task

    def remove(self, waiter: Any) -> None:
        list.remove(self, waiter)
        if not self and self.task._wl is self:
            self.task._wl = None


class _TaskMore:
    """What most tasks leave at its default (programs, outputs, failures, settled
    inputs): one slot on :class:`Task` (None) instead of ten (issue 26: memory per held
    future). Read and written as the task's own attributes (:class:`.._rare.Rare`)."""

    # _call: (fn, args, kwargs), kept for an on_failure handler
    # _output_tasks: made by the first output(name)
    # _output_of: set on a reference made by ``.output(name)``: it is not a task the user
    #   submitted (the journal's kind "output"; counts and failure lists leave it out)
    # _key_unstable: why its auto-key may differ in another run
    # _settled: the inputs it takes settled (pilotfish.settled), for the core
    __slots__ = (
        "_call",
        "_cmd_timeout",
        "_declared_outputs",
        "_key_unstable",
        "_last_exc",
        "_last_failure",
        "_output_of",
        "_output_tasks",
        "_programs",
        "_settled",
    )

    def __init__(self) -> None:
        self._call = None
        self._cmd_timeout = None
        self._declared_outputs = ()
        self._key_unstable = None
        self._last_exc = None
        self._last_failure = None
        self._output_of = None
        self._output_tasks = None
        self._programs = ()
        self._settled = None


class Task(cf.Future, Keyed):  # type: ignore[type-arg]
    """A submitted task: a ``concurrent.futures.Future`` with pilotfish's record of it."""

    # Slots, the Future's own fields too (a slot on the class wins over the instance
    # dict, so Future's methods use them): a Task never fills a __dict__. Issue 26:
    # attributes set after a task was made (its value, at the end) outgrew the inline
    # values CPython sizes when an object is made, turning each finished task's
    # attributes into a dict of its own (~830 B per held future).
    __slots__ = (
        "_cbl",  # Future._done_callbacks, made when first asked for (see below)
        "_cond",  # Future._condition, likewise
        "_deps",
        "_exception",
        "_kind",
        "_more",  # the attributes most tasks leave at their defaults (_TaskMore)
        "_payload",
        "_pending_value",
        "_result",
        "_session",
        "_state",
        "_tid",
        "_value_bytes",
        "_wl",  # Future._waiters, made when first asked for (see below)
        "key",
        "name",
        "options",
    )
    _kind: str
    _payload: bytes
    _deps: tuple[Task, ...]
    _value_bytes: bytes | None
    _pending_value: Any

    def __init__(
        self,
        session: Session,
        tid: int,
        key: str,
        name: str,
        options: TaskOptions,
    ) -> None:
        # Future.__init__ without its Condition (a lock, a deque and five bound methods)
        # or its two lists: most tasks are never waited on one by one, so they are made
        # when first needed. Fewer objects per task: less work for the cyclic GC, a large
        # share of a no-op's cost (benchmarks/README.md).
        self._state = cf._base.PENDING
        self._result = None
        self._exception = None
        self._wl: list[Any] | None = None
        self._cbl: list[Any] | None = None
        self._cond: threading.Condition | None = None
        self._session = session  # output() submits through it
        self._tid = tid
        self.key = key
        self.name = name
        self.options = options
        self._kind = "call"
        self._more: _TaskMore | None = None
        self._payload = b""
        self._deps = ()
        self._value_bytes = None
        self._pending_value = None

    @property
    def _driver(self) -> Driver:
        """The session's driver: state, attempts, failure and cancel read its core."""
        return self._session._driver

    _waiters = _ListWhenAsked("_wl", _Waiters)
    _done_callbacks = _ListWhenAsked("_cbl", lambda task: [])
    _call = Rare("_more", _TaskMore)
    _cmd_timeout = Rare("_more", _TaskMore)
    _declared_outputs = Rare("_more", _TaskMore)
    _key_unstable = Rare("_more", _TaskMore)
    _last_exc = Rare("_more", _TaskMore)
    _last_failure = Rare("_more", _TaskMore)
    _output_of = Rare("_more", _TaskMore)
    _output_tasks = Rare("_more", _TaskMore)
    _programs = Rare("_more", _TaskMore)
    _settled = Rare("_more", _TaskMore)

    @property
    def _condition(self) -> threading.Condition:
        c = self._cond
        if c is None:
            with _COND_LOCK:
                c = self._cond
                if c is None:
                    c = self._cond = threading.Condition()
        return c

    @_condition.setter
    def _condition(self, c: threading.Condition) -> None:
        self._cond = c

    def done(self) -> bool:
        return self._state in _DONE_STATES  # one attribute read: no lock (or Condition) needed

    def _nobody_waits(self) -> None:
        """About to finish: if nobody ever asked for the Condition, nobody waits on it,
        and the shared one for finished tasks will do."""
        if self._cond is None:
            with _COND_LOCK:
                if self._cond is None:
                    self._cond = _FINISHED_CONDITION

    @property
    def state(self) -> State:
        with self._driver.lock:
            return self._driver.core.state(self._tid)

    @property
    def attempts(self) -> list[wf.AttemptRecord]:
        with self._driver.lock:
            return [dataclasses.replace(a) for a in self._driver.core.attempts(self._tid)]

    @property
    def failure(self) -> FailureRecord | None:
        with self._driver.lock:
            return self._driver.core.failure(self._tid)

    @property
    def dependencies(self) -> tuple[Task, ...]:
        return self._deps

    def running(self) -> bool:
        with self._driver.lock:
            return self._driver.core.is_started(self._tid)

    def cancel(self) -> bool:
        """Cancel if not started yet (queued, waiting for inputs, or between retries)."""
        return self._driver.cancel(self)

    def output(self, name: str) -> Task:
        """A Task resolving to the path of declared output ``name`` of this program task.

        Use it as an input or argument of later tasks to chain programs by their files.
        """
        if self._kind != "command":
            raise InvalidTask(f"{self!r} is not a program task; output() needs executable()")
        if name not in self._declared_outputs:
            raise InvalidTask(
                f"{name!r} is not a declared output of task {self.key!r}; declared: "
                f"{list(self._declared_outputs)} (add it to outputs=[...])"
            )
        with self._driver.lock:
            if self._output_tasks is None:
                self._output_tasks = {}
            t: Task | None = self._output_tasks.get(name)
            if t is None:
                opts = TaskOptions(name=f"{self.name}.output", key=f"{self.key}:{name}")
                t = self._session._submit_call(output_path, (self, name), {}, opts, name)
                self._output_tasks[name] = t
            return t

    def result(self, timeout: float | None = None) -> Any:
        """The value, as ``Future.result``; raises :class:`pilotfish.store.journal.JournalError`
        instead while the session's journal cannot be written."""
        value = super().result(timeout)
        journal = self._driver.journal
        if journal is not None:
            journal.raise_if_broken()
        return value

    def _force_cancel(self) -> None:
        # cancel, then notify waiters of cf.wait/as_completed, as an Executor must
        self._nobody_waits()
        if super().cancel():
            self.set_running_or_notify_cancel()
        self._release_condition()

    def set_result(self, result: Any) -> None:
        self._finish(True, result)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(False, exception)

    def _finish(self, ok: bool, outcome: Any) -> None:
        """``Future.set_result`` / ``set_exception``, reading the waiter and callback lists
        only if someone made them (reading ``_waiters`` would make one per task)."""
        self._nobody_waits()
        cond = self._condition
        with cond:
            if self._state in _DONE_STATES:
                raise cf.InvalidStateError(f"{self._state}: {self!r}")
            if ok:
                self._result = outcome
            else:
                self._exception = outcome
            self._state = cf._base.FINISHED
            for waiter in self._wl or ():
                if ok:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            cond.notify_all()
        callbacks, self._cbl = self._cbl, None  # called once: later ones run at once
        for callback in callbacks or ():  # as Future._invoke_callbacks
            try:
                callback(self)
            except Exception:
                cf._base.LOGGER.exception("exception calling callback for %r", self)
        self._release_condition()

    def _release_condition(self) -> None:
        """A finished future is never waited on again (every waiter was notified and holds
        its own reference); its Condition (about 1 KB) is swapped for a shared one, which
        keeps the memory per finished task small in runs of 100,000 tasks."""
        if self.done():
            self._condition = _FINISHED_CONDITION

    def __repr__(self) -> str:
        return f"<Task {self.key!r} {self.state.name}>"


_FINISHED_CONDITION = threading.Condition()
_COND_LOCK = threading.Lock()  # makes a Task's Condition exactly once
_DONE_STATES = frozenset({cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED, cf._base.FINISHED})


class _TaskRef(weakref.ref):  # type: ignore[type-arg]
    __slots__ = ("tid",)  # its key, when it is gone, is the core's (collect's key_of)
    tid: int


class TaskTable:
    """The session's tasks by id, holding only the unfinished ones.

    A finished task stays reachable while the user (or a dependent task) holds it, and
    is freed with its result when nobody does: its id then appears in ``gone`` (a
    weakref callback, in whatever thread the last reference died; it only appends), and
    the session drops its record from the core under its lock (``Workflow.forget``; the
    journal has it). So memory grows with the tasks the user keeps, not with every task
    ever run, and an executor keeps no reference to results, as concurrent.futures
    promises.

    Keys must stay unique for the whole session, so every key ever used is remembered,
    but only as its ``hash()`` (:class:`.keyset.HashSet`: 16 bytes each, where the key and
    a dict entry cost ~150): the tasks that still exist are found by key in ``_ids``. Two keys
    with the same 64-bit hash (odds about 3e-8 among a million) make :meth:`used` say
    yes for the second: an automatic key then gets the next ``-n`` suffix, a user's own
    key is refused as used.
    """

    __slots__ = ("_gone_cb", "_ids", "_live", "_refs", "_used", "gone")

    def __init__(self) -> None:
        self._live: dict[int, Task] = {}
        self._refs: dict[int, _TaskRef] = {}
        self._ids: dict[str, int] = {}  # the key of every task that still exists -> id
        self._used = HashSet()  # hash() of every key ever used in the session
        self.gone: collections.deque[int] = collections.deque()
        gone = self.gone

        def on_gone(ref: _TaskRef) -> None:
            gone.append(ref.tid)

        self._gone_cb = on_gone

    def add(self, task: Task) -> None:
        tid = task._tid
        self._live[tid] = task
        ref = _TaskRef(task, self._gone_cb)
        ref.tid = tid
        self._refs[tid] = ref
        self._ids[task.key] = tid
        self._used.add(hash(task.key))

    def release(self, tid: int) -> None:
        """``tid`` is final: hold it no more (it lives on while someone else holds it)."""
        self._live.pop(tid, None)

    def collect(self, key_of: Callable[[int], str]) -> list[int]:
        """The ids of tasks freed since the last call (under the session's lock);
        ``key_of(tid)``: a freed task's key (the core still has its record)."""
        gone, refs, out = self.gone, self._refs, []
        ids = self._ids
        while gone:
            tid = gone.popleft()
            ref = refs.get(tid)
            if ref is not None and ref() is None:
                del refs[tid]
                try:
                    key = key_of(tid)
                except KeyError:  # never reached the core (its submit failed half-way)
                    key = None
                if key is not None and ids.get(key) == tid:  # stays used (_used), not findable
                    del ids[key]
                out.append(tid)
        return out

    def forget(self, task: Task) -> None:
        """A submit that failed half-way: as if never submitted (its key is free again)."""
        self._live.pop(task._tid, None)
        self._refs.pop(task._tid, None)
        if self._ids.get(task.key) == task._tid:
            del self._ids[task.key]
            self._used.discard(hash(task.key))

    def __getitem__(self, tid: int) -> Task:
        t = self._live.get(tid)
        if t is None:
            t = self._refs[tid]()
            if t is None:
                raise KeyError(tid)
        return t

    def get(self, tid: int) -> Task | None:
        t = self._live.get(tid)
        if t is None:
            ref = self._refs.get(tid)
            t = None if ref is None else ref()
        return t

    def by_key(self, key: str) -> Task | None:
        tid = self._ids.get(key)
        return None if tid is None else self.get(tid)

    def used(self, key: str) -> bool:
        """Was ``key`` used in this session (or does its hash collide with one that was)?"""
        return key in self._ids or hash(key) in self._used

    def alive(self) -> list[Task]:
        """The tasks that still exist (unfinished, or held by someone), in submission order."""
        out = [r() for r in list(self._refs.values())]
        return [t for t in out if t is not None]

    def unfinished(self) -> list[Task]:
        return list(self._live.values())
