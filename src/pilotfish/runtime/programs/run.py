"""Run one attempt of a command-line program inside a sandbox directory:
:func:`run_command`, the sequence of named steps, each in the module of its concern.

*Sandbox.*  Every attempt gets its own directory (``sandbox``). Inputs are symlinked
into it under their declared names (``staging``), the program runs with the sandbox as
its working directory (unless told otherwise), and its declared outputs are looked up
there after it exits.  :func:`run_command` never deletes the sandbox: whoever called it
decides whether to keep it (``sandbox.keeps_sandbox``).

*Stage first, fail early.*  Everything that can be checked before spawning is checked
before spawning: the arguments (``spec.spec_problem``, as the client did at submit),
that every input exists and its name stays inside the sandbox, that the program can be
found and is executable, that the working directory exists.  Those failures are
reported as ``"staging"`` (the inputs or the sandbox) or ``"environment"`` (this host
lacks the program or directory), never as a failure of the program itself, and the
message names the host, the program and the ``PATH`` searched, because "works on my
machine" is the usual cause.

*Files, not pipes.*  stdout and stderr are written straight to ``stdout.txt`` and
``stderr.txt`` in the sandbox: the child gets the file descriptors, so we never have
to pump pipes (a full pipe deadlocks a child that writes more than 64 KiB while nobody
reads), the output is complete and byte-exact however large it is, it survives the
death of the worker, and a human can ``tail`` it while the program runs.

The process itself (its group, its timeout, killing it) is ``process``'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ...core.ledger import describe_exit, signal_name
from ..files import open_regular
from .outcome import TAIL_LINES, CommandOutcome, OutcomeKind, excerpt, this_host
from .process import Ended, resolve_program, start, wait_for
from .spec import STDERR_NAME, STDOUT_NAME, CommandSpec, program_cwd, program_env, spec_problem
from .staging import find_outputs, stage_inputs


def run_command(
    spec: CommandSpec,
    sandbox: str | Path,
    *,
    on_start: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> CommandOutcome:
    """Run ``spec`` once in ``sandbox`` and report what happened.

    Never raises for problems of the program, its inputs or this host: those
    become a :class:`CommandOutcome`.  It raises only if ``on_start`` raises
    (after killing the process group) or on interpreter-level interruptions
    (also after killing the group).  The sandbox is never deleted.
    """
    run = _Attempt(spec, Path(sandbox).absolute(), time.monotonic(), this_host())
    try:
        _check(run)
        _make_box(run)
        launch = _prepare(run)
        proc = _spawn(run, launch)
    except _Refused as r:
        return run.outcome(r.kind, r.message)
    ended = wait_for(proc, spec.timeout, on_start, cancel)
    return _judge(run, launch, ended)


class _Refused(Exception):
    """The attempt cannot start: an outcome of ``kind`` with ``message``."""

    def __init__(self, kind: OutcomeKind, message: str) -> None:
        super().__init__(message)
        self.kind: OutcomeKind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class _Attempt:
    spec: CommandSpec
    box: Path
    started: float
    host: str

    @property
    def program(self) -> str:
        return self.spec.argv[0] if self.spec.argv else ""

    def outcome(
        self,
        kind: OutcomeKind,
        message: str,
        *,
        returncode: int | None = None,
        streams: bool = False,
        outputs: dict[str, str] | None = None,
        missing: tuple[str, ...] = (),
    ) -> CommandOutcome:
        return CommandOutcome(
            kind=kind,
            message=message,
            returncode=returncode,
            signal=None if returncode is None else signal_name(returncode),
            stdout_path=str(self.box / STDOUT_NAME) if streams else None,
            stderr_path=str(self.box / STDERR_NAME) if streams else None,
            sandbox=str(self.box),
            outputs=outputs or {},
            missing=missing,
            elapsed=time.monotonic() - self.started,
            host=this_host(),
        )


@dataclass(frozen=True, slots=True)
class _Launch:
    """What the program is started with: resolved before anything is spawned."""

    executable: str
    cwd: str
    env: dict[str, str]


# --------------------------------------------------------------------------- before the spawn


def _check(run: _Attempt) -> None:
    problem = spec_problem(run.spec)
    if problem is not None:
        raise _Refused("invalid", f"invalid program task on host {run.host}: {problem}.")


def _make_box(run: _Attempt) -> None:
    """The sandbox exists (mode 0700), with the inputs staged in it."""
    box = run.box
    try:
        if not box.is_dir():
            box.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(box, 0o700)
    except OSError as exc:
        raise _Refused(
            "staging", f"cannot create sandbox {box} on host {run.host}: {exc.strerror or exc}."
        ) from None
    problem = stage_inputs(run.spec, box)
    if problem is not None:
        raise _Refused("staging", problem)


def _prepare(run: _Attempt) -> _Launch:
    """The program's environment, its working directory (which must exist) and its
    executable (which must be found)."""
    spec, box, host, program = run.spec, run.box, run.host, run.program
    env = program_env(spec, os.environ)
    cwd = program_cwd(spec, box)
    if not os.path.isdir(cwd):
        raise _Refused(
            "environment",
            f"cannot run {program!r} on host {host}: working directory {cwd} does not exist "
            f"or is not a directory (sandbox {box}).",
        )
    executable, reason = resolve_program(program, cwd, env)
    if executable is None:
        raise _Refused(
            "environment",
            f"cannot run {program!r} on host {host}: {reason}. Install it on this host "
            "or fix the command/PATH.",
        )
    return _Launch(executable, cwd, env)


# --------------------------------------------------------------------------- the spawn


def _spawn(run: _Attempt, launch: _Launch) -> subprocess.Popen[bytes]:
    """Start the program with its stdin file and the sandbox's stream files."""
    with _stdin(run) as stdin, _streams(run) as (out_f, err_f):
        try:
            return start(
                run.spec.argv, launch.executable, launch.cwd, launch.env, stdin, out_f, err_f
            )
        except OSError as exc:
            detail = exc.strerror or str(exc)
            if exc.errno == errno.ENOEXEC:
                detail += " (not a binary and no '#!' line?)"
            raise _Refused(
                "environment",
                f"cannot start {run.program!r} ({launch.executable}) on host {run.host}: "
                f"{detail}; cwd {launch.cwd}, PATH searched: {launch.env.get('PATH', os.defpath)}.",
            ) from None


