"""Program tasks on the client: ``Session.executable()``'s arguments, checked once.

:func:`program_spec` turns what the user passed into the *template* a worker
runs (``runtime/program_attempt.py`` resolves it in a fresh sandbox) and the
task's options. Bad arguments are rejected here, by the call that received
them, with an :class:`~pilotfish.InvalidTask` naming the argument: never by a
worker crashing later. Input paths are made absolute (and must exist) so the
worker copies exactly the file the user meant; names inside the sandbox are
relative and cannot climb out of it.

The rules on the resolved call (NUL bytes, env names, ``cwd``, outputs that
clash, escape or name an input, names that stay inside the sandbox, the values of
``keep_sandboxes``) live in one place, ``pilotfish.runtime.programs.spec`` (and
``KEEP_SANDBOXES`` in ``.sandbox``): checked here on what is known at submit, and again
on the worker (:func:`pilotfish.runtime.programs.spec_problem`) once dependency values
are substituted. This module checks only the shapes of what the user passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidTask
from ..runtime.programs import (
    KEEP_SANDBOXES,
    CommandResult,
    CommandSpec,
    env_problem,
    files_problem,
    inherit_from,
    outside_cwd_problem,
    spec_problem,
    stays_inside,
)
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


def _bad(what: str) -> InvalidTask:
    return InvalidTask(f"executable(): {what}")


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
    timeout_retries: Any = None,
) -> ProgramSpec:
    """Check ``executable()``'s arguments; ``keep_sandboxes`` is already defaulted.
    ``task_type`` is :class:`pilotfish.Task` (Tasks may stand for arguments and inputs).

    ``resume_files`` are names inside the sandbox (as outputs are) that a retry after a
    lost, timed-out or retry-asking attempt starts with, copied from that attempt's
    sandbox (all or none); ``resume_argv`` (needs ``resume_files``) replaces ``argv``
    when they all came.

    The steps run in this order, each raising the :class:`InvalidTask` of the first
    bad argument it finds (so which error wins when several are bad is fixed)."""
    example = "['gmx', 'mdrun'] (for a shell line use ['sh', '-c', LINE])"
    _check_argv("argv", argv, example, task_type)
    first = argv[0]
    shown = "program" if isinstance(first, task_type) else os.path.basename(os.fspath(first))
    ins = _inputs(inputs, task_type)
    outputs = _outputs(outputs)
    _check(env_problem(env, kind=dict))
    cwd = _cwd(cwd)
    inherit_env = _inherit_env(inherit_env)
    codes = _retry_codes(retry_exit_codes)
    resume_files = _resume_files(resume_files, cwd, ins)
    _check_resume_argv(resume_argv, resume_files, task_type)
    if keep_sandboxes not in KEEP_SANDBOXES:
        raise _bad(f"keep_sandboxes={keep_sandboxes!r} must be 'failed' or 'all'")
    if timeout_retries is None and resume_files and isinstance(retries, int):
        timeout_retries = retries  # each retry continues from the checkpoint: progress
    opts = make_options(
        retries=retries, timeout=timeout, name=name, key=key, timeout_retries=timeout_retries
    )
    stdin = _stdin(stdin)
    # The same rules the worker applies, on what is known now (a Task stands in
    # for a value that only exists on the worker; it is checked there).
    known = CommandSpec(
        argv=tuple(_known_arg(a, task_type) for a in argv),
        inputs={n: "" if isinstance(v, task_type) else v for n, v in ins.items()},
        outputs=tuple(outputs),
        env=env,
        stdin=stdin,
        cwd=cwd,
        timeout=opts.timeout,
        inherit_env=inherit_env,
    )
    _check(spec_problem(known))
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
    _set_optional(template, inherit_env, resume_files, resume_argv)
    return ProgramSpec(template, opts, shown)


def _set_optional(
    template: dict[str, Any], inherit_env: Any, resume_files: list[Any], resume_argv: Any
) -> None:
    """The template's optional entries, only when set: the template's pickle is in the
    task key, so a call that does not use them keeps the key it always had."""
    if inherit_env is not True:
        template["inherit_env"] = inherit_env
    if resume_files:
        template["resume_files"] = list(resume_files)
        if resume_argv is not None:
            template["resume_argv"] = list(resume_argv)


def _check(problem: str | None) -> None:
    """Raise the :class:`InvalidTask` of a rule of ``pilotfish.runtime.programs.spec``."""
    if problem is not None:
        raise _bad(problem)


def _check_argv(name: str, argv: Any, example: str, task_type: type) -> None:
    """``argv`` (or ``resume_argv``) is a non-empty list of str, paths, numbers or Tasks."""
    if isinstance(argv, str | bytes) or not isinstance(argv, Sequence) or not argv:
        raise _bad(f"{name}={argv!r} must be a non-empty list such as {example}")
    for i, a in enumerate(argv):
        if not isinstance(a, str | os.PathLike | int | float | task_type):
            raise _bad(f"{name}[{i}]={a!r} must be a str, path, number or Task")


def _known_arg(a: Any, task_type: type) -> str:
    """An argument as the worker will see it, as far as it is known at submit."""
    if isinstance(a, task_type):
        return "task"
    return os.fsdecode(a) if isinstance(a, os.PathLike) else str(a)


def _inputs(inputs: Any, task_type: type) -> dict[str, Any]:
    """Each input: a name inside the sandbox -> an existing path (made absolute) or a Task."""
    ins: dict[str, Any] = {}
    for n, v in (inputs or {}).items():
        if not stays_inside(n):
            raise _bad(f"input name {n!r} must be a relative path inside the sandbox")
        if isinstance(v, task_type):
            ins[n] = v
        elif isinstance(v, str | os.PathLike):
            p = os.path.abspath(os.fspath(v))
            if not os.path.exists(p):
                raise _bad(f"input {n!r}: {p} does not exist")
            ins[n] = p
        else:
            raise _bad(f"input {n!r}={v!r} must be a path or a Task")
    return ins


def _outputs(outputs: Any) -> list[str]:
    if (
        isinstance(outputs, str | bytes)
        or not isinstance(outputs, Iterable)
        or not all(stays_inside(o) for o in outputs)
    ):
        raise _bad(f"outputs={outputs!r} must be a list of relative paths")
    return list(outputs)


def _cwd(cwd: Any) -> str | None:
    if cwd is None:
        return None
    if not isinstance(cwd, str | os.PathLike):
        raise _bad(f"cwd={cwd!r} must be a path (str or os.PathLike) or None")
    cwd = os.fspath(cwd)
    if not isinstance(cwd, str):
        raise _bad(f"cwd={cwd!r} must be a str path, not bytes")
    return cwd


def _inherit_env(inherit_env: Any) -> bool | tuple[Any, ...]:
    if not isinstance(inherit_env, bool) and (
        isinstance(inherit_env, str | bytes) or not isinstance(inherit_env, Iterable)
    ):
        raise _bad(f"inherit_env={inherit_env!r} must be True, False or a list of names")
    return inherit_from(inherit_env)


def _retry_codes(retry_exit_codes: Iterable[Any]) -> list[Any]:
    try:
        codes = list(retry_exit_codes)
    except TypeError:
        raise _bad(
            f"retry_exit_codes={retry_exit_codes!r} must be a list of non-zero ints, e.g. [75]"
        ) from None
    if not all(isinstance(c, int) and not isinstance(c, bool) and c != 0 for c in codes):
        raise _bad(f"retry_exit_codes={codes!r} must be non-zero ints")
    return codes


def _resume_files(resume_files: Any, cwd: str | None, ins: dict[str, Any]) -> list[Any]:
    if isinstance(resume_files, Iterable) and not isinstance(resume_files, str | bytes):
        resume_files = list(resume_files)
    if not isinstance(resume_files, list):
        raise _bad(
            f"resume_files={resume_files!r} must be a list of relative paths inside the "
            "sandbox, e.g. ['md.cpt']"
        )
    _check(outside_cwd_problem(cwd, resume_files, "resume_files"))
    # the rule of outputs, written once (the worker checks it again on the resolved call)
    problem = files_problem(resume_files, cwd, ins, "resume file")
    if problem is not None:
        raise _bad(f"resume_files={resume_files!r}: {problem}")
    return resume_files


def _check_resume_argv(resume_argv: Any, resume_files: list[Any], task_type: type) -> None:
    if resume_argv is None:
        return
    if not resume_files:
        raise _bad("resume_argv needs resume_files (the files whose presence it needs)")
    _check_argv("resume_argv", resume_argv, "['gmx', 'mdrun', '-cpi', 'md.cpt']", task_type)
    for i, a in enumerate(resume_argv):
        if isinstance(a, str) and "\0" in a:
            raise _bad(f"resume_argv[{i}] contains a NUL byte")


def _stdin(stdin: Any) -> str | None:
    """The stdin file, made absolute: it must exist now."""
    if stdin is None:
        return None
    if not isinstance(stdin, str | os.PathLike):
        raise _bad(f"stdin={stdin!r} must be a path or None")
    stdin = os.path.abspath(os.fspath(stdin))
    if not isinstance(stdin, str) or not os.path.isfile(stdin):
        raise _bad(f"stdin file {stdin!r} does not exist")
    return stdin


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
