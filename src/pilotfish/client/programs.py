"""Program tasks on the client: ``Session.executable()``'s arguments, checked once.

:func:`program_spec` turns what the user passed into the *template* a worker
runs (``backends/command_runner.py`` resolves it in a fresh sandbox) and the
task's options. Bad arguments are rejected here, by the call that received
them, with an :class:`~pilotfish.InvalidTask` naming the argument: never by a
worker crashing later. Input paths are made absolute (and must exist) so the
worker copies exactly the file the user meant; names inside the sandbox are
relative and cannot climb out of it.

The rules on the resolved call (NUL bytes, env names, ``cwd``, outputs that
clash, escape or name an input) live in one place,
:func:`pilotfish.runtime.programs.spec_problem`: checked here on what is known at
submit, and again on the worker once dependency values are substituted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidTask
from ..runtime.programs import CommandResult, CommandSpec, files_problem, spec_problem
from .options import TaskOptions, make_options

if TYPE_CHECKING:
    from .session import Task

__all__ = ["ProgramSpec", "backstop", "input_stamps", "output_path", "program_spec"]


@dataclasses.dataclass(frozen=True, slots=True)
class ProgramSpec:
    """A checked program call: the worker's ``template``, the task ``options``, and the
    name to show (the program's base name)."""

    template: dict[str, Any]
    options: TaskOptions
    shown: str

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.template["outputs"])


def _check_argv(
    name: str,
    argv: Any,
    example: str,
    task_type: type,
    bad: Callable[[str], InvalidTask],
) -> None:
    """``argv`` (or ``resume_argv``) is a non-empty list of str, paths, numbers or Tasks."""
    if isinstance(argv, str | bytes) or not isinstance(argv, Sequence) or not argv:
        raise bad(f"{name}={argv!r} must be a non-empty list such as {example}")
    for i, a in enumerate(argv):
        if not isinstance(a, str | os.PathLike | int | float | task_type):
            raise bad(f"{name}[{i}]={a!r} must be a str, path, number or Task")


