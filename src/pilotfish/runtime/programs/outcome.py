"""What one program attempt reports: :class:`CommandOutcome` (every attempt) and
:class:`CommandResult` (a successful one's value), and the quoting of the sandbox's
stream files in their messages (:func:`tail_lines`, :func:`excerpt`).

*Files, not pipes.*  stdout and stderr are written straight to ``stdout.txt`` and
``stderr.txt`` in the sandbox (see ``run``); error messages quote only the last lines
of stderr, read from the end of the file, never in a way that blocks.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from ..files import NotRegularFile, read_tail
from .spec import opt_str

OutcomeKind = Literal[
    "ok", "failed", "missing_output", "timeout", "environment", "staging", "invalid"
]
_KINDS: frozenset[str] = frozenset(
    ("ok", "failed", "missing_output", "timeout", "environment", "staging", "invalid")
)

#: Lines of stderr quoted in failure messages.
TAIL_LINES = 20


def this_host() -> str:
    """The host name every message of an attempt names."""
    return socket.gethostname()


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The value of a successful program task.

    ``stdout``/``stderr`` are the complete output files, ``outputs`` maps each
    declared output to its path, ``sandbox`` is the attempt's sandbox when it is
    kept (``keep_sandboxes="all"``), else None (the files were moved to
    ``rundir/results/NAME``, the sandbox's own unique name; see
    :func:`make_sandbox`). Paths are on ``host``'s filesystem.
    """

    returncode: int
    stdout: Path
    stderr: Path
    outputs: dict[str, Path]
    sandbox: Path | None
    host: str = ""
    elapsed: float = 0.0
    #: what the attempt started from, when the program names ``resume_files`` and an
    #: earlier attempt was lost: "resumed from attempt 2: md.cpt, 48 MB" or
    #: "fresh start: md.cpt missing" (also in the task's attempt record)
    note: str | None = None


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What happened to one attempt.  ``message`` is written for a human."""

    kind: OutcomeKind
    message: str
    returncode: int | None
    signal: str | None
    stdout_path: str | None
    stderr_path: str | None
    sandbox: str
    outputs: dict[str, str]
    missing: tuple[str, ...]
    elapsed: float
    host: str

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able representation."""
        return {
            "kind": self.kind,
            "message": self.message,
            "returncode": self.returncode,
            "signal": self.signal,
            "stdout_path": self.stdout_path,
            "stderr_path": self.stderr_path,
            "sandbox": self.sandbox,
            "outputs": dict(self.outputs),
            "missing": list(self.missing),
            "elapsed": self.elapsed,
            "host": self.host,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CommandOutcome:
        """Inverse of :meth:`to_dict`."""
        kind = str(d["kind"])
        if kind not in _KINDS:
            raise ValueError(f"unknown CommandOutcome kind {kind!r}")
        rc = d.get("returncode")
        return cls(
            kind=cast(OutcomeKind, kind),
            message=str(d.get("message", "")),
            returncode=None if rc is None else int(rc),
            signal=opt_str(d.get("signal")),
            stdout_path=opt_str(d.get("stdout_path")),
            stderr_path=opt_str(d.get("stderr_path")),
            sandbox=str(d.get("sandbox", "")),
            outputs={str(k): str(v) for k, v in (d.get("outputs") or {}).items()},
            missing=tuple(str(m) for m in (d.get("missing") or ())),
            elapsed=float(d.get("elapsed", 0.0)),
            host=str(d.get("host", "")),
        )


def tail_lines(path: str | Path, n: int = 20, max_bytes: int = 65536) -> str:
    """Return the last ``n`` lines of a file, reading at most ``max_bytes`` from its end.

    Bytes are decoded as UTF-8 with replacement characters, so any output is
    safe to put in a message.  A line cut by the ``max_bytes`` window is dropped
    unless it is the only line in the window.  An unreadable file gives "", and so
    does anything but a regular file (a program may have replaced its ``stderr.txt``
    with a FIFO: it is never opened in a way that blocks; see :func:`excerpt`).
    """
    if n <= 0 or max_bytes <= 0:
        return ""
    try:
        data, _, start = read_tail(path, max_bytes)
    except OSError:
        return ""
    return _last_lines(data, start, n)


def _last_lines(data: bytes, start: int, n: int) -> str:
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return ""
    lines = data.split(b"\n")
    if start > 0 and len(lines) > 1:
        lines = lines[1:]  # first line in the window is probably cut
    lines = lines[-n:]
    return "\n".join(line.rstrip(b"\r").decode("utf-8", errors="replace") for line in lines)


def excerpt(path: str | Path, what: str = "stderr", n: int = TAIL_LINES) -> str:
    """The sentence quoting a sandbox stream in a failure message: its last ``n`` lines,
    that it is empty, or why it was not read (it is not a regular file: the program
    replaced it with a FIFO, a device, a socket; or it cannot be opened). Never blocks."""
    try:
        data, _, start = read_tail(path, 65536)
    except NotRegularFile as e:
        return (
            f"{what} was not read: {path} is not a regular file ({e.strerror}; the program "
            "replaced it), so its output is not available"
        )
    except OSError as e:
        return f"{what} could not be read: {path}: {e.strerror or e}"
    tail = _last_lines(data, start, n)
    return f"last lines of {what}:\n{tail}" if tail else f"{what} is empty."
