"""The one exception tree of pilotfish, failure categories and failure records.

Every failed task has exactly one :class:`FailureRecord`; ``Task.result()``
raises an exception that carries it as ``.failure``::

    Exception
     +-- PilotfishError                    anything pilotfish itself raises
     |    +-- InvalidTask                  rejected by submit(): bad option, unpicklable call,
     |    |                                a Task from another session (never dispatched)
     |    +-- CommandFailed                a program exited non-zero or died by a signal
     |    +-- MissingOutput                a program exited 0 but a declared output is absent
     |    +-- TaskTimeout (+TimeoutError)  the attempt ran past its ``timeout`` and was stopped
     |    +-- WorkerLost                   the worker running the attempt died or hung
     |    +-- RuntimeLost                  the master/scheduler itself died or stopped answering
     |    +-- DependencyFailed             an input task failed; names ``upstream`` and ``root``
     |    +-- EnvironmentMismatch          the worker environment cannot run the task
     |    +-- RemoteError                  a user exception that could not travel back as itself
     |    +-- InvalidTransition            an internal state-machine bug (carries the history)
     |    |    +-- InvalidSlotTransition   a move the local dispatcher's slot table forbids
     |    +-- InvariantViolation (+AssertionError)  ``validate()`` found a machine's state
     |    |                                broken: a bug (core.machine; tests only)
     |    +-- JournalError                 the journal or run directory cannot be used
     |         +-- RundirBusy              another session holds the run directory (_rundir)
     |         +-- JournalDamaged          SQLite found damaged pages: never written to
     |         +-- JournalReadOnly         read-only: read by the CLI, refused for writing
     +-- <the user's own exception>        USER_ERROR: re-raised as its own type, with the
                                           remote traceback and a note naming task/attempt/worker

``concurrent.futures.CancelledError`` is raised for cancelled tasks, as the
Executor protocol requires.

Fine lines: ``WorkerLost`` means *a process running your task vanished*
(SIGKILL, segfault, ``os._exit``, hang); it is transient and retried.
``RuntimeLost`` means *the machinery above the workers vanished* (the
master or the scheduler); the task itself may have been fine.
``TaskTimeout`` is ours stopping your task on purpose.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any

__all__ = [
    "Category",
    "CommandFailed",
    "DependencyFailed",
    "EnvironmentMismatch",
    "Failure",
    "FailureRecord",
    "InvalidTask",
    "InvalidTransition",
    "MissingOutput",
    "PilotfishError",
    "RemoteError",
    "RuntimeLost",
    "TaskTimeout",
    "WorkerLost",
]


class Category(enum.Enum):
    """Why a task failed. ``transient`` categories are retried by default."""

    USER_ERROR = "user_error"
    COMMAND_FAILED = "command_failed"
    MISSING_OUTPUT = "missing_output"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    RUNTIME_LOST = "runtime_lost"
    DEPENDENCY_FAILED = "dependency_failed"
    ENVIRONMENT = "environment"
    INVALID_TASK = "invalid_task"
    CANCELLED = "cancelled"

    @property
    def transient(self) -> bool:
        return self in _TRANSIENT


_TRANSIENT = frozenset({Category.TIMEOUT, Category.WORKER_LOST, Category.RUNTIME_LOST})


@dataclasses.dataclass(frozen=True, slots=True)
class FailureRecord:
    """Everything known about one failure, complete (nothing is ever truncated).

    ``traceback`` is the complete remote traceback text for USER_ERROR;
    ``stderr_tail`` the last lines of a dead worker's or program's stderr.
    For DEPENDENCY_FAILED, ``upstream`` is the failed input and ``root`` the
    task where the failure began. ``staged`` is set when a failed program's
    files could not be read on the client (the worker's own disk): they were
    copied into the run directory, ``stdout_path``/``stderr_path`` name the
    copies, and it says where the originals are (host, sandbox) and what was cut.
    """

    key: str
    category: Category
    message: str
    transient: bool = False
    exc_type: str | None = None
    traceback: str | None = None
    returncode: int | None = None
    signal: str | None = None
    stdout_path: str | None = None
    stderr_path: str | None = None
    stderr_tail: str | None = None
    sandbox: str | None = None
    worker: str | None = None
    host: str | None = None
    pid: int | None = None
    attempt: int | None = None
    time: float = dataclasses.field(default_factory=time.time)
    upstream: str | None = None
    root: str | None = None
    staged: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["category"] = self.category.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FailureRecord:
        d = dict(d)
        d["category"] = Category(d["category"])
        return cls(**d)

    def one_line(self) -> str:
        first = self.message.strip().splitlines()
        return first[0] if first else self.category.value


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """What a task that takes its inputs settled (:func:`pilotfish.settled`) gets in
    place of the value of an input that failed or was cancelled: which task, its name,
    the category and the one-line message (``pilotfish show KEY`` has the rest)."""

    key: str
    name: str
    category: Category
    message: str

    def __repr__(self) -> str:
        return f"Failure({self.key!r}, {self.category.value}: {self.message!r})"


class PilotfishError(Exception):
    """Base of every exception pilotfish raises; ``.failure`` is the record."""

    def __init__(self, message: str, failure: FailureRecord | None = None) -> None:
        super().__init__(message)
        self.failure = failure

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (str(self), self.failure))


class InvalidTask(PilotfishError, ValueError):
    """Raised by ``submit``/``executable`` itself: the task can never run as given."""


class CommandFailed(PilotfishError):
    """A program exited with a non-zero code or was killed by a signal.

    ``returncode`` is negative for a signal (as in :mod:`subprocess`);
    ``signal`` names it; ``stdout_path``/``stderr_path`` are the complete files.
    """

    @property
    def returncode(self) -> int | None:
        return self.failure.returncode if self.failure else None

    @property
    def stdout_path(self) -> str | None:
        return self.failure.stdout_path if self.failure else None

    @property
    def stderr_path(self) -> str | None:
        return self.failure.stderr_path if self.failure else None

    @property
    def sandbox(self) -> str | None:
        return self.failure.sandbox if self.failure else None


class MissingOutput(CommandFailed):
    """A program exited 0 but did not produce a declared output."""


class TaskTimeout(PilotfishError, TimeoutError):
    """The attempt ran longer than its ``timeout`` and was stopped by pilotfish."""


class WorkerLost(PilotfishError):
    """The worker process holding the attempt died (exit code / signal named) or hung."""


class RuntimeLost(PilotfishError):
    """The master (local backend) or scheduler (Dask) died or stopped answering."""


class DependencyFailed(PilotfishError):
    """An input of this task failed; ``__cause__`` is the root task's exception."""

    @property
    def upstream(self) -> str | None:
        return self.failure.upstream if self.failure else None

    @property
    def root(self) -> str | None:
        return self.failure.root if self.failure else None


class EnvironmentMismatch(PilotfishError):
    """The worker's environment cannot run this task (module, version, program, sandbox)."""


class RemoteError(PilotfishError):
    """A user exception that could not be pickled or unpickled on its way back.

    ``type_name`` is its qualified type name, ``remote_traceback`` the complete
    traceback text; the message is the original ``str(exc)``.
    """

    def __init__(
        self,
        message: str,
        failure: FailureRecord | None = None,
        *,
        type_name: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message, failure)
        self.type_name = type_name
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        return f"{self.type_name}: {base}" if self.type_name else base

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_remote_error,
            (Exception.__str__(self), self.failure, self.type_name, self.remote_traceback),
        )


