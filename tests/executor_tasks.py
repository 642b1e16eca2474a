"""Task functions for the Executor-semantics tests (imported by workers)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

STATE: Any = "uninitialized"


def init(value: Any, log: str | None = None) -> None:
    """An initializer: sets a module global; appends its pid to ``log`` if given."""
    global STATE
    STATE = value
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")


def state() -> tuple[Any, int]:
    return STATE, os.getpid()


def init_fails() -> None:
    raise ValueError("error in initializer: model file missing")


def say(*words: Any) -> None:
    """print(), but as one write(2): lines from two workers sharing a pipe never interleave."""
    os.write(1, (" ".join(map(str, words)) + "\n").encode())


def sleep_then(value: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return value


def wait_for_file(path: str, timeout: float) -> bool:
    """Block until ``path`` exists (True), or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def write_pid_then_sleep(path: str, seconds: float) -> tuple[Any, int]:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return STATE, os.getpid()


def _raise(exc_type: type[BaseException]) -> None:
    raise exc_type("raised while unpickling a result on the client")


class ExitAtUnpickle:
    """A result that raises SystemExit when the client unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _raise, (SystemExit,)


class ErrorAtUnpickle:
    def __reduce__(self) -> tuple[Any, ...]:
        import pickle

        return _raise, (pickle.UnpicklingError,)


def make(cls: type) -> Any:
    return cls()


class Payload:
    """A result with some weight, to see it freed."""

    def __init__(self, n: int = 1000) -> None:
        self.data = bytes(n)


def log_once(path: str, i: int) -> int:
    """Append ``i`` to ``path`` in one write(2): how many times each body ran."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    return i
