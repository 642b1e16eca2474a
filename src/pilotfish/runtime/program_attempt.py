"""Worker side of program tasks: resolve the spec, run it in a sandbox, package the outcome.

The payload of a ``"command"`` attempt is a pickled dict (see
``Session.executable``) whose ``argv`` and ``inputs`` may hold dependency
values. They are resolved here, on the worker, into a
:class:`pilotfish.runtime.programs.CommandSpec`; :func:`pilotfish.runtime.programs.run_command`
does the rest. Every outcome becomes a ``Result``: a :class:`CommandResult`
value, or an ``Envelope`` whose category is COMMAND_FAILED, MISSING_OUTPUT,
TIMEOUT or ENVIRONMENT with every path in ``extra``.

Stage on error: a failed attempt's sandbox is never touched, and its stdout and stderr
travel with its failure, bounded (``programs/ship.py``), for a client that cannot read
this host's disk. A successful
one is kept with ``keep_sandboxes="all"``; with ``"failed"`` (the default)
its declared outputs and stdout/stderr are moved to ``rundir/results/NAME/``
and the sandbox is removed.

Resume (``resume_files``): when the attempt's ``lineage`` names an earlier attempt
that was lost, timed out or asked for a retry, its sandbox (found by its unique tag
under ``rundir/sandboxes``: on a filesystem this worker shares) gives the new
sandbox those files, all or none (:func:`pilotfish.runtime.programs.restore_files`), and
``resume_argv`` replaces ``argv`` when they all came. The attempt's note says
which ("resumed from attempt 2: md.cpt, 48 MB", "fresh start: md.cpt missing"). The
first attempt of a resumed run may continue an attempt of an earlier run that the
client's death interrupted (``make_lineage``): its note says so and names that sandbox,
which is left in place. ``resume_files`` obey the rules of ``outputs``
(:func:`pilotfish.runtime.programs.files_problem`), checked again here on the resolved call.

Edges trust nothing (DESIGN section 5): a task key never becomes a path.
Every attempt gets a fresh sandbox ``rundir/sandboxes/NAME`` created with
``mkdir`` that fails if it exists (:func:`pilotfish.runtime.programs.make_sandbox`),
where ``NAME`` is a safe prefix of the key, a hash of the whole key, the
attempt number and a random suffix; its results directory has the same
``NAME``. So no attempt, in this session or any other, reuses a sandbox, sees
a stale file, or removes another task's results. Outputs have already been
checked to resolve inside the sandbox (``run_command``); a symlinked output is
copied (its target may be shared), a plain one is moved.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.ledger import describe_exit
from ..wire import messages as _wire
from .programs import (
    STDERR_NAME,
    STDOUT_NAME,
    CommandOutcome,
    CommandResult,
    CommandSpec,
    excerpt,
    files_problem,
    find_sandbox,
    from_earlier_run,
    inherit_from,
    keeps_sandbox,
    make_sandbox,
    outside_cwd_problem,
    previous_attempt,
    restore_files,
    run_command,
    spec_problem,
)
from .programs.ship import pack_failure_files

_CATEGORY = {
    "failed": "command_failed",
    "missing_output": "missing_output",
    "timeout": "timeout",
    "environment": "environment",
    "staging": "environment",
    "invalid": "invalid_task",
}
_TYPE = {
    "command_failed": "pilotfish.CommandFailed",
    "missing_output": "pilotfish.MissingOutput",
    "timeout": "pilotfish.TaskTimeout",
    "environment": "pilotfish.EnvironmentMismatch",
    "invalid_task": "pilotfish.InvalidTask",
}


def _as_arg(value: Any, what: str) -> str:
    if isinstance(value, CommandResult):
        raise TypeError(
            f"{what} is the whole result of a program task; use task.output(NAME) to pass "
            "one of its declared outputs, or task.result().stdout on the client"
        )
    if isinstance(value, bytes):
        return os.fsdecode(value)
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def resolve(template: dict[str, Any]) -> CommandSpec:
    argv = tuple(_as_arg(a, f"argv[{i}]") for i, a in enumerate(template["argv"]))
    inputs = {
        name: os.path.abspath(_as_arg(v, f"input {name!r}"))
        for name, v in template["inputs"].items()
    }
    return CommandSpec(
        argv=argv,
        inputs=inputs,
        outputs=tuple(template["outputs"]),
        env=template["env"],
        stdin=template["stdin"],
        cwd=template["cwd"],
        timeout=template["timeout"],
        # absent from older templates
        inherit_env=inherit_from(template.get("inherit_env", True)),
    )


class _Refused(Exception):
    """The attempt ends before its program runs, with this pickled ``Envelope``."""

    def __init__(self, envelope: _wire.Envelope) -> None:
        super().__init__(envelope.message)
        self.envelope = envelope


def _invalid(m: _wire.RunAttempt, what: str) -> _Refused:
    """The attempt cannot start because of its own arguments: INVALID_TASK (permanent),
    never a crashed worker taken for WORKER_LOST."""
    return _Refused(
        _wire.Envelope(
            "invalid_task", _TYPE["invalid_task"], f"task {m.key!r}: {what}", "", None, {}
        )
    )


def run_command_attempt(
    m: _wire.RunAttempt,
    rundir: str,
    on_group: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> tuple[bool, bytes]:
    """Run the program attempt ``m`` in a fresh sandbox under ``rundir``: ``(True, the
    pickled CommandResult)`` or ``(False, a pickled Envelope)``."""
    try:
        template, spec = _spec(m)
        box = _sandbox(m, rundir)
        spec, note = _resume(m, rundir, template, spec, box)
    except _Refused as r:
        return False, pickle.dumps(r.envelope, _wire.PROTOCOL)
    try:
        out = run_command(spec, box, on_start=on_group, cancel=cancel)
    except (ValueError, TypeError, OverflowError) as e:
        # an argument the checks did not foresee (raised before or by the spawn)
        what = f"program {spec.argv[:1]!r} cannot start: {type(e).__name__}: {e}"
        return False, pickle.dumps(_invalid(m, what).envelope, _wire.PROTOCOL)
    if out.kind == "ok":
        try:
            return True, _wire.dumps_value(_result(rundir, m, template, out, note))
        except OSError as e:
            env = _wire.Envelope(
                "environment",
                _TYPE["environment"],
                f"task {m.key!r}: cannot collect the outputs of sandbox {out.sandbox} on host "
                f"{out.host}: {e} (sandbox kept)",
                "",
                None,
                {"sandbox": out.sandbox, "host": out.host},
            )
            return False, pickle.dumps(env, _wire.PROTOCOL)
    env = _failure(m, template, spec, out, note)
    if out.stdout_path is not None and not (cancel is not None and cancel.is_set()):
        # stage on error: the files travel with the failure, for a client that cannot
        # read this host's disk (client/staging.py writes them down there if so)
        env.extra["shipped"] = pack_failure_files(out.stdout_path, out.stderr_path)
    return False, pickle.dumps(env, _wire.PROTOCOL)


def _spec(m: _wire.RunAttempt) -> tuple[dict[str, Any], CommandSpec]:
    """The attempt's template and its spec, dependency values substituted, checked by
    the rules the client applied at submit (:func:`spec_problem` and those of
    ``resume_files``)."""
    try:
        template = _wire.loads_call(m.payload, m.deps)
        spec = resolve(template)
    except BaseException as e:
        raise _Refused(_wire.envelope_for(e, "user_error")) from None
    resume_files = tuple(template.get("resume_files", ()))
    problem = (
        spec_problem(spec)
        or outside_cwd_problem(spec.cwd, resume_files, "resume_files")
        or files_problem(resume_files, spec.cwd, spec.inputs, "resume file")
    )
    if problem is not None:
        raise _invalid(m, f"invalid program task: {problem}")
    return template, spec


def _sandbox(m: _wire.RunAttempt, rundir: str) -> Path:
    """A new sandbox under ``rundir/sandboxes``, named with the attempt's tag."""
    tag, _, _, _ = previous_attempt(m.attempt, m.lineage)
    try:
        return make_sandbox(Path(rundir) / "sandboxes", m.key, tag)
    except OSError as e:
        raise _Refused(
            _wire.Envelope(
                "environment",
                _TYPE["environment"],
                f"task {m.key!r}: cannot create a sandbox under {Path(rundir) / 'sandboxes'} "
                f"on host {_wire.host_name()}: {e.strerror or e}",
                "",
                None,
                {"host": _wire.host_name()},
            )
        ) from None


