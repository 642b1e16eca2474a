"""The public face: exports locked, options validated at once with clear errors."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

import pilotfish


def test_all_is_locked() -> None:
    """Adding or removing a public name is a deliberate act: update this list with it."""
    assert sorted(pilotfish.__all__) == sorted(
        [
            "AttemptRecord",
            "Backoff",
            "Call",
            "CancelledError",
            "Category",
            "CommandFailed",
            "CommandResult",
            "DependencyFailed",
            "EnvironmentMismatch",
            "Fail",
            "Failure",
            "FailureRecord",
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
            "DrainPolicy",
            "HostDrained",
            "previous_attempt_files",
            "scratch_dir",
            "settled",
            "__version__",
            "as_completed",
            "task",
            "wait",
        ]
    )
    for name in pilotfish.__all__:
        assert hasattr(pilotfish, name), name


def test_exception_tree() -> None:
    """Callers catch at the right level: every pilotfish error is a PilotfishError."""
    for cls in (
        pilotfish.InvalidTask,
        pilotfish.CommandFailed,
        pilotfish.MissingOutput,
        pilotfish.TaskTimeout,
        pilotfish.WorkerLost,
        pilotfish.RuntimeLost,
        pilotfish.DependencyFailed,
        pilotfish.EnvironmentMismatch,
        pilotfish.RemoteError,
    ):
        assert issubclass(cls, pilotfish.PilotfishError)
    assert issubclass(pilotfish.TaskTimeout, TimeoutError)
    assert issubclass(pilotfish.MissingOutput, pilotfish.CommandFailed)
    assert pilotfish.CancelledError is cf.CancelledError
    assert issubclass(pilotfish.Session, cf.Executor)
    assert issubclass(pilotfish.Task, cf.Future)
    transient = {c for c in pilotfish.Category if c.transient}
    assert transient == {
        pilotfish.Category.TIMEOUT,
        pilotfish.Category.WORKER_LOST,
        pilotfish.Category.RUNTIME_LOST,
    }


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retries": True}, "retries"),
        ({"retry_on": (ValueError, 3)}, "retry_on"),
        ({"retry_on": "OSError"}, "retry_on"),
        ({"retry_on": [int]}, "retry_on"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "10"}, "timeout"),
        ({"key": ""}, "key"),
        ({"name": 3}, "name"),
        ({"requires": [None]}, "requires"),
        ({"retires": 3}, "retires"),
    ],
)
def test_invalid_options_name_the_option(options: dict[str, object], named: str) -> None:
    """A typo or a bad value is caught at decoration time, naming the option."""
    with pytest.raises(pilotfish.InvalidTask, match=named):
        pilotfish.task(**options)(abs)  # type: ignore[arg-type]
    with pytest.raises(pilotfish.InvalidTask, match=named):
        pilotfish.task(abs).options(**options)


def test_task_decorator_keeps_function_callable() -> None:
    """Decorated functions still run locally and keep their name."""

    @pilotfish.task(retries=2, retry_on=OSError, timeout=5)
    def double(x: int) -> int:
        return 2 * x

    assert double(4) == 8
    assert double.__name__ == "double"
    assert double.task_options.retry_on == (OSError,)
    assert double.options(retries=0).task_options.retries == 0
    assert double.task_options.retries == 2  # options() returns a copy


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"workers": 0}, "workers"),
        ({"poison_after": 0}, "poison_after"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"heartbeat_interval": 2.0, "heartbeat_timeout": 1.0}, "heartbeat_timeout"),
        ({"max_master_restarts": -1}, "max_master_restarts"),
        ({"backend": "nope"}, "backend"),
    ],
)
def test_invalid_session_arguments(kwargs: dict[str, object], named: str) -> None:
    """Bad Session arguments fail before any process starts."""
    with pytest.raises(pilotfish.InvalidTask, match=named):
        pilotfish.Session(**kwargs)  # type: ignore[arg-type]


def test_missing_optional_backend_says_how_to_install() -> None:
    """backend='radical' without RADICAL-Pilot installed: a clear error with the pip line."""
    import importlib.util

    if importlib.util.find_spec("radical") is not None:
        pytest.skip("radical.pilot is installed here; the error path cannot be shown")
    with pytest.raises(pilotfish.EnvironmentMismatch, match=r"pilotfish\[radical\]"):
        pilotfish.Session(backend="radical")


def test_python_dash_m_pilotfish_is_the_command() -> None:
    """``python -m pilotfish status`` works as ``pilotfish status`` does (the command line
    moved to ``pilotfish.tools.cli``; ``python -m pilotfish.cli`` is gone with it)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "pilotfish", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "status" in out.stdout and "failures" in out.stdout
