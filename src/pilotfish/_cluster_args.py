"""The checks of :func:`pilotfish.cluster.slurm`'s arguments, made at the call: a
:class:`TypeError` for a wrong type, a :class:`ValueError` for a wrong value, each naming
the argument, its value and what it needs; a str that may reach the job script must be
one line (:func:`_one_line`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["check_behaviour", "check_passed_on", "check_places", "check_sizes"]

_WALLTIME = re.compile(r"^(?:[0-9]+-[0-9]{1,2}(?::[0-9]{1,2}){0,2}|[0-9]+(?::[0-9]{1,2}){0,2})$")


def _bad(name: str, value: Any, need: str) -> ValueError:
    return ValueError(f"pilotfish.cluster.slurm({name}={value!r}) is invalid: {need}")


def _one_line(name: str, value: Any) -> None:
    """A str that reaches the job script: no newline or other control character, so
    nothing a caller passes becomes a line of the script of its own."""
    if not isinstance(value, str):
        raise TypeError(
            f"pilotfish.cluster.slurm({name}={value!r}) is invalid: give a str "
            f"(got {type(value).__name__})"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _bad(
            name,
            value,
            "it contains a newline or another control character, which would put a line "
            "of its own into the job script; give one line of text",
        )


def _integer(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"pilotfish.cluster.slurm({name}={value!r}) is invalid: give an int >= "
            f"{least} (got {type(value).__name__})"
        )
    if value < least:
        raise _bad(name, value, f"give an int >= {least}")


def check_sizes(
    *,
    cores: Any,
    jobs: Any,
    processes: Any,
    walltime: Any,
    memory: Any,
    parse_walltime: Callable[[str], float | None],
) -> None:
    """What the jobs are: how many, their cores, processes, walltime and memory
    (``parse_walltime``: :func:`pilotfish.cluster.parse_walltime`, SLURM's time format)."""
    _integer("cores", cores, 1)
    _integer("jobs", jobs, 0)
    _integer("processes", processes, 1)
    if processes > cores:
        raise _bad("processes", processes, f"at most cores={cores} (one thread each at least)")
    _one_line("walltime", walltime)
    secs = parse_walltime(walltime) if _WALLTIME.match(walltime.strip()) else None
    if not secs:
        raise _bad(
            "walltime",
            walltime,
            "give a positive SLURM time: 'HH:MM:SS', 'D-HH:MM:SS', 'MM:SS' or minutes "
            "('30'), e.g. '04:00:00'",
        )
    _one_line("memory", memory)
    try:
        from dask.utils import parse_bytes

        size = parse_bytes(memory) if memory.strip() else 0
    except (ValueError, TypeError):
        size = 0
    if not size or size < 0:
        raise _bad("memory", memory, "give a size such as '4GB' or '500MiB' (> 0)")


def check_places(*, interface: Any, queue: Any, log_directory: Any) -> None:
    """Where the jobs run and log: network interface, partition, log directory."""
    for name, value in (("interface", interface), ("queue", queue)):
        if value is not None:
            _one_line(name, value)
            if not value.strip():
                raise _bad(name, value, "give a non-empty str, or leave it out")
    if not isinstance(log_directory, str | Path):
        raise TypeError(
            f"pilotfish.cluster.slurm(log_directory={log_directory!r}) is invalid: give a "
            "directory path (str or Path)"
        )
    _one_line("log_directory", str(log_directory))
    if not str(log_directory).strip():
        raise _bad("log_directory", log_directory, "give a non-empty directory path")


def check_behaviour(adaptive: Any, lost_worker_timeout: Any, wait: Any, security: Any) -> None:
    """How the cluster behaves: adaptive, lost_worker_timeout, wait, security."""
    if not isinstance(adaptive, bool):
        raise TypeError(f"pilotfish.cluster.slurm(adaptive={adaptive!r}) is invalid: True/False")
    _one_line("lost_worker_timeout", lost_worker_timeout)
    try:
        from dask.utils import parse_timedelta

        ok = parse_timedelta(lost_worker_timeout) is not None
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise _bad("lost_worker_timeout", lost_worker_timeout, "give a duration such as '1s'")
    if wait is not None and (
        isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 < wait < 1e9
    ):
        raise _bad("wait", wait, "give seconds > 0 to wait for the first worker, or None")
    if not (isinstance(security, bool) or type(security).__name__ == "Security"):
        raise TypeError(
            f"pilotfish.cluster.slurm(security={security!r}) is invalid: give True (TLS "
            "with credentials made for this cluster), a distributed.Security, or False"
        )


def check_passed_on(jobqueue_options: dict[str, Any]) -> None:
    """Any other keyword may reach the job script (account, job_extra_directives,
    job_script_prologue, worker_extra_args, python, local_directory, ...): every str in
    it, or in a list of them, must be one line."""
    for name, value in jobqueue_options.items():
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if isinstance(item, str | Path):
                _one_line(name, str(item))