def _resume(
    m: _wire.RunAttempt, rundir: str, template: dict[str, Any], spec: CommandSpec, box: Path
) -> tuple[CommandSpec, str | None]:
    """The ``resume_files`` of the attempt this one continues, copied into ``box`` (all
    or none), and the spec to run: with ``resume_argv`` when they all came. The note says
    which; None if the program names no resume files or nothing came before."""
    _, previous, _, which = previous_attempt(m.attempt, m.lineage)
    sub = template["cwd"] or ""  # names are relative to the program's directory
    names = tuple(os.path.normpath(os.path.join(sub, r)) for r in template.get("resume_files", ()))
    if not names or previous is None:
        return spec, None
    resumed, note = restore_files(
        find_sandbox(Path(rundir) / "sandboxes", m.key, previous),
        which,
        box,
        names,
        left_in_place=from_earlier_run(m.lineage),
    )
    if resumed and template.get("resume_argv"):
        try:
            argv = tuple(
                _as_arg(a, f"resume_argv[{i}]") for i, a in enumerate(template["resume_argv"])
            )
        except TypeError as e:
            raise _invalid(m, str(e)) from None
        spec = dataclasses.replace(spec, argv=argv)
    return spec, note


def _failure(
    m: _wire.RunAttempt,
    template: dict[str, Any],
    spec: CommandSpec,
    out: CommandOutcome,
    note: str | None,
) -> _wire.Envelope:
    """The Envelope of an attempt whose program did not succeed, every path in ``extra``."""
    category = _CATEGORY[out.kind]
    extra = {
        "returncode": out.returncode,
        "signal": out.signal,
        "stdout_path": out.stdout_path,
        "stderr_path": out.stderr_path,
        "sandbox": out.sandbox,
        "host": out.host,
        "retry_requested": out.kind == "failed"
        and out.returncode in set(template["retry_exit_codes"]),
    }
    if note is not None:
        extra["note"] = note
    if out.kind == "failed":
        how = describe_exit(out.returncode if out.returncode is not None else 0)[0]
        msg = (
            f"task {m.key!r}: program {spec.argv[0]!r} {how} after {out.elapsed:.1f} s on host "
            f"{out.host}\n  complete stderr: {out.stderr_path}\n  complete stdout: "
            f"{out.stdout_path}\n  sandbox (kept): {out.sandbox}\n"
            + (excerpt(out.stderr_path) if out.stderr_path else "stderr is empty")
        )
    else:
        msg = f"task {m.key!r}: {out.message}"
    return _wire.Envelope(category, _TYPE[category], msg, "", None, extra)


