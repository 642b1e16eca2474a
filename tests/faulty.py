"""Task functions that misbehave on purpose (imported by workers in fault tests)."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path


def ident(x: int) -> int:
    return x


def slow(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def write_pid_then_sleep(path: str, seconds: float, value: int = 1) -> int:
    """Publishes the worker pid, then works for `seconds`."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return value


def kill_self_once(marker: str, value: int) -> int:
    """SIGKILLs its own worker on the first attempt only."""
    p = Path(marker)
    if not p.exists():
        p.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def exit_hard(code: int) -> None:
    import sys

    sys.stderr.write(f"about to exit with {code} from pid {os.getpid()}\n")
    sys.stderr.flush()
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def stop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def spin_in_c(seconds: float) -> int:
    """Holds the GIL in C code (sum over a range) for about `seconds`."""
    n = int(3e7 * seconds)
    return sum(range(n)) and 1


def square(x: int) -> int:
    return x * x


def square_slowly(x: int) -> int:
    time.sleep(0.002)
    return x * x
