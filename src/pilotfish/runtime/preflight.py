"""Pre-flight checks: find an incompatible worker environment before work is sent to it.

Run on workers (every backend), never trusted from the client's point of view:

* ``worker_checks`` when a worker starts, before it accepts any attempt: Python
  version, pilotfish version (major.minor must match the client's),
  cloudpickle (major must match), writable sandbox root, free disk space;
* ``requirement_checks`` for task requirements: modules with version
  specifiers (``"numpy>=1.26"``, checked with :mod:`packaging`) and programs
  (found on ``PATH`` and executable). Results are cached per worker.

Each check is a :class:`Check` (name, ok, found, hint); a failed check's message
names what was required, what was found (version or absence), the host, the
Python executable and the ``sys.path``/``PATH`` searched.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    found: str
    hint: str = ""
    host: str = ""

    def message(self) -> str:
        where = f" on host {self.host}" if self.host else ""
        text = f"{self.name}{where}: found {self.found}"
        return text + (f"; {self.hint}" if self.hint and not self.ok else "")


def _host() -> str:
    return os.uname().nodename


def _version_info() -> tuple[str, str]:
    import cloudpickle

    from .._version import __version__

    return __version__, cloudpickle.__version__


def client_versions() -> dict[str, str]:
    """What the client runs, to compare on workers."""
    pf, cp = _version_info()
    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "pilotfish": pf,
        "cloudpickle": cp,
    }


def _release(v: str) -> tuple[int, ...]:
    """The leading release numbers of version ``v`` ('1.2.3rc1' -> (1, 2, 3)): enough to
    compare majors and minors without importing packaging at every worker's start."""
    out = []
    for part in v.split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(out)


def _major_minor(v: str) -> tuple[int, ...]:
    return _release(v)[:2]


def worker_checks(
    client: dict[str, str], rundir: str, min_free_bytes: int = 100 * 2**20
) -> list[Check]:
    """The start-up checks of one worker; compare with the client's ``client_versions()``."""
    host = _host()
    mine = client_versions()
    out: list[Check] = []
    py_ok = mine["python"].split(".")[:2] == client.get("python", mine["python"]).split(".")[:2]
    out.append(
        Check(
            f"python {client.get('python')} (as the client)",
            py_ok,
            f"python {mine['python']} at {sys.executable}",
            "run workers with the client's Python minor version (cloudpickle payloads are "
            "tied to it): set python=/path/to/python",
            host,
        )
    )
    pf_ok = _major_minor(mine["pilotfish"]) == _major_minor(client.get("pilotfish", ""))
    out.append(
        Check(
            f"pilotfish {client.get('pilotfish')} (major.minor as the client)",
            pf_ok,
            f"pilotfish {mine['pilotfish']}",
            "install the same pilotfish version on the workers",
            host,
        )
    )
    cp_ok = _release(mine["cloudpickle"])[:1] == _release(client.get("cloudpickle", "0"))[:1]
    out.append(
        Check(
            f"cloudpickle {client.get('cloudpickle')} (same major)",
            cp_ok,
            f"cloudpickle {mine['cloudpickle']}",
            "install the client's cloudpickle major version on the workers",
            host,
        )
    )
    root = Path(rundir) / "sandboxes"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".preflight-"):
            pass
        out.append(Check(f"sandbox root {root} writable", True, "writable", "", host))
    except OSError as e:
        out.append(
            Check(
                f"sandbox root {root} writable",
                False,
                f"not writable ({e.strerror or e})",
                "choose a rundir on a filesystem this worker can write (Session(rundir=...))",
                host,
            )
        )
    try:
        free = shutil.disk_usage(root if root.is_dir() else Path(rundir).parent).free
        out.append(
            Check(
                f"free disk space >= {min_free_bytes / 2**20:.0f} MiB",
                free >= min_free_bytes,
                f"{free / 2**20:.0f} MiB free",
                "free some space or choose another rundir",
                host,
            )
        )
    except OSError as e:
        out.append(Check("free disk space", False, f"unknown ({e})", "", host))
    return out


_cache: dict[str, Check] = {}


