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
import ast
import contextlib
import errno
import json
import logging
import os
import re
import runpy
import shlex
import sqlite3
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from .. import digest as _digest
from ..client.resume import SUMMARY as RESUME_SUMMARY
from ..digest import clean, fmt_dur
from ..store.reader import JournalReader
from ..store.schema import JournalError, sqlite_problem
from .render import (
    Whole,
    plain,
    print_digest,
    print_failures,
    status_table,
    stream_file,
    task_lines,
    workers_table,
    wrapped,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
TAIL_KB = 64  # of a stderr file shown by `show` (without --full)


def _journal_path(rundir: str) -> Path:
    return Path(rundir) / "journal.db"


# --------------------------------------------------------------------------- status


def _short(path: str) -> str:
    """A path relative to the current directory when it is below it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    reader = JournalReader(_journal_path(args.rundir))
    console.print(status_table(reader))
    wal = Path(f"{reader.path}-wal")
    if reader.immutable and wal.exists() and wal.stat().st_size:
        wrapped(
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
    lines, full = task_lines(reader, row, tail_bytes=args.tail_kb * 1024, full=args.full)

    def emit() -> None:
        for item in lines:  # a path whole (soft-wrapped by the terminal, copyable)
            out.print(item, soft_wrap=isinstance(item, Whole))

    if console.is_terminal and not args.no_pager and full is None:
        # rich's pager holds what it shows: bounded here (the stderr is a tail)
        with out.pager(styles=True):
            emit()
    else:
        emit()
    if full is not None:
        stream_file(out, *full)
    return 0


# --------------------------------------------------------------------------- run


class Progress:
    """What `pilotfish run` says while a script runs, one line at a time on its own
    console (stderr: never mixed into the script's stdout): each failure with its
    category and reason, each lost worker with the tasks it was running, and a count
    line (done, failed, running of submitted, elapsed) after each failure and at most
    every ``every`` seconds while tasks move; :meth:`summary` at the end."""

    def __init__(
        self, console: Console, *, every: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console = console
        self.states: dict[str, str] = {}
        self.failed: list[str] = []
        self.workers: set[str] = set()
        self.rundirs: list[str] = []  # of the sessions seen (for the hints)
        self.lock = threading.Lock()
        self.every = every
        self.clock = clock
        self.t0 = clock()
        self._last = self.t0  # when the last count line was printed
        self._changed = False

    def _say(self, text: str, style: str = "") -> None:
        wrapped(self.console, text, style=style, indent="")

    def on_event(self, e: Any) -> None:
        from ..client.events import MasterEvent, TaskEvent, WorkerEvent

        with self.lock:
            if isinstance(e, TaskEvent):
                first = not self.states
                self.states[e.key] = e.finish.name
                self._changed = True
                if first:
                    self._note_rundirs()
                if e.finish.name == "FAILED":
                    self.failed.append(e.key)
                    f = getattr(e, "failure", None)
                    why = f" ({_category(f)}: {_digest.reason(f)})" if f is not None else ""
                    self._say(f"failed: {e.key}{why}", "red")
                    self._note_rundirs()
                    self._count()
                elif self.clock() - self._last >= self.every:
                    self._count()
            elif isinstance(e, WorkerEvent):
                if e.kind == "started":
                    self.workers.add(e.worker)
                elif e.kind in ("lost", "stopped", "start_failed"):
                    self.workers.discard(e.worker)
                    if e.kind == "lost":
                        held = f" while running {', '.join(e.held)}" if e.held else ""
                        self._say(f"worker {e.worker} lost{held}: {e.message}", "yellow")
            elif isinstance(e, MasterEvent) and e.kind == "lost":
                self._say(f"master lost: {e.message}", "yellow")

    def _note_rundirs(self) -> None:
        """The run directories of the live sessions with a journal: `run` names them in
        its hints."""
        from ..client import lifecycle

        try:
            journals = lifecycle.live_journals()
        except RuntimeError:  # the set changed while it was read: the next event retries
            return
        for path in journals:
            if path.name == "journal.db":
                rundir = str(path.parent)
                if rundir not in self.rundirs:
                    self.rundirs.append(rundir)

    def count_line(self) -> str:
        c = Counter(self.states.values())
        n = len(self.states)
        ended = c["DONE"] + c["FAILED"] + c["CANCELLED"]
        waiting = c["PENDING"] + c["READY"] + c["RETRYING"]
        parts = [f"{c['DONE']} done", f"{c['FAILED']} failed"]
        for n_, what in ((c["CANCELLED"], "cancelled"), (c["RUNNING"], "running")):
            if n_:
                parts.append(f"{n_} {what}")
        if waiting:
            parts.append(f"{waiting} waiting")
        pct = f" ({100 * ended // n}%)" if n else ""
        return f"[{fmt_dur(self.clock() - self.t0)}] {', '.join(parts)} of {n} submitted{pct}"

    def _count(self) -> None:
        self._last = self.clock()
        self._changed = False
        self._say(self.count_line(), "dim")

    def summary(self) -> None:
        """The last count line (if any task was seen and it changed since)."""
        with self.lock:
            if self.states and self._changed:
                self._count()


def _category(f: Any) -> str:
    cat = getattr(f, "category", None)
    return str(getattr(cat, "value", cat) or "unknown")


class _ResumeSummaries(logging.Filter):
    """Takes each resumed session's summary off the ``pilotfish`` logger while a script
    runs (``run_script`` prints it at the end, once); other records pass."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = getattr(record, RESUME_SUMMARY, None)
        if isinstance(text, str):
            self.texts.append(text)
            return False
        return True


def run_script(
    path: str, argv: list[str], console: Console, *, resume: bool, rundir: str | None = None
) -> int:
    """Run the script ``path`` as ``__main__``; ``rundir``: the default run directory of
    the Sessions it makes without one ($PILOTFISH_RUNDIR while it runs)."""
    from ..client import lifecycle
    from ..client.session import RUNDIR_ENV

    script = Path(path)
    if not script.is_file():
        raise JournalError(f"no such workflow script: {script}")
    progress = Progress(Console(stderr=True))  # the script's stdout stays its own
    lifecycle.add_listener(progress.on_event)
    summaries = _ResumeSummaries()
    logging.getLogger("pilotfish").addFilter(summaries)
    old_argv, old_env = sys.argv, os.environ.get("PILOTFISH_RESUME")
    old_rundir = os.environ.get(RUNDIR_ENV)
    if rundir is not None:
        os.environ[RUNDIR_ENV] = rundir
    sys.argv = [str(script), *argv]
    if resume:
        os.environ["PILOTFISH_RESUME"] = "1"
    sys.path.insert(0, str(script.resolve().parent))
    code = 0
    try:
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        progress.summary()
    finally:
        lifecycle.remove_listener(progress.on_event)
        logging.getLogger("pilotfish").removeFilter(summaries)
        sys.argv = old_argv
        if rundir is not None:
            if old_rundir is None:
                os.environ.pop(RUNDIR_ENV, None)
            else:
                os.environ[RUNDIR_ENV] = old_rundir
        if resume:
            if old_env is None:
                os.environ.pop("PILOTFISH_RESUME", None)
            else:
                os.environ["PILOTFISH_RESUME"] = old_env
    if rundir is not None:
        for used in progress.rundirs:
            if Path(used).absolute() != Path(rundir).absolute():
                wrapped(
                    console,
                    f"note: --rundir {shlex.quote(rundir)} was not used by a Session of the "
                    f"script that names its own run directory: its journal is in "
                    f"{shlex.quote(_short(used))} (--rundir is the default only for "
                    "Sessions made without rundir=)",
                    style="yellow",
                )
    for text in summaries.texts:  # what each resumed session took and ran
        wrapped(console, text)
    if progress.failed:
        n = len(progress.failed)
        console.print(Text(f"{n} task(s) failed; see `pilotfish failures`", style="red"))
        for rundir in progress.rundirs:
            hint = _report_hint(_short(rundir))
            where = _short(str(Path(rundir) / "report.html"))
            wrapped(console, f"  grouped: {hint.replace('report --html', 'failures --group')}")
            wrapped(console, f"  report:  {hint}   (writes {shlex.quote(where)})")
        return code or EXIT_FAILED
    return code


def _given_rundir(args: argparse.Namespace) -> str | None:
    """The --rundir given to `run`/`resume` (None: the default, ./.pilotfish)."""
    return None if Path(args.rundir) == Path(".pilotfish") else str(args.rundir)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    return run_script(args.script, args.args, console, resume=False, rundir=_given_rundir(args))


def cmd_resume(args: argparse.Namespace, console: Console) -> int:
    return run_script(args.script, args.args, console, resume=True, rundir=_given_rundir(args))


_SYS_PATH = re.compile(r"\s*\(sys\.path searched: (\[.*\])\)")


def _rundir_check(rundir: str) -> Any:
    """Can this user make and write the run directory ``rundir``? Looked at, not made:
    the directory itself if it exists, else the nearest parent that does."""
    from ..runtime.preflight import Check

    path = Path(rundir).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe == path:
        ok = path.is_dir() and os.access(path, os.W_OK | os.X_OK)
        found = f"{path} exists" + ("" if ok else ", but is not a directory you can write")
    else:
        ok = probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
        found = f"{path} does not exist yet; {probe} " + (
            "lets you create it" if ok else "does not let you create it"
        )
    hint = "give a run directory you can write: --rundir DIR (Session(rundir=DIR))"
    return Check(f"run directory {rundir}", ok, found, hint, os.uname().nodename)


def cmd_check(args: argparse.Namespace, console: Console) -> int:
    """Pre-flight checks of the workers' environment, one check per line (what was
    found, the fix), a searched ``sys.path`` one entry per line. It creates nothing:
    the session runs in a temporary run directory, removed at the end."""
    from .. import Session
    from ..errors import PilotfishError

    try:
        with (
            tempfile.TemporaryDirectory(prefix="pilotfish-check-") as scratch,
            Session(
                workers=1,
                backend=args.backend,
                rundir=scratch,
                journal=None,
                **({"address": args.address} if args.address else {}),
            ) as s,
        ):
            checks = s.preflight(args.requires, args.program)
        checks.append(_rundir_check(args.rundir))
    except PilotfishError as e:
        Console(stderr=True).print(plain(f"pilotfish check: {e}", "red", one_line=False))
        return EXIT_FAILED
    console.print(Text(f"pre-flight checks ({args.backend} backend)", style="bold"))
    for c in checks:
        found, paths = str(c.found), []
        m = _SYS_PATH.search(found)
        if m:
            with contextlib.suppress(ValueError, SyntaxError):
                paths = [str(p) for p in ast.literal_eval(m.group(1))]
                found = found[: m.start()] + found[m.end() :]
        mark = "ok    " if c.ok else "FAILED"
        head = textwrap.wrap(
            clean(f"{mark}  {c.name}: {found}", one_line=True),
            width=max(20, console.width),
            subsequent_indent=" " * 8,
            break_on_hyphens=False,
        )
        for ln in head:
            console.print(Text(ln, style="" if c.ok else "red"), no_wrap=True, crop=True)
        if paths:
            wrapped(console, "sys.path searched:", indent="        ")
            for p in paths:
                console.print(Whole("          " + clean(p, one_line=True)), soft_wrap=True)
        if not c.ok and c.hint:
            wrapped(console, f"fix: {c.hint}", indent="        ")
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
        wrapped(console, f"  pilotfish {opt} {cmd}{what}")
    wrapped(console, f"report written: {_short(str(page))} (open it in a browser)")
    if not args.gromacs and gromacs.available():
        wrapped(console, "GROMACS is installed: `pilotfish demo --gromacs` runs a real MD ensemble")
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


_RUNDIR_HELP = (
    "run directory holding journal.db (default: ./.pilotfish; for run/resume, the default "
    "of the script's Sessions made without rundir=)"
)

_Subparsers = Any  # argparse's _SubParsersAction (private to argparse)

#: examples shown at the end of each command's --help
_EXAMPLES = {
    "run": "  pilotfish run ensemble.py --members 100\n"
    "  pilotfish run --rundir runs/today ensemble.py  # its Sessions default rundir",
    "resume": "  pilotfish resume ensemble.py --members 100   # the same script and arguments",
    "status": "  pilotfish status\n  pilotfish --rundir runs/today status",
    "failures": "  pilotfish failures            # one line per failed task, reason first\n"
    "  pilotfish failures --group    # grouped by cause, largest group first\n"
    "  pilotfish failures --json | jq '.[].call'",
    "report": "  pilotfish report --html\n  pilotfish report --out ~/public_html/run.html",
    "show": "  pilotfish show simulate-18010ca2a0f7\n"
    "  pilotfish show mdrun-7 --full --no-pager > mdrun-7.txt",
    "check": "  pilotfish check --requires 'numpy>=1.26' --program gmx\n"
    "  pilotfish check --backend dask --address tcp://head:8786 --requires scipy",
    "demo": "  pilotfish demo\n  pilotfish demo --gromacs --rundir /tmp/md-demo",
}


def _examples(name: str) -> dict[str, Any]:
    return {
        "epilog": "examples:\n" + _EXAMPLES[name],
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pilotfish",
        description="Run workflows and inspect their journal (failures are first-class).",
        epilog="examples:\n  pilotfish run ensemble.py\n  pilotfish failures\n"
        "  pilotfish show KEY\n  pilotfish COMMAND --help   # each command's own examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rundir", default=".pilotfish", help=_RUNDIR_HELP)
    # --rundir after the command too (it then overrides the one before, if given)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--rundir", default=argparse.SUPPRESS, help=_RUNDIR_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    _add_script_parser(
        sub, common, "run", "run a workflow script; progress (failures, counts) on stderr", cmd_run
    )
    _add_script_parser(
        sub,
        common,
        "resume",
        "run a script again: tasks DONE before are taken from the journal, every other "
        "one (failed ones too) runs again",
        cmd_resume,
    )
    s = sub.add_parser(
        "status",
        parents=[common],
        help="counts by state and failure category, runs",
        **_examples("status"),
    )
    s.set_defaults(func=cmd_status)
    _add_failures_parser(sub, common)
    _add_report_parser(sub, common)
    _add_show_parser(sub, common)
    _add_check_parser(sub, common)
    _add_demo_parser(sub, common)
    return p


def _add_script_parser(
    sub: _Subparsers,
    common: argparse.ArgumentParser,
    name: str,
    what: str,
    func: Callable[[argparse.Namespace, Console], int],
) -> None:
    r = sub.add_parser(
        name, parents=[common], help=what, description=textwrap.fill(what, 78), **_examples(name)
    )
    r.add_argument("script", help="the workflow script (Python) to run as __main__")
    r.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments passed to the script (its sys.argv)"
    )
    r.set_defaults(func=func)


