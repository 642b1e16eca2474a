"""The durable journal: SQLite (WAL) in ``rundir/journal.db``, written by the client only.

It records every task (key, name, dependencies, options), every attempt
(worker, host, pid, times, outcome, failure), every state transition with its
time, every ``FailureRecord`` in full, and the pickled value of DONE tasks
(values above ``VALUE_INLINE_MAX`` go to files in ``rundir/values/``).

Writes are cheap for the session: it appends plain tuples to a list under its
own lock; a writer thread commits them in batches every ``flush_interval``
seconds (0.5 s), in one transaction, one row per task (a task that is submitted
and finishes within one interval costs a single row). After SIGKILL of the client the journal opens
cleanly (WAL) and shows everything committed up to then: a task counts as DONE
for ``resume`` only once its DONE row is committed.

Readers (the CLI) use :class:`JournalReader`, which never writes.
"""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .errors import PilotfishError

SCHEMA_VERSION = 1
VALUE_INLINE_MAX = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL, ended REAL, argv TEXT, pid INTEGER, host TEXT,
    status TEXT);
CREATE TABLE IF NOT EXISTS tasks (
    key TEXT PRIMARY KEY, name TEXT, kind TEXT, deps TEXT, options TEXT, run INTEGER,
    submitted REAL, state TEXT, updated REAL, failure TEXT, value BLOB, value_path TEXT,
    attempts TEXT, history TEXT, earlier TEXT);
"""


# One row per task. A row from an earlier run is kept in ``earlier`` (one JSON line per
# run) when the task is submitted again (resume), so no attempt is ever forgotten.
_UPSERT = """
INSERT INTO tasks (key, name, kind, deps, options, run, submitted, state, updated, failure,
                   value, value_path, attempts, history)
VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT(key) DO UPDATE SET
    earlier = CASE WHEN tasks.run != excluded.run THEN
        coalesce(tasks.earlier, '') || json_object(
            'run', tasks.run, 'state', tasks.state,
            'failure', json(coalesce(tasks.failure, 'null')),
            'attempts', json(coalesce(tasks.attempts, '[]')),
            'history', coalesce(tasks.history, '')) || char(10)
        ELSE tasks.earlier END,
    name = excluded.name, kind = excluded.kind, deps = excluded.deps,
    options = excluded.options, run = excluded.run, submitted = excluded.submitted,
    state = excluded.state, updated = excluded.updated, failure = excluded.failure,
    value = excluded.value, value_path = excluded.value_path, attempts = excluded.attempts,
    history = excluded.history