def program_spec(
    argv: Any,
    *,
    inputs: Any,
    outputs: Any,
    env: Any,
    stdin: Any,
    cwd: Any,
    timeout: Any,
    retries: Any,
    retry_exit_codes: Iterable[Any],
    name: Any,
    key: Any,
    keep_sandboxes: Any,
    task_type: type[Task],
    inherit_env: Any = True,
    resume_files: Any = (),
    resume_argv: Any = None,
) -> ProgramSpec:
    """Check ``executable()``'s arguments; ``keep_sandboxes`` is already defaulted.
    ``task_type`` is :class:`pilotfish.Task` (Tasks may stand for arguments and inputs).

    ``resume_files`` are names inside the sandbox (as outputs are) that a retry after a
    lost, timed-out or retry-asking attempt starts with, copied from that attempt's
    sandbox (all or none); ``resume_argv`` (needs ``resume_files``) replaces ``argv``
    when they all came."""

    def bad(what: str) -> InvalidTask:
        return InvalidTask(f"executable(): {what}")

    _check_argv(
        "argv", argv, "['gmx', 'mdrun'] (for a shell line use ['sh', '-c', LINE])", task_type, bad
    )
    first = argv[0]
    shown = "program" if isinstance(first, task_type) else os.path.basename(os.fspath(first))
    ins: dict[str, Any] = {}
    for n, v in (inputs or {}).items():
        if not isinstance(n, str) or not n or os.path.isabs(n) or ".." in Path(n).parts:
            raise bad(f"input name {n!r} must be a relative path inside the sandbox")
        if isinstance(v, task_type):
            ins[n] = v
        elif isinstance(v, str | os.PathLike):
            p = os.path.abspath(os.fspath(v))
            if not os.path.exists(p):
                raise bad(f"input {n!r}: {p} does not exist")
            ins[n] = p
        else:
            raise bad(f"input {n!r}={v!r} must be a path or a Task")
    if (
        isinstance(outputs, str | bytes)
        or not isinstance(outputs, Iterable)
        or not all(
            isinstance(o, str) and o and not os.path.isabs(o) and ".." not in Path(o).parts
            for o in outputs
        )
    ):
        raise bad(f"outputs={outputs!r} must be a list of relative paths")
    outputs = list(outputs)
    if env is not None and not (
        isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise bad("env must be a dict of str to str")
    if cwd is not None:
        if not isinstance(cwd, str | os.PathLike):
            raise bad(f"cwd={cwd!r} must be a path (str or os.PathLike) or None")
        cwd = os.fspath(cwd)
        if not isinstance(cwd, str):
            raise bad(f"cwd={cwd!r} must be a str path, not bytes")
    if inherit_env is not True and inherit_env is not False:
        if isinstance(inherit_env, str | bytes) or not isinstance(inherit_env, Iterable):
            raise bad(f"inherit_env={inherit_env!r} must be True, False or a list of names")
        inherit_env = tuple(inherit_env)
    try:
        codes = list(retry_exit_codes)
    except TypeError:
        raise bad(
            f"retry_exit_codes={retry_exit_codes!r} must be a list of non-zero ints, e.g. [75]"
        ) from None
    if not all(isinstance(c, int) and not isinstance(c, bool) and c != 0 for c in codes):
        raise bad(f"retry_exit_codes={codes!r} must be non-zero ints")
    if isinstance(resume_files, Iterable) and not isinstance(resume_files, str | bytes):
        resume_files = list(resume_files)
    if not isinstance(resume_files, list):
        raise bad(
            f"resume_files={resume_files!r} must be a list of relative paths inside the "
            "sandbox, e.g. ['md.cpt']"
        )
    if resume_files and isinstance(cwd, str) and os.path.isabs(cwd):
        raise bad(
            f"resume_files with an absolute cwd={cwd!r}: files are only ever taken from "
            "inside the sandbox (use a relative cwd)"
        )
    # the rule of outputs, written once (the worker checks it again on the resolved call)
    problem = files_problem(resume_files, cwd, ins, "resume file")
    if problem is not None:
        raise bad(f"resume_files={resume_files!r}: {problem}")
    if resume_argv is not None:
        if not resume_files:
            raise bad("resume_argv needs resume_files (the files whose presence it needs)")
        _check_argv(
            "resume_argv", resume_argv, "['gmx', 'mdrun', '-cpi', 'md.cpt']", task_type, bad
        )
        for i, a in enumerate(resume_argv):
            if isinstance(a, str) and "\0" in a:
                raise bad(f"resume_argv[{i}] contains a NUL byte")
    if keep_sandboxes not in ("failed", "all"):
        raise bad(f"keep_sandboxes={keep_sandboxes!r} must be 'failed' or 'all'")
    opts = make_options(retries=retries, timeout=timeout, name=name, key=key)
    if stdin is not None:
        if not isinstance(stdin, str | os.PathLike):
            raise bad(f"stdin={stdin!r} must be a path or None")
        stdin = os.path.abspath(os.fspath(stdin))
        if not isinstance(stdin, str) or not os.path.isfile(stdin):
            raise bad(f"stdin file {stdin!r} does not exist")
    # The same rules the worker applies, on what is known now (a Task stands in
    # for a value that only exists on the worker; it is checked there).
    known = CommandSpec(
        argv=tuple(
            "task"
            if isinstance(a, task_type)
            else os.fsdecode(a)
            if isinstance(a, os.PathLike)
            else str(a)
            for a in argv
        ),
        inputs={n: "" if isinstance(v, task_type) else v for n, v in ins.items()},
        outputs=tuple(outputs),
        env=env,
        stdin=stdin,
        cwd=cwd,
        timeout=opts.timeout,
        inherit_env=inherit_env,
    )
    problem = spec_problem(known)
    if problem is not None:
        raise bad(problem)
    template = {
        "argv": list(argv),
        "inputs": ins,
        "outputs": list(outputs),
        "env": env,
        "stdin": stdin,
        "cwd": cwd,
        "timeout": timeout,
        "retry_exit_codes": codes,
        "keep_sandboxes": keep_sandboxes,
    }
    if inherit_env is not True:  # only when set: the template's pickle is in the task key
        template["inherit_env"] = inherit_env
    if resume_files:  # likewise
        template["resume_files"] = list(resume_files)
        if resume_argv is not None:
            template["resume_argv"] = list(resume_argv)
    return ProgramSpec(template, opts, shown)


def input_stamps(template: dict[str, Any]) -> list[str]:
    """Path, size and mtime of each input file, for the task key: an edited input
    makes a new task (resume does not take the old result)."""
    stamps = []
    for path in template["inputs"].values():
        if isinstance(path, str):
            with contextlib.suppress(OSError):
                st = os.stat(path)
                stamps.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return stamps


def backstop(timeout: float | None) -> float | None:
    """The master's own deadline for a program: the program's timeout is enforced by the
    worker (killing its process group); if the worker itself is stuck, the master kills it."""
    return None if timeout is None else timeout + 10.0 + 0.1 * timeout


def output_path(result: CommandResult, name: str) -> Path:
    """The value of ``task.output(name)``: that declared output's path."""
    return result.outputs[name]
