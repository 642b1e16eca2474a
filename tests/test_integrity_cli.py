"""The command line with hostile task data (issue 13, item 9): keys and names that look
like rich markup, messages and stderr full of terminal escape sequences, a stderr file
too large to print. The CLI runs in-process, on a journal a real Session wrote."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from pilotfish import cli
from pilotfish.journal import JournalReader

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
    assert "TAIL-OF-STDERR" in out and "HEAD-OF-STDERR" not in out
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
    real_open = open

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

    def spy_open(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        f = real_open(file, mode, *a, **kw)
        return Spy(f) if str(file) == str(hostile_run["stderr"]) else f

    monkeypatch.setattr("builtins.open", spy_open)
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

    from pilotfish._events import TaskEvent, WorkerEvent
    from pilotfish.core.states import State

    console = Console(force_terminal=False, width=200)
    prog = cli.Progress(console)
    prog.on_event(TaskEvent("k[/]\x1b]0;t\x07", "n[/]", State.RUNNING, State.FAILED, 0.0))
    out = capsys.readouterr().out
    assert "failed: k[/]\\x1b]0;t\\x07" in out and _escapes(out) == []
    prog.on_event(WorkerEvent("lost", "w[/]1", 1, 0.0, message="died\x1b[2J[/]"))
    out = capsys.readouterr().out
    assert "worker w[/]1 lost: died\\x1b[2J[/]" in out and _escapes(out) == []
