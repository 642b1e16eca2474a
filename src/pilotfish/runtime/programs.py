"""Run one attempt of a command-line program inside a sandbox directory on a worker.

This module is deliberately self-contained (standard library only) so a worker
can import it without pulling in the rest of pilotfish.

Design
------
*Sandbox.*  Every attempt gets its own directory (mode 0700).  Inputs are
symlinked into it under their declared names, the program runs with the
sandbox as its working directory (unless told otherwise), and its declared
outputs are looked up there after it exits.  :func:`run_command` never deletes
the sandbox: whoever called it decides whether to keep it for debugging.

*Edges trust nothing.*  A task key never becomes a path (:func:`safe_dirname`);
:func:`make_sandbox` creates a directory no other attempt or run ever had, so a
stale file cannot pass for an output.  An output counts only if it resolves,
symlinks followed, to a path inside the sandbox: a link to the user's file, a
file inside a staged input directory, or a file under a ``cwd`` outside the
sandbox is refused by name.  :func:`spec_problem` is the one list of argument
rules (NUL bytes, env names, ``cwd``, output names), applied by the client at
submit and again here.  An exit status lost to someone else's ``wait`` (ECHILD,
e.g. SIGCHLD ignored) is reported, never read as success.

*Stage first, fail early.*  Everything that can be checked before spawning is
checked before spawning: that every input exists and its name stays inside the
sandbox, that the program can be found and is executable, that the working
directory exists.  Those failures are reported as ``"staging"`` (the inputs or
the sandbox) or ``"environment"`` (this host lacks the program or directory),
never as a failure of the program itself, and the message names the host, the
program and the ``PATH`` searched, because "works on my machine" is the usual
cause.

*Files, not pipes.*  stdout and stderr are written straight to
``stdout.txt`` and ``stderr.txt`` in the sandbox: the child gets the file
descriptors, so we never have to pump pipes (a full pipe deadlocks a child
that writes more than 64 KiB while nobody reads), the output is complete and
byte-exact however large it is, it survives the death of the worker, and a
human can ``tail`` it while the program runs.  Error messages quote only the
last lines of stderr, read from the end of the file (:func:`tail_lines`).

*Process groups.*  The program starts in a new session, hence in its own
process group whose id is its pid.  Killing the group (``os.killpg``) kills
the whole tree, including grandchildren started in the background, which
killing only the direct child would orphan.  ``on_start(pid)`` hands that
group id to the caller right after the spawn so a supervisor can kill the tree
even if this worker process dies.  On timeout or cancellation the group gets
SIGTERM, a short grace period, then SIGKILL.  After a normal exit, anything
left in the group is killed with SIGKILL so nothing leaks.  (A program that
calls ``setsid()`` itself leaves the group: the worker, a child subreaper, finds
it when the attempt ends, see :class:`pilotfish.runtime.procs.Containment`.)

*No pid-reuse races.*  The exit of the main program is observed with
``waitid(..., WNOWAIT)``: the child stays an unreaped zombie, which keeps its
pid and therefore the process-group id reserved, until the group has been
killed.  Only then is it reaped, so ``killpg`` can never hit an unrelated
group that happened to be given a recycled id.  While a group is being killed,
members that are already zombies (possible in containers whose init does not
reap orphans) are treated as gone.

*No busy waiting.*  Waiting blocks on a pidfd (Linux) or sleeps in short
slices; when a ``cancel`` event is given, the wait is cut into 50 ms slices
so cancellation is noticed promptly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, cast

from ..core.ledger import describe_exit as _describe_exit
from ..core.ledger import signal_name
from .files import NotRegularFile, open_regular, read_tail

__all__ = [
    "STDERR_NAME",
    "STDOUT_NAME",
    "CommandOutcome",
    "CommandResult",
    "CommandSpec",
    "OutcomeKind",
    "attempt_tags",
    "describe_exit",
    "excerpt",
    "find_sandbox",
    "make_sandbox",
    "output_problem",
    "restore_files",
    "run_command",
    "safe_dirname",
    "signal_name",
    "spec_problem",
    "tail_lines",
]

OutcomeKind = Literal[
    "ok", "failed", "missing_output", "timeout", "environment", "staging", "invalid"
]
_KINDS: frozenset[str] = frozenset(
    ("ok", "failed", "missing_output", "timeout", "environment", "staging", "invalid")
)

STDOUT_NAME = "stdout.txt"
STDERR_NAME = "stderr.txt"

#: Seconds between SIGTERM and SIGKILL when a group is killed.
KILL_GRACE = 2.0
#: Longest wait for SIGKILLed processes to actually disappear.
_KILL_SETTLE = 1.0
#: Wait slice used when a cancel event must be polled.
_SLICE = 0.05
#: Lines of stderr quoted in failure messages.
_TAIL_LINES = 20


# --------------------------------------------------------------------------- data


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
        inherit = d.get("inherit_env", True)
        return cls(
            argv=tuple(str(a) for a in d["argv"]),
            inputs={str(k): str(v) for k, v in (d.get("inputs") or {}).items()},
            outputs=tuple(str(o) for o in (d.get("outputs") or ())),
            env=None if env is None else {str(k): str(v) for k, v in env.items()},
            stdin=_opt_str(d.get("stdin")),
            cwd=_opt_str(d.get("cwd")),
            timeout=None if timeout is None else float(timeout),
            inherit_env=inherit if isinstance(inherit, bool) else tuple(str(x) for x in inherit),
        )


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
            signal=_opt_str(d.get("signal")),
            stdout_path=_opt_str(d.get("stdout_path")),
            stderr_path=_opt_str(d.get("stderr_path")),
            sandbox=str(d.get("sandbox", "")),
            outputs={str(k): str(v) for k, v in (d.get("outputs") or {}).items()},
            missing=tuple(str(m) for m in (d.get("missing") or ())),
            elapsed=float(d.get("elapsed", 0.0)),
            host=str(d.get("host", "")),
        )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


# --------------------------------------------------------------------------- helpers


def _private(path: str, flags: int) -> int:
    """``open()``'s opener for the runner's own files in a sandbox: mode 0600 whatever
    the umask, and never through a symlink."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)


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


