"""The ``pilotfish`` command line: run and resume workflows, and read the journal.

Every command that reads results works on the journal in ``./.pilotfish``
(``--rundir`` to change it) and never writes to it. Problems (no journal, a
foreign file, an unknown key) are reported in one clear line, exit status 2.

Task data (keys, names, messages, tracebacks, stderr) is shown as it is, never as rich
markup, and with control characters (escape sequences, BEL, carriage returns) made
visible as ``\\x1b``-style escapes: a key like ``a[/]b`` or a program that writes
terminal escape sequences cannot break or take over the terminal. ``show`` prints the
last ``--tail-kb`` KiB of a stderr file (the path says where the rest is), or streams the
whole file with ``--full``; it never reads a file whole into memory.

Many failures: ``failures`` prints one line per task cut to the terminal's width (the
rest is in ``show``), ``failures --group`` the failure digest (:mod:`pilotfish.digest`),
and ``report --html`` writes one self-contained HTML page (:mod:`pilotfish.tools.report`).
``run``, ``resume`` and ``demo`` say where that report goes when tasks failed.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import runpy
import shlex
import sqlite3
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .. import digest as _digest
from ..digest import clean, fmt_dur, fmt_time
from ..runtime.files import NotRegularFile, open_regular, read_tail
from ..store.reader import JournalReader
from ..store.schema import JournalError, sqlite_problem

EXIT_FAILED = 1
EXIT_USAGE = 2
TAIL_KB = 64  # of a stderr file shown by `show` (without --full)
_CHUNK = 1 << 16


def plain(value: object, style: str = "", *, one_line: bool = True) -> Text:
    """Task data for a table cell or a line: cleaned, and a ``Text`` (never parsed as
    rich markup, so ``[/]`` in a key is just three characters)."""
    return Text(clean(value, one_line=one_line), style=style)


def _journal_path(rundir: str) -> Path:
    return Path(rundir) / "journal.db"


# --------------------------------------------------------------------------- status


def _short(path: str) -> str:
    """A path relative to the current directory when it is below it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


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
            fmt_dur(wall) if wall is not None else "not closed",
        )
    return t


def workers_table(reader: JournalReader) -> Table | None:
    """Each worker of the last run that had any: its last state and why (a lost or
    stopped worker's message: exit status, signal, or its batch job and how it ended),
    drains and "every worker gone" too; None when the journal has no worker events."""
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
        if e["run"] == last_run and e["kind"] in ("gone", "drained"):
            what = "every worker gone" if e["kind"] == "gone" else f"drained {e['name']}"
            t.add_row(plain(what, "red"), "", plain(e["kind"], "red"), plain(e["message"] or ""))
    return t


def failure_lines(failures: list[dict[str, Any]], width: int) -> list[Text]:
    """One line per failed task, each at most ``width`` cells: key, category, attempts
    and the first line of the message, cut with "…" (``show KEY`` has the rest; a cut
    key still finds its task: ``show`` lists the keys that start with what it is given)."""
    if not failures:
        return [Text("no failed tasks")]
    keys = [clean(f.get("key", ""), one_line=True) for f in failures]
    cats = [clean(f.get("category", ""), one_line=True) for f in failures]
    tries = [str(f.get("attempts", 0)) for f in failures]
    gap = 2
    cat_w = max(len("category"), *(cell_len(c) for c in cats))
    att_w = len("attempts")
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
            cell("attempts", att_w, "bold"),
            cell("message", msg_w, "bold", last=True),
        )
    ]
    for f, k, c, a in zip(failures, keys, cats, tries, strict=True):
        msg = clean(_digest.headline(f), one_line=True)
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
        _wrapped(
            console,
            "one in full: `pilotfish show KEY`; grouped: `pilotfish failures --group`",
            style="dim",
        )


def _wrapped(console: Console, text: str, style: str = "", indent: str = "") -> None:
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
            _wrapped(console, ln, style="bold")
        elif ln.startswith("    "):
            _wrapped(console, ln.strip(), indent="    ")
        else:
            _wrapped(console, ln, style="red")


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    reader = JournalReader(_journal_path(args.rundir))
    console.print(status_table(reader))
    wal = Path(f"{reader.path}-wal")
    if reader.immutable and wal.exists() and wal.stat().st_size:
        _wrapped(
            console,
            f"read-only: shown as last checkpointed; {wal} holds later records that SQLite "
            "cannot read in a read-only directory (copy the run directory somewhere "
            "writable to see them)",
            style="yellow",
        )
    workers = workers_table(reader)
    if workers is not None:
        console.print(workers)
    return 0


