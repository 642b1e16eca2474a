"""What the ``pilotfish`` commands print: tables, failure lines, the digest, one task.

The renderers of :mod:`pilotfish.tools.cli`, on a rich ``Console``. Task data (keys,
names, messages, tracebacks, stderr) goes through :func:`plain`: shown as it is, never
as rich markup, with control characters made visible (:func:`pilotfish.digest.clean`).
A stderr file is never read whole: :func:`stderr_tail` reads its last bytes,
:func:`stream_file` prints it in chunks.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import digest as _digest
from ..digest import clean, fmt_dur, fmt_time
from ..runtime.files import NotRegularFile, open_regular, read_tail
from ..store.reader import JournalReader
from ..store.schema import CLIENT_DIED

_CHUNK = 1 << 16


def plain(value: object, style: str = "", *, one_line: bool = True) -> Text:
    """Task data for a table cell or a line: cleaned, and a ``Text`` (never parsed as
    rich markup, so ``[/]`` in a key is just three characters)."""
    return Text(clean(value, one_line=one_line), style=style)


# --------------------------------------------------------------------------- status


def status_table(reader: JournalReader) -> Table:
    counts = reader.counts()
    cats = reader.failure_counts()
    runs = reader.runs()
    t = Table(title=plain(f"pilotfish status — {reader.path}"), box=box.SIMPLE_HEAVY)
    t.add_column("what")
    t.add_column("count", justify="right")
    for state in ("DONE", "FAILED", "CANCELLED", "RUNNING", "RETRYING", "READY", "PENDING"):
        if counts.get(state):
            style = {"DONE": "green", "FAILED": "red", "CANCELLED": "yellow"}.get(state, "")
            t.add_row(plain(state.lower(), style), str(counts[state]))
    t.add_row("total tasks", str(sum(counts.values())), end_section=True)
    for cat, n in sorted(cats.items()):
        t.add_row(plain(f"failed: {cat}", "red"), str(n))
    if cats:
        t.rows[-1].end_section = True
    for r in runs:
        wall = (r["ended"] - r["started"]) if r["ended"] else None
        t.add_row(
            plain(f"run {r['id']} ({r['status']}) {fmt_time(r['started'])}"),
            fmt_dur(wall)
            if wall is not None
            else ("end unknown" if r["status"] == CLIENT_DIED else "not closed"),
        )
    return t


def workers_table(reader: JournalReader) -> Table | None:
    """Each worker of the last run that had any: its last state and why (a lost or
    stopped worker's message: exit status, signal, or its batch job and how it ended),
    drains, "every worker gone", and the master's (or scheduler's) losses and silences
    too; None when the journal has no such events."""
    events = reader.events()
    if not events:
        return None
    last_run = max(e["run"] for e in events)
    t = Table(title=plain(f"workers (run {last_run})"), box=box.SIMPLE_HEAVY)
    t.add_column("worker")
    t.add_column("pid", justify="right")
    t.add_column("state")
    t.add_column("why", overflow="fold")
    for w in reader.workers():
        if w["run"] != last_run:
            continue
        style = {"lost": "red", "stopped": "", "started": "green"}.get(w["state"], "")
        t.add_row(
            plain(w["name"]),
            str(w.get("pid") or ""),
            plain(w["state"], style),
            plain(w.get("message") or ""),
        )
    for e in events:
        kind = e["kind"]
        if e["run"] != last_run:
            continue
        if kind in ("gone", "drained"):
            what = "every worker gone" if kind == "gone" else f"drained {e['name']}"
            t.add_row(plain(what, "red"), "", plain(kind, "red"), plain(e["message"] or ""))
        elif kind.startswith("master-"):  # the master or scheduler: lost, back, silent
            state = kind.removeprefix("master-")
            style = "red" if state in ("lost", "silent") else "green"
            t.add_row(
                plain("master/scheduler"),
                str(e["pid"] or ""),
                plain(state, style),
                plain(e["message"] or ""),
            )
    return t


def failure_lines(failures: list[dict[str, Any]], width: int) -> list[Text]:
    """One line per failed task, each at most ``width`` cells: key, category, attempts
    ("tries") and the reason, first (:func:`pilotfish.digest.reason`: ``exit 3: ...``, ``timed out
    after 5 s``; no paths), cut with "…" (``show KEY`` has the rest; a cut key still finds
    its task: ``show`` lists the keys that start with what it is given)."""
    if not failures:
        return [Text("no failed tasks")]
    keys = [clean(f.get("key", ""), one_line=True) for f in failures]
    cats = [clean(f.get("category", ""), one_line=True) for f in failures]
    tries = [str(f.get("attempts", 0)) for f in failures]
    gap = 2
    cat_w = max(len("category"), *(cell_len(c) for c in cats))
    att_w = len("tries")
    key_w = max(len("key"), *(cell_len(k) for k in keys))
    # a key of usual length (24) stays whole; a longer one gets two fifths of the room
    # (in a very narrow terminal, a third of the line: the key is what `show` needs)
    room = width - cat_w - att_w - 3 * gap
    key_w = max(3, min(key_w, max(24, room * 2 // 5), max(room - 10, width // 3)))
    msg_w = max(1, width - key_w - cat_w - att_w - 3 * gap)

    def cell(text: str, w: int, style: str = "", right: bool = False, last: bool = False) -> Text:
        t = Text(text, style=style)
        t.truncate(w, overflow="ellipsis")
        pad = "" if last else " " * (w - t.cell_len)
        return Text(pad, style="") + t if right else t + pad

    def line(k: Text, c: Text, a: Text, m: Text) -> Text:
        out = Text.assemble(k, " " * gap, c, " " * gap, a, " " * gap, m)
        out.truncate(width, overflow="ellipsis")
        return out

    out = [
        line(
            cell("key", key_w, "bold"),
            cell("category", cat_w, "bold"),
            cell("tries", att_w, "bold"),
            cell("reason", msg_w, "bold", last=True),
        )
    ]
    for f, k, c, a in zip(failures, keys, cats, tries, strict=True):
        msg = clean(_digest.reason(f), one_line=True)
        out.append(
            line(
                cell(k, key_w),
                cell(c, cat_w, "red"),
                cell(a, att_w, right=True),
                cell(msg, msg_w, last=True),
            )
        )
    return out


def print_failures(console: Console, failures: list[dict[str, Any]]) -> None:
    width = console.width
    n = len(failures)
    console.print(Text(f"{n} failed task(s)", style="bold"))
    for ln in failure_lines(failures, width):
        console.print(ln, no_wrap=True, overflow="ellipsis", crop=True)
    if failures:
        wrapped(
            console,
            "one in full: `pilotfish show KEY`; grouped: `pilotfish failures --group`",
            style="dim",
        )


def wrapped(console: Console, text: str, style: str = "", indent: str = "") -> None:
    """``text`` (task data allowed: it is cleaned) wrapped to the console's width, its
    continuation lines indented by ``indent`` plus two spaces."""
    lines = textwrap.wrap(
        clean(text, one_line=True),
        width=max(20, console.width),
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_on_hyphens=False,
    ) or [""]
    for ln in lines:
        console.print(Text(ln, style=style), no_wrap=True, crop=True)


def print_digest(console: Console, digest: dict[str, Any]) -> None:
    """The failure digest (:func:`pilotfish.digest.format_digest`), wrapped to the width:
    the largest group first, its size and category in colour."""
    lines = _digest.format_digest(digest)
    for i, ln in enumerate(lines):
        if i == 0:
            wrapped(console, ln, style="bold")
        elif ln.startswith("    "):
            wrapped(console, ln.strip(), indent="    ")
        else:
            wrapped(console, ln, style="red")


# --------------------------------------------------------------------------- show


class Whole(Text):
    """A line printed whole, never wrapped or cut (``soft_wrap``): a path, so it can be
    copied from the terminal (a terminal narrower than it wraps it on screen only)."""


#: the fields of a failure record ``show`` lists on one line under its message
_FAILURE_FIELDS = ("returncode", "signal", "worker", "host", "pid", "upstream", "root")
#: its paths, each printed once, whole, on a line of its own: (field, label, token)
_PATH_FIELDS = (
    ("sandbox", "sandbox (kept)", "<sandbox>"),
    ("stdout_path", "stdout, complete", "<stdout>"),
    ("stderr_path", "stderr, complete", "<stderr>"),
)
_TAIL_MARKER = "last lines of stderr:"


def task_lines(
    reader: JournalReader, row: Any, *, tail_bytes: int, full: bool
) -> tuple[list[Any], tuple[Path, object] | None]:
    """What ``pilotfish show`` prints about the task of journal row ``row``: its head,
    attempts, history and each failure (with the last ``tail_bytes`` of its stderr
    file); with ``full``, no tails but the last stderr file (and its host) to stream
    after them (:func:`stream_file`; the others' paths are listed).

    Each path is printed once, as a :class:`Whole` line; the stderr tail once: a
    message's own copy of it ("last lines of stderr:") is left out when the file's
    tail is printed."""
    attempts = reader.attempts(row["key"])
    lines: list[Any] = [*_task_head(row), _attempts_table(attempts)]
    for a in attempts:  # what it resumed from, or why it was not charged (issue 17)
        if a.get("note"):
            lines.append(plain(f"attempt {a['number']} (run {a['run']}): {a['note']}"))
    hist = reader.transitions(row["key"])
    lines.append(
        plain("history: " + " -> ".join(f"{b} ({fmt_time(t)})" for _r, t, _a, b in hist if b))
    )
    streamed: tuple[Path, object] | None = None
    shown: set[str] = set()  # paths printed already (a final failure repeats its attempt's)
    for number, run, f in _failures_of(row, attempts):
        tail: list[Text] = []
        err = str(f.get("stderr_path") or "")
        if err and err not in shown:
            p = Path(err)
            if full:
                streamed = (p, f.get("host"))
            else:
                tail = stderr_tail(p, f.get("host"), tail_bytes)
        lines.extend(_failure_block(number, run, f, shown, drop_tail=_readable(tail)))
        lines.extend(tail)
    if row["state"] == "DONE":
        lines.append(Text("value: stored in the journal", style="green"))
    return lines, streamed


def _readable(tail: list[Text]) -> bool:
    return bool(tail) and tail[0].plain.startswith("stderr (")


def _task_head(row: Any) -> list[Text]:
    deps = ", ".join(json.loads(row["deps"] or "[]")) or "-"
    call = row["call"] if "call" in row.keys() else None  # noqa: SIM118 (a sqlite3.Row)
    return [
        plain(f"task {row['key']}", "bold"),
        plain(f"name: {row['name']}   kind: {row['kind']}   state: {row['state']}"),
        *([plain(f"call: {call}")] if call else []),
        plain(f"submitted: {fmt_time(row['submitted'])}   run: {row['run']}"),
        plain(f"options: {row['options']}"),
        plain(f"dependencies: {deps}"),
    ]


def _attempts_table(attempts: list[dict[str, Any]]) -> Table:
    """One row per attempt, within 80 columns: its start in full, how long it took, and
    its outcome never cut (the worker and host columns fold if they must)."""
    at = Table(
        title="attempts",
        box=box.SIMPLE,
        caption=(
            "started: the clock of the attempt's host; took: until it ended (this "
            "client's clock for a loss or timeout it decided)"
        ),
        caption_justify="left",
        pad_edge=False,
    )
    at.add_column("run", justify="right", no_wrap=True)
    at.add_column("#", justify="right", no_wrap=True)
    at.add_column("worker", overflow="fold")
    at.add_column("host", overflow="fold")
    at.add_column("pid", justify="right", no_wrap=True)
    at.add_column("started", no_wrap=True)
    at.add_column("took", justify="right", no_wrap=True)
    at.add_column("outcome", no_wrap=True)
    for a in attempts:
        s, e = a["started"], a["ended"]
        took = fmt_dur(max(0.0, e - s)) if s and e else ("-" if not e else "ended")
        at.add_row(
            *(
                plain(v)
                for v in (
                    a["run"],
                    a["number"],
                    a["worker"] or "-",
                    a["host"] or "-",
                    a["pid"] or "-",
                    fmt_time(s),
                    took,
                    a["outcome"] or "-",
                )
            )
        )
    return at


def _failures_of(
    row: Any, attempts: list[dict[str, Any]]
) -> list[tuple[int | None, int, dict[str, Any]]]:
    """(attempt number, run, failure) of each failed attempt, and the task's final
    failure (number None) when it says something the last attempt's does not."""
    failures = [(a["number"], a["run"], a["failure"]) for a in attempts if a.get("failure")]
    final = json.loads(row["failure"]) if row["failure"] else None
    if final and (not failures or final.get("message") != failures[-1][2].get("message")):
        failures.append((None, row["run"], final))
    return failures


def _message(f: dict[str, Any], drop_tail: bool) -> str:
    """A failure's message with its paths replaced by ``<sandbox>``, ``<stdout>`` and
    ``<stderr>`` (printed once, whole, below it), a line that only named one of them
    left out, and (``drop_tail``) its copy of the stderr tail too: the file's is shown."""
    text = str(f.get("message") or "")
    if drop_tail and (i := text.rfind(_TAIL_MARKER)) >= 0:
        text = text[:i].rstrip()
    paths = [(str(f[k]), tok) for k, _l, tok in _PATH_FIELDS if f.get(k)]
    for path, tok in sorted(paths, key=lambda pt: -len(pt[0])):  # a file in the sandbox first
        text = text.replace(path, tok)
    kept = []
    for ln in text.splitlines():
        label, _, rest = ln.partition(": ")
        if rest.strip() in {tok for _p, tok in paths} and len(label.split()) <= 3:
            continue  # "  complete stderr: <stderr>": the path is listed below
        kept.append(ln)
    return "\n".join(kept)


def _failure_block(
    number: int | None, run: int, f: dict[str, Any], shown: set[str], *, drop_tail: bool
) -> list[Text]:
    """One failure: title (with the short reason), message, its fields on one line,
    each path not ``shown`` yet on a line of its own, complete traceback."""
    title = f"failure of attempt {number} (run {run})" if number else "final failure"
    lines = [
        plain(f"\n{title}: {f.get('category')}: {_digest.reason(f)}", "bold red", one_line=False),
        plain(_message(f, drop_tail), one_line=False),
    ]
    fields = [f"{k}: {f[k]}" for k in _FAILURE_FIELDS if f.get(k) not in (None, "")]
    if fields:
        lines.append(plain("  " + "   ".join(fields)))
    if f.get("staged"):
        lines.append(plain(f"  staged: {f['staged']}", one_line=False))
    for field, label, _tok in _PATH_FIELDS:
        path = str(f.get(field) or "")
        if path and path not in shown:
            shown.add(path)
            lines.append(plain(f"  {label}:", "dim"))
            lines.append(Whole(clean(path, one_line=True)))
    if f.get("traceback"):
        lines.append(Text("traceback (complete):", style="bold"))
        lines.append(plain(f["traceback"], one_line=False))
    return lines


def _unread(p: Path, e: OSError, host: object) -> str:
    """Why the file ``p`` (printed above) is not shown: not a regular file (a task may
    have made it a FIFO: never opened for reading), or not readable here."""
    if isinstance(e, NotRegularFile):
        return f"stderr: {e.strerror}"
    return f"stderr: cannot read the file here ({e.strerror or e}); it is on host {host}"


def stderr_tail(p: Path, host: object, limit: int) -> list[Text]:
    """The last ``limit`` bytes of a stderr file, cleaned, with a title saying what is
    shown and where the whole file is; never more than ``limit`` bytes read, never a
    file that is not a regular one (:func:`pilotfish.runtime.files.read_tail`)."""
    try:
        data, size, start = read_tail(p, limit)
    except OSError as e:
        return [plain(_unread(p, e, host))]
    if start:
        title = (
            f"stderr (the last {len(data) / 1024:.0f} KiB of {size / 1024:.0f} KiB; "
            "the whole file with --full, or open its path above):"
        )
    elif not data:
        return [plain("stderr (complete): empty", "bold")]
    else:
        title = "stderr (complete):"
    text = data.decode("utf-8", errors="replace")
    if start and "\n" in text:
        text = text[text.index("\n") + 1 :]  # from the first whole line
    return [plain(title, "bold"), plain(text, one_line=False)]


def stream_file(out: Console, p: Path, host: object) -> None:
    """``p`` printed in chunks (cleaned), so a file of any size is never held whole."""
    try:
        fh = open_regular(p)
    except OSError as e:
        out.print(plain(_unread(p, e, host)))
        return
    out.print(plain("stderr (complete, the file above):", "bold"))
    try:
        with fh:
            tail = b""
            while chunk := fh.read(_CHUNK):
                chunk, tail = _split_utf8(tail + chunk)
                out.print(plain(chunk.decode("utf-8", "replace"), one_line=False), end="")
            if tail:
                out.print(plain(tail.decode("utf-8", "replace"), one_line=False), end="")
        out.print()
    except OSError as e:
        out.print(plain(f"(cannot read {p} here: {e})"))


def _split_utf8(b: bytes) -> tuple[bytes, bytes]:
    """``b`` cut before an incomplete UTF-8 sequence at its end (kept for the next chunk)."""
    for i in range(1, min(4, len(b)) + 1):
        c = b[-i]
        if c & 0xC0 != 0x80:  # the start of the last character (or ASCII)
            need = 1 if c < 0x80 else 2 if c >> 5 == 0b110 else 3 if c >> 4 == 0b1110 else 4
            return (b, b"") if need <= i else (b[:-i], b[-i:])
    return b, b""