def excerpt(path: str | Path, what: str = "stderr", n: int = _TAIL_LINES) -> str:
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


def safe_dirname(key: str, prefix_len: int = 40) -> str:
    """A short, filesystem-safe, collision-free directory name for a task key.

    A key never becomes a path as it is: ``".."``, ``"a/b"``, a NUL byte or a
    300-character key would climb out of the run directory, collide with
    another task's directory or fail.  The name is a readable prefix
    (letters, digits, ``._-``; other characters become ``_``; no leading dot)
    plus a hash of the *whole* key, so ``"a/b"`` and ``"a_b"`` differ.
    """
    raw = key.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(raw).hexdigest()[:16]
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in key)
    safe = safe[:prefix_len].lstrip(".") or "task"
    return f"{safe}-{digest}"


def _private_root(root: str | Path) -> Path:
    """Create ``root`` (mode 0700) if needed; refuse it if it is not a real directory."""
    root_path = Path(root).absolute()
    if not root_path.is_dir():
        root_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root_path, 0o700)
    if root_path.is_symlink() or not root_path.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, "not a real directory (a symlink or a file?)", str(root_path)
        )
    return root_path


def _clean_tag(tag: str) -> str:
    """A sandbox tag as it appears in a directory name (letters and digits, at most 40):
    the one form :func:`make_sandbox` names and :func:`find_sandbox` looks for."""
    return "".join(c for c in tag if c.isascii() and c.isalnum())[:40]


def make_sandbox(root: str | Path, name: str, tag: str = "") -> Path:
    """Create ``root`` (mode 0700) if needed and a new, unique sandbox dir inside it.

    The sandbox is named ``safe_dirname(name)`` plus a random suffix and is
    created with mode 0700 by ``mkdir``, which fails if the name exists
    (``tempfile.mkdtemp`` then tries another): no other attempt, session or
    process ever gets the same directory, so no stale file of an earlier run
    can be taken for an output and no kept sandbox is ever reused or removed.
    """
    clean_tag = _clean_tag(tag)
    prefix = safe_dirname(name) + (f".{clean_tag}" if clean_tag else "") + "."
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_private_root(root)))


