"""pilotfish: a Python task runtime in which failure is a first-class result.

>>> import pilotfish
>>> with pilotfish.Session(workers=2) as s:         # doctest: +SKIP
...     a = s.submit(pow, 2, 10)
...     b = s.submit(sum, [a, a])                     # Tasks in arguments are dependencies
...     b.result()
2048

The public face is this module; everything else is private.

Its names are imported when first used (PEP 562): a worker or master process, which
imports ``pilotfish.backends...`` and so this package, then loads only what it runs,
not the client (the session, the journal, rich): about 0.1 s less at every process start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors as _errors  # light, and every process imports it anyway
from ._version import __version__

if TYPE_CHECKING:
    from concurrent.futures import CancelledError

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

#: public name -> the module that defines it
_WHERE = {
    "CancelledError": "concurrent.futures",
    **dict.fromkeys(
        ("HostDrained", "MasterEvent", "TaskEvent", "WorkerEvent", "WorkersGone"),
        "pilotfish.client.events",
    ),
    **dict.fromkeys(("TaskFunction", "TaskOptions", "task"), "pilotfish.client.options"),
    **dict.fromkeys(
        ("Call", "Fail", "Retry", "Session", "Task", "as_completed", "wait"),
        "pilotfish.client.session",
    ),
    "settled": "pilotfish.client.settled",
    "DrainPolicy": "pilotfish.core.drain",
    "Backoff": "pilotfish.core.policy",
    "State": "pilotfish.core.states",
    "AttemptRecord": "pilotfish.core.workflow",
    **dict.fromkeys(_errors.__all__, "pilotfish.errors"),  # its public names, all
    "CommandResult": "pilotfish.runtime.programs",
    **dict.fromkeys(("previous_attempt_files", "scratch_dir"), "pilotfish.runtime.scratch"),
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'pilotfish' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