def cmd_failures(args: argparse.Namespace, console: Console) -> int:
    reader = JournalReader(_journal_path(args.rundir))
    failures = reader.failures()
    if args.group:
        digest = _digest.failure_digest(failures)
        if args.json:
            print(json.dumps(digest, indent=2, default=str))
        else:
            print_digest(console, digest)
    elif args.json:
        print(json.dumps(failures, indent=2, default=str))
    elif failures:
        print_failures(console, failures)
    else:
        console.print("no failed tasks")
    return 0


def _report_hint(rundir: str) -> str:
    opt = "" if Path(rundir) == Path(".pilotfish") else f" --rundir {shlex.quote(rundir)}"
    return f"pilotfish{opt} report --html"


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from . import report

    journal = _journal_path(args.rundir)
    JournalReader(journal).close()  # a clear error for a missing or foreign journal
    out = Path(args.out) if args.out else Path(args.rundir) / "report.html"
    try:
        path = report.write_report(journal, out)
    except OSError as e:
        raise JournalError(f"cannot write the report to {out}: {e.strerror or e}") from e
    size = path.stat().st_size
    console.print(plain(f"report written: {path} ({size / 1024:,.0f} KiB)"))
    console.print(plain(f"open it in a browser: {path.resolve().as_uri()}"))
    return 0


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    reader = JournalReader(_journal_path(args.rundir))
    row = reader.task(args.key)
    if row is None:
        near = reader.find(args.key)
        hint = f"; keys starting so: {', '.join(near)}" if near else ""
        raise JournalError(f"no task with key {args.key!r} in {reader.path}{hint}")
    out = Console(file=console.file, force_terminal=console.is_terminal)
    lines: list[Any] = []
    lines.append(plain(f"task {row['key']}", "bold"))
    lines.append(plain(f"name: {row['name']}   kind: {row['kind']}   state: {row['state']}"))
    lines.append(plain(f"submitted: {fmt_time(row['submitted'])}   run: {row['run']}"))
    lines.append(plain(f"options: {row['options']}"))
    deps = ", ".join(json.loads(row["deps"] or "[]")) or "-"
    lines.append(plain(f"dependencies: {deps}"))
    at = Table(title="attempts", box=box.SIMPLE)
    for col in ("run", "#", "worker", "host", "pid", "started", "ended", "outcome"):
        at.add_column(col)
    attempts = reader.attempts(row["key"])
    for a in attempts:
        at.add_row(
            *(
                plain(v)
                for v in (
                    a["run"],
                    a["number"],
                    a["worker"] or "-",
                    a["host"] or "-",
                    a["pid"] or "-",
                    fmt_time(a["started"]),
                    fmt_time(a["ended"]),
                    a["outcome"] or "-",
                )
            )
        )
    lines.append(at)
    for a in attempts:  # what it resumed from, or why it was not charged (issue 17)
        if a.get("note"):
            lines.append(plain(f"attempt {a['number']} (run {a['run']}): {a['note']}"))
    hist = reader.transitions(row["key"])
    lines.append(
        plain("history: " + " -> ".join(f"{b} ({fmt_time(t)})" for _r, t, _a, b in hist if b))
    )
    failures = [(a["number"], a["run"], a["failure"]) for a in attempts if a.get("failure")]
    final = json.loads(row["failure"]) if row["failure"] else None
    if final and (not failures or final.get("message") != failures[-1][2].get("message")):
        failures.append((None, row["run"], final))
    full: tuple[Path, object] | None = None  # a stderr file (and host) streamed last (--full)
    for number, run, f in failures:
        title = f"failure of attempt {number} (run {run})" if number else "final failure"
        lines.append(plain(f"\n{title}: {f.get('category')}", "bold red", one_line=False))
        lines.append(plain(f.get("message"), one_line=False))
        for field in (
            "returncode",
            "signal",
            "worker",
            "host",
            "pid",
            "sandbox",
            "stdout_path",
            "stderr_path",
            "upstream",
            "root",
        ):
            if f.get(field) not in (None, ""):
                lines.append(plain(f"  {field}: {f[field]}"))
        if f.get("traceback"):
            lines.append(Text("traceback (complete):", style="bold"))
            lines.append(plain(f["traceback"], one_line=False))
        if f.get("stderr_path"):
            p = Path(str(f["stderr_path"]))
            if args.full:
                full = (p, f.get("host"))  # the last one: the others' paths are listed
            else:
                lines.extend(_stderr_tail(p, f.get("host"), args.tail_kb * 1024))
    if row["state"] == "DONE":
        lines.append(Text("value: stored in the journal", style="green"))

    def emit() -> None:
        for item in lines:
            out.print(item)

    if console.is_terminal and not args.no_pager and full is None:
        # rich's pager holds what it shows: bounded here (the stderr is a tail)
        with out.pager(styles=True):
            emit()
    else:
        emit()
    if full is not None:
        _stream_file(out, *full)
    return 0


