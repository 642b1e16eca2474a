"""pilotfish: a Python task runtime in which failure is a first-class result.

>>> import pilotfish
>>> with pilotfish.Session(workers=2) as s:         # doctest: +SKIP
...     a = s.submit(pow, 2, 10)
...     b = s.submit(sum, [a, a])                     # Tasks in arguments are dependencies
...     b.result()
2048

The public face is this module; everything else is private.
"""

from concurrent.futures import CancelledError

from ._version import __version__
from .client.events import HostDrained, MasterEvent, TaskEvent, WorkerEvent, WorkersGone
from .client.options import TaskFunction, TaskOptions, task
from .client.session import Call, Fail, Retry, Session, Task, as_completed, wait
from .client.settled import settled
from .core.drain import DrainPolicy
from .core.policy import Backoff
from .core.states import State
from .core.workflow import AttemptRecord
from .errors import (
    Category,
    CommandFailed,
    DependencyFailed,
    EnvironmentMismatch,
    Failure,
    FailureRecord,
    InvalidTask,
    InvalidTransition,
    MissingOutput,
    PilotfishError,
    RemoteError,
    RuntimeLost,
    TaskTimeout,
    WorkerLost,
)
from .runtime.programs import CommandResult
from .runtime.scratch import previous_attempt_files, scratch_dir

__all__ = [
    "AttemptRecord",
    "Backoff",
    "Call",
    "CancelledError",
    "Category",
    "CommandFailed",
    "CommandResult",
    "DependencyFailed",
    "DrainPolicy",
    "EnvironmentMismatch",
    "Fail",
    "Failure",
    "FailureRecord",
    "HostDrained",
    "InvalidTask",
    "InvalidTransition",
    "MasterEvent",
    "MissingOutput",
    "PilotfishError",
    "RemoteError",
    "Retry",
    "RuntimeLost",
    "Session",
    "State",
    "Task",
    "TaskEvent",
    "TaskFunction",
    "TaskOptions",
    "TaskTimeout",
    "WorkerEvent",
    "WorkerLost",
    "WorkersGone",
    "__version__",
    "as_completed",
    "previous_attempt_files",
    "scratch_dir",
    "settled",
    "task",
    "wait",
]
