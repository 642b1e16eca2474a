"""The failure digest: the shape of many failures at a glance, as plain data.

A scientist with 5,000 members and 400 failures needs the shape of the failures
first, then any single one in full (``pilotfish show KEY``). :func:`failure_digest`
groups failed tasks by category and a *normalised signature*, largest group first::

    412 tasks: COMMAND_FAILED exit 1 'Invalid enum <...> for variable integrator'
    3,100 tasks: DEPENDENCY_FAILED from 31 roots

The signature of a failure (:func:`signature`):

* a Python exception (USER_ERROR): its type and the first line of its message;
* a program (COMMAND_FAILED with an exit code or a signal): ``exit N`` or
  ``signal SIGSEGV`` and the last *distinctive* stderr line (the last one that
  reads like an error, else the last one that is not boilerplate);
* a lost worker or master: the signal or exit code and the first line of the message;
* a dependency failure: one group per category, whatever the root; the group
  lists its roots (key and how many tasks each took with it);
* anything else: the first line of the message.

Messages are masked so that failures differing only in data fall together: the
task's own key (and its upstream, root, worker and host names) become ``<key>``,
``<worker>``, ``<host>``; quoted values ``<...>`` (not a program's name: ``program
'gmx'`` stays); paths ``<path>``; hexadecimal
ids and UUIDs ``<hex>``; numbers ``<n>``.

This module is pure (no I/O, standard library only): it reads FailureRecord-like
objects (:class:`pilotfish.FailureRecord`, or the dicts the journal stores) and
returns dicts, lists, strings and ints, ready for JSON. The CLI, the HTML report
and ``Session.failure_digest()`` all use it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "EXAMPLES",
    "clean",
    "distinctive_line",
    "exit_label",
    "failure_digest",
    "format_digest",
    "headline",
    "mask",
    "reason",
    "signature",
]

EXAMPLES = 3  # example keys kept per group
ROOTS = 10  # roots listed per dependency group (all are counted)
_LINE_MAX = 300  # a signature is one line, at most this long

_QUOTED = re.compile(r"(?<!\w)(?:'[^'\n]{0,200}'|\"[^\"\n]{0,200}\")(?!\w)")
_UUID = re.compile(
    r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
)
_HEX = re.compile(
    r"\b0[xX][0-9a-fA-F]+\b|\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{6,}\b"
)
# absolute or relative paths with at least one slash, or a ~ path; a URL's scheme is kept
_PATH = re.compile(r"(?<![\w.<>:/-])(?:~|\.{1,2})?(?:/[\w.+@%=,-]+)+/?|\b[\w.-]+(?:/[\w.-]+)+/?")
# a number, with a unit glued to it ("0.5s", "48MB", "12%") masked too
_NUMBER = re.compile(
    r"(?<![\w<.])[-+]?(?:\d[\d_,]*)?\.?\d+(?:[eE][-+]?\d+)?(?:[a-zA-Z%]{1,3})?(?![\w>])"
)
_SPACES = re.compile(r"\s+")
_TOKEN_WITH_SLASH = re.compile(r"\S*[/\\]\S*")
_TASK_PREFIX = re.compile(r"^task '.*?'(?::\s*|\s+(?=did not run))")

# a stderr line that says what went wrong (case-insensitive)
_ERRORISH = re.compile(
    r"error|fatal|fail|invalid|exception|abort|cannot|can't|could not|not found|no such|"
    r"denied|refused|illegal|unknown|unrecognized|unexpected|missing|violation|"
    r"segmentation|killed|out of memory|panic|traceback|assert",
    re.IGNORECASE,
)
# lines that end many programs' stderr and say nothing about this failure
_BOILERPLATE = re.compile(
    r"^(?:[-=*#_~.+ ]*|for more information.*|see .* for (?:more )?details.*|"
    r"please (?:check|see|report|consult).*|abort(?:ed)?(?: \(core dumped\))?|"
    r"traceback \(most recent call last\):|during handling of the above exception.*|"
    r"\s*at .*|\s*file \".*\", line \d+.*|halting program\.?|program (?:stopped|terminated)\.?|"
    r"error termination.*|stop\.?|exit(?:ing)?\.?|thanks for using .*|gcq#\d+.*)$",
    re.IGNORECASE,
)


# C0 controls but newline and tab, DEL, the C1 controls (a bare 0x9b is a CSI), and
# Unicode's line separators and bidirectional overrides (text that shows reordered)
_OTHER = "\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_OTHER}]")
_CONTROL_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f{_OTHER}]")


def _esc(ch: re.Match[str]) -> str:
    n = ord(ch.group())
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def clean(value: object, *, one_line: bool = False) -> str:
    """``value`` as text safe to show (a terminal, a web page): control characters (ANSI
    CSI/OSC escape sequences, BEL, backspace, carriage return, bidi overrides...) become
    visible ``\\xNN`` escapes (``one_line``: newlines and tabs too). The one rule for
    the CLI and the HTML report; never markup: each caller escapes for its medium."""
    s = "" if value is None else str(value)
    return (_CONTROL_LINE if one_line else _CONTROL).sub(_esc, s)


def fmt_time(t: float | None) -> str:
    """A journal time as local ``YYYY-MM-DD HH:MM:SS`` (``-`` if unknown), for the CLI
    and the report alike."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def fmt_dur(seconds: float | None) -> str:
    """A duration in s, min or h (``-`` if unknown), for the CLI and the report alike."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _get(record: Any, name: str) -> Any:
    if type(record) is dict or isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _category(record: Any) -> str:
    cat = _get(record, "category")
    value = getattr(cat, "value", cat)
    return str(value).lower() if value else "unknown"


def exit_label(returncode: int | None, signal: str | None) -> str:
    """How a process ended, short: ``signal SIGKILL`` or ``exit 2`` (``exit ?`` if
    unknown). One wording for the digest, the CLI and the report."""
    if signal:
        return f"signal {signal}"
    if returncode is not None and returncode < 0:
        return f"signal {-returncode}"
    if returncode is None:
        return "exit ?"
    return f"exit {returncode}"


def headline(record: Any) -> str:
    """The first line of a failure's message without the ``task 'KEY':`` prefix (the
    key is shown beside it), or the category if there is no message."""
    message = str(_get(record, "message") or "").strip()
    first = message.splitlines()[0].strip() if message else ""
    key = _get(record, "key")
    if key is not None:
        for prefix in (f"task {key!r}: ", f"task {key!r} "):
            if first.startswith(prefix):
                first = first[len(prefix) :]
                break
        else:
            first = _TASK_PREFIX.sub("", first, count=1)
    return first or _category(record)


def mask(text: str, names: Mapping[str, str] | None = None) -> str:
    """``text`` with the data in it masked (see the module docstring); ``names`` maps
    exact strings (a key, a worker name) to their placeholder, replaced first."""
    s = text
    # paths first, whole: a sandbox path holds the task's key and a random suffix, and
    # masking the key inside it first would cut the path in two, leaving the suffix
    s = _PATH.sub(_path_token, s)
    for value, token in sorted((names or {}).items(), key=lambda kv: -len(kv[0])):
        if value and len(value) > 1:
            s = s.replace(value, token)
    s = _QUOTED.sub(_quoted_token, s)
    s = _UUID.sub("<hex>", s)
    s = _HEX.sub("<hex>", s)
    s = _NUMBER.sub("<n>", s)
    s = _SPACES.sub(" ", s).strip()
    return s if len(s) <= _LINE_MAX else s[: _LINE_MAX - 1] + "…"


def _quoted_token(m: re.Match[str]) -> str:
    """A quoted value as ``<...>``, unless it is a placeholder already or the name of a
    program (``program 'gmx'``): which program failed is what a group is about, not
    data that differs between its failures."""
    text = m.group()
    if text[1:-1].startswith("<") or m.string[max(0, m.start() - 8) : m.start()] == "program ":
        return text
    return "<...>"


def _path_token(m: re.Match[str]) -> str:
    text = m.group()
    # "a/b" with no dot and no leading slash is often prose ("and/or", "I/O"): keep it
    if not text.startswith(("/", "~", ".")) and "." not in text and text.count("/") == 1:
        return text
    return "<path>"


def distinctive_line(stderr_tail: str) -> str:
    """The stderr line that best says what went wrong: the last line that reads like an
    error (``FATAL: ...``, ``Invalid enum 'x' for variable integrator``), else the last
    line that is not boilerplate (rulers, "For more information...", "Aborted"), else ""."""
    lines = [ln.strip() for ln in stderr_tail.splitlines()]
    lines = [ln for ln in lines if ln]
    useful = [ln for ln in lines if not _BOILERPLATE.match(ln)]
    for ln in reversed(useful):
        if _ERRORISH.search(_TOKEN_WITH_SLASH.sub("", ln)):  # "run-time-errors.html" is not one
            return ln
    return useful[-1] if useful else ""


def _stderr_tail(record: Any) -> str:
    """The stderr lines a record carries: ``stderr_tail``, else the part of a program's
    message after "last lines of stderr:"."""
    tail = _get(record, "stderr_tail")
    if tail:
        return str(tail)
    message = str(_get(record, "message") or "")
    marker = "last lines of stderr:"
    i = message.rfind(marker)
    return message[i + len(marker) :] if i >= 0 else ""


def _names(record: Any) -> dict[str, str]:
    names: dict[str, str] = {}
    for field, token in (
        ("key", "<key>"),
        ("upstream", "<key>"),
        ("root", "<key>"),
        ("worker", "<worker>"),
        ("host", "<host>"),
    ):
        value = _get(record, field)
        if isinstance(value, str) and value:
            names[value] = token
    return names


def _short_type(exc_type: str) -> str:
    return exc_type.rsplit(".", 1)[-1]


def _exception_line(exc_type: str, first: str) -> tuple[str, str]:
    """A user exception's short type name, and its message's first line without the
    type name it may start with ('' if the line is only the type)."""
    short = _short_type(exc_type)
    for prefix in (f"{exc_type}: ", f"{short}: "):
        if first.startswith(prefix):
            return short, first[len(prefix) :]
    return short, "" if first in (exc_type, short) else first


def signature(record: Any) -> str:
    """The normalised signature of one failure (see the module docstring)."""
    category = _category(record)
    names = _names(record)
    first = headline(record)
    if category == "dependency_failed":
        return "dependency failed"
    returncode, sig = _get(record, "returncode"), _get(record, "signal")
    exc_type = _get(record, "exc_type")
    if category == "command_failed" and (returncode is not None or sig):
        line = distinctive_line(_stderr_tail(record))
        ended = exit_label(returncode, sig)
        return f"{ended} {mask(line, names)!r}" if line else ended
    if category in ("worker_lost", "runtime_lost") and (returncode is not None or sig):
        return f"{exit_label(returncode, sig)}: {mask(first, names)}"
    if category == "user_error" and exc_type:
        short, first = _exception_line(str(exc_type), first)
        return f"{short}: {mask(first, names)}" if first else short
    return mask(first, names)


_TIMEOUT_OF = re.compile(r"(?:time limit|timeout) of ([0-9][0-9.e+]*) ?s\b")
_MISSING = re.compile(r"declared output\(s\) (.+?) (?:\(looked in|resolve outside)")
_NOT_ON_PATH = re.compile(r"program ('[^']*'|\S+) was not found on PATH")
_OUTPUT_NAME = re.compile(r"'([^']*)'|\"([^\"]*)\"")
# an absolute path (or ~/...): in a one-line reason it becomes its last name
_ABS_PATH = re.compile(r"(?<![\w.~/-])~?/[^\s'\";,()\[\]]+")


def _basename(m: re.Match[str]) -> str:
    name = m.group().rstrip("/.").rsplit("/", 1)[-1]
    return f"…/{name}" if name else m.group()


def _no_paths(text: str) -> str:
    """``text`` with each absolute path replaced by ``…/`` and its last name (a one-line
    view has no room for a sandbox path; ``show KEY`` prints them whole)."""
    return _ABS_PATH.sub(_basename, text) if "/" in text else text


def _missing_outputs(message: str) -> str | None:
    m = _MISSING.search(message)
    if m is None:
        return None
    names = [a or b for a, b in _OUTPUT_NAME.findall(m.group(1))] or [m.group(1)]
    if "resolve outside" in m.group(0):
        return f"output{'s' if len(names) != 1 else ''} outside the sandbox: {', '.join(names)}"
    return f"missing output{'s' if len(names) != 1 else ''} {', '.join(names)}"


def reason(record: Any) -> str:
    """Why a task failed, short and reason first, for a one-line view (``pilotfish
    failures``, ``run``'s progress lines): ``exit 3: <the distinctive stderr line>``,
    ``signal SIGSEGV``, ``timed out after 5 s``, ``missing output x.dat``, ``worker lost:
    signal SIGKILL``, ``ValueError: <first line>``; else the first line of the message.
    Paths are cut to their last name (the category is shown beside it)."""
    category = _category(record)
    message = str(_get(record, "message") or "")
    first = headline(record)
    returncode, sig = _get(record, "returncode"), _get(record, "signal")
    out = first
    if category == "command_failed" and (returncode is not None or sig):
        line = distinctive_line(_stderr_tail(record))
        ended = exit_label(returncode, sig)
        out = f"{ended}: {line}" if line else ended
    elif category == "timeout":
        m = _TIMEOUT_OF.search(message)
        out = f"timed out after {m.group(1)} s" if m else first
    elif category == "missing_output":
        out = _missing_outputs(message) or first
    elif category in ("worker_lost", "runtime_lost"):
        who = "worker lost" if category == "worker_lost" else "master/scheduler lost"
        if returncode is not None or sig:
            out = f"{who}: {exit_label(returncode, sig)}"
            if "poison" in message:
                out += " (poison: it killed workers)"
    elif category == "user_error":
        exc_type = _get(record, "exc_type")
        if exc_type:
            short, first = _exception_line(str(exc_type), first)
            out = f"{short}: {first}" if first else short
    elif category == "dependency_failed":
        up, root = _get(record, "upstream"), _get(record, "root")
        if up:
            out = f"input failed: {up}" + (f" (root {root})" if root and root != up else "")
    elif category == "environment" and (m := _NOT_ON_PATH.search(message)):
        out = f"program {m.group(1)} not found on PATH"
    elif first.endswith(":"):  # "requirements are not met:" and the list below it
        rest = [ln.strip().removeprefix("- ") for ln in message.splitlines()[1:] if ln.strip()]
        if rest:
            more = f" (and {len(rest) - 1} more)" if len(rest) > 1 else ""
            out = rest[0] + more
    return _no_paths(out)


def failure_digest(records: Iterable[Any]) -> dict[str, Any]:
    """Group failures by category and normalised signature, largest group first.

    ``records``: FailureRecord-like objects (attributes or mapping keys ``key``,
    ``category`` (a :class:`pilotfish.Category` or its value), ``message``,
    ``exc_type``, ``returncode``, ``signal``, ``stderr_tail``, ``upstream``, ``root``,
    ``worker``, ``host``; missing ones count as None). Returns plain data::

        {"failed": 3512,                       # failures read
         "groups": [{
            "category": "command_failed",      # a Category value
            "signature": "exit 1 'Invalid enum <...> for variable integrator'",
            "count": 412,
            "examples": ["member-17", ...],    # up to EXAMPLES keys, in input order
            "example": "program 'gmx' exited with code 1 ...",  # one real headline
            "took_down": 3100,                 # dependency failures rooted in this group
            "roots": [],                       # dependency groups: [{"key", "count"}, ...]
            "root_count": 0},                  #   the ROOTS largest; how many in all
          ...]}

    Ties are broken by category and signature, so the order is stable.
    """
    if isinstance(records, str | bytes | dict) or not isinstance(records, Iterable):
        raise TypeError(
            f"failure_digest(records={records!r:.80}) is invalid: give an iterable of "
            "FailureRecords (or mappings with their fields), e.g. session.failures()"
        )
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    group_of: dict[str, tuple[str, str]] = {}
    roots: dict[tuple[str, str], dict[str, int]] = {}
    failed = 0
    for record in records:
        failed += 1
        category = _category(record)
        sig = signature(record)
        gid = (category, sig)
        g = groups.get(gid)
        if g is None:
            g = groups[gid] = {
                "category": category,
                "signature": sig,
                "count": 0,
                "examples": [],
                "example": headline(record),
                "took_down": 0,
                "roots": [],
                "root_count": 0,
            }
        g["count"] += 1
        key = _get(record, "key")
        if len(g["examples"]) < EXAMPLES and key is not None:
            g["examples"].append(str(key))
        if key is not None:
            group_of[str(key)] = gid
        if category == "dependency_failed":
            root = _get(record, "root") or _get(record, "upstream") or "?"
            per_root = roots.setdefault(gid, {})
            per_root[str(root)] = per_root.get(str(root), 0) + 1
    for gid, per_root in roots.items():
        g = groups[gid]
        ranked = sorted(per_root.items(), key=lambda kv: (-kv[1], kv[0]))
        g["roots"] = [{"key": k, "count": n} for k, n in ranked[:ROOTS]]
        g["root_count"] = len(per_root)
        g["signature"] = f"from {len(per_root):,} root{'s' if len(per_root) != 1 else ''}"
        for root, n in per_root.items():
            owner = group_of.get(root)
            if owner is not None and owner in groups:
                groups[owner]["took_down"] += n
    ordered = sorted(groups.values(), key=lambda g: (-g["count"], g["category"], g["signature"]))
    return {"failed": failed, "groups": ordered}


def _tasks(n: int) -> str:
    return f"{n:,} task{'s' if n != 1 else ''}"


def format_digest(digest: Mapping[str, Any]) -> list[str]:
    """The digest as plain text lines (no markup; the caller escapes for its medium)::

    412 tasks: COMMAND_FAILED exit 1 'Invalid enum <...> for variable integrator'
        e.g. member-17, member-230, member-231
    3,100 tasks: DEPENDENCY_FAILED from 31 roots
        roots: member-17 (120), member-230 (98), ... and 28 more
    """
    groups = digest.get("groups") or []
    if not groups:
        return ["no failed tasks"]
    n_groups = len(groups)
    lines = [
        f"{_tasks(int(digest.get('failed') or 0))} failed, in {n_groups:,} "
        f"group{'s' if n_groups != 1 else ''} (largest first):"
    ]
    for g in groups:
        lines.append(f"{_tasks(g['count'])}: {str(g['category']).upper()} {g['signature']}")
        if g.get("roots"):
            shown = ", ".join(f"{r['key']} ({r['count']:,})" for r in g["roots"])
            more = g["root_count"] - len(g["roots"])
            lines.append(f"    roots: {shown}" + (f" and {more:,} more" if more > 0 else ""))
        else:
            lines.append(f"    e.g. {', '.join(g['examples'])}")
        if g.get("took_down"):
            n = g["took_down"]
            lines.append(f"    root of {n:,} dependency failure{'s' if n != 1 else ''}")
    return lines