def _unread(p: Path, e: OSError, host: object) -> str:
    """Why the file ``p`` is not shown: not a regular file (a task may have made it a
    FIFO: never opened for reading), or not readable here."""
    if isinstance(e, NotRegularFile):
        return f"stderr {p}: {e.strerror}"
    return f"stderr: cannot read {p} here: {e}; it is on host {host}"


def _stderr_tail(p: Path, host: object, limit: int) -> list[Text]:
    """The last ``limit`` bytes of a stderr file, cleaned, with a title saying what is
    shown and where the whole file is; never more than ``limit`` bytes read, never a
    file that is not a regular one (:func:`pilotfish.runtime.files.read_tail`)."""
    try:
        data, size, start = read_tail(p, limit)
    except OSError as e:
        return [plain(_unread(p, e, host))]
    if start:
        title = (
            f"stderr ({p}): the last {len(data) / 1024:.0f} KiB of {size / 1024:.0f} KiB; "
            "the whole file with --full, or open the path"
        )
    else:
        title = f"stderr ({p}, complete):"
    text = data.decode("utf-8", errors="replace")
    if start and "\n" in text:
        text = text[text.index("\n") + 1 :]  # from the first whole line
    return [plain(title, "bold"), plain(text, one_line=False)]


def _stream_file(out: Console, p: Path, host: object) -> None:
    """``p`` printed in chunks (cleaned), so a file of any size is never held whole."""
    try:
        fh = open_regular(p)
    except OSError as e:
        out.print(plain(_unread(p, e, host)))
        return
    out.print(plain(f"stderr ({p}, complete):", "bold"))
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


# --------------------------------------------------------------------------- run


