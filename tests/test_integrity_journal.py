"""Issue 13, items 4, 5 and 7: the journal never drops a record, resume loads pickles
only from private files, and automatic keys are the same in every process.

Each test names the real-world mistake or attack it reproduces."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from conftest import wait_for
from pilotfish.backends.fake import FakeBackend
from pilotfish.client.payloads import call_digest
from pilotfish.store.reader import JournalReader
from pilotfish.store.schema import JournalDamaged, JournalError
from pilotfish.wire.messages import dumps_call


def double(x: int) -> int:
    return 2 * x


def type_name(x: object) -> str:
    return type(x).__name__


def big(n: int) -> bytes:
    return b"v" * n


def session(rundir: Path, **kw: object) -> pilotfish.Session:
    return pilotfish.Session(backend=FakeBackend(2), rundir=str(rundir), **kw)  # type: ignore[arg-type]


def stored_value(r: JournalReader, key: str) -> Any:
    """The value of DONE task ``key``, read back as resume reads it."""
    data = r.done_value(key)
    assert data is not None, f"{key} has no stored value"
    return pickle.loads(data)


# --------------------------------------------------------------------------- item 4


def test_lone_surrogate_key_does_not_drop_the_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key with a lone surrogate (a file name read with surrogateescape) next to three
    normal tasks left the journal with zero rows although all four tasks succeeded."""
    with session(tmp_path / "run") as s:
        tasks = [s.submit(double, i) for i in range(3)]
        tasks.append(s.submit(pilotfish.task(double, key="bad\udc80"), 7))
        assert [t.result(timeout=30) for t in tasks] == [0, 2, 4, 14]
    r = JournalReader(tmp_path / "run" / "journal.db")
    assert r.counts() == {"DONE": 4}
    assert r.task("bad\\udc80") is not None  # escaped, not lost
    assert stored_value(r, "bad\\udc80") == 14
    assert "bad\\udc80" in caplog.text and "not valid UTF-8" in caplog.text
    with session(tmp_path / "run", resume=True) as s:  # and resume finds it
        t = s.submit(pilotfish.task(double, key="bad\udc80"), 7)
        assert t.result(timeout=30) == 14
        assert t.attempts == [], "restored from the journal, not run again"