"""


_ATTEMPT_FIELDS = (
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
)


def _encode(history: list[tuple[float, str, str]], attempts: list[Any]) -> tuple[str, str]:
    """Compact, fast encodings (this runs once per task): attempts as JSON lists in
    ``_ATTEMPT_FIELDS`` order, history as ``time from to;...``."""
    h = ";".join(f"{t:.6f} {a} {b}" for t, a, b in history)
    rows = [
        (
            a.number,
            a.id,
            a.dispatched,
            a.worker,
            a.host,
            a.pid,
            a.started,
            a.ended,
            a.outcome,
            a.failure.to_dict() if a.failure is not None else None,
        )
        for a in attempts
    ]
    return json.dumps(rows), h


def _decode_attempts(text: str | None) -> list[dict[str, Any]]:
    return [dict(zip(_ATTEMPT_FIELDS, r, strict=True)) for r in json.loads(text or "[]")]


def _decode_history(text: str | None) -> list[tuple[float, str, str]]:
    out = []
    for item in (text or "").split(";"):
        if item:
            t, a, b = item.split(" ")
            out.append((float(t), a, b))
    return out


class JournalError(PilotfishError):
    """The journal is missing, corrupt, foreign, or from a newer pilotfish."""


def _check(conn: sqlite3.Connection, path: Path) -> None:
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise JournalError(
            f"{path} is not a pilotfish journal (SQLite says: {e}); it may be corrupt or "
            "another kind of file. Point --rundir/journal= at a pilotfish run directory, or "
            "move the file away to start a new journal."
        ) from e
    if not tables:
        return
    if "meta" not in tables or "tasks" not in tables:
        raise JournalError(
            f"{path} is an SQLite database but not a pilotfish journal (tables: "
            f"{sorted(tables)}); use another rundir or journal path"
        )
    row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"{path} was written by a newer pilotfish (journal schema {version}; this "
            f"pilotfish reads up to {SCHEMA_VERSION}); upgrade pilotfish to read it"
        )


class Journal:
    """The single writer. ``record_*`` methods are called with the session's lock held."""

    def __init__(self, path: str | os.PathLike[str], *, flush_interval: float = 0.5) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.values_dir = self.path.parent / "values"
        existed = self.path.exists()
        if not existed:
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        else:
            os.chmod(self.path, 0o600)
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        _check(self.conn, self.path)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)
        for side in ("-wal", "-shm"):
            p = Path(str(self.path) + side)
            if p.exists():
                os.chmod(p, 0o600)
        self.conn.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (str(time.time()),))
        import sys

        cur = self.conn.execute(
            "INSERT INTO runs (started, argv, pid, host, status) VALUES (?, ?, ?, ?, 'running')",
            (time.time(), json.dumps(sys.argv), os.getpid(), os.uname().nodename),
        )
        self.run = int(cur.lastrowid or 0)
        self._flush_interval = flush_interval
        self._opts_json: dict[int, tuple[Any, str]] = {}
        # append and popleft are atomic: the session's threads never wait for the writer
        self._q: collections.deque[tuple[Any, ...]] = collections.deque()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pilotfish-journal", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ reading (resume)
    def done_value(self, key: str) -> bytes | None:
        """The pickled value of ``key`` if it is DONE in the journal, else None."""
        row = self.conn.execute(
            "SELECT state, value, value_path FROM tasks WHERE key=?", (key,)
        ).fetchone()
        if row is None or row[0] != "DONE":
            return None
        if row[1] is not None:
            return bytes(row[1])
        if row[2]:
            try:
                return Path(row[2]).read_bytes()
            except OSError:
                return None
        return None

    # ------------------------------------------------------------------ recording
    def record(
        self,
        task: Any,
        state: str,
        history: list[tuple[float, str, str]],
        attempts: list[Any],
        failure: Any = None,
        value: bytes | None = None,
    ) -> None:
        """Snapshot of one task (a ``pilotfish.Task``): on submit, on a failed attempt,
        and when final. Serialised by the writer thread, off the session's hot path;
        the latest snapshot of a key in a batch wins, so a task that finishes within one
        flush interval costs one row."""
        self._q.append((task, state, list(history), list(attempts), failure, value, time.time()))

    def record_submit(self, task: Any, now: float) -> None:
        """A new task (state PENDING or later: the latest snapshot in a batch wins)."""
        self._q.append((task, None, None, None, None, None, now))

    # ------------------------------------------------------------------ writer
    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._closed:
                    self._cv.wait(self._flush_interval)
                closed = self._closed
            try:
                self.flush()
            except BaseException:  # logged; a journal failure must never kill the session
                import logging

                logging.getLogger("pilotfish").exception("pilotfish: journal write failed")
            if closed:
                return

    def flush(self) -> None:
        q = self._q
        latest: dict[str, tuple[Any, ...]] = {}
        for _ in range(len(q)):
            rec = q.popleft()
            latest[rec[0].key] = rec
        if not latest:
            return
        opts_json = self._opts_json  # TaskOptions objects are shared by many tasks
        if len(opts_json) > 4096:
            opts_json.clear()
        rows: list[tuple[Any, ...]] = []
        for task, state, history, attempts, failure, value, now in latest.values():
            cached = opts_json.get(id(task.options))
            if cached is None or cached[0] is not task.options:
                cached = opts_json[id(task.options)] = (
                    task.options,
                    json.dumps(task.options.to_dict(), default=str),
                )
            head = (
                task.key,
                task.name,
                task._kind,
                json.dumps([d.key for d in task._deps]) if task._deps else "[]",
                cached[1],
                self.run,
            )
            if state is None:  # submitted, nothing else known yet: the cheap row
                rows.append((*head, now, "PENDING", now, None, None, None, "[]", ""))
                continue
            value_path = None
            if value is not None and len(value) > VALUE_INLINE_MAX:
                value_path, value = str(self._value_file(task.key, value)), None
            rows.append(
                (
                    *head,
                    history[0][0] if history else now,
                    state,
                    now,
                    json.dumps(failure.to_dict()) if failure is not None else None,
                    value,
                    value_path,
                    *_encode(history, attempts),
                )
            )
        c = self.conn
        c.execute("BEGIN")
        try:
            c.executemany(_UPSERT, rows)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _value_file(self, key: str, value: bytes) -> Path:
        import hashlib

        self.values_dir.mkdir(mode=0o700, exist_ok=True)
        name = hashlib.blake2b(key.encode(), digest_size=16).hexdigest() + ".pkl"
        path = self.values_dir / name
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        return path

    def close(self, status: str = "finished") -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        self._thread.join()
        self.flush()
        self.conn.execute(
            "UPDATE runs SET ended=?, status=? WHERE id=?", (time.time(), status, self.run)
        )
        self.conn.close()