def make_lineage(
    nonce: str,
    previous: tuple[int, int] | None = None,
    earlier: tuple[str, int, int | None, str] | None = None,
) -> tuple[Any, ...]:
    """``RunAttempt.lineage``: ``(nonce,)``; ``(nonce, previous id, previous number)`` for
    a retry that may resume from this session's attempt ``previous``; or ``(nonce,
    previous id, previous number or None, earlier nonce, how)`` for the first attempt of a
    resumed run that may continue an attempt of an earlier session (``earlier``: its
    nonce, id, number if known, and how it ended and was found, for the note). Workers
    that know only the first two forms read the third as a fresh start."""
    if previous is not None:
        return (nonce, previous[0], previous[1])
    if earlier is not None:
        e_nonce, e_id, e_number, how = earlier
        return (nonce, e_id, e_number, e_nonce, how)
    return (nonce,)


def attempt_tags(attempt: int, lineage: tuple[Any, ...]) -> tuple[str, str | None, int | None]:
    """This attempt's sandbox tag, and the tag and number of the attempt it may resume
    from (``RunAttempt.lineage``, see :func:`make_lineage`). The session's random nonce
    makes tags unique in a rundir shared by several runs (attempt ids restart at 1 in
    every session)."""
    tag, previous, number, _ = previous_attempt(attempt, lineage)
    return tag, previous, number


def previous_attempt(
    attempt: int, lineage: tuple[Any, ...]
) -> tuple[str, str | None, int | None, str | None]:
    """:func:`attempt_tags` and the earlier attempt as a note names it ("attempt 2",
    "attempt 2 of run 1 (interrupted when the client died)"), or None."""
    if not lineage:
        return f"a{attempt}", None, None, None
    nonce = _clean_tag(str(lineage[0]))[:10]
    tag = f"{nonce}a{attempt}"
    if len(lineage) < 3 or not isinstance(lineage[1], int) or isinstance(lineage[1], bool):
        return tag, None, None, None
    number = lineage[2] if isinstance(lineage[2], int) else None
    if len(lineage) >= 5 and isinstance(lineage[3], str) and isinstance(lineage[4], str):
        earlier = _clean_tag(lineage[3])[:10]
        which = (f"attempt {number} " if number is not None else "an attempt ") + lineage[4]
        return tag, f"{earlier}a{lineage[1]}", number, which
    if number is None:
        return tag, None, None, None
    return tag, f"{nonce}a{lineage[1]}", number, f"attempt {number}"


def from_earlier_run(lineage: tuple[Any, ...]) -> bool:
    """Does ``lineage`` name an attempt of an earlier session (see :func:`make_lineage`)?"""
    return len(lineage) >= 5 and isinstance(lineage[3], str)


def call_tag(tag: str, call: int | None) -> str:
    """The tag of call ``call`` of a ``map(chunksize=n)`` attempt: each call of a chunk has
    its own scratch directory (and finds its own in the previous attempt)."""
    return tag if call is None else f"{tag}c{call}"


def parse_tag(dirname: str, name: str) -> tuple[str, int] | None:
    """``(nonce, attempt id)`` of a sandbox :func:`make_sandbox` made for task ``name``
    with a tag from :func:`attempt_tags` (any call of a chunk), or None."""
    prefix = safe_dirname(name) + "."
    if not dirname.startswith(prefix):
        return None
    m = _TAG.fullmatch(dirname[len(prefix) :].partition(".")[0])
    return (m.group(1) or "", int(m.group(2))) if m else None


_TAG = re.compile(r"([0-9a-f]{8})?a([0-9]+)(?:c[0-9]+)?")


def keeps_sandbox(keep_sandboxes: str, ok: bool) -> bool:
    """The one rule for an attempt's sandbox or scratch directory: a failed (or lost)
    attempt's is kept (its retry and the user need it); a successful one's is removed
    unless ``keep_sandboxes="all"``."""
    return not ok or keep_sandboxes == "all"


def _our_dirs(root: str | Path, prefix: str) -> list[tuple[int, Path]]:
    """``(mtime, path)`` of the real directories of ours under ``root`` whose names
    start with ``prefix``: never a symlink, never one owned by someone else."""
    root_path = Path(root).absolute()
    found: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(root_path))
    except OSError:
        return found
    uid = os.getuid() if hasattr(os, "getuid") else None
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if e.is_symlink() or not e.is_dir(follow_symlinks=False):
            continue
        if uid is not None and st.st_uid != uid:
            continue  # not ours: never take files from it
        found.append((st.st_mtime_ns, Path(e.path)))
    return found