class Progress:
    """Live display for `pilotfish run`: counts per state, failures, workers alive."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.states: dict[str, str] = {}
        self.failed: list[str] = []
        self.workers: set[str] = set()
        self.rundirs: list[str] = []  # of sessions with failed tasks (for the report hint)
        self.lock = threading.Lock()
        self.live: Live | None = None

    def on_event(self, e: Any) -> None:
        from ..client.events import MasterEvent, TaskEvent, WorkerEvent

        with self.lock:
            if isinstance(e, TaskEvent):
                self.states[e.key] = e.finish.name
                if e.finish.name == "FAILED":
                    self.failed.append(e.key)
                    self.console.print(plain(f"failed: {e.key}", "red"))
                    self._note_rundirs()
            elif isinstance(e, WorkerEvent):
                if e.kind == "started":
                    self.workers.add(e.worker)
                elif e.kind in ("lost", "stopped", "start_failed"):
                    self.workers.discard(e.worker)
                    if e.kind == "lost":
                        self.console.print(plain(f"worker {e.worker} lost: {e.message}", "yellow"))
            elif isinstance(e, MasterEvent) and e.kind == "lost":
                self.console.print(plain(f"master lost: {e.message}", "yellow"))
        if self.live is not None:
            self.live.update(self.render())

    def _note_rundirs(self) -> None:
        """The run directories of the live sessions with a journal (a failure happened in
        one of them): `run` names them in its report hint."""
        from ..client import session as _session

        try:
            sessions = list(_session._live_sessions)
        except RuntimeError:  # the set changed while it was read: the next failure retries
            return
        for s in sessions:
            journal = getattr(s, "_journal", None)
            path = getattr(journal, "path", None)
            if path is not None and path.name == "journal.db":
                rundir = str(path.parent)
                if rundir not in self.rundirs:
                    self.rundirs.append(rundir)

    def render(self) -> Table:
        with self.lock:
            c = Counter(self.states.values())
            t = Table(box=box.MINIMAL, show_header=True)
            for s in ("PENDING", "READY", "RUNNING", "RETRYING", "DONE", "FAILED", "CANCELLED"):
                t.add_column(s.lower(), justify="right")
            t.add_column("workers", justify="right")
            t.add_row(
                *[
                    str(c.get(s, 0))
                    for s in (
                        "PENDING",
                        "READY",
                        "RUNNING",
                        "RETRYING",
                        "DONE",
                        "FAILED",
                        "CANCELLED",
                    )
                ],
                str(len(self.workers)),
            )
            return t


def run_script(path: str, argv: list[str], console: Console, *, resume: bool) -> int:
    from ..client import session as _session

    script = Path(path)
    if not script.is_file():
        raise JournalError(f"no such workflow script: {script}")
    progress = Progress(console)
    _session._global_listeners.append(progress.on_event)
    old_argv, old_env = sys.argv, os.environ.get("PILOTFISH_RESUME")
    sys.argv = [str(script), *argv]
    if resume:
        os.environ["PILOTFISH_RESUME"] = "1"
    sys.path.insert(0, str(script.resolve().parent))
    code = 0
    try:
        with Live(
            progress.render(), console=console, refresh_per_second=8, transient=False
        ) as live:
            progress.live = live
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            live.update(progress.render())
    finally:
        _session._global_listeners.remove(progress.on_event)
        sys.argv = old_argv
        if resume:
            if old_env is None:
                os.environ.pop("PILOTFISH_RESUME", None)
            else:
                os.environ["PILOTFISH_RESUME"] = old_env
    if progress.failed:
        n = len(progress.failed)
        console.line()
        console.print(Text(f"{n} task(s) failed; see `pilotfish failures`", style="red"))
        for rundir in progress.rundirs:
            hint = _report_hint(_short(rundir))
            where = _short(str(Path(rundir) / "report.html"))
            _wrapped(console, f"  grouped: {hint.replace('report --html', 'failures --group')}")
            _wrapped(console, f"  report:  {hint}   (writes {shlex.quote(where)})")
        return code or EXIT_FAILED
    return code


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    return run_script(args.script, args.args, console, resume=False)


def cmd_resume(args: argparse.Namespace, console: Console) -> int:
    return run_script(args.script, args.args, console, resume=True)


def cmd_check(args: argparse.Namespace, console: Console) -> int:
    from .. import Session
    from ..errors import PilotfishError

    try:
        with Session(
            workers=1,
            backend=args.backend,
            rundir=args.rundir,
            journal=None,
            **({"address": args.address} if args.address else {}),
        ) as s:
            checks = s.preflight(args.requires, args.program)
    except PilotfishError as e:
        Console(stderr=True).print(plain(f"pilotfish check: {e}", "red", one_line=False))
        return EXIT_FAILED
    t = Table(title=f"pre-flight checks ({args.backend} backend)", box=box.SIMPLE_HEAVY)
    for col in ("check", "result", "found", "fix"):
        t.add_column(col, overflow="fold")
    for c in checks:
        t.add_row(
            plain(c.name),
            Text("ok", style="green") if c.ok else Text("FAILED", style="red"),
            plain(c.found, one_line=False),
            plain("" if c.ok else c.hint, one_line=False),
        )
    console.print(t)
    bad = sum(not c.ok for c in checks)
    if bad:
        console.print(Text(f"{bad} check(s) failed", style="red"))
        return EXIT_FAILED
    console.print(Text("all checks passed", style="green"))
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from .examples import demo, gromacs

    rundir = Path(args.rundir if args.rundir != ".pilotfish" else ".pilotfish-demo")
    if args.gromacs and not gromacs.available():
        console.print(
            Text(
                "pilotfish demo --gromacs needs GROMACS: `gmx` is not on PATH "
                "(Debian/Ubuntu: apt-get install gromacs)",
                style="red",
            )
        )
        return EXIT_USAGE
    what = "a real GROMACS ensemble" if args.gromacs else "an ensemble"
    console.print(
        Text(
            clean(f"pilotfish demo: {what} with deliberate failures, run directory {rundir}"),
            style="bold",
        )
    )
    t0 = time.time()
    try:
        rundir.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as every rundir
        digest = (gromacs if args.gromacs else demo).main(str(rundir), console)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        where = Path(e.filename).absolute() if e.filename else rundir.absolute()
        raise JournalError(
            f"demo: cannot write {where} ({e.strerror}); the demo writes its run directory "
            f"({rundir}) in the current directory: cd to a directory you can write, or pass "
            "--rundir DIR (pilotfish demo --rundir DIR)"
        ) from e
    elapsed = time.time() - t0
    reader = JournalReader(_journal_path(str(rundir)))
    console.print(status_table(reader))
    print_failures(console, reader.failures())
    from . import report

    page = report.write_report(_journal_path(str(rundir)), rundir / "report.html")
    opt = f"--rundir {shlex.quote(str(rundir))}"
    console.print(Text(f"\nfinished in {elapsed:.1f} s. The failures are deliberate. Try:"))
    for cmd, what in (
        ("show KEY", "  # one task in full"),
        ("failures --json", ""),
        ("report --html", "  # the HTML report"),
    ):
        _wrapped(console, f"  pilotfish {opt} {cmd}{what}")
    _wrapped(console, f"report written: {_short(str(page))} (open it in a browser)")
    if not args.gromacs and gromacs.available():
        _wrapped(
            console, "GROMACS is installed: `pilotfish demo --gromacs` runs a real MD ensemble"
        )
    console.print(Text("\nfailure digest (`pilotfish failures --group`):", style="bold"))
    print_digest(console, digest)
    return 0


# --------------------------------------------------------------------------- main


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pilotfish",
        description="Run workflows and inspect their journal (failures are first-class).",
    )
    p.add_argument(
        "--rundir",
        default=".pilotfish",
        help="run directory holding journal.db (default: ./.pilotfish)",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--rundir",
        default=argparse.SUPPRESS,
        help="run directory holding journal.db (default: ./.pilotfish)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run", parents=[common], help="run a workflow script with a live progress display"
    )
    r.add_argument("script")
    r.add_argument("args", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)
    r = sub.add_parser(
        "resume", parents=[common], help="run a script again, skipping tasks already DONE"
    )
    r.add_argument("script")
    r.add_argument("args", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_resume)
    s = sub.add_parser(
        "status", parents=[common], help="counts by state and failure category, runs"
    )
    s.set_defaults(func=cmd_status)
    f = sub.add_parser(
        "failures",
        parents=[common],
        help="every failed task on one line (--group: the digest, grouped by cause)",
    )
    f.add_argument(
        "--group",
        action="store_true",
        help="group the failures by category and normalised message, largest group first",
    )
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=cmd_failures)
    rp = sub.add_parser(
        "report", parents=[common], help="write one self-contained HTML page about the run"
    )
    rp.add_argument(
        "--html", action="store_true", help="an HTML page (the only format, and the default)"
    )
    rp.add_argument(
        "--out",
        metavar="FILE",
        help="where to write it (default: RUNDIR/report.html; a directory: DIR/report.html). "
        "An existing FILE is replaced only if it is a report pilotfish wrote; the journal, "
        "its -wal/-shm files and anything in the run directory's values/, sandboxes/ and "
        "results/ are never written",
    )
    rp.set_defaults(func=cmd_report)
    sh = sub.add_parser(
        "show", parents=[common], help="everything about one task: attempts, complete output"
    )
    sh.add_argument("key")
    sh.add_argument("--no-pager", action="store_true")
    sh.add_argument(
        "--full",
        action="store_true",
        help="stream the whole stderr file (default: its last --tail-kb KiB and its path)",
    )
    sh.add_argument(
        "--tail-kb",
        type=_positive_int,
        default=TAIL_KB,
        metavar="N",
        help=f"KiB of stderr shown without --full (default {TAIL_KB})",
    )
    sh.set_defaults(func=cmd_show)
    c = sub.add_parser(
        "check", parents=[common], help="pre-flight checks of the worker environment"
    )
    c.add_argument("--backend", default="local", choices=["local", "dask"])
    c.add_argument("--address", help="Dask scheduler address (with --backend dask)")
    c.add_argument(
        "--requires",
        action="append",
        default=[],
        metavar="REQ",
        help="a module requirement such as 'numpy>=1.26' (repeatable)",
    )
    c.add_argument(
        "--program",
        action="append",
        default=[],
        metavar="NAME",
        help="a program that must be on the workers' PATH (repeatable)",
    )
    c.set_defaults(func=cmd_check)
    d = sub.add_parser(
        "demo", parents=[common], help="run a bundled example ensemble with deliberate failures"
    )
    d.add_argument(
        "--gromacs",
        action="store_true",
        help="run a small real GROMACS ensemble instead (needs gmx): a bad .mdp, a blow-up, "
        "a member whose node dies and one that hits its walltime, both resumed from md.cpt",
    )
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return int(args.func(args, console))
    except sqlite3.DatabaseError as e:  # a page found damaged while reading
        err = sqlite_problem(e, _journal_path(getattr(args, "rundir", ".pilotfish")))
        Console(stderr=True).print(plain(f"pilotfish: {err}", "red"), soft_wrap=True)
        return EXIT_USAGE
    except JournalError as e:  # one line, however wide the terminal
        Console(stderr=True).print(plain(f"pilotfish: {e}", "red"), soft_wrap=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
