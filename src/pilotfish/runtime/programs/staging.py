"""Files in and out of a sandbox: inputs staged in, declared outputs found, the files
of an earlier attempt restored (``resume_files``).

*Edges trust nothing.*  Inputs are symlinked into the sandbox under their declared
names, which must stay inside it (:func:`stage_inputs`); a missing input is a staging
failure named with the host, never the program's.  An output counts only if it
resolves, symlinks followed, to a path inside the sandbox (:func:`find_outputs`): a
link to the user's file, a file inside a staged input directory, or a file under a
``cwd`` outside the sandbox is refused by name.  Restored files obey the same rule and
come all or none (:func:`restore_files`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .outcome import this_host
from .spec import RESERVED, CommandSpec, stays_inside


def inside(path: str, root: str) -> bool:
    """Is the already-resolved ``path`` strictly inside the resolved ``root``?"""
    return path != root and os.path.commonpath([path, root]) == root


def check_input_name(name: str, sandbox: Path) -> str | None:
    """Return an error sentence if ``name`` is not a safe relative path in the sandbox."""
    if not name or name.strip() != name:
        return f"input name {name!r} is empty or has surrounding whitespace"
    if "\0" in name:
        return f"input name {name!r} contains a NUL byte"
    if os.path.isabs(name):
        return f"input name {name!r} is an absolute path; names must be relative to the sandbox"
    if not stays_inside(name):
        return f"input name {name!r} escapes the sandbox ('..' is not allowed)"
    norm = os.path.normpath(name)
    if norm in RESERVED:
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


def stage_inputs(spec: CommandSpec, sandbox: Path) -> str | None:
    """Symlink every input into the sandbox.  Returns an error message or None."""
    host = this_host()
    for name, source in spec.inputs.items():
        problem = check_input_name(name, sandbox)
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


def find_outputs(
    outputs: tuple[str, ...], cwd: str, box: Path
) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """Where the declared ``outputs`` are after the program ran in ``cwd``: ``(found,
    missing, escaped)``, the paths of those inside the sandbox ``box``, the names of those
    absent (or dangling links), and where those that resolve outside it lead."""
    found: dict[str, str] = {}
    missing: list[str] = []
    escaped: dict[str, str] = {}
    real_box = os.path.realpath(box)
    for name in outputs:
        path = os.path.abspath(os.path.join(cwd, name))
        if not os.path.lexists(path):
            missing.append(name)
        elif not inside(os.path.realpath(path), real_box):
            # a symlink to a file outside, a file inside a staged input directory,
            # or a cwd outside the sandbox: never the program's own new file
            escaped[name] = os.path.realpath(path)
        elif os.path.exists(path):
            found[name] = path
        else:
            missing.append(name)  # a dangling symlink
    return found, missing, escaped


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
        return False, f"fresh start: the sandbox of {which} is not on host {this_host()}"
    real_prev = os.path.realpath(previous)
    problems: list[str] = []
    sources: list[tuple[str, str, int]] = []
    for name in names:
        src = os.path.realpath(os.path.join(previous, os.path.normpath(name)))
        if not inside(src, real_prev):
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