def _rebuild_remote_error(
    message: str, failure: FailureRecord | None, type_name: str, tb: str
) -> RemoteError:
    return RemoteError(message, failure, type_name=type_name, remote_traceback=tb)


class InvalidTransition(PilotfishError, RuntimeError):
    """A state change the state machine forbids: a pilotfish bug. ``history`` tells the story."""

    def __init__(self, key: str, start: str, finish: str, history: list[Any]) -> None:
        lines = "\n".join(f"  {h}" for h in history)
        super().__init__(f"task {key!r}: invalid transition {start} -> {finish}; history:\n{lines}")
        self.key = key
        self.start = start
        self.finish = finish
        self.history = history

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.key, self.start, self.finish, self.history))


EXCEPTION_FOR: dict[Category, type[PilotfishError]] = {
    Category.COMMAND_FAILED: CommandFailed,
    Category.MISSING_OUTPUT: MissingOutput,
    Category.TIMEOUT: TaskTimeout,
    Category.WORKER_LOST: WorkerLost,
    Category.RUNTIME_LOST: RuntimeLost,
    Category.DEPENDENCY_FAILED: DependencyFailed,
    Category.ENVIRONMENT: EnvironmentMismatch,
    Category.INVALID_TASK: InvalidTask,
    Category.USER_ERROR: RemoteError,
}
