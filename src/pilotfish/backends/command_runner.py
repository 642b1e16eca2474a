"""Worker side of program tasks: resolve the spec, run it in a sandbox, package the outcome.

The payload of a ``"command"`` attempt is a pickled dict (see
``Session.executable``) whose ``argv`` and ``inputs`` may hold dependency
values. They are resolved here, on the worker, into a
:class:`pilotfish.commands.CommandSpec`; :func:`pilotfish.commands.run_command`
does the rest. Every outcome becomes a ``Result``: a :class:`CommandResult`
value, or an ``Envelope`` whose category is COMMAND_FAILED, MISSING_OUTPUT,
TIMEOUT or ENVIRONMENT with every path in ``extra``.

Stage on error: a failed attempt's sandbox is never touched. A successful
one is kept with ``keep_sandboxes="all"``; with ``"failed"`` (the default)
its declared outputs and stdout/stderr are moved to ``rundir/results/KEY/``
and the sandbox is removed.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _wire
from ..commands import (
    STDERR_NAME,
    STDOUT_NAME,
    CommandResult,
    CommandSpec,
    describe_exit,
    run_command,
    tail_lines,
)

_CATEGORY = {
    "failed": "command_failed",
    "missing_output": "missing_output",
    "timeout": "timeout",
    "environment": "environment",
    "staging": "environment",
}
_TYPE = {
    "command_failed": "pilotfish.CommandFailed",
    "missing_output": "pilotfish.MissingOutput",
    "timeout": "pilotfish.TaskTimeout",
    "environment": "pilotfish.EnvironmentMismatch",
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
    )


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", key)[:120]


def run_command_attempt(
    m: _wire.RunAttempt,
    rundir: str,
    on_group: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> tuple[bool, bytes]:
    try:
        template = _wire.loads_call(m.payload, m.deps)
        spec = resolve(template)
    except BaseException as e:
        env = _wire.envelope_for(e, "user_error")
        return False, pickle.dumps(env, _wire.PROTOCOL)
    root = Path(rundir) / "sandboxes"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    box = root / f"{_safe(m.key)}.a{m.attempt}"

    out = run_command(spec, box, on_start=on_group, cancel=cancel)
    if out.kind == "ok":
        return True, _wire.dumps_value(_result(rundir, m, template, out))
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
    if out.kind == "failed":
        how = describe_exit(out.returncode if out.returncode is not None else 0)
        tail = tail_lines(out.stderr_path) if out.stderr_path else ""
        msg = (
            f"task {m.key!r}: program {spec.argv[0]!r} {how} after {out.elapsed:.1f} s on host "
            f"{out.host}\n  complete stderr: {out.stderr_path}\n  complete stdout: "
            f"{out.stdout_path}\n  sandbox (kept): {out.sandbox}\n"
            + (f"last lines of stderr:\n{tail}" if tail else "stderr is empty")
        )
    else:
        msg = f"task {m.key!r}: {out.message}"
    env = _wire.Envelope(category, _TYPE[category], msg, "", None, extra)
    return False, pickle.dumps(env, _wire.PROTOCOL)


def _result(rundir: str, m: _wire.RunAttempt, template: dict[str, Any], out: Any) -> CommandResult:
    box = Path(out.sandbox)
    stdout, stderr = box / STDOUT_NAME, box / STDERR_NAME
    outputs = {k: Path(v) for k, v in out.outputs.items()}
    if template["keep_sandboxes"] == "all":
        return CommandResult(0, stdout, stderr, outputs, box, out.host, out.elapsed)
    dest = Path(rundir) / "results" / _safe(m.key)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(mode=0o700, parents=True)
    moved: dict[str, Path] = {}
    for name, path in outputs.items():
        target = dest / name
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.move(os.fspath(path), target)
        moved[name] = target
    for f in (stdout, stderr):
        shutil.move(os.fspath(f), dest / f.name)
    shutil.rmtree(box, ignore_errors=True)
    return CommandResult(
        0, dest / STDOUT_NAME, dest / STDERR_NAME, moved, None, out.host, out.elapsed
    )
