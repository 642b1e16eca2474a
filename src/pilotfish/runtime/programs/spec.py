"""A program call as a worker runs it (:class:`CommandSpec`) and the rules its arguments obey.

Every rule on a program's arguments is written here, once: the client checks it at
submit (``pilotfish.client.programs``) on what is known then, and the worker checks it
again on the resolved call (:func:`spec_problem`), which catches values that only
arrived on the worker (dependency results) and direct callers of ``run_command``.

* a name inside the sandbox (an input, an output, a resume file, a relative ``cwd``) is
  relative and never climbs out with ``..`` (:func:`stays_inside`);
* a declared output or resume file is a new file of the program's, inside the sandbox,
  none the same as another or an input (:func:`output_problem`, :func:`files_problem`);
  none is collected from an absolute ``cwd`` (:func:`outside_cwd_problem`);
* ``env`` maps str names (no ``=``, no NUL) to str values (:func:`env_problem`);
* ``inherit_env`` is True, False or a tuple of names (:func:`inherit_from`);
* no argument holds a NUL byte, ``timeout`` is a finite number of seconds > 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STDOUT_NAME = "stdout.txt"
STDERR_NAME = "stderr.txt"
#: names inside the sandbox that are the runner's own (or the sandbox itself)
RESERVED = frozenset((".", STDOUT_NAME, STDERR_NAME))


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One program invocation, fully resolved, ready to run on this host."""

    argv: tuple[str, ...]
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    stdin: str | None = None
    cwd: str | None = None
    timeout: float | None = None
    #: What the program inherits from this process's environment: True (all of it),
    #: False (nothing: only ``env``), or the names of the variables to pass through.
    inherit_env: bool | tuple[str, ...] = True

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able representation (lists and dicts of strings)."""
        return {
            "argv": list(self.argv),
            "inputs": dict(self.inputs),
            "outputs": list(self.outputs),
            "env": None if self.env is None else dict(self.env),
            "stdin": self.stdin,
            "cwd": self.cwd,
            "timeout": self.timeout,
            "inherit_env": self.inherit_env
            if isinstance(self.inherit_env, bool)
            else list(self.inherit_env),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CommandSpec:
        """Inverse of :meth:`to_dict`."""
        env = d.get("env")
        timeout = d.get("timeout")
        return cls(
            argv=tuple(str(a) for a in d["argv"]),
            inputs={str(k): str(v) for k, v in (d.get("inputs") or {}).items()},
            outputs=tuple(str(o) for o in (d.get("outputs") or ())),
            env=None if env is None else {str(k): str(v) for k, v in env.items()},
            stdin=opt_str(d.get("stdin")),
            cwd=opt_str(d.get("cwd")),
            timeout=None if timeout is None else float(timeout),
            inherit_env=inherit_from(d.get("inherit_env", True), str),
        )


def opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def inherit_from(value: Any, name: Any = None) -> bool | tuple[Any, ...]:
    """``inherit_env`` as a :class:`CommandSpec` holds it: a bool as it is, any other
    iterable as a tuple of its names (each passed through ``name`` if given); whether
    they are names is :func:`spec_problem`'s to say."""
    if isinstance(value, bool):
        return value
    return tuple(value) if name is None else tuple(name(n) for n in value)


def program_cwd(spec: CommandSpec, box: str | os.PathLike[str]) -> str:
    """The directory the program runs in: the sandbox ``box``, or ``spec.cwd`` (absolute,
    or relative to the sandbox). Its declared outputs are named relative to it."""
    if spec.cwd is None:
        return os.fspath(box)
    if os.path.isabs(spec.cwd):
        return spec.cwd
    return os.path.normpath(os.path.join(box, spec.cwd))