def _result(
    rundir: str,
    m: _wire.RunAttempt,
    template: dict[str, Any],
    out: Any,
    note: str | None = None,
) -> CommandResult:
    box = Path(out.sandbox)
    stdout, stderr = box / STDOUT_NAME, box / STDERR_NAME
    outputs = {k: Path(v) for k, v in out.outputs.items()}
    if keeps_sandbox(template["keep_sandboxes"], True):
        return CommandResult(0, stdout, stderr, outputs, box, out.host, out.elapsed, note)
    # Same unique name as the sandbox: never an existing directory, never another
    # task's (mkdir fails if it exists; nothing is removed first).
    results = Path(rundir) / "results"
    results.mkdir(mode=0o700, parents=True, exist_ok=True)
    if results.is_symlink() or not results.is_dir():
        raise NotADirectoryError(f"{results} is not a real directory")
    dest = results / box.name
    dest.mkdir(mode=0o700)
    moved: dict[str, Path] = {}
    for name, path in outputs.items():
        target = dest / os.path.normpath(name)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.is_symlink():
            # resolves inside the sandbox (checked by run_command) but its target
            # may be another output: copy the content, never move through a link
            real = os.path.realpath(path)
            if os.path.isdir(real):
                shutil.copytree(real, target, symlinks=True)
            else:
                shutil.copy2(real, target)
        else:
            shutil.move(os.fspath(path), target)
        moved[name] = target
    for f in (stdout, stderr):
        shutil.move(os.fspath(f), dest / f.name)
    shutil.rmtree(box, ignore_errors=True)
    return CommandResult(
        0, dest / STDOUT_NAME, dest / STDERR_NAME, moved, None, out.host, out.elapsed, note
    )