def test_locked_database_is_retried_not_dropped(tmp_path: Path) -> None:
    """Another process (a `sqlite3` shell, a backup tool) held the journal's write lock
    for longer than SQLite's busy timeout: every batch written meanwhile was dropped."""
    rundir = tmp_path / "run"
    with session(rundir) as s:
        assert s._journal is not None
        s._journal.conn.execute("PRAGMA busy_timeout=20")
        other = sqlite3.connect(rundir / "journal.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the write lock
        tasks = [s.submit(double, i) for i in range(5)]
        assert [t.result(timeout=30) for t in tasks] == [0, 2, 4, 6, 8]
        time.sleep(1.2)  # a few flushes meet "database is locked"
        assert s._journal.error is None  # still within retry_for: not broken
        other.execute("ROLLBACK")
        other.close()
    r = JournalReader(rundir / "journal.db")
    assert r.counts() == {"DONE": 5}


def _fill_disk(s: pilotfish.Session) -> None:
    """SQLITE_FULL, as on a full disk: the database may not grow beyond its size now."""
    assert s._journal is not None
    c = s._journal.conn
    (pages,) = c.execute("PRAGMA page_count").fetchone()
    c.execute(f"PRAGMA max_page_count={pages}")


def test_disk_full_raises_at_next_submit_and_result_and_keeps_records(tmp_path: Path) -> None:
    """The disk filled up during a run: batches of journal writes were dropped silently,
    the run went on, and resume later reran work that had finished."""
    rundir = tmp_path / "run"
    with session(rundir) as s:
        _fill_disk(s)
        t = s.submit(big, 200_000)
        assert s._journal is not None
        journal = s._journal
        wait_for(lambda: journal.error is not None)
        with pytest.raises(JournalError, match=r"journal\.db cannot be written.*full"):
            s.submit(double, 1)
        with pytest.raises(JournalError, match=re.escape(str(rundir / "journal.db"))):
            t.result(timeout=30)
        journal.conn.execute("PRAGMA max_page_count=1073741823")  # space freed
        wait_for(lambda: journal.error is None)
        assert t.result(timeout=30) == b"v" * 200_000
        assert s.submit(double, 2).result(timeout=30) == 4
    r = JournalReader(rundir / "journal.db")
    assert r.counts() == {"DONE": 2}  # the record held in memory was written later
    assert stored_value(r, t.key) == b"v" * 200_000


def test_final_flush_failure_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk was full at the end of a run: shutdown() (the with-block's exit) raised a
    raw sqlite3.OperationalError from the journal's last flush, hiding the run's results;
    or, once the writer thread had dropped the batch, nothing at all was reported."""
    rundir = tmp_path / "run"
    s = session(rundir)
    _fill_disk(s)
    t = s.submit(pilotfish.task(big, key="last-task"), 200_000)
    pilotfish.wait([t], timeout=30)  # (t.result() may raise JournalError: disk full)
    assert t.done()
    s.shutdown()  # never raises for the final flush
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        "could not be completed" in r.getMessage() and "'last-task'" in r.getMessage()
        for r in errors
    ), caplog.text
    assert str(rundir / "journal.db") in caplog.text


# --------------------------------------------------------------------------- item 5


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.mkdir, (self.marker,))


def _run_with_value_file(rundir: Path) -> tuple[str, Path]:
    with session(rundir) as s:
        t = s.submit(big, (1 << 20) + 10)
        t.result(timeout=30)
    files = list((rundir / "values").iterdir())
    assert len(files) == 1
    return t.key, files[0]


def test_resume_refuses_a_replaced_group_writable_pickle(tmp_path: Path) -> None:
    """Attack: someone who can write the values directory replaced a value pickle;
    `pilotfish resume` unpickled it and ran their code."""
    rundir, marker = tmp_path / "run", tmp_path / "pwned"
    key, vfile = _run_with_value_file(rundir)
    vfile.write_bytes(pickle.dumps(_Evil(str(marker))))
    os.chmod(vfile, 0o666)
    with session(rundir, resume=True) as s:
        with pytest.raises(
            JournalError, match=re.escape(str(vfile)) + r".*writable by group and others.*chmod"
        ):
            s.submit(big, (1 << 20) + 10)
        assert s.tasks == []  # the refused task is not left half-submitted
    assert not marker.exists()
    with pytest.raises(JournalError, match="writable by"):
        JournalReader(rundir / "journal.db").done_value(key)
    assert not marker.exists()


def test_resume_refuses_a_symlinked_pickle(tmp_path: Path) -> None:
    """Attack: the value file was replaced by a symbolic link to a pickle elsewhere."""
    rundir, marker = tmp_path / "run", tmp_path / "pwned"
    _, vfile = _run_with_value_file(rundir)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Evil(str(marker))))
    os.chmod(evil, 0o600)
    vfile.unlink()
    vfile.symlink_to(evil)
    with session(rundir, resume=True) as s, pytest.raises(JournalError, match="symbolic link"):
        s.submit(big, (1 << 20) + 10)
    assert not marker.exists()


def test_resume_refuses_a_journal_writable_by_others(tmp_path: Path) -> None:
    """Mistake: a journal copied with `cp -p` from a shared scratch area kept mode 0666;
    anyone could have changed the pickled values inside it."""
    rundir = tmp_path / "run"
    _run_with_value_file(rundir)
    os.chmod(rundir / "journal.db", 0o666)
    with pytest.raises(JournalError, match=r"journal.db: it is writable by group and others"):
        session(rundir, resume=True)


def test_resume_refuses_a_run_directory_of_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a run directory owned by another user (e.g. on a shared file system)."""
    rundir = tmp_path / "run"
    _run_with_value_file(rundir)
    monkeypatch.setattr(os, "getuid", lambda: 4242)  # as if another user ran it
    with pytest.raises(
        JournalError, match=re.escape(str(rundir)) + " is owned by uid .*not by you"
    ):
        session(rundir, resume=True)


def test_loose_run_directory_is_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Mistake: the run directory was created by hand with mode 0777 (or under umask 000);
    it was used as it was, so anyone could replace its pickles."""
    rundir = tmp_path / "run"
    rundir.mkdir()
    os.chmod(rundir, 0o777)
    with session(rundir) as s:
        assert s.submit(double, 2).result(timeout=30) == 4
    assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
    assert "made it private" in caplog.text and str(rundir) in caplog.text


def test_shared_sticky_directory_is_refused(tmp_path: Path) -> None:
    """Mistake: `rundir="/tmp"` (mode 1777): never tightened (that would break /tmp for
    everyone), refused."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(JournalError, match="shared directory"):
        session(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


# --------------------------------------------------------------------------- item 7

_KEYS_SCRIPT = textwrap.dedent(
    """
    import dataclasses, enum, json, sys
    import pilotfish
    from pilotfish.backends.fake import FakeBackend

    class Color(enum.Enum):
        RED = 1

    @dataclasses.dataclass(frozen=True)
    class Sample:
        name: str
        tags: frozenset
        params: dict

    def work(*args, **kwargs):
        return 1

    calls = [
        ({"alpha", "beta", "gamma", "delta"},),
        (frozenset({"x", "y", "z"}), {"b": 2, "a": 1}),
        (Sample("s1", frozenset({"u", "v", "w"}), {"k": {"p", "q"}}),),
        ([{"n": (1, {"m", "o"})}, Color.RED],),
        (1, "a", [2.5, (3, None)], b"raw"),
    ]
    with pilotfish.Session(backend=FakeBackend(), journal=None,
                           rundir=sys.argv[1]) as s:
        tasks = [s.submit(work, *c, opt={"s", "t"}) for c in calls]
        tasks.append(s.submit(lambda v: v, {"l1", "l2"}))
        keys = [t.key for t in tasks]
        unstable = [t._key_unstable for t in tasks]  # s.tasks: only the tasks still held
    print(json.dumps([keys, unstable]))
    """
)


def test_auto_keys_are_the_same_under_any_hash_seed(tmp_path: Path) -> None:
    """A set of strings, a dict, or a dataclass defined in `__main__` as an argument gave
    a task a new key in every process (pickles follow the hash seed's set order and
    cloudpickle's per-process class ids): `pilotfish resume` restored 1 of 3 finished
    tasks and reran the rest and all their dependents."""
    script = tmp_path / "keys.py"
    script.write_text(_KEYS_SCRIPT)
    outs = []
    for seed in ("1", "2", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        p = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "run")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    keys, unstable = outs[0]
    assert all(u is None for u in unstable)
    assert outs[1] == outs[0] and outs[2] == outs[0]
    assert len(set(keys)) == len(keys)


def test_simple_argument_keys_are_unchanged() -> None:
    """Upgrade: keys of calls with ints, strings, lists and tuples are what they were, so
    journals written before canonical keys still resume."""
    with pilotfish.Session(backend=FakeBackend(), journal=None) as s:
        args = (1, "a", [2.5, (3, None)], (b"x", True))
        t = s.submit(double, *args, k=[1, 2])
        payload = dumps_call((double, args, {"k": [1, 2]}), lambda x: None)
        assert t.key == f"double-{call_digest(payload, [])}"
        dep = s.submit(double, t, 3)
        payload = dumps_call((double, (t, 3), {}), lambda x: 0 if x is t else None)
        assert dep.key == f"double-{call_digest(payload, [t])}"


def test_canonical_keys_tell_equal_arguments_apart_from_different_ones() -> None:
    """A canonical form that forgot a type or an order would give two different calls one
    key (resume would restore the wrong value)."""

    @dataclasses.dataclass
    class A:
        x: object

    @dataclasses.dataclass
    class B:
        x: object

    with pilotfish.Session(backend=FakeBackend(), journal=None) as s:

        def key(*a: object) -> str:
            return s.submit(double, *a).key

        assert key({"a", "b"}) == key({"b", "a"}).rsplit("-", 1)[0]  # same call: "-2"
        assert key({1: "a", 2: "b"}) != key({1: "b", 2: "a"})
        assert key({"a"}) != key(frozenset({"a"}))
        assert key({1, 2}) != key({1, 3})
        assert key(A(1)) != key(B(1))
        assert key(A({"x"})) != key(A({"y"}))
        assert key({"1"}) != key({1})


class Opaque:
    """No canonical form (not a dataclass, not a container)."""

    def __init__(self, v: int) -> None:
        self.v = v


def test_resume_names_the_tasks_it_cannot_match(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Resume silently reran tasks whose keys had changed; now it says which ones and
    why (an argument with no canonical form) and how to fix it (key=)."""
    rundir = tmp_path / "run"
    with session(rundir) as s:
        assert s.submit(type_name, Opaque(1)).result(timeout=30) == "Opaque"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pilotfish"), session(rundir, resume=True) as s:
        t = s.submit(type_name, Opaque(2))
        t.result(timeout=30)
    assert t.key in caplog.text
    assert "argument 0 holds an object of type" in caplog.text
    assert "Opaque" in caplog.text and "key=" in caplog.text


_RESUME_SCRIPT = textwrap.dedent(
    """
    import dataclasses, os, sys
    import pilotfish

    @dataclasses.dataclass
    class Config:
        name: str
        labels: frozenset

    def step(marks, cfg, extra):
        with open(os.path.join(marks, cfg.name), "a") as f:
            f.write("x\\n")
        return len(cfg.labels) + len(extra)

    def total(*parts):
        return sum(parts)

    if __name__ == "__main__":
        marks = sys.argv[1]
        with pilotfish.Session(workers=2, rundir=sys.argv[2]) as s:
            parts = [
                s.submit(step, marks, Config(f"c{i}", frozenset({"a", "b", str(i)})),
                         {"tag", "other"})
                for i in range(3)
            ]
            s.submit(total, *parts).result()
    """
)


def test_resume_in_a_new_process_restores_tasks_with_set_and_dataclass_args(
    tmp_path: Path,
) -> None:
    """The issue's case end to end: `pilotfish run`, then `pilotfish resume` in a new
    process (another hash seed); before, 2 of 3 finished tasks ran again."""
    script, marks, rundir = tmp_path / "wf.py", tmp_path / "marks", tmp_path / "run"
    script.write_text(_RESUME_SCRIPT)
    marks.mkdir()
    cli = [sys.executable, "-m", "pilotfish.tools.cli", "--rundir", str(rundir)]
    for seed, cmd in (("1", "run"), ("2", "resume")):
        subprocess.run(
            [*cli, cmd, str(script), str(marks), str(rundir)],
            env=dict(os.environ, PYTHONHASHSEED=seed),
            capture_output=True,
            timeout=120,
            check=True,
        )
    runs = {p.name: len(p.read_text().splitlines()) for p in marks.iterdir()}
    assert runs == {"c0": 1, "c1": 1, "c2": 1}
    assert JournalReader(rundir / "journal.db").counts() == {"DONE": 4}


# --------------------------------------------------------------------------- issue 22

# what a message may hold: a str read with surrogateescape, bytes that are not UTF-8, NUL
_BAD = ("lone \udc80 surrogate", b"bytes \xff\xfe not utf-8", "nul \x00 inside")
_STORED = ("lone \\udc80 surrogate", "bytes \\xff\\xfe not utf-8", "nul \x00 inside")


class _Head:
    """What Journal.record needs of a task (key, name, kind, output reference or not,
    dependencies, options)."""

    def __init__(self, key: str, name: str) -> None:
        self.key, self.name, self._kind, self._deps = key, name, "call", ()
        self._output_of = None
        self.options = pilotfish.TaskOptions()


def _text_everywhere(value: object) -> list[str]:
    """Every str in a row (JSON columns decoded) that is not valid UTF-8 text."""
    if isinstance(value, str):
        try:
            decoded = json.loads(value) if value[:1] in "[{" else None
        except ValueError:
            decoded = None
        bad = [] if _encodes(value) else [value]
        return bad + (_text_everywhere(decoded) if decoded is not None else [])
    if isinstance(value, dict):
        return [b for k, v in value.items() for b in _text_everywhere(k) + _text_everywhere(v)]
    if isinstance(value, list | tuple):
        return [b for v in value for b in _text_everywhere(v)]
    return []


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_every_text_field_is_stored_whatever_its_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker event whose message was not valid UTF-8 (lone surrogates, bytes) was
    journaled in the same flush as a finished task: the flush failed, the task's row was
    lost and the run stayed "running". Every text field of every record kind (tasks,
    attempts, failures, events, drains) now goes through one escaping rule."""
    from pilotfish.store.journal import Journal

    path = tmp_path / "journal.db"
    j = Journal(path, flush_interval=3600)  # everything below goes in the final flush
    now = time.time()
    for i, bad in enumerate(_BAD):
        text = bad if isinstance(bad, str) else bad.decode("latin-1")
        fail = pilotfish.FailureRecord(
            key=f"f{i}",
            category=pilotfish.Category.USER_ERROR,
            message=bad,  # type: ignore[arg-type]  # the API may be handed anything
            traceback=bad,  # type: ignore[arg-type]
            stderr_tail=bad,  # type: ignore[arg-type]
            worker=text,
            host=text,
        )
        attempt = dataclasses.make_dataclass(
            "A",
            [
                "number",
                "id",
                "dispatched",
                "worker",
                "host",
                "pid",
                "started",
                "ended",
                "outcome",
                "failure",
                "note",
            ],
        )(1, i, now, bad, bad, 7, now, now, "user_error", fail, bad)
        j.record(
            _Head(f"f{i}-{text}", f"name {text}"),
            "FAILED",
            [(now, "PENDING", "FAILED")],
            [attempt],
            fail,
        )
        j.record(
            _Head(f"d{i}", text), "DONE", [(now, "PENDING", "DONE")], [], None, pickle.dumps(i)
        )
        j.record_event(now, bad, bad, 7, bad, bad, {"why": bad, bad: [bad]})  # type: ignore[arg-type, dict-item]
        j.record_drain({"time": now, "name": bad, "host": bad, "reason": bad, "keys": [bad]})
    j.close()
    assert j.error is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    r = JournalReader(path)
    assert [run["status"] for run in r.runs()] == ["finished"]
    assert r.counts() == {"DONE": 3, "FAILED": 3}
    assert [stored_value(r, f"d{i}") for i in range(3)] == [0, 1, 2]
    rows = [dict(row) for row in r.tasks()] + [dict(e) for e in r.events()]
    assert _text_everywhere(rows) == []
    messages = [e["message"] for e in r.events() if e["kind"] != "drained"]
    assert messages == list(_STORED)  # escaped, not dropped: NUL kept as it is
    assert [e["message"] for e in r.events("drained")] == list(_STORED)
    assert [f["message"] for f in r.failures()] == list(_STORED)
    assert [a["note"] for i in range(3) for a in r.attempts(r.tasks("FAILED")[i]["key"])] == list(
        _STORED
    )


def _damage(path: Path) -> None:
    """Overwrite the middle pages of an SQLite file with noise (a disk or copy fault)."""
    size = path.stat().st_size
    rng = random.Random(22)
    with open(path, "r+b") as f:
        f.seek(3 * 4096)
        f.write(rng.randbytes(size - 5 * 4096))


def test_damaged_journal_is_refused_by_session_and_never_written(tmp_path: Path) -> None:
    """A journal with corrupt pages: Session(resume=True) raised a raw sqlite3 error from
    submit() and went on writing into the damaged file. Now Session(...) itself refuses,
    before anything runs, with what to do (.recover), and the file is left as it was."""
    rundir = tmp_path / "run"
    with session(rundir) as s:
        assert [t.result(timeout=30) for t in [s.submit(big, 700 + i) for i in range(300)]]
    journal = rundir / "journal.db"
    _damage(journal)
    before = journal.read_bytes()
    for kw in ({"resume": True}, {}):
        with pytest.raises(JournalDamaged) as info:
            session(rundir, **kw)
        msg = str(info.value)
        assert str(journal) in msg and ".recover" in msg and "damaged" in msg, msg
        assert "\n" not in msg
    assert journal.read_bytes() == before  # nothing written
    assert not (rundir / "journal.db-wal").exists()
    with session(tmp_path / "other") as s:  # and the lock went with the refusal
        assert s.submit(double, 2).result(timeout=30) == 4