def find_sandbox(root: str | Path, name: str, tag: str) -> Path | None:
    """The sandbox :func:`make_sandbox` made for ``(name, tag)`` under ``root``, if it is
    there (same filesystem): a real directory of ours. The newest if an engine ran that
    attempt twice (each run got its own sandbox)."""
    found = _our_dirs(root, safe_dirname(name) + "." + _clean_tag(tag) + ".")
    return max(found)[1] if found else None


def sandbox_index(root: str | Path) -> dict[str, list[tuple[int, Path]]]:
    """Every real directory of ours under ``root`` by its task's :func:`safe_dirname`
    (``(mtime, path)``): one scan of the sandboxes directory for a whole resumed run."""
    index: dict[str, list[tuple[int, Path]]] = {}
    for mtime, path in _our_dirs(root, ""):
        m = _NAME.match(path.name)
        if m:
            index.setdefault(m.group(1), []).append((mtime, path))
    return index


_NAME = re.compile(r"(.*-[0-9a-f]{16})\.")


def newest_sandbox(
    root: str | Path, name: str, index: dict[str, list[tuple[int, Path]]] | None = None
) -> tuple[Path, str, int] | None:
    """The newest sandbox (or scratch directory) of task ``name`` under ``root`` made with
    an attempt's tag, and that attempt's ``(nonce, id)``: how a resumed run finds an
    attempt whose start the journal did not record. Only real directories of ours whose
    names start with the key's own :func:`safe_dirname` (a hash of the whole key).
    ``index``: :func:`sandbox_index` of ``root``, for many keys."""
    if index is None:
        entries = _our_dirs(root, safe_dirname(name) + ".")
    else:
        entries = index.get(safe_dirname(name), [])
    found = [
        (mtime, path, tag)
        for mtime, path in entries
        if (tag := parse_tag(path.name, name)) is not None
    ]
    if not found:
        return None
    _, path, (nonce, aid) = max(found, key=lambda f: (f[0], f[1]))
    return path, nonce, aid


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def restore_files(
    previous: Path | None,
    number: int | str | None,
    box: Path,
    names: tuple[str, ...],
    *,
    left_in_place: bool = False,
) -> tuple[bool, str]:
    """Copy ``names`` from an earlier attempt's sandbox ``previous`` into ``box``: all of
    them or none. Returns ``(resumed, note)``: ``(True, "resumed from attempt 2: md.cpt,
    48 MB")`` or ``(False, "fresh start: md.cpt missing")``. A file counts only if it is a
    regular, non-empty file inside ``previous`` (symlinks resolved: a link out of the old
    sandbox is refused, as outputs are); an empty one is partial. A copy that fails
    (disk full, a file that shrank) removes what was copied: a fresh start, never a
    half-restored sandbox. ``number`` is the earlier attempt's number, or how a note names
    it (:func:`previous_attempt`); ``left_in_place``: the note names that sandbox's path
    (an earlier run's: the user's data, never removed)."""
    if isinstance(number, str):
        which = number
    else:
        which = f"attempt {number}" if number is not None else "the previous attempt"
    if previous is None:
        return False, f"fresh start: the sandbox of {which} is not on host {_host()}"
    real_prev = os.path.realpath(previous)
    problems: list[str] = []
    sources: list[tuple[str, str, int]] = []
    for name in names:
        src = os.path.realpath(os.path.join(previous, os.path.normpath(name)))
        if not _inside(src, real_prev):
            problems.append(f"{name} is a link out of the sandbox")
            continue
        try:
            st = os.stat(src)
        except OSError:
            problems.append(f"{name} missing")
            continue
        if not os.path.isfile(src):
            problems.append(f"{name} is not a file")
        elif st.st_size == 0:
            problems.append(f"{name} empty (partial)")
        else:
            sources.append((name, src, st.st_size))
    if problems:
        return False, "fresh start: " + ", ".join(problems) + f" (in {which})"
    copied: list[Path] = []
    try:
        for name, src, size in sources:
            dest = box / os.path.normpath(name)
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                raise FileExistsError(f"{name} is already in the new sandbox (an input?)")
            shutil.copyfile(src, dest)
            copied.append(dest)
            if os.path.getsize(dest) < size:
                raise OSError(f"{name} shrank while it was copied (partial)")
    except OSError as e:
        for f in copied:
            with contextlib.suppress(OSError):
                f.unlink()
        return False, f"fresh start: cannot copy from {which}: {e}"
    total = sum(size for _, _, size in sources)
    note = f"resumed from {which}: {', '.join(names)}, {_size(total)}"
    return True, note + (f"; its sandbox, left in place: {previous}" if left_in_place else "")