def program_env(spec: CommandSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment the program runs with: what it inherits of ``environ`` (this
    process's), then ``spec.env`` over it."""
    if spec.inherit_env is True:
        env = dict(environ)
    elif spec.inherit_env is False:
        env = {}
    else:
        env = {k: environ[k] for k in spec.inherit_env if k in environ}
    if spec.env:
        env.update(spec.env)
    return env


def stays_inside(name: object) -> bool:
    """The one rule of a name inside the sandbox: a non-empty relative path without
    ``..`` (it cannot climb out). Stricter rules build on it."""
    return (
        isinstance(name, str)
        and bool(name)
        and not os.path.isabs(name)
        and ".." not in Path(name).parts
    )


def output_problem(name: object, cwd: str | None = None, what: str = "output") -> str | None:
    """An error sentence if ``name`` cannot be a declared output (or, with ``what``, a
    resume file: the same rule), else None.

    An output is a relative path below the working directory that stays
    inside the sandbox and is neither the sandbox itself nor one of the
    runner's own files (``stdout.txt``, ``stderr.txt``).
    """
    if not isinstance(name, str) or not name:
        return f"{what} {name!r} must be a non-empty relative path"
    if "\0" in name:
        return f"{what} {name!r} contains a NUL byte"
    if not stays_inside(name):
        return f"{what} {name!r} must be a relative path inside the sandbox (no '/...', no '..')"
    rel_cwd = cwd if cwd is not None and not os.path.isabs(cwd) else ""
    if os.path.normpath(os.path.join(rel_cwd, name)) in RESERVED:
        return (
            f"{what} {name!r} is reserved: it names the sandbox itself or the runner's own "
            f"{STDOUT_NAME}/{STDERR_NAME} (those are always returned as .stdout/.stderr)"
        )
    return None


def files_problem(names: Any, cwd: str | None, inputs: Any, what: str = "output") -> str | None:
    """The one rule for the files a program declares it writes, ``outputs`` and
    ``resume_files`` alike: each a relative path inside the sandbox (:func:`output_problem`),
    no two the same file, none an input or inside a staged input directory (that is the
    user's own file, staged afresh in every attempt). None if they are all fine."""
    seen: dict[str, str] = {}
    staged = [os.path.normpath(n) for n in inputs]
    for name in names:
        problem = output_problem(name, cwd, what)
        if problem is not None:
            return problem
        norm = os.path.normpath(os.path.join(cwd or "", name))
        if norm in seen:
            return f"{what}s {seen[norm]!r} and {name!r} are the same file"
        seen[norm] = name
        for inp in staged:
            if norm == inp or norm.startswith(inp + os.sep):
                return (
                    f"{what} {name!r} is (inside) the input {inp!r}, which is the user's own "
                    f"file, staged afresh in every attempt; {what}s must be new files the "
                    "program writes in the sandbox"
                )
    return None


def outside_cwd_problem(cwd: object, names: Iterable[str], what: str = "outputs") -> str | None:
    """The one rule of declared files and an absolute ``cwd``: files are only ever taken
    from inside the sandbox, so a program that declares ``outputs`` (or, with ``what``,
    ``resume_files``) cannot run in a ``cwd`` outside it. None if that is not the case."""
    names = list(names)
    if not (isinstance(cwd, str) and os.path.isabs(cwd) and names):
        return None
    if what == "outputs":
        return (
            f"cwd={cwd!r} is outside the sandbox, so outputs {names!r} cannot "
            "be collected (outputs are only taken from the sandbox; use a relative cwd "
            "or write the outputs into the sandbox)"
        )
    return (
        f"{what} with an absolute cwd={cwd!r}: files are only ever taken "
        "from inside the sandbox (use a relative cwd)"
    )


def env_problem(env: object, what: str = "env", kind: type = Mapping) -> str | None:
    """An error sentence if ``env`` is not None nor a mapping (a ``kind``: the client
    asks for a plain dict) of valid variable names to str values, else None."""
    if env is None:
        return None
    if not isinstance(env, kind) or not isinstance(env, Mapping):
        return f"{what} must be a dict of str to str"
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            return f"{what} must be a dict of str to str (got {k!r}: {v!r})"
        if not k or "=" in k or "\0" in k:
            return f"{what} name {k!r} is invalid (empty, or contains '=' or a NUL byte)"
        if "\0" in v:
            return f"{what}[{k!r}] contains a NUL byte"
    return None


def spec_problem(spec: CommandSpec) -> str | None:
    """An error sentence naming the first argument of ``spec`` that cannot run, else None.

    The client checks the same rules when the task is submitted
    (``Session.executable``); this copy catches values that only arrived on
    the worker (dependency results) and direct callers of ``run_command``.
    """
    if not spec.argv:
        return "argv is empty"
    for i, a in enumerate(spec.argv):
        if not isinstance(a, str):
            return f"argv[{i}]={a!r} is not a string"
        if "\0" in a:
            return f"argv[{i}]={a!r} contains a NUL byte"
    problem = env_problem(spec.env) or _inherit_problem(spec.inherit_env) or _cwd_problem(spec)
    if problem is not None:
        return problem
    if spec.stdin is not None and "\0" in spec.stdin:
        return f"stdin={spec.stdin!r} contains a NUL byte"
    t = spec.timeout
    if t is not None and (
        isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0
    ):
        return f"timeout={t!r} must be a finite number of seconds > 0, or None"
    for n, src in spec.inputs.items():
        if "\0" in n or "\0" in src:
            return f"input {n!r}: {src!r} contains a NUL byte"
    return files_problem(spec.outputs, spec.cwd, spec.inputs)


def _inherit_problem(ie: object) -> str | None:
    if not isinstance(ie, bool) and not (
        isinstance(ie, tuple) and all(isinstance(n, str) for n in ie)
    ):
        return f"inherit_env={ie!r} must be True, False or a list of variable names"
    return None


def _cwd_problem(spec: CommandSpec) -> str | None:
    cwd = spec.cwd
    if cwd is None:
        return None
    if not isinstance(cwd, str) or not cwd or "\0" in cwd:
        return f"cwd={cwd!r} must be a non-empty path without NUL bytes"
    if not os.path.isabs(cwd) and not stays_inside(cwd):
        return f"cwd={cwd!r} escapes the sandbox ('..' is not allowed in a relative cwd)"
    return outside_cwd_problem(cwd, spec.outputs)