# --------------------------------------------------------------------------- reading


class JournalReader:
    """Read-only access for the command line and reports."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise JournalError(
                f"no journal at {self.path}: run a workflow first (pilotfish run SCRIPT), or "
                "point --rundir at the run directory it used"
            )
        try:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        except sqlite3.Error as e:
            raise JournalError(f"cannot open journal {self.path}: {e}") from e
        _check(self.conn, self.path)
        self.conn.row_factory = sqlite3.Row

    def counts(self) -> dict[str, int]:
        return {
            r["state"]: r["n"]
            for r in self.conn.execute("SELECT state, count(*) AS n FROM tasks GROUP BY state")
        }

    def failure_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.conn.execute("SELECT failure FROM tasks WHERE state='FAILED'"):
            cat = json.loads(r["failure"])["category"] if r["failure"] else "unknown"
            out[cat] = out.get(cat, 0) + 1
        return out

    def runs(self) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM runs ORDER BY id"))

    def tasks(self, state: str | None = None) -> list[sqlite3.Row]:
        if state is None:
            return list(self.conn.execute("SELECT * FROM tasks ORDER BY submitted"))
        return list(
            self.conn.execute("SELECT * FROM tasks WHERE state=? ORDER BY submitted", (state,))
        )

    def task(self, key: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM tasks WHERE key=?", (key,)
        ).fetchone()
        return row

    def journal_value(self, key: str) -> Any:
        """The value of a DONE task, unpickled (None if it has none)."""
        import pickle

        row = self.task(key)
        if row is None or row["state"] != "DONE":
            return None
        data = (
            row["value"]
            if row["value"] is not None
            else (Path(row["value_path"]).read_bytes() if row["value_path"] else None)
        )
        return pickle.loads(data) if data is not None else None

    def find(self, prefix: str) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT key FROM tasks WHERE key LIKE ? ESCAPE '\\' ORDER BY key LIMIT 20",
                (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
            )
        ]

    def attempts(self, key: str) -> list[dict[str, Any]]:
        """Every attempt of ``key``, earlier runs first; each dict has ``run``."""
        row = self.task(key)
        if row is None:
            return []
        out: list[dict[str, Any]] = []
        for line in (row["earlier"] or "").splitlines():
            old = json.loads(line)
            rows = [dict(zip(_ATTEMPT_FIELDS, r, strict=True)) for r in old["attempts"] or []]
            out.extend(dict(a, run=old["run"]) for a in rows)
        out.extend(dict(a, run=row["run"]) for a in _decode_attempts(row["attempts"]))
        return out

    def transitions(self, key: str) -> list[tuple[int, float, str, str]]:
        """(run, time, from, to) for every state transition of ``key``, in order."""
        row = self.task(key)
        if row is None:
            return []
        out: list[tuple[int, float, str, str]] = []
        for line in (row["earlier"] or "").splitlines():
            old = json.loads(line)
            out.extend((old["run"], t, a, b) for t, a, b in _decode_history(old["history"]))
        out.extend((row["run"], t, a, b) for t, a, b in _decode_history(row["history"]))
        return out

    def failures(self) -> list[dict[str, Any]]:
        out = []
        for r in self.tasks("FAILED"):
            f = json.loads(r["failure"]) if r["failure"] else {}
            f["attempts"] = len(json.loads(r["attempts"] or "[]"))
            f["name"] = r["name"]
            out.append(f)
        return out

    def close(self) -> None:
        self.conn.close()
