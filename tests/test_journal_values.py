"""Which values the journal keeps (issue 25 item 18: an analysis returning a large
object per part made the journal 3 MB for one small run; ``journal=None`` was the only
way out, and it loses resume). ``Session(journal_values=...)`` and the task option
``keep_result``: a task whose value was not kept is DONE in the journal and runs again
on resume; the others are restored."""

from __future__ import annotations

from pathlib import Path

import pytest

import pilotfish
from conftest import fake_session
from pilotfish.store.reader import JournalReader


def blob(n: int) -> bytes:
    return b"x" * n


def _journaled(rundir: Path, key: str) -> bytes | None:
    j = JournalReader(rundir / "journal.db")
    try:
        return j.done_value(key)
    finally:
        j.close()


def test_large_values_are_not_journaled_and_rerun_on_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """... and the resumed run's summary counts those as DONE without a kept value (it
    called them "unfinished done")."""
    rundir = tmp_path / "r"
    runs = []
    for resume in (False, True):
        with (
            caplog.at_level("INFO", logger="pilotfish"),
            fake_session(rundir, resume=resume, journal_values=1000) as s,
        ):
            small = s.submit(blob, 10)
            big = s.submit(blob, 100_000)
            kept = s.submit(pilotfish.task(blob, keep_result=True), 50_000)
            dropped = s.submit(pilotfish.task(blob, keep_result=False), 5)
            assert [len(t.result(timeout=30)) for t in (small, big, kept, dropped)] == [
                10, 100_000, 50_000, 5,
            ]  # fmt: skip
            runs.append([len(t.attempts) for t in (small, big, kept, dropped)])
            keys = [t.key for t in (small, big, kept, dropped)]
        got = [_journaled(rundir, k) for k in keys]
        assert [g is not None for g in got] == [True, False, True, False]
    assert runs == [[1, 1, 1, 1], [0, 1, 0, 1]]  # resume: the unkept ran again
    (summary,) = [r.getMessage() for r in caplog.records if "pilotfish resume of" in r.getMessage()]
    assert "2 DONE before, taken from the journal" in summary
    assert "2 DONE before without a kept value (journal_values, keep_result), run again" in (
        summary
    )
    assert "unfinished" not in summary
    values = rundir / "values"
    size = sum(f.stat().st_size for f in values.iterdir()) if values.exists() else 0
    assert size < 60_000, size  # the 100 kB value never went there


def test_journal_values_false_keeps_none(tmp_path: Path) -> None:
    with fake_session(tmp_path / "r", journal_values=False) as s:
        t = s.submit(blob, 3)
        assert t.result(timeout=30) == b"xxx"
    assert _journaled(tmp_path / "r", t.key) is None
    j = JournalReader(tmp_path / "r" / "journal.db")
    try:
        assert j.task(t.key)["state"] == "DONE"  # the record is there, the value not
    finally:
        j.close()


def test_bad_journal_values_and_keep_result(tmp_path: Path) -> None:
    for bad in (-1, 1.5, "all"):
        with pytest.raises(pilotfish.InvalidTask, match="journal_values"):
            pilotfish.Session(workers=1, rundir=str(tmp_path / "r"), journal_values=bad)
    for bad in (1, "no"):
        with pytest.raises(pilotfish.InvalidTask, match="keep_result"):
            pilotfish.task(blob, keep_result=bad)