def _add_failures_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    f = sub.add_parser(
        "failures",
        parents=[common],
        help="every failed task on one line (--group: the digest, grouped by cause)",
        **_examples("failures"),
    )
    f.add_argument(
        "--group",
        action="store_true",
        help="group the failures by category and normalised message, largest group first",
    )
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=cmd_failures)


def _add_report_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    rp = sub.add_parser(
        "report",
        parents=[common],
        help="write one self-contained HTML page about the run",
        **_examples("report"),
    )
    rp.add_argument(
        "--html", action="store_true", help="an HTML page (the only format, and the default)"
    )
    rp.add_argument(
        "--out",
        metavar="FILE",
        help="where to write it (default: RUNDIR/report.html; a directory: DIR/report.html). "
        "An existing FILE is replaced only if it is a report pilotfish wrote; the journal, "
        "its -wal/-shm files and anything in the run directory's values/, sandboxes/, "
        "results/ and staged/ are never written",
    )
    rp.set_defaults(func=cmd_report)


def _add_show_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    sh = sub.add_parser(
        "show",
        parents=[common],
        help="everything about one task: attempts, complete output",
        **_examples("show"),
    )
    sh.add_argument(
        "key", help="the task's key, as `failures` lists it (a prefix lists the keys starting so)"
    )
    sh.add_argument(
        "--no-pager",
        action="store_true",
        help="print straight to the terminal (default there: a pager, such as less)",
    )
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


def _add_check_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser(
        "check",
        parents=[common],
        help="pre-flight checks of the worker environment (creates nothing: it runs in a "
        "temporary run directory, removed at the end; --rundir is checked: that you can "
        "create or write it)",
        **_examples("check"),
    )
    c.add_argument(
        "--backend",
        default="local",
        choices=["local", "dask"],
        help="whose workers to check (default: local)",
    )
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


def _add_demo_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser(
        "demo",
        help="run a bundled example ensemble with deliberate failures",
        **_examples("demo"),
    )
    d.add_argument(
        "--rundir",
        default=argparse.SUPPRESS,
        help="run directory of the demo (default: ./.pilotfish-demo, not ./.pilotfish)",
    )
    d.add_argument(
        "--gromacs",
        action="store_true",
        help="run a small real GROMACS ensemble instead (needs gmx): a bad .mdp, a blow-up, "
        "a member whose node dies and one that hits its walltime, both resumed from md.cpt",
    )
    d.set_defaults(func=cmd_demo)


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