def _host() -> str:
    return socket.gethostname()


def _group_alive(pgid: int) -> bool:
    """True while the process group has a member that is not a zombie.

    Zombies are ignored because in containers whose init does not reap orphans
    they never go away; they hold no resources beyond a process-table slot.
    Uses /proc where available, otherwise ``killpg(pgid, 0)``.
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        entries = []
    if entries and os.path.exists("/proc/self/stat"):
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _ExitWatcher:
    """Waits for a child to exit WITHOUT reaping it (see module docstring)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = None
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self._pidfd = int(pidfd_open(pid))
            except OSError:
                self._pidfd = None
        self._delay = 0.001
        #: The exit status was lost: someone else reaped the child (ECHILD), e.g.
        #: because SIGCHLD is ignored in this process.  Never read as success.
        self.lost = False

    def exited(self) -> bool:
        try:
            res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            self.lost = True  # already reaped by someone else: status unknown
            return True
        return res is not None

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True once the child has exited."""
        if self.exited():
            return True
        if timeout <= 0:
            return False
        if self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            with contextlib.suppress(InterruptedError):
                poller.poll(max(1, int(timeout * 1000)))
            return self.exited()
        # Portable fallback: short sleeps growing to 50 ms.
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self.exited()
            time.sleep(min(self._delay, remaining))
            self._delay = min(self._delay * 2, _SLICE)
            if self.exited():
                return True

    def close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def _kill_group(proc: subprocess.Popen[bytes], watcher: _ExitWatcher) -> None:
    """SIGTERM the group, grace period, SIGKILL, wait for it to die, reap the child.

    The child is reaped only at the end so its zombie keeps the group id reserved.
    """
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while _group_alive(pgid) and time.monotonic() < deadline:
        # Block on the main child first (cheap), then poll the rest of the group.
        if not watcher.exited():
            watcher.wait(min(_SLICE, max(0.0, deadline - time.monotonic())))
        else:
            time.sleep(0.02)
    _signal_group(pgid, signal.SIGKILL)
    settle = time.monotonic() + _KILL_SETTLE
    while _group_alive(pgid) and time.monotonic() < settle:
        time.sleep(0.01)
    proc.wait()


def _outcome(
    kind: OutcomeKind,
    message: str,
    sandbox: Path,
    started: float,
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
        stdout_path=str(sandbox / STDOUT_NAME) if streams else None,
        stderr_path=str(sandbox / STDERR_NAME) if streams else None,
        sandbox=str(sandbox),
        outputs=outputs or {},
        missing=missing,
        elapsed=time.monotonic() - started,
        host=_host(),
    )


def describe_exit(returncode: int) -> str:
    """'exited with code 3' or 'was killed by signal SIGSEGV (-11)' (the ledger's words)."""
    return _describe_exit(returncode)[0]


def _stderr_excerpt(stderr_path: Path) -> str:
    return excerpt(stderr_path, "stderr", _TAIL_LINES)


def _check_input_name(name: str, sandbox: Path) -> str | None:
    """Return an error sentence if ``name`` is not a safe relative path in the sandbox."""
    if not name or name.strip() != name:
        return f"input name {name!r} is empty or has surrounding whitespace"
    if "\0" in name:
        return f"input name {name!r} contains a NUL byte"
    if os.path.isabs(name):
        return f"input name {name!r} is an absolute path; names must be relative to the sandbox"
    parts = Path(name).parts
    if ".." in parts:
        return f"input name {name!r} escapes the sandbox ('..' is not allowed)"
    norm = os.path.normpath(name)
    if norm in (".", STDOUT_NAME, STDERR_NAME):
        return f"input name {name!r} is reserved in the sandbox"
    # No existing component of the parent may be a symlink (it could lead
    # outside the sandbox, e.g. into a staged input directory).
    cur = sandbox
    for part in Path(norm).parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            return (
                f"input name {name!r} would be placed inside {cur}, "
                "which is a symlink (another input?)"
            )
    return None


_RESERVED = frozenset((".", STDOUT_NAME, STDERR_NAME))


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
    if os.path.isabs(name) or ".." in Path(name).parts:
        return f"{what} {name!r} must be a relative path inside the sandbox (no '/...', no '..')"
    rel_cwd = cwd if cwd is not None and not os.path.isabs(cwd) else ""
    if os.path.normpath(os.path.join(rel_cwd, name)) in _RESERVED:
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


def _env_problem(env: object, what: str = "env") -> str | None:
    if env is None:
        return None
    if not isinstance(env, Mapping):
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
    the worker (dependency results) and direct callers of :func:`run_command`.
    """
    if not spec.argv:
        return "argv is empty"
    for i, a in enumerate(spec.argv):
        if not isinstance(a, str):
            return f"argv[{i}]={a!r} is not a string"
        if "\0" in a:
            return f"argv[{i}]={a!r} contains a NUL byte"
    problem = _env_problem(spec.env)
    if problem is not None:
        return problem
    ie = spec.inherit_env
    if not isinstance(ie, bool) and not (
        isinstance(ie, tuple) and all(isinstance(n, str) for n in ie)
    ):
        return f"inherit_env={ie!r} must be True, False or a list of variable names"
    cwd = spec.cwd
    if cwd is not None:
        if not isinstance(cwd, str) or not cwd or "\0" in cwd:
            return f"cwd={cwd!r} must be a non-empty path without NUL bytes"
        if not os.path.isabs(cwd) and ".." in Path(cwd).parts:
            return f"cwd={cwd!r} escapes the sandbox ('..' is not allowed in a relative cwd)"
        if os.path.isabs(cwd) and spec.outputs:
            return (
                f"cwd={cwd!r} is outside the sandbox, so outputs {list(spec.outputs)!r} cannot "
                "be collected (outputs are only taken from the sandbox; use a relative cwd "
                "or write the outputs into the sandbox)"
            )
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
    return files_problem(spec.outputs, cwd, spec.inputs)


def _inside(path: str, root: str) -> bool:
    """Is the already-resolved ``path`` strictly inside the resolved ``root``?"""
    return path != root and os.path.commonpath([path, root]) == root


def _stage_inputs(spec: CommandSpec, sandbox: Path) -> str | None:
    """Symlink every input into the sandbox.  Returns an error message or None."""
    host = _host()
    for name, source in spec.inputs.items():
        problem = _check_input_name(name, sandbox)
        if problem is not None:
            return f"cannot stage inputs on host {host}: {problem} (sandbox {sandbox})."
        src = os.path.abspath(source)
        if not os.path.exists(src):
            return (
                f"cannot stage input {name!r} on host {host}: source {src} does not exist "
                f"(sandbox {sandbox}). Check that the file was produced and that its "
                "filesystem is mounted on this host."
            )
        link = sandbox / os.path.normpath(name)
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                if os.readlink(link) == src:
                    continue
                link.unlink()
            elif link.exists():
                return (
                    f"cannot stage input {name!r} on host {host}: {link} already exists "
                    f"in the sandbox and is not a staged link (sandbox {sandbox})."
                )
            os.symlink(src, link)
        except OSError as exc:
            return (
                f"cannot stage input {name!r} ({src}) on host {host}: "
                f"{exc.strerror or exc} (sandbox {sandbox})."
            )
    return None


def _resolve_program(argv0: str, cwd: str, env: Mapping[str, str]) -> tuple[str | None, str]:
    """Find the executable.  Returns (path, "") or (None, reason)."""
    search_path = env.get("PATH", os.defpath)
    if not argv0:
        return None, "the program name (argv[0]) is empty"
    if "/" not in argv0:
        found = shutil.which(argv0, path=search_path)
        if found is None:
            return None, (
                f"program {argv0!r} was not found on PATH (or is not executable); "
                f"PATH searched: {search_path}"
            )
        return os.path.abspath(found), ""
    full = argv0 if os.path.isabs(argv0) else os.path.join(cwd, argv0)
    if not os.path.exists(full):
        return None, f"program {argv0!r} does not exist (looked at {full})"
    if os.path.isdir(full):
        return None, f"program {argv0!r} is a directory ({full})"
    if not os.access(full, os.X_OK):
        return None, (
            f"program {argv0!r} is not executable ({full}); check its permissions (chmod +x)"
        )
    return full, ""


# --------------------------------------------------------------------------- main entry


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
    started = time.monotonic()
    host = _host()
    box = Path(sandbox).absolute()
    program = spec.argv[0] if spec.argv else ""

    problem = spec_problem(spec)
    if problem is not None:
        return _outcome("invalid", f"invalid program task on host {host}: {problem}.", box, started)

    # --- sandbox and inputs -------------------------------------------------
    try:
        if not box.is_dir():
            box.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(box, 0o700)
    except OSError as exc:
        return _outcome(
            "staging",
            f"cannot create sandbox {box} on host {host}: {exc.strerror or exc}.",
            box,
            started,
        )
    problem = _stage_inputs(spec, box)
    if problem is not None:
        return _outcome("staging", problem, box, started)

    # --- environment: cwd, program, stdin ------------------------------------
    if spec.inherit_env is True:
        env = dict(os.environ)
    elif spec.inherit_env is False:
        env = {}
    else:
        env = {k: os.environ[k] for k in spec.inherit_env if k in os.environ}
    if spec.env:
        env.update(spec.env)
    if spec.cwd is None:
        cwd = str(box)
    elif os.path.isabs(spec.cwd):
        cwd = spec.cwd
    else:
        cwd = os.path.normpath(os.path.join(box, spec.cwd))
    if not os.path.isdir(cwd):
        return _outcome(
            "environment",
            f"cannot run {program!r} on host {host}: working directory {cwd} does not exist "
            f"or is not a directory (sandbox {box}).",
            box,
            started,
        )
    if not spec.argv:
        return _outcome(
            "environment", f"cannot run on host {host}: the command is empty.", box, started
        )
    executable, reason = _resolve_program(program, cwd, env)
    if executable is None:
        return _outcome(
            "environment",
            f"cannot run {program!r} on host {host}: {reason}. Install it on this host "
            "or fix the command/PATH.",
            box,
            started,
        )

    stdin_file: IO[bytes] | None = None
    if spec.stdin is not None:
        stdin_path = spec.stdin if os.path.isabs(spec.stdin) else os.path.join(box, spec.stdin)
        try:
            # a FIFO would block this worker until someone writes it: regular files only
            stdin_file = open_regular(stdin_path)
        except OSError as exc:
            return _outcome(
                "staging",
                f"cannot open stdin file {stdin_path} for {program!r} on host {host}: "
                f"{exc.strerror or exc} (sandbox {box}).",
                box,
                started,
            )

    # --- spawn --------------------------------------------------------------
    stdout_path = box / STDOUT_NAME
    stderr_path = box / STDERR_NAME
    try:
        try:
            out_f = open(stdout_path, "wb", opener=_private)  # noqa: SIM115
            try:
                err_f = open(stderr_path, "wb", opener=_private)  # noqa: SIM115
            except OSError:
                out_f.close()
                raise
        except OSError as exc:
            return _outcome(
                "staging",
                f"cannot create output files in sandbox {box} on host {host}: "
                f"{exc.strerror or exc}.",
                box,
                started,
            )
        try:
            proc = subprocess.Popen(
                list(spec.argv),
                executable=executable,
                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            detail = exc.strerror or str(exc)
            if exc.errno == errno.ENOEXEC:
                detail += " (not a binary and no '#!' line?)"
            return _outcome(
                "environment",
                f"cannot start {program!r} ({executable}) on host {host}: {detail}; "
                f"cwd {cwd}, PATH searched: {env.get('PATH', os.defpath)}.",
                box,
                started,
            )
        finally:
            out_f.close()
            err_f.close()
    finally:
        if stdin_file is not None:
            stdin_file.close()

    # --- wait ---------------------------------------------------------------
    spawned = time.monotonic()
    watcher = _ExitWatcher(proc.pid)
    reason_killed: Literal["timeout", "cancelled"] | None = None
    try:
        if on_start is not None:
            on_start(proc.pid)
        deadline = None if spec.timeout is None else spawned + spec.timeout
        while True:
            if cancel is not None and cancel.is_set():
                reason_killed = "cancelled"
                break
            if deadline is None:
                slice_ = _SLICE if cancel is not None else 3600.0
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if watcher.exited():
                        break
                    reason_killed = "timeout"
                    break
                slice_ = min(_SLICE, remaining) if cancel is not None else remaining
            if watcher.wait(slice_):
                break
        if reason_killed is not None:
            _kill_group(proc, watcher)
        else:
            # Main program exited; its zombie still reserves the group id, so
            # killing leftovers (background grandchildren) is race-free.
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    except BaseException:
        if proc.returncode is None:
            _kill_group(proc, watcher)
        raise
    finally:
        watcher.close()

    ran = time.monotonic() - spawned
    rc = proc.returncode
    assert rc is not None
    if watcher.lost:
        return _outcome(
            "environment",
            f"the exit status of {program!r} on host {host} was lost: the child was reaped "
            "by someone else (ECHILD; is SIGCHLD ignored in this worker, e.g. by an earlier "
            f"task calling signal.signal(SIGCHLD, SIG_IGN)?). stderr: {stderr_path}; "
            f"sandbox {box}.",
            box,
            started,
            streams=True,
        )

    if reason_killed == "timeout":
        return _outcome(
            "timeout",
            f"{program!r} on host {host} exceeded its time limit of {spec.timeout:g}s "
            f"(ran {ran:.1f}s) and its process group was killed; {describe_exit(rc)}. "
            f"stderr: {stderr_path}; sandbox kept at {box}. "
            f"{_stderr_excerpt(stderr_path)}",
            box,
            started,
            returncode=rc,
            streams=True,
        )
    if reason_killed == "cancelled":
        return _outcome(
            "failed",
            f"cancelled: {program!r} on host {host} was cancelled after {ran:.1f}s and its "
            f"process group was killed; {describe_exit(rc)}. "
            f"stderr: {stderr_path}; sandbox {box}.",
            box,
            started,
            returncode=rc,
            streams=True,
        )
    if rc != 0:
        return _outcome(
            "failed",
            f"{program!r} on host {host} {describe_exit(rc)} after {ran:.1f}s. "
            f"stderr: {stderr_path}; sandbox {box}. {_stderr_excerpt(stderr_path)}",
            box,
            started,
            returncode=rc,
            streams=True,
        )

    found: dict[str, str] = {}
    missing: list[str] = []
    escaped: dict[str, str] = {}
    real_box = os.path.realpath(box)
    for name in spec.outputs:
        path = os.path.abspath(os.path.join(cwd, name))
        if not os.path.lexists(path):
            missing.append(name)
        elif not _inside(os.path.realpath(path), real_box):
            # a symlink to a file outside, a file inside a staged input directory,
            # or a cwd outside the sandbox: never the program's own new file
            escaped[name] = os.path.realpath(path)
        elif os.path.exists(path):
            found[name] = path
        else:
            missing.append(name)  # a dangling symlink
    if escaped:
        where = ", ".join(f"{n!r} -> {p}" for n, p in escaped.items())
        return _outcome(
            "missing_output",
            f"{program!r} on host {host} exited 0 but declared output(s) {where} resolve "
            f"outside the sandbox {box}; outputs are only taken "
            "from inside the sandbox (a symlink to, or a file inside, the user's own files "
            "is never collected).",
            box,
            started,
            returncode=rc,
            streams=True,
            missing=tuple(escaped),
        )
    if missing:
        listed = ", ".join(repr(m) for m in missing)
        return _outcome(
            "missing_output",
            f"{program!r} on host {host} exited 0 but did not create declared output(s) "
            f"{listed} (looked in {cwd}; sandbox {box}). Check the output names in the "
            f"command and the program's stderr: {stderr_path}.",
            box,
            started,
            returncode=rc,
            streams=True,
            missing=tuple(missing),
        )
    return _outcome(
        "ok",
        f"{program!r} on host {host} exited 0 after {ran:.1f}s (sandbox {box}).",
        box,
        started,
        returncode=rc,
        streams=True,
        outputs=found,
    )