@contextlib.contextmanager
def _stdin(run: _Attempt) -> Iterator[IO[bytes] | None]:
    """The program's stdin file, open (a regular file: a FIFO would block this worker
    until someone writes it), or None."""
    stdin = run.spec.stdin
    if stdin is None:
        yield None
        return
    path = stdin if os.path.isabs(stdin) else os.path.join(run.box, stdin)
    try:
        f = open_regular(path)
    except OSError as exc:
        raise _Refused(
            "staging",
            f"cannot open stdin file {path} for {run.program!r} on host {run.host}: "
            f"{exc.strerror or exc} (sandbox {run.box}).",
        ) from None
    with f:
        yield f


@contextlib.contextmanager
def _streams(run: _Attempt) -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    """``stdout.txt`` and ``stderr.txt`` in the sandbox, created afresh (mode 0600)."""
    try:
        with contextlib.ExitStack() as stack:
            out_f = stack.enter_context(open(run.box / STDOUT_NAME, "wb", opener=_private))
            err_f = stack.enter_context(open(run.box / STDERR_NAME, "wb", opener=_private))
            files = stack.pop_all()
    except OSError as exc:
        raise _Refused(
            "staging",
            f"cannot create output files in sandbox {run.box} on host {run.host}: "
            f"{exc.strerror or exc}.",
        ) from None
    with files:
        yield out_f, err_f


def _private(path: str, flags: int) -> int:
    """``open()``'s opener for the runner's own files in a sandbox: mode 0600 whatever
    the umask, and never through a symlink."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)


# --------------------------------------------------------------------------- after the exit


def _judge(run: _Attempt, launch: _Launch, ended: Ended) -> CommandOutcome:
    """The outcome of a program that ran: its status lost, killed, failed, or exited 0
    (then its outputs decide)."""
    program, host, box, rc = run.program, run.host, run.box, ended.returncode
    stderr_path = box / STDERR_NAME
    if ended.lost:
        return run.outcome(
            "environment",
            f"the exit status of {program!r} on host {host} was lost: the child was reaped "
            "by someone else (ECHILD; is SIGCHLD ignored in this worker, e.g. by an earlier "
            f"task calling signal.signal(SIGCHLD, SIG_IGN)?). stderr: {stderr_path}; "
            f"sandbox {box}.",
            streams=True,
        )
    how = describe_exit(rc)[0]
    if ended.killed == "timeout":
        message = (
            f"{program!r} on host {host} exceeded its time limit of {run.spec.timeout:g}s "
            f"(ran {ended.ran:.1f}s) and its process group was killed; {how}. "
            f"stderr: {stderr_path}; sandbox kept at {box}. "
            f"{excerpt(stderr_path, 'stderr', TAIL_LINES)}"
        )
        return run.outcome("timeout", message, returncode=rc, streams=True)
    if ended.killed == "cancelled":
        message = (
            f"cancelled: {program!r} on host {host} was cancelled after {ended.ran:.1f}s and "
            f"its process group was killed; {how}. stderr: {stderr_path}; sandbox {box}."
        )
        return run.outcome("failed", message, returncode=rc, streams=True)
    if rc != 0:
        message = (
            f"{program!r} on host {host} {how} after {ended.ran:.1f}s. "
            f"stderr: {stderr_path}; sandbox {box}. {excerpt(stderr_path, 'stderr', TAIL_LINES)}"
        )
        return run.outcome("failed", message, returncode=rc, streams=True)
    return _collect(run, launch, ended)


def _collect(run: _Attempt, launch: _Launch, ended: Ended) -> CommandOutcome:
    """The outcome of a program that exited 0: ok if every declared output is there,
    inside the sandbox."""
    program, host, box, rc = run.program, run.host, run.box, ended.returncode
    found, missing, escaped = find_outputs(run.spec.outputs, launch.cwd, box)
    if escaped:
        where = ", ".join(f"{n!r} -> {p}" for n, p in escaped.items())
        message = (
            f"{program!r} on host {host} exited 0 but declared output(s) {where} resolve "
            f"outside the sandbox {box}; outputs are only taken "
            "from inside the sandbox (a symlink to, or a file inside, the user's own files "
            "is never collected)."
        )
        return run.outcome(
            "missing_output", message, returncode=rc, streams=True, missing=tuple(escaped)
        )
    if missing:
        listed = ", ".join(repr(m) for m in missing)
        message = (
            f"{program!r} on host {host} exited 0 but did not create declared output(s) "
            f"{listed} (looked in {launch.cwd}; sandbox {box}). Check the output names in "
            f"the command and the program's stderr: {box / STDERR_NAME}."
        )
        return run.outcome(
            "missing_output", message, returncode=rc, streams=True, missing=tuple(missing)
        )
    message = f"{program!r} on host {host} exited 0 after {ended.ran:.1f}s (sandbox {box})."
    return run.outcome("ok", message, returncode=rc, streams=True, outputs=found)
