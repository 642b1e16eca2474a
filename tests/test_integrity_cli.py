"""The command line with hostile task data (issue 13, item 9): keys and names that look
like rich markup, messages and stderr full of terminal escape sequences, a stderr file
too large to print. The CLI runs in-process, on a journal a real Session wrote."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from pilotfish.backends.fake import FakeBackend
from pilotfish.runtime.files import open_regular
from pilotfish.store.reader import JournalReader
from pilotfish.tools import cli

KEY = "evil[/]key [bold red]x[/bold red]"
NAME = "name[/]"
# CSI (clear screen, colour), OSC (set the window title, a hyperlink), BEL, a bare C1 CSI,
# a carriage return that would hide what precedes it, a bidi override
HOSTILE = (
    "before\x1b[2J\x1b[31mred\x1b]0;pwned\x07\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\"
    "\x07bell\x9b1mc1\rcr\u202eevil[/]after"
)
BIG_MB = 3


def hostile_fail(msg: str) -> None:
    print(msg, file=sys.stderr)
    raise RuntimeError(msg)


def _escapes(text: str) -> list[str]:
    """Raw control characters in ``text`` other than newline, tab and the ones rich adds
    itself (none: the tests' console is not a terminal)."""
    return re.findall("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", text)


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide enough that table cells are not folded, so strings can be found whole."""
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("hostile")
    rundir = tmp / "run"
    script = (
        f"import sys; sys.stderr.write('HEAD-OF-STDERR\\n' + 'x' * 99 + '\\n');"
        f"[sys.stderr.write(('%07d' % i) + 'y' * 120 + '\\n') "
        f"for i in range({BIG_MB} * 1024 * 1024 // 128)];"
        f"sys.stderr.write({HOSTILE!r} + '\\nTAIL-OF-STDERR\\n'); sys.exit(3)"
    )
    fn = pilotfish.task(hostile_fail, key=KEY, name=NAME, retries=0)
    with pilotfish.Session(workers=1, rundir=str(rundir)) as s:
        a = s.submit(fn, HOSTILE)
        b = s.executable([sys.executable, "-c", script], key="big-stderr", retries=0)
        pilotfish.wait([a, b], timeout=120)
    fails = {f["key"]: f for f in JournalReader(rundir / "journal.db").failures()}
    assert set(fails) == {KEY, "big-stderr"}
    stderr = Path(fails["big-stderr"]["stderr_path"])
    assert stderr.stat().st_size > BIG_MB * 1024 * 1024
    return {"rundir": str(rundir), "stderr": stderr}


def test_markup_key_does_not_crash_failures(
    hostile_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A key and name containing ``[/]`` and rich tags (a MarkupError before) are shown
    literally by `failures`, and the message's escape sequences are made visible."""
    assert cli.main(["--rundir", hostile_run["rundir"], "failures"]) == 0
    out = capsys.readouterr().out
    assert KEY in out
    assert "[bold red]" in out  # shown, not applied
    assert _escapes(out) == []
    assert "\\x1b" in out


def test_markup_key_does_not_crash_show(
    hostile_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`show KEY` for a key with ``[/]`` prints the task; the traceback and the message
    holding CSI/OSC/BEL/C1/CR/bidi characters reach the terminal only as visible escapes."""
    assert cli.main(["--rundir", hostile_run["rundir"], "show", KEY, "--no-pager"]) == 0
    out = capsys.readouterr().out
    assert f"task {KEY}" in out and "name: name[/]" in out
    assert "RuntimeError" in out  # the traceback
    assert _escapes(out) == []
    for visible in ("\\x1b[2J", "\\x1b]0;pwned\\x07", "\\x9b", "\\x0d", "\\u202e"):
        assert visible in out


def test_status_with_hostile_data(
    hostile_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` works on a journal with hostile keys."""
    assert cli.main(["--rundir", hostile_run["rundir"], "status"]) == 0
    out = capsys.readouterr().out
    assert "failed: user_error" in out and _escapes(out) == []


def test_unknown_key_with_markup_and_escapes(
    hostile_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`show` of an unknown key typed with markup and an escape sequence: one clear line,
    exit 2, the key shown literally (and its neighbours by prefix, cleaned)."""
    assert cli.main(["--rundir", hostile_run["rundir"], "show", "evil[/]\x1b[2J"]) == 2
    err = capsys.readouterr().err
    assert "no task with key" in err and "evil[/]" in err and _escapes(err) == []
    assert cli.main(["--rundir", hostile_run["rundir"], "show", "evil["]) == 2
    err = capsys.readouterr().err
    assert "[bold red]" in err and _escapes(err) == []


def test_show_tails_a_large_stderr(
    hostile_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A stderr file of several MB: `show` prints its last --tail-kb KiB and the path to
    the whole file, not all of it; the escape sequences in it are made visible."""
    args = ["--rundir", hostile_run["rundir"], "show", "big-stderr", "--no-pager"]
    assert cli.main([*args, "--tail-kb", "16"]) == 0
    out = capsys.readouterr().out
    # the call line shows the program's argv, which writes HEAD-OF-STDERR: not the tail
    tail = "\n".join(ln for ln in out.splitlines() if not ln.startswith("call: "))
    assert "TAIL-OF-STDERR" in tail and "HEAD-OF-STDERR" not in tail
    assert "--full" in out and str(hostile_run["stderr"]) in out.replace("\n", "")
    assert len(out) < 40 * 1024
    assert _escapes(out) == [] and "\\x1b[31m" in out
    assert cli.main(args) == 0  # the default tail is bounded too
    assert len(capsys.readouterr().out) < (cli.TAIL_KB + 16) * 1024


def test_show_full_streams_without_reading_whole(
    hostile_run: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`show --full` prints the whole file, in chunks: no read of more than a chunk, so a
    multi-GB file is never held in memory."""
    reads: list[int] = []
    real_open = open_regular

    class Spy:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, n: int = -1) -> bytes:
            reads.append(n)
            return bytes(self.f.read(n))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

    def spy_open(file: Any) -> Any:
        f = real_open(file)
        return Spy(f) if str(file) == str(hostile_run["stderr"]) else f

    monkeypatch.setattr("pilotfish.tools.render.open_regular", spy_open)
    args = ["--rundir", hostile_run["rundir"], "show", "big-stderr", "--full"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "HEAD-OF-STDERR" in out and "TAIL-OF-STDERR" in out
    assert _escapes(out) == []
    assert reads and all(0 < n <= 1 << 20 for n in reads)


def test_clean_keeps_text_and_escapes_controls() -> None:
    """The cleaning rule itself: printable text (any script) kept, controls escaped."""
    assert cli.clean("héllo 世界\tok\n") == "héllo 世界\tok\n"
    assert cli.clean("a\x1b[0mb\x07\r\x9b\u202e") == "a\\x1b[0mb\\x07\\x0d\\x9b\\u202e"
    assert cli.clean("a\nb\tc", one_line=True) == "a\\x0ab\\x09c"
    assert cli.plain("[/]").plain == "[/]"


def test_live_progress_escapes_hostile_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """`run`'s live progress prints failed keys and worker messages without markup
    errors and with escape sequences made visible."""
    from rich.console import Console

    from pilotfish.client.events import TaskEvent, WorkerEvent
    from pilotfish.core.states import State

    console = Console(force_terminal=False, width=200)
    prog = cli.Progress(console)
    prog.on_event(TaskEvent("k[/]\x1b]0;t\x07", "n[/]", State.RUNNING, State.FAILED, 0.0))
    out = capsys.readouterr().out
    assert "failed: k[/]\\x1b]0;t\\x07" in out and _escapes(out) == []
    prog.on_event(WorkerEvent("lost", "w[/]1", 1, 0.0, message="died\x1b[2J[/]"))
    out = capsys.readouterr().out
    assert "worker w[/]1 lost: died\\x1b[2J[/]" in out and _escapes(out) == []


# --------------------------------------------------------------------------- issue 22


def _failed_program_run(rundir: Path) -> str:
    """A finished run (fake backend) with one DONE task and one failed program whose
    stderr is kept; returns the failed task's key."""
    backend = FakeBackend(1, rundir=str(rundir))
    with pilotfish.Session(backend=backend, rundir=str(rundir)) as s:
        ok = s.submit(abs, -1)
        bad = s.executable(["sh", "-c", "echo OOPS-ON-STDERR >&2; exit 3"], key="prog", retries=0)
        pilotfish.wait([ok, bad], timeout=30)
    return bad.key


def _cli(args: list[str], cwd: Path | None = None, prefix: list[str] | None = None) -> Any:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "pilotfish.tools.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=50,
        env=dict(os.environ, COLUMNS="400"),
    )


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_report_out_never_writes_over_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pilotfish report --html --out RUNDIR/journal.db` replaced the journal with the
    HTML page (`status` then said "not a pilotfish journal"). Nothing pilotfish keeps in
    the run directory is written over, nor a file that is not a report it wrote."""
    rundir = tmp_path / "run"
    key = _failed_program_run(rundir)
    sandbox = Path(JournalReader(rundir / "journal.db").failures()[0]["sandbox"])
    mine = tmp_path / "notes.html"
    mine.write_text("my own notes")
    journal = rundir / "journal.db"
    before = journal.read_bytes()
    for out in (
        journal,
        Path(str(journal) + "-wal"),
        Path(str(journal) + "-shm"),
        rundir / "values" / "x.html",
        sandbox / "stderr.txt",
        sandbox,  # a directory: DIR/report.html, inside a sandbox
        rundir / "results" / "r.html",
        rundir / ".." / rundir.name / "journal.db",  # the same file by another path
        mine,
    ):
        assert cli.main(["--rundir", str(rundir), "report", "--html", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "refusing to write the report" in err and "Traceback" not in err, (out, err)
    assert journal.read_bytes() == before and mine.read_text() == "my own notes"
    assert "OOPS-ON-STDERR" in (sandbox / "stderr.txt").read_text()
    assert cli.main(["--rundir", str(rundir), "status"]) == 0
    page = tmp_path / "page.html"
    for _ in range(2):  # a report pilotfish wrote is replaced
        assert cli.main(["--rundir", str(rundir), "report", "--out", str(page)]) == 0
    assert key in page.read_text()
    assert cli.main(["--rundir", str(rundir), "report"]) == 0  # RUNDIR/report.html
    assert (rundir / "report.html").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    assert "replaced only if it is a report pilotfish wrote" in capsys.readouterr().out


def test_show_and_report_never_block_on_a_fifo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A program replaced its stderr.txt with a FIFO: `pilotfish show KEY` blocked forever
    opening it (and `--full`, and the report). Only regular files are read."""
    rundir = tmp_path / "run"
    key = _failed_program_run(rundir)
    stderr = Path(JournalReader(rundir / "journal.db").failures()[0]["stderr_path"])
    stderr.unlink()
    os.mkfifo(stderr)
    for extra in ([], ["--full"]):
        assert cli.main(["--rundir", str(rundir), "show", key, "--no-pager", *extra]) == 0
        out = capsys.readouterr().out.replace("\n", "")
        assert "not read: it is a FIFO" in out, out
    page = tmp_path / "r.html"
    assert cli.main(["--rundir", str(rundir), "report", "--out", str(page)]) == 0
    assert "not read: it is a FIFO" in page.read_text()


def _damage(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(3 * 4096)
        f.write(b"\xa5" * (size - 5 * 4096))


def test_damaged_journal_is_one_line_and_exit_2_everywhere(tmp_path: Path) -> None:
    """A journal with corrupt pages: every CLI command printed a Python traceback
    (sqlite3.DatabaseError). Each says, in one line, that the file is damaged and how to
    recover it, exit status 2, and the file is not written."""
    rundir = tmp_path / "run"
    with pilotfish.Session(backend=FakeBackend(1), rundir=str(rundir)) as s:
        pilotfish.wait([s.submit(abs, -i) for i in range(2000)], timeout=60)
    journal = rundir / "journal.db"
    _damage(journal)
    before = journal.read_bytes()
    script = tmp_path / "wf.py"
    script.write_text(f"import pilotfish\npilotfish.Session(rundir={str(rundir)!r})\n")
    for args in (
        ["status"],
        ["failures"],
        ["failures", "--group"],
        ["show", "abs-x"],
        ["report", "--out", str(tmp_path / "r.html")],
        ["resume", str(script)],
        ["run", str(script)],
    ):
        out = _cli(["--rundir", str(rundir), *args], cwd=tmp_path)
        line = _one_line(out.stderr)
        assert out.returncode == 2, (args, out.stderr)
        assert "damaged" in line and ".recover" in line and str(journal) in line, line
    assert journal.read_bytes() == before


def unprivileged() -> list[str]:
    """A command prefix under which file permissions hold. As root (a container), where
    a read-only directory is writable anyway, the capabilities that bypass permissions
    are dropped for the command (setpriv, util-linux)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: permissions cannot be made to hold")
    return [
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-dac_override,-dac_read_search,-fowner",
        "--",
    ]


def _chmod_tree(root: Path, dirs: int, files: int) -> None:
    for d, _subdirs, names in os.walk(root):
        for n in names:
            p = Path(d) / n
            if stat.S_ISREG(p.lstat().st_mode):
                p.chmod(files)
        Path(d).chmod(dirs)


def test_read_only_journal_is_read_and_refused_for_writing(tmp_path: Path) -> None:
    """A cleanly closed journal in a read-only directory: status/failures/show and resume
    all answered "not a pilotfish journal ... may be corrupt ... move the file away",
    advice that invites deleting the history. Readers now read it (immutable when SQLite
    cannot make its -shm file); writers are refused, saying it is read-only."""
    rundir = tmp_path / "run"
    key = _failed_program_run(rundir)
    script = tmp_path / "wf.py"
    script.write_text(
        f"import pilotfish\nwith pilotfish.Session(rundir={str(rundir)!r}) as s:\n"
        "    print(s.submit(abs, -1).result())\n"
    )
    prefix = unprivileged()
    # a read-only run directory, then only a read-only journal file in a writable one
    for dirs, files in ((0o500, 0o400), (0o700, 0o400)):
        _chmod_tree(rundir, dirs, files)
        try:
            for args in (
                ["status"],
                ["failures"],
                ["show", key, "--no-pager"],
                ["report", "--out", str(tmp_path / "r.html")],
            ):
                out = _cli(["--rundir", str(rundir), *args], tmp_path, prefix)
                assert out.returncode == 0, (oct(dirs), args, out.stderr)
            assert (
                "OOPS-ON-STDERR"
                in _cli(
                    ["--rundir", str(rundir), "show", key, "--no-pager"], tmp_path, prefix
                ).stdout
            )
            for cmd in ("resume", "run"):
                out = _cli(["--rundir", str(rundir), cmd, str(script)], tmp_path, prefix)
                line = _one_line(out.stderr)
                assert out.returncode == 2 and "read-only" in line, (oct(dirs), line)
                assert "corrupt" not in line and "move" not in line, line
        finally:
            _chmod_tree(rundir, 0o700, 0o600)
    assert JournalReader(rundir / "journal.db").counts() == {"DONE": 1, "FAILED": 1}


def test_demo_in_a_read_only_directory_and_its_private_rundir(tmp_path: Path) -> None:
    """`pilotfish demo` in a read-only directory ended in a PermissionError traceback, and
    its run directory was created 0755 (the README promises 0700)."""
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    out = _cli(["demo"], ro, unprivileged())
    line = _one_line(out.stderr)
    assert out.returncode == 2, out.stderr
    assert "--rundir" in line and str(ro) in line and "cd" in line, line
    assert not (ro / ".pilotfish-demo").exists()
    run = tmp_path / "demo-run"
    out = _cli(["demo", "--rundir", str(run)], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert stat.S_IMODE(run.stat().st_mode) == 0o700


def test_read_only_journal_with_a_wal_says_what_it_cannot_show(tmp_path: Path) -> None:
    """A run killed in a directory that was then made read-only left records in its -wal
    file, which SQLite cannot read there: `status` showed the older state as if it were
    all. It still shows it, and says that later records are in the -wal file."""
    src = tmp_path / "live"
    _failed_program_run(src)
    c = sqlite3.connect(src / "journal.db", isolation_level=None)
    try:
        c.execute("PRAGMA wal_autocheckpoint=0")
        c.execute("UPDATE tasks SET state='CANCELLED' WHERE state='DONE'")
        rundir = tmp_path / "run"
        rundir.mkdir()
        for name in ("journal.db", "journal.db-wal"):  # as a killed client left them
            shutil.copy(src / name, rundir / name)
    finally:
        c.close()
    assert (rundir / "journal.db-wal").stat().st_size > 0
    _chmod_tree(rundir, 0o500, 0o400)
    try:
        out = _cli(["--rundir", str(rundir), "status"], tmp_path, unprivileged())
    finally:
        _chmod_tree(rundir, 0o700, 0o600)
    assert out.returncode == 0, out.stderr
    assert "shown as last checkpointed" in out.stdout and "journal.db-wal" in out.stdout
