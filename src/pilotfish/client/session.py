"""``Session``, the Executor: the public methods, and what they check before anything runs.

A Session turns user calls into tasks (pickled once, keyed, their Tasks as dependencies)
and hands them to its :class:`~pilotfish.client.driver.Driver`, which feeds the workflow
core and carries out its commands: backend, futures, journal, timer. The rules live
elsewhere, each in one named place: what a backend event means (:mod:`.translate`), what
a program call may be (:mod:`.programs`), how a call is pickled and keyed
(:mod:`.payloads`), pre-flight probes (:mod:`.probes`), what a resumed task takes from an
earlier run (:mod:`.resume`), a session's life in the process (:mod:`.lifecycle`).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..backends import backend_factory
from ..backends.base import Backend
from ..core import workflow as wf
from ..core.policy import Backoff
from ..errors import EnvironmentMismatch, FailureRecord, InvalidTask
from ..runtime.execute import call_chunk, shared_process
from ..runtime.preflight import check_preload
from ..runtime.programs import keeps_sandbox
from ..store import rundir as _rundir
from ..store.journal import Journal, JournalError
from ..store.trust import secure_rundir
from ..wire import messages as _wire
from . import lifecycle
from .describe import describe_argv, describe_call, task_name
from .driver import Driver
from .lifecycle import Closer
from .options import (
    TaskFunction,
    TaskOptions,
    check_rundir,
    check_session_args,
    check_session_choices,
    check_wait,
    str_list,
)
from .payloads import call_digest, call_key_digest, pickle_call
from .programs import input_stamps, program_spec
from .resume import Resumer
from .settled import SettledFound
from .task import Task, TaskTable
from .translate import Call, Fail, Retry, Translator, drain_policy

__all__ = ["Call", "Fail", "Retry", "Session", "Task", "as_completed", "wait"]


_DEFAULT_OPTIONS = TaskOptions()  # frozen: one shared instance (the journal caches its JSON)


def _workers_arg(workers: int | None, max_workers: int | None) -> tuple[int | None, str]:
    """``workers`` or ``max_workers`` (ProcessPoolExecutor's name), and which was given."""
    if max_workers is None:
        return workers, "workers"
    if workers is not None:
        raise InvalidTask(
            f"Session(workers={workers!r}, max_workers={max_workers!r}): give one "
            "of them (max_workers is the concurrent.futures name for workers)"
        )
    return max_workers, "max_workers"


def _open_rundir(
    rundir: str, journal: str | os.PathLike[str] | bool | None, resume: bool
) -> tuple[list[_rundir.RundirLock], Journal | None]:
    """Make the run directory (private), take its lock (one session at a time per run
    directory and journal, with or without a journal: held until the session is closed,
    released by the kernel if this process dies), then open the journal."""
    try:
        Path(rundir).mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise EnvironmentMismatch(
            f"Session(rundir={rundir!r}): cannot create the run directory "
            f"({e.strerror or e}); choose a directory you can write"
        ) from e
    secure_rundir(rundir)  # pickles live there: it must be the user's, and private
    path = Path(journal) if journal and journal is not True else None
    locks = _rundir.hold(rundir, path)
    if path is None:
        return locks, None
    try:
        return locks, Journal(path, resume=resume)
    except (sqlite3.Error, OSError) as e:
        _rundir.release(locks)
        raise JournalError(
            f"Session(journal={str(journal)!r}): cannot open the journal ({e}); "
            "check the path, or pass journal=None to run without one"
        ) from e
    except BaseException:
        _rundir.release(locks)
        raise


#: the environment variable that names the default run directory (`pilotfish run --rundir`)
RUNDIR_ENV = "PILOTFISH_RUNDIR"


class Session(cf.Executor):
    """Run Python callables (and programs) with every failure recorded and handled.

    Keywords: ``workers`` (default: CPU count), ``backend`` (``"local"``, ``"dask"``,
    ``"radical"``, or a backend object such as
    :class:`pilotfish.backends.fake.FakeBackend`), ``rundir`` (default
    ``$PILOTFISH_RUNDIR``, else ``./.pilotfish``), ``keep_going`` (default
    True: independent work continues after a failure; False cancels what has not
    started), ``on_event(event)``, ``on_failure(failure, call)``, ``poison_after``
    (worker deaths that make a task poison), ``heartbeat_interval``/``heartbeat_timeout``
    (s; a backend that sends ``Alive`` and then stays silent for longer than
    ``heartbeat_timeout`` while ``shutdown`` waits has its unfinished tasks failed
    RUNTIME_LOST), ``max_master_restarts``, ``backoff`` (a
    :class:`pilotfish.core.policy.Backoff`), ``clock`` and ``rand`` (injected for
    deterministic tests), ``drain_after`` (``3`` or ``(3, 600.0)``: a worker or host
    where 3 different tasks failed WORKER_LOST, ENVIRONMENT or TIMEOUT within 600 s is
    drained, those attempts uncharged; see :mod:`pilotfish.core.drain`; None: off; the
    default ``"auto"`` is ``(3, 600.0)`` on backends whose workers may span hosts and
    that can retire one (Dask), off elsewhere). ``journal_values``: which DONE values the
    journal keeps for resume (True: all; False: none; N: those up to N bytes; a larger
    one's task runs again on resume; a task's ``keep_result`` option overrides it).
    ``preload`` (module names, every backend):
    each worker imports them as it starts, not on its first task. ``links`` (local and
    Dask, default True): a task whose inputs still run is sent at once, linked to them,
    and the master or Dask's scheduler passes their values on (False: sent once they are
    DONE; see :attr:`pilotfish.core.workflow.Workflow.links`). Other keywords go to the
    backend.

    (Longer than the size guide: the Executor's public methods with their documentation,
    and an ``__init__`` whose 24 keywords take 27 lines before its body; what they run
    lives in :mod:`.driver`.)
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        max_workers: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        backend: str | Backend = "local",
        rundir: str | None = None,
        keep_going: bool = True,
        on_event: Callable[[Any], None] | None = None,
        on_failure: Callable[[FailureRecord, Call], Retry | Fail | None] | None = None,
        poison_after: int = 3,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_master_restarts: int = 3,
        journal: str | os.PathLike[str] | bool | None = True,
        resume: bool | None = None,
        keep_sandboxes: str = "failed",
        journal_values: bool | int = True,
        requires: Iterable[str] = (),
        requires_programs: Iterable[str] = (),
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] | None = None,
        drain_after: Any = "auto",
        **backend_options: Any,
    ) -> None:
        workers, workers_name = _workers_arg(workers, max_workers)
        if "preload" in backend_options:  # every backend takes it; checked here, once
            backend_options["preload"] = check_preload(backend_options["preload"])
        factory = backend_factory(backend, backend_options)
        check_session_args(
            workers,
            poison_after,
            heartbeat_interval,
            heartbeat_timeout,
            max_master_restarts,
            workers_name=workers_name,
        )
        # the default: $PILOTFISH_RUNDIR (`pilotfish run --rundir X` sets it), else .pilotfish
        rundir = check_rundir(
            rundir if rundir is not None else os.environ.get(RUNDIR_ENV) or ".pilotfish"
        )
        value_limit = check_session_choices(initializer, journal_values, keep_sandboxes)
        if resume is None:  # `pilotfish resume SCRIPT` sets it for the script's sessions
            resume = os.environ.get("PILOTFISH_RESUME") == "1"
        if journal is True:
            journal = Path(rundir) / "journal.db"
        if not journal and resume:
            raise InvalidTask("Session(resume=True) needs a journal; do not pass journal=None")
        shared_process()  # attempts run here (FakeBackend) leave the process alone
        self._rundir = rundir
        self._keep_sandboxes = keep_sandboxes
        self._on_failure = on_failure
        self._tasks = TaskTable()
        self._dups: dict[str, int] = {}
        self._next_tid = 1
        self._shutdown_flag = False
        self._closing = False  # a shutdown(wait=False) thread is draining
        lock = threading.RLock()
        self._locks, self._journal = _open_rundir(rundir, journal, bool(resume))
        try:
            core = wf.Workflow(
                poison_after=poison_after,
                keep_going=keep_going,
                backoff=backoff,
                rand=rand or random.Random().random,
                drain=drain_policy(
                    getattr(factory, "drains_by_default", False)
                    if drain_after == "auto"
                    else drain_after
                ),
            )
            self._driver = d = self._make_driver(
                lock,
                core,
                clock,
                on_event,
                bool(resume),
                heartbeat_interval,
                heartbeat_timeout,
            )
            if initializer is not None:
                d.init = self._pickle_initializer(initializer, tuple(initargs))
            d.value_limit = value_limit
            self._backend: Backend = (
                factory(
                    workers,
                    heartbeat_interval=heartbeat_interval,
                    heartbeat_timeout=heartbeat_timeout,
                    max_master_restarts=max_master_restarts,
                    rundir=rundir,
                    **backend_options,
                )
                if isinstance(backend, str)
                else factory
            )
        except BaseException:  # e.g. a bad backend option: nothing ran, leave no journal open
            if self._journal is not None:
                self._journal.close("failed")
            _rundir.release(self._locks)
            raise
        # a backend that passes values between attempts itself gets linked chains
        d.core.links = getattr(self._backend, "links", False) is True
        self._closer = Closer(self._backend, self._journal, d.core, d.timer_cv, self._locks)
        self._finalizer = weakref.finalize(self, self._closer)
        self._finalizer.atexit = False  # lifecycle's exit hooks close sessions first
        d.start(self._backend)
        lifecycle.register(self, self._journal.path if self._journal else None)
        self._check_requirements(requires, requires_programs)

    def _make_driver(
        self,
        lock: threading.RLock,
        core: wf.Workflow,
        clock: Callable[[], float],
        on_event: Callable[[Any], None] | None,
        resume: bool,
        heartbeat_interval: float,
        heartbeat_timeout: float,
    ) -> Driver:
        nonce = f"{random.getrandbits(32):08x}"  # sandbox tags unique in the rundir
        listeners = lifecycle.global_listeners() + ([on_event] if on_event else [])
        translate = Translator(
            core,
            self._tasks,  # type: ignore[arg-type]
            self._tasks.by_key,
            host=_wire.host_name(),
            clock=clock,
            on_failure=self._on_failure,
            repickle=self._pickle_call,
            public_events=bool(listeners),
        )
        journal = self._journal
        return Driver(
            core,
            self._tasks,
            translate,
            journal,
            Resumer(journal, self._rundir, nonce, lock) if resume and journal else None,
            lock=lock,
            clock=clock,
            listeners=listeners,
            nonce=nonce,
            keep_all_sandboxes=keeps_sandbox(self._keep_sandboxes, ok=True),
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            rundir=str(Path(self._rundir).resolve()),
        )

    def _pickle_initializer(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
        payload, deps = self._pickle_call(fn, args, {})
        if deps:
            raise InvalidTask(
                "Session(initargs=...) may not contain Tasks: the initializer runs "
                "before any task, on every worker"
            )
        return payload

    def _check_requirements(self, requires: Iterable[str], programs: Iterable[str]) -> None:
        """``Session(requires=..., requires_programs=...)``: pre-flight on a worker now;
        a failed check closes the session and raises, before anything is submitted."""
        modules = str_list(requires, "requires")
        progs = str_list(programs, "requires_programs")
        if not (modules or progs):
            return
        try:
            checks = self.preflight(modules, progs)
        except BaseException:
            self._close()
            raise
        bad = [c for c in checks if not c.ok]
        if bad:
            self._close()
            lines = "\n".join(f"  - {c.message()}" for c in bad)
            raise EnvironmentMismatch(
                f"Session(requires=...): {len(bad)} pre-flight check(s) failed on the "
                f"workers; nothing was submitted:\n{lines}"
            )

    # ------------------------------------------------------------------ public
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Task:
        """Run ``fn(*args, **kwargs)``; Tasks anywhere in the arguments are dependencies."""
        opts = _DEFAULT_OPTIONS
        if isinstance(fn, TaskFunction):
            opts, fn = fn.task_options, fn.fn
        if not callable(fn):
            raise InvalidTask(f"submit() needs a callable as first argument, got {fn!r}")
        return self._submit_call(fn, args, kwargs, opts)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``Executor.map``: submits every call now and yields the results in order
        (raising a call's exception when its turn comes; ``timeout`` counts from this
        call). ``chunksize=n`` runs n calls per attempt, as ProcessPoolExecutor does: fewer,
        larger tasks for many tiny calls; a failure then fails (and retries) its chunk."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise InvalidTask(
                f"map(chunksize={chunksize!r}) is invalid: chunksize must be >= 1 "
                "(the number of calls each task runs)"
            )
        check_wait("Session.map", timeout)
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        end = None if timeout is None else time.monotonic() + timeout
        opts = _DEFAULT_OPTIONS
        if isinstance(fn, TaskFunction):
            opts, fn = fn.task_options, fn.fn
        if not callable(fn):
            raise InvalidTask(f"map() needs a callable as first argument, got {fn!r}")
        name = f"{opts.name or task_name(fn)}[chunk]"
        opts = opts.merged(name=name)
        calls = zip(*iterables, strict=False)
        fs = [
            self._submit_call(call_chunk, (fn, chunk), {}, opts)
            for chunk in iter(lambda: tuple(itertools.islice(calls, chunksize)), ())
        ]
        return _chunk_results(fs, end)

    def executable(
        self,
        argv: Sequence[Any],
        /,
        *,
        inputs: dict[str, Any] | None = None,
        outputs: Sequence[str] = (),
        env: dict[str, str] | None = None,
        stdin: str | os.PathLike[str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        retry_exit_codes: Iterable[int] = (),
        name: str | None = None,
        key: str | None = None,
        keep_sandboxes: str | None = None,
        requires_programs: Iterable[str] = (),
        requires: Iterable[str] = (),
        inherit_env: bool | Iterable[str] = True,
        resume_files: Sequence[str] = (),
        resume_argv: Sequence[Any] | None = None,
        timeout_retries: int | None = None,
    ) -> Task:
        """Run a program in its own sandbox; the Task's value is a :class:`CommandResult`.

        ``argv`` elements and ``inputs`` values may be Tasks (their value, e.g. from
        ``task.output(name)``, is substituted). ``outputs`` must exist after exit 0.
        ``retries`` covers transient failures (worker lost, timeout) and exit codes
        listed in ``retry_exit_codes``; any other non-zero exit is permanent. Of those,
        ``timeout_retries`` may follow a timeout (default 1, or all ``retries`` with
        ``resume_files``: each retry then continues from the checkpoint).
        ``keep_sandboxes`` (default: the session's) is ``"failed"`` (successful
        sandboxes are removed after moving outputs to ``rundir/results/NAME``) or
        ``"all"``. Failed attempts' sandboxes are always kept. ``requires_programs``
        (programs that must be on the worker's PATH) and ``requires`` (Python modules)
        are checked on the worker first: a failed check is ENVIRONMENT, not retried.
        ``inherit_env`` is what the program inherits from the worker's environment (which
        is the client's, on the local backend): True (all), False (only ``env``), or a
        list of names to pass through, e.g. ``["PATH", "HOME"]``. ``cwd`` is relative to
        the sandbox (and may not climb out of it); an absolute ``cwd`` runs the program
        there but then no ``outputs`` may be declared, since outputs are only ever taken
        from inside the sandbox. ``resume_files`` (names in the sandbox, e.g. ``["md.cpt"]``):
        a retry after a lost, timed-out or ``retry_exit_codes`` attempt starts with them,
        copied from that attempt's sandbox (all or none), and ``resume_argv`` then
        replaces ``argv``; the attempt's ``note`` says which.
        """
        programs = str_list(requires_programs, "requires_programs")
        modules = str_list(requires, "requires")
        spec = program_spec(
            argv,
            inputs=inputs,
            outputs=outputs,
            env=env,
            stdin=stdin,
            cwd=cwd,
            timeout=timeout,
            retries=retries,
            retry_exit_codes=retry_exit_codes,
            name=name,
            key=key,
            keep_sandboxes=keep_sandboxes or self._keep_sandboxes,
            task_type=Task,
            inherit_env=inherit_env,
            resume_files=resume_files,
            resume_argv=resume_argv,
            timeout_retries=timeout_retries,
        )
        payload, deps = pickle_call(spec.template, self, Task, f"program {spec.shown!r}")
        digest = call_digest(payload, deps, input_stamps(spec.template))
        opts = spec.options
        task = self._register(opts.name or spec.shown, opts, digest, deps, payload, "command")
        task._declared_outputs = spec.outputs
        task._cmd_timeout = timeout
        task._programs = programs
        if modules:
            task.options = task.options.merged(requires=modules)
        return self._start(task, describe_argv(argv) if self._journal is not None else None)

    def preflight(
        self,
        requires: Iterable[str] = (),
        programs: Iterable[str] = (),
        timeout: float = 120.0,
    ) -> list[Any]:
        """Run the pre-flight checks on a worker and return every check (passed or not):
        Python, pilotfish and cloudpickle versions, sandbox root, disk space, and the given
        module requirements and programs. Used by ``Session(requires=...)`` and
        ``pilotfish check``."""
        return self._driver.probes.preflight(
            self._backend.submit, self._rundir, requires, programs, timeout
        )

    def processes(self) -> dict[str, Any]:
        """``{"master": pid, "workers": [pids]}`` (diagnostics)."""
        return self._backend.processes()

    def failures(self) -> list[FailureRecord]:
        """The FailureRecord of every task that failed so far, in submission order."""
        with self._driver.lock:
            refs = self._driver.output_keys  # .output() references: not tasks of yours
            return [f for f in self._driver.core.failures() if f.key not in refs]

    def failure_digest(self) -> dict[str, Any]:
        """The failures grouped by category and normalised message, largest group first
        (plain data, as ``pilotfish failures --group --json`` prints): ``{"failed": n,
        "groups": [{"category", "signature", "count", "examples", "roots", ...}]}``."""
        from ..digest import failure_digest

        return failure_digest(self.failures())

    @property
    def tasks(self) -> list[Task]:
        """The tasks that are unfinished or still referenced (by you or a dependent task),
        in submission order; a finished task nobody holds is freed (its record is in
        :meth:`failures`, the journal and ``pilotfish status``)."""
        with self._driver.lock:
            return self._tasks.alive()

    def counts(self) -> dict[str, int]:
        """How many tasks are in each state (``.output()`` references included: they are
        tasks of the core; ``pilotfish status`` leaves them out)."""
        with self._driver.lock:
            return {s.name: n for s, n in self._driver.core.counts.items() if n}

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, _stop_now: bool = False
    ) -> None:
        """Stop taking tasks; with ``wait``, return when every task is final. That wait is
        bounded: a backend that sent ``Alive`` and then says nothing for longer than
        ``heartbeat_timeout`` is given up, and its unfinished tasks fail RUNTIME_LOST."""
        for name, flag in (("wait", wait), ("cancel_futures", cancel_futures)):
            if not isinstance(flag, bool | int):
                raise TypeError(f"Session.shutdown({name}={flag!r}) is invalid: give True or False")
        with self._driver.lock:
            self._shutdown_flag = True
            closing, self._closing = self._closing, True
        if cancel_futures:
            self._driver.cancel_unfinished()
        if _stop_now:
            self._close()
        elif wait:
            self._driver.drain()
            self._close()
        elif not closing:
            # return at once; the pending work still runs. A non-daemon thread waits for
            # it and then stops the backend; the interpreter does not exit before it ends
            threading.Thread(
                target=self._drain_and_close, name="pilotfish-shutdown", daemon=False
            ).start()

    def _drain_and_close(self) -> None:
        try:
            self._driver.drain()
        finally:
            self._close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Ctrl-C in the with-block: do not wait for the whole ensemble
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.shutdown(wait=True, cancel_futures=interrupted)

    # ------------------------------------------------------------------ submit
    def _submit_call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        opts: TaskOptions,
        output_of: str | None = None,
    ) -> Task:
        if self._shutdown_flag:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if lifecycle.exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        found = SettledFound()
        payload, deps = pickle_call((fn, args, kwargs), self, Task, found=found)
        name = opts.name or task_name(fn)  # the function a library's wrapper holds
        digest, task_unstable = call_key_digest((fn, args, kwargs), payload, deps)
        task = self._register(name, opts, digest, deps, payload, "call")
        task._settled = found.for_core(deps)
        task._key_unstable = task_unstable if opts.key is None else None
        task._output_of = output_of
        if output_of is not None:
            self._driver.output_keys.add(task.key)
        if self._on_failure is not None:
            task._call = (fn, args, kwargs)
        # for the journal's submit row only (driver.enqueue): the task does not keep it
        call = describe_call(fn, args, kwargs) if self._journal is not None else None
        return self._start(task, call)

    def _pickle_call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, list[Task]]:
        return pickle_call((fn, args, kwargs), self, Task)

    def _register(
        self,
        name: str,
        opts: TaskOptions,
        digest: str,
        deps: list[Task],
        payload: bytes,
        kind: str,
    ) -> Task:
        with self._driver.lock:
            if self._journal is not None:
                self._journal.raise_if_broken()  # loudly, rather than lose the run's history
            if opts.key is not None:
                key = opts.key
                if self._tasks.used(key):
                    raise InvalidTask(
                        f"task key {key!r} is already used in this session by "
                        f"{self._tasks.by_key(key) or 'an earlier task'!r}; keys must be unique"
                    )
            else:
                # the n-th identical call gets "-n": unique, and stable from run to run
                key = base = f"{name}-{digest}"
                n = self._dups.get(base, 1)
                while self._tasks.used(key):
                    n += 1
                    key = f"{base}-{n}"
                if n > 1:  # only repeated calls: a million distinct ones cost nothing here
                    self._dups[base] = n
            tid = self._next_tid
            self._next_tid += 1
            task = Task(self, tid, key, name, opts)
            task._payload = payload
            task._deps = tuple(deps)
            task._kind = kind
            self._tasks.add(task)
            self._driver.hold_session(self)
            return task

    def _start(self, task: Task, call: str | None = None) -> Task:
        """A registered task enters the core (resume: restored, or continuing the
        earlier run's interrupted attempt); ``call``: its description, for the journal's
        submit row (the task does not keep it)."""
        resumer, restored, earlier = self._driver.resumer, None, None
        if resumer is not None:
            try:
                restored = resumer.restore_value(task)
                if restored is None:
                    earlier = resumer.earlier_attempt(task)
            except BaseException:  # e.g. an untrusted value file: never submitted
                with self._driver.lock:
                    self._tasks.forget(task)
                raise
        self._driver.enqueue(task, restored, earlier, call)
        return task

    def _close(self) -> None:
        if not self._driver.close():
            return
        if self._driver.gave_up:
            self._closer.stop_timeout = self._driver.hb_timeout
        self._closer.collected = False
        self._finalizer()  # once: a later garbage collection does nothing
        lifecycle.unregister(self)
        if self._driver.resumer is not None:  # what resume took and what it ran, once
            self._driver.resumer.report()


def _chunk_results(fs: list[Task], end: float | None) -> Iterator[Any]:
    """The items of ``map``'s chunk tasks in order; holds no task it has passed (so
    neither their results), and cancels the rest if the caller stops early."""
    fs.reverse()
    try:
        while fs:
            f = fs.pop()
            try:
                chunk = f.result(None if end is None else end - time.monotonic())
            finally:
                f.cancel()
                del f
            yield from chunk
            del chunk
    finally:
        for f in fs:
            f.cancel()


def wait(
    fs: Iterable[cf.Future[Any]],
    timeout: float | None = None,
    return_when: str = cf.ALL_COMPLETED,
) -> cf._base.DoneAndNotDoneFutures[Any]:
    """``concurrent.futures.wait`` for Tasks (and any futures)."""
    check_wait("wait", timeout, return_when)
    return cf.wait(fs, timeout=timeout, return_when=return_when)


def as_completed(
    fs: Iterable[cf.Future[Any]], timeout: float | None = None
) -> Iterator[cf.Future[Any]]:
    """``concurrent.futures.as_completed`` for Tasks (and any futures)."""
    check_wait("as_completed", timeout)
    return cf.as_completed(fs, timeout=timeout)