def _check_module(spec: str) -> Check:
    from packaging.requirements import InvalidRequirement, Requirement

    host = _host()
    try:
        req = Requirement(spec)
    except InvalidRequirement as e:
        return Check(
            f"requirement {spec!r}",
            False,
            f"an invalid requirement ({e})",
            "write it like 'numpy>=1.26'",
            host,
        )
    import importlib.metadata  # here: ~15 ms that every client and worker start would pay

    version: str | None = None
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        modname = req.name.replace("-", "_")
        if importlib.util.find_spec(modname) is None:
            return Check(
                f"module {spec}",
                False,
                f"nothing: {req.name!r} is not installed for {sys.executable} "
                f"(sys.path searched: {sys.path})",
                f"install it on the workers: pip install '{spec}'",
                host,
            )
        if req.specifier:
            mod = importlib.import_module(modname)
            version = getattr(mod, "__version__", None)
            if version is None:
                return Check(
                    f"module {spec}",
                    False,
                    f"{modname} importable but of unknown version",
                    "install it as a package so its version is known",
                    host,
                )
        else:
            return Check(f"module {spec}", True, f"{modname} importable", "", host)
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        return Check(
            f"module {spec}",
            False,
            f"{req.name} {version} for {sys.executable} (sys.path searched: {sys.path})",
            f"install a matching version on the workers: pip install '{spec}'",
            host,
        )
    return Check(f"module {spec}", True, f"{req.name} {version}", "", host)


def _check_program(name: str, env_path: str | None = None) -> Check:
    host = _host()
    path = env_path if env_path is not None else os.environ.get("PATH", "")
    found = shutil.which(name, path=path)
    if found is None:
        return Check(
            f"program {name}",
            False,
            f"nothing executable named {name!r} (PATH searched: {path})",
            "install it on the workers or load its module (module load ...) before starting them",
            host,
        )
    return Check(f"program {name}", True, found, "", host)


def requirement_checks(modules: Iterable[str], programs: Iterable[str] = ()) -> list[Check]:
    """Check task requirements here; results are cached for the life of this worker."""
    out = []
    for spec in modules:
        key = "m:" + spec
        if key not in _cache:
            _cache[key] = _check_module(spec)
        out.append(_cache[key])
    for prog in programs:
        key = "p:" + prog
        if key not in _cache:
            _cache[key] = _check_program(prog)
        out.append(_cache[key])
    return out


def report(checks: list[Check]) -> dict[str, Any]:
    return {"ok": all(c.ok for c in checks), "checks": [dataclasses.asdict(c) for c in checks]}


def session_checks(
    client: dict[str, str], rundir: str, modules: list[str], programs: list[str]
) -> list[Check]:
    """What ``Session(requires=...)`` and ``pilotfish check`` run on a worker."""
    return worker_checks(client, rundir) + requirement_checks(modules, programs)


def preload(modules: Iterable[str], where: str = "") -> list[str]:
    """Import ``modules`` (``Session(preload=...)``) in this worker process, so that its
    first task does not wait for them; returns what could not be imported (each also said
    on stderr: the tasks that need it then fail with their own ImportError)."""
    import importlib

    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as e:  # a module's import-time crash: not this worker's end
            failed.append(f"{name}: {type(e).__name__}: {e}")
            print(
                f"pilotfish: worker {where or os.getpid()} could not preload {name!r}: "
                f"{type(e).__name__}: {e}",
                file=sys.stderr,
                flush=True,
            )
    return failed


def check_preload(preload: Any) -> tuple[str, ...]:
    """``Session(preload=...)`` checked in the client: module names that this Python can
    find (workers see the client's ``sys.path``); a clear error otherwise."""
    from ..errors import InvalidTask

    if isinstance(preload, str) or not isinstance(preload, Iterable):
        raise InvalidTask(
            f"Session(preload={preload!r}) is invalid: give a list of module names, "
            "e.g. preload=['numpy', 'scipy.optimize']"
        )
    names = tuple(preload)
    for name in names:
        if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
            raise InvalidTask(
                f"Session(preload=...): {name!r} is not a module name; give names such as "
                "'numpy' or 'scipy.optimize'"
            )
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise InvalidTask(
                f"Session(preload=...): module {name!r} is not importable here (workers see "
                "this Python's sys.path): install it, or fix the name"
            )
    return names
