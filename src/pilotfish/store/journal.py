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

The journal never drops a record:

- a text field SQLite cannot store (a key or name with a lone surrogate such as
  ``"bad\\udc80"``) is written escaped (``backslashreplace``: ``'bad\\\\udc80'``) and a
  warning is logged; any other record that cannot be encoded is written row by row,
  escaped, or as a minimal row that says why;
- "database is locked" / "busy" errors are retried for ``retry_for`` seconds;
- when the journal cannot be written at all (disk full, I/O error, read-only file
  system, locked for longer), the records stay queued in memory and are retried at
  every flush; :meth:`Journal.raise_if_broken` raises a :class:`JournalError` naming
  the path and the cause, and the session calls it at every ``submit``,
  ``executable`` and ``Task.result()``, until a flush succeeds;
- the final flush of :meth:`Journal.close` (``Session.shutdown``) never raises for
  these ordinary failures: it logs an ERROR on the ``pilotfish`` logger naming the
  path, the cause and the keys not written, and leaves :attr:`Journal.error` set.

Pickles are trusted only from files the user owns and nobody else can write
(:func:`check_private`): resume refuses a run directory, journal or value file
that is owned by someone else or writable by group or others (whoever can write
it could make resume run their code). An existing run directory of the user's
that is group/other-writable is tightened to 0700 with a logged warning
(:func:`secure_rundir`); one owned by someone else, or a shared sticky directory
such as ``/tmp``, is refused.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sqlite3
import stat
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from ..core.workflow import RESUMABLE
from ..errors import PilotfishError

SCHEMA_VERSION = 1
VALUE_INLINE_MAX = 1 << 20

log = logging.getLogger("pilotfish")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL, ended REAL, argv TEXT, pid INTEGER, host TEXT,
    status TEXT);
CREATE TABLE IF NOT EXISTS tasks (
    key TEXT PRIMARY KEY, name TEXT, kind TEXT, deps TEXT, options TEXT, run INTEGER,
    submitted REAL, state TEXT, updated REAL, failure TEXT, value BLOB, value_path TEXT,
    attempts TEXT, history TEXT, earlier TEXT);
CREATE TABLE IF NOT EXISTS events (
    run INTEGER, time REAL, kind TEXT, name TEXT, pid INTEGER, host TEXT, message TEXT,
    data TEXT);
CREATE TABLE IF NOT EXISTS started (
    run INTEGER, key TEXT, nonce TEXT, attempt INTEGER, number INTEGER, time REAL);
CREATE INDEX IF NOT EXISTS started_key ON started (key);
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

_INSERT_EVENT = "INSERT INTO events VALUES (?,?,?,?,?,?,?,?)"

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
    "note",  # what the attempt resumed from, or why it was not charged (issue 17)
)


def _encode(history: list[tuple[float, str, str]], attempts: list[Any]) -> tuple[str, str]:
    """Compact, fast encodings (this runs once per task): attempts as JSON lists in
    ``_ATTEMPT_FIELDS`` order, history as ``time from to;...``."""
    h = ";".join([f"{t:.6f} {a} {b}" for t, a, b in history])  # a list joins faster
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
            getattr(a, "note", None),
        )
        for a in attempts
    ]
    return _json(rows), h


def _attempt_row(r: list[Any]) -> dict[str, Any]:
    """One attempt; rows written before ``note`` existed have one field less."""
    return dict(
        zip(_ATTEMPT_FIELDS, [*r, None] if len(r) == len(_ATTEMPT_FIELDS) - 1 else r, strict=True)
    )


def _decode_attempts(text: str | None) -> list[dict[str, Any]]:
    return [_attempt_row(r) for r in json.loads(text or "[]")]


def _decode_history(text: str | None) -> list[tuple[float, str, str]]:
    out = []
    for item in (text or "").split(";"):
        if item:
            t, a, b = item.split(" ")
            out.append((float(t), a, b))
    return out


class JournalError(PilotfishError):
    """The journal is missing, corrupt, foreign, from a newer pilotfish, not safe to load
    pickles from, or cannot be written."""


class JournalDamaged(JournalError):
    """The journal's file is damaged (SQLite finds corrupt pages): it is read as far as
    it can be and never written; the message says how to recover it."""


class JournalReadOnly(JournalError):
    """The journal (or its directory) cannot be written: readers work, writers are
    refused, and nothing is wrong with the file itself."""


def damaged_error(path: Path | str, cause: object) -> JournalDamaged:
    """The one message for a damaged journal (the session's, resume's and the CLI's)."""
    return JournalDamaged(
        f"the journal {path} is damaged (SQLite says: {cause}); pilotfish did not write to "
        f"it and will not. Keep it: copy it aside (cp '{path}' '{path}.damaged'), then "
        f"recover what it holds into a new run directory (mkdir R && sqlite3 '{path}' "
        "'.recover' | sqlite3 R/journal.db, or '.recover' > recovered.sql) and use "
        "--rundir R; or start a new run in another run directory"
    )


def read_only_error(path: Path | str, why: str) -> JournalReadOnly:
    """The one message for a run directory or journal that cannot be written."""
    return JournalReadOnly(
        f"{path} is read-only ({why}): a session cannot run or resume there, and nothing "
        "was written. `pilotfish status`, `failures`, `show` and `report --out FILE` read "
        f"it as it is; to run or resume, make it writable (chmod u+w '{path}') or copy the "
        "run directory somewhere writable and use that (--rundir / Session(rundir=...))"
    )


def sqlite_problem(e: sqlite3.Error, path: Path | str) -> JournalError:
    """What an SQLite error on opening or reading the journal ``path`` means, said once
    (the session, resume, the CLI and the report all say it so)."""
    name = getattr(e, "sqlite_errorname", "") or ""
    text = str(e)
    if name.startswith("SQLITE_CORRUPT") or "malformed" in text:
        return damaged_error(path, e)
    if name.startswith("SQLITE_NOTADB") or "not a database" in text:
        return JournalError(
            f"{path} is not a pilotfish journal: SQLite says '{e}' (another kind of file, "
            "or a journal whose first page is damaged). pilotfish did not write to it. "
            "Point --rundir/journal= at a pilotfish run directory; if it is a journal, copy "
            f"it aside and try: sqlite3 '{path}' '.recover' | sqlite3 recovered.db"
        )
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) or (
        "readonly" in text
    ):
        return read_only_error(path, f"SQLite says: {e}")
    return JournalError(f"cannot read the journal {path} (SQLite says: {e})")


# --------------------------------------------------------------------------- trust


def _loose(st: os.stat_result) -> str | None:
    """Why a file or directory with this stat cannot be trusted, or None."""
    uid = os.getuid()
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by you (uid {uid})"
    if st.st_mode & 0o022:
        who = " and ".join(
            w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit
        )
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _refuse(path: Path | str, what: str, problem: str) -> JournalError:
    return JournalError(
        f"refusing to load pickles from {what} {path}: it {problem}. Whoever can write it "
        "could make pilotfish run their code. If you trust its contents, make it yours "
        f"and private (`chown $(id -u) '{path}'` and `chmod go-w '{path}'`), or start "
        "a new run without resume (another --rundir)."
    )


def check_private(path: Path | str, what: str) -> None:
    """Raise :class:`JournalError` unless ``path`` is owned by the user and not writable by
    group or others (checked with ``stat``, following symlinks)."""
    problem = _loose(os.stat(path))
    if problem is not None:
        raise _refuse(path, what, problem)


def read_private(path: Path, what: str) -> bytes:
    """The bytes of ``path``, checked on the open file (no symlink, owned by the user,
    not writable by others), so a file swapped in after a check is never read."""
    check_private(path.parent, "the directory of")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if os.path.islink(path):
            raise _refuse(path, what, "is a symbolic link") from e
        raise
    with os.fdopen(fd, "rb") as f:
        problem = _loose(os.fstat(f.fileno()))
        if problem is not None:
            raise _refuse(path, what, problem)
        return f.read()


def secure_rundir(path: Path | str) -> None:
    """Make an existing run directory private, or refuse it (see the module docstring)."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise JournalError(
            f"the run directory {path} is owned by uid {st.st_uid}, not by you (uid "
            f"{os.getuid()}); pilotfish keeps pickles there, so it must be yours: choose "
            "another rundir (the default is ./.pilotfish)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        if mode & stat.S_ISVTX:
            raise JournalError(
                f"the run directory {path} is a shared directory (mode {mode:04o}, sticky); "
                "pilotfish keeps pickles there, so choose a directory of your own as rundir"
            )
        try:
            os.chmod(path, mode & 0o700)
        except OSError as e:
            raise JournalError(
                f"the run directory {path} is writable by others (mode {mode:04o}) and "
                f"cannot be made private ({e.strerror or e}); pilotfish keeps pickles "
                f"there: `chmod go-w '{path}'` or choose another rundir"
            ) from e
        log.warning(
            "pilotfish: the run directory %s was writable by others (mode %04o); made it "
            "private (mode %04o), since pilotfish loads pickles from it",
            path,
            mode,
            mode & 0o700,
        )


def _safe_text(s: str) -> str:
    """``s`` as SQLite can store it (valid UTF-8): lone surrogates backslash-escaped."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def _text(v: Any) -> str | None:
    """The one escaping rule for a text field of any record (task, attempt, failure,
    event, drain): whatever it holds becomes valid UTF-8 text, nothing is dropped. A
    str's lone surrogates and bytes that are not UTF-8 are backslash-escaped
    (``"\\udc80"``, ``"\\xff"``), NUL and every other character are kept, anything else is
    its ``str()``; None stays None."""
    if v is None or (type(v) is str and v.isascii()):
        return v
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).decode("utf-8", "backslashreplace")
    return _safe_text(v if isinstance(v, str) else str(v))


def _scrub(obj: Any) -> Any:
    """``obj`` with every str and bytes in it (keys too) made text by :func:`_text`."""
    if isinstance(obj, str | bytes | bytearray | memoryview):
        return _text(obj)
    if isinstance(obj, dict):
        return {_text(k) if isinstance(k, str | bytes) else k: _scrub(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_scrub(v) for v in obj]
    return obj


def _json(obj: Any) -> str:
    """The one rule for a JSON column: ASCII JSON whose strings are text by :func:`_text`
    (so a reader never gets a lone surrogate back); objects JSON does not know are their
    ``str()``. The fast path costs one ``json.dumps`` and one substring search."""
    try:
        out = json.dumps(obj)
    except (TypeError, ValueError):
        return json.dumps(_scrub(obj), default=str)
    # a surrogate escape: a lone surrogate, or a character beyond the BMP (then kept)
    return json.dumps(_scrub(obj)) if "\\ud" in out else out


def _escape_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_safe_text(v) if isinstance(v, str) else v for v in row)


_DATA_ERRORS = (ValueError, TypeError, OverflowError, sqlite3.InterfaceError)


def _transient(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


def _check(conn: sqlite3.Connection, path: Path, *, intact: bool = False) -> None:
    """Refuse what is not a pilotfish journal this pilotfish reads; with ``intact``, also
    a damaged one (``PRAGMA quick_check``: about 1.5 ms for a 10,000-task journal)."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check(1)")] if intact else []
    except sqlite3.DatabaseError as e:
        raise sqlite_problem(e, path) from e
    if problems and problems != ["ok"]:
        raise damaged_error(path, " ".join(problems[0].split()))  # its first problem
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

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_interval: float = 0.5,
        resume: bool = False,
        retry_for: float = 30.0,
    ) -> None:
        """``resume``: values will be loaded from it, so the journal, its directory and its
        WAL files must be private (else :class:`JournalError`); without it, an own journal
        with loose permissions is made 0600. ``retry_for``: seconds to retry a locked
        database before the journal counts as broken."""
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.values_dir = self.path.parent / "values"
        self.error: JournalError | None = None  # set while records cannot be written
        self._retry_for = retry_for
        self._cause = ""
        if resume:
            check_private(self.path.parent, "the run directory")
        existed = self.path.exists()
        if not os.access(self.path.parent, os.W_OK):
            raise read_only_error(
                self.path.parent,
                "the directory is not writable, and SQLite keeps the journal's -wal and -shm "
                "files beside it",
            )
        if existed and not os.access(self.path, os.W_OK):
            raise read_only_error(self.path, "the file is not writable")
        if not existed:
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        else:
            for side in ("", "-wal", "-shm"):
                p = Path(str(self.path) + side)
                problem = _loose(os.stat(p)) if p.exists() else None
                if problem is not None and resume:
                    raise _refuse(p, "the journal", problem)
                if problem is not None and "owned" in problem:
                    raise JournalError(
                        f"the journal {p} {problem}: pilotfish writes only its own "
                        "journals; choose another rundir or journal path"
                    )
                if problem is not None:
                    os.chmod(p, 0o600)
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:  # before anything is written: a damaged journal is never written to
            _check(self.conn, self.path, intact=existed)
        except BaseException:
            self.conn.close()
            raise
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
        #: worker, master and drain events: (time, kind, name, pid, host, message, data)
        self._events: collections.deque[tuple[Any, ...]] = collections.deque()
        #: attempts that started: (key, session nonce, attempt id, number, time)
        self._started: collections.deque[tuple[Any, ...]] = collections.deque()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pilotfish-journal", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ reading (resume)
    def done_value(self, key: str) -> bytes | None:
        """The pickled value of ``key`` if it is DONE in the journal, else None."""
        row = self.conn.execute(
            "SELECT state, value, value_path FROM tasks WHERE key=?", (_safe_text(key),)
        ).fetchone()
        if row is None or row[0] != "DONE":
            return None
        if row[1] is not None:
            return bytes(row[1])
        if row[2]:
            # only a file in this run's values/ (the row holds its name; the rundir may move)
            path = self.values_dir / Path(row[2]).name
            if not path.exists() and not path.is_symlink():
                return None
            return read_private(path, "the value file")
        return None

    def raise_if_broken(self) -> None:
        """Raise :class:`JournalError` while the journal cannot be written (the session
        calls this at every submit and result); nothing once the journal is closed."""
        err = self.error
        if err is not None and not self._closed:
            raise JournalError(str(err)) from err.__cause__

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
        self._q.append(
            (_head(task), state, list(history), list(attempts), failure, value, time.time())
        )

    def record_event(
        self,
        time_: float,
        kind: str,
        name: str = "",
        pid: int | None = None,
        host: str | None = None,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        """A worker's life (started, lost, replaced, stopped: on a batch system the
        message names its job and why it ended), every worker gone, a drain: written
        with the next flush, read by ``pilotfish status`` and the report."""
        if data:
            try:
                blob: str | None = _json(data)
            except Exception as e:  # e.g. a circular reference: say so, keep the event
                blob = json.dumps({"journal_error": f"{type(e).__name__}: {e}"})
        else:
            blob = None
        self._events.append((time_, kind, name, pid, host, message, blob))

    def record_drain(self, d: dict[str, Any]) -> None:
        """A drained worker or host (``Session(drain_after=...)``): why and which tasks."""
        self.record_event(
            d.get("time") or time.time(),
            "drained",
            d.get("name") or "",  # text by _text when written, whatever it is
            None,
            d.get("host"),
            d.get("reason") or "",
            {"kind": d.get("kind"), "keys": d.get("keys"), "attempts": d.get("attempts")},
        )

    def record_submit(self, task: Any, now: float) -> None:
        """A new task (state PENDING or later: the latest snapshot in a batch wins)."""
        self._q.append((_head(task), None, None, None, None, None, now))

    def record_started(self, key: str, nonce: str, attempt: int, number: int, now: float) -> None:
        """An attempt started (the core took the backend's Started): enough to find its
        sandbox in a later run (the session's nonce and the attempt's id make its tag)
        if the client dies before the attempt ends (:meth:`interrupted`)."""
        self._started.append((key, nonce, attempt, number, now))

    def _flush_started(self) -> None:
        st = self._started
        batch = [st.popleft() for _ in range(len(st))]
        if not batch:
            return
        try:
            self._commit(
                [(self.run, _text(k), _text(n), *rest) for k, n, *rest in batch],
                "INSERT INTO started VALUES (?,?,?,?,?,?)",
            )
        except sqlite3.Error as e:  # kept, and retried with the next flush
            st.extendleft(reversed(batch))
            log.warning("pilotfish: journal records of started attempts not written yet (%s)", e)

    def interrupted(self, key: str) -> dict[str, Any] | None:
        """resume: the latest attempt of ``key`` an earlier run started and never ended
        (that run's client died, or stopped, while it ran), or that ended lost or timed
        out while the task waited for its retry (``ended``: that outcome):
        ``{"run", "nonce", "attempt", "number", "status", "ended"}`` (``status``: that
        run's, "running" if its client died), or None (none started, or the last one
        ended so that nothing continues from it: done, failed, cancelled)."""
        return _interrupted(self.conn, _safe_text(key), self.run)

    def task_state(self, key: str) -> str | None:
        """The state ``key`` had when the journal last recorded it, or None (unknown)."""
        row = self.conn.execute(
            "SELECT state FROM tasks WHERE key=?", (_safe_text(key),)
        ).fetchone()
        return None if row is None else str(row[0])

    def started_run(self, nonce: str, attempt: int | None = None) -> tuple[int, bool] | None:
        """``(run, journaled)``: the run whose session had ``nonce`` (known once any of its
        attempts was journaled as started), and whether attempt ``attempt`` of it was; or
        None. (A resumed run found a sandbox the journal may not know of.)"""
        row = self.conn.execute(
            "SELECT run FROM started WHERE nonce=? LIMIT 1", (nonce,)
        ).fetchone()
        if row is None:
            return None
        hit = attempt is not None and (
            self.conn.execute(
                "SELECT 1 FROM started WHERE nonce=? AND attempt=? LIMIT 1", (nonce, attempt)
            ).fetchone()
            is not None
        )
        return int(row[0]), hit

    # ------------------------------------------------------------------ writer
    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._closed:
                    self._cv.wait(self._flush_interval)
                closed = self._closed
            if closed:
                return  # close() does the final flush
            try:
                self.flush()
            except BaseException:  # logged; a journal failure must never kill the session
                log.exception("pilotfish: journal write failed")

    def flush(self) -> None:
        """Write what is queued. Records that cannot be written stay queued, and
        :attr:`error` says why (see the module docstring); it never drops one."""
        self._flush_events()
        self._flush_started()
        q = self._q
        latest: dict[str, tuple[Any, ...]] = {}
        for _ in range(len(q)):
            rec = q.popleft()
            latest[rec[0][0]] = rec
        if not latest:
            return
        try:
            self._write([self._row(rec) for rec in latest.values()])
        except Exception as e:  # sqlite3.Error, OSError (values/), or a bug: keep them all
            q.extendleft(reversed(list(latest.values())))  # kept, older than what came since
            msg = (
                f"the journal {self.path} cannot be written ({type(e).__name__}: {e}); "
                f"{len(q)} task record(s) are held in memory and retried every "
                f"{self._flush_interval:g} s. Free disk space or fix the file system; until "
                "then the run's history is not on disk and resume would rerun these tasks"
            )
            cause = f"{type(e).__name__}: {e}"
            if self.error is None or self._cause != cause:  # once per cause, not per flush
                log.error("pilotfish: %s", msg)
            self._cause = cause
            err = JournalError(msg)
            err.__cause__ = e
            self.error = err
            return
        if self.error is not None:
            log.warning("pilotfish: the journal %s is written again", self.path)
            self.error = None

    def _row(self, rec: tuple[Any, ...]) -> tuple[Any, ...]:
        (
            (task_key, task_name, kind, deps, options),
            state,
            history,
            attempts,
            failure,
            value,
            now,
        ) = rec
        key, name = _safe_text(task_key), _safe_text(task_name)
        if key != task_key or name != task_name:
            log.warning(
                "pilotfish: task key %r or name %r is not valid UTF-8 text; the journal %s "
                "stores it escaped as %r / %r",
                task_key,
                task_name,
                self.path,
                key,
                name,
            )
        opts_json = self._opts_json  # TaskOptions objects are shared by many tasks
        if len(opts_json) > 4096:
            opts_json.clear()
        try:
            cached = opts_json.get(id(options))
            if cached is None or cached[0] is not options:
                cached = opts_json[id(options)] = (
                    options,
                    _json(options.to_dict()),
                )
            head = (
                key,
                name,
                kind,
                _json(list(deps)) if deps else "[]",
                cached[1],
                self.run,
            )
            if state is None:  # submitted, nothing else known yet: the cheap row
                return (*head, now, "PENDING", now, None, None, None, "[]", "")
            value_path = None
            if value is not None and len(value) > VALUE_INLINE_MAX:
                value_path, value = str(self._value_file(task_key, value)), None
            return (
                *head,
                history[0][0] if history else now,
                state,
                now,
                _json(failure.to_dict()) if failure is not None else None,
                value,
                value_path,
                *_encode(history, attempts),
            )
        except OSError:
            raise  # the values directory cannot be written: the journal is broken
        except Exception as e:
            log.warning("pilotfish: journal record of task %r is incomplete: %s", key, e)
            note = json.dumps({"journal_error": f"{type(e).__name__}: {e}"}, default=str)
            head = (key, name, str(kind), "[]", "{}", self.run)
            return (*head, now, state or "PENDING", now, note, None, None, "[]", "")

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """One transaction; on a record SQLite refuses, row by row (escaped if need be)."""
        try:
            self._commit(rows)
            return
        except _DATA_ERRORS:
            pass
        for row in rows:
            try:
                self._commit([row])
                continue
            except _DATA_ERRORS as e:
                log.warning("pilotfish: journal record of task %r escaped: %s", row[0], e)
            try:
                self._commit([_escape_row(row)])
            except _DATA_ERRORS as e:
                note = json.dumps({"journal_error": f"{type(e).__name__}: {e}"})
                minimal = (ascii(row[0]), ascii(row[1]), "call", "[]", "{}", self.run)
                self._commit([(*minimal, row[6], row[7], row[8], note, None, None, "[]", "")])

    def _commit(self, rows: list[tuple[Any, ...]], sql: str = _UPSERT) -> None:
        """Commit ``rows`` (of ``sql``: task rows by default) in one transaction, retrying
        "locked"/"busy" for ``retry_for``."""
        c = self.conn
        deadline = time.monotonic() + self._retry_for
        delay = 0.01
        while True:
            try:
                c.execute("BEGIN")
                c.executemany(sql, rows)
                c.execute("COMMIT")
                return
            except BaseException as e:
                if c.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        c.execute("ROLLBACK")
                if not _transient(e) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

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
        """The final flush. Never raises for a journal that cannot be written: it logs an
        ERROR naming the path, the cause and the tasks not journaled (:attr:`error`)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        self._thread.join()
        try:
            self.flush()
            if self.error is None:
                self._commit_run_status(status)
        except Exception as e:  # not expected: flush keeps its own errors in self.error
            err = JournalError(f"the journal {self.path} cannot be written ({e})")
            err.__cause__ = e
            self.error = err
        finally:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        if self.error is not None:
            keys = [rec[0][0] for rec in self._q]
            shown = ", ".join(repr(k) for k in keys[:20]) + (" ..." if len(keys) > 20 else "")
            log.error(
                "pilotfish: the run ended but its journal could not be completed: %s. Not "
                "journaled: %d record(s) of task(s) %s",
                self.error,
                len(keys),
                shown or "(none)",
            )

    def _event_row(self, e: tuple[Any, ...]) -> tuple[Any, ...]:
        """An event as a row: every text field through :func:`_text`, whatever it holds."""
        time_, kind, name, pid, host, message, data = e
        return (
            self.run,
            time_ if isinstance(time_, int | float) else None,
            _text(kind),
            _text(name),
            pid if isinstance(pid, int) else None,
            _text(host),
            _text(message),
            _text(data),
        )

    def _flush_events(self) -> None:
        """Write the queued events; one that cannot be written stays queued (warned
        about), and never keeps the task records of the same flush from being written."""
        ev = self._events
        batch = [ev.popleft() for _ in range(len(ev))]
        if not batch:
            return
        try:
            self._commit([self._event_row(e) for e in batch], _INSERT_EVENT)
        except Exception as e:  # kept, and retried with the next flush
            ev.extendleft(reversed(batch))
            log.warning("pilotfish: journal events not written yet (%s); retrying", e)

    def _commit_run_status(self, status: str) -> None:
        try:
            self.conn.execute(
                "UPDATE runs SET ended=?, status=? WHERE id=?", (time.time(), status, self.run)
            )
        except sqlite3.Error as e:
            err = JournalError(f"the journal {self.path} cannot record the run's end ({e})")
            err.__cause__ = e
            self.error = err


# --------------------------------------------------------------------------- reading


#: an attempt that ended so is continued by the next one (the core's rule, as outcomes)
_RESUMABLE_OUTCOMES = frozenset(c.value for c in RESUMABLE)


def _interrupted(conn: sqlite3.Connection, key: str, run: int) -> dict[str, Any] | None:
    """See :meth:`Journal.interrupted` (also :meth:`JournalReader.interrupted`)."""
    try:
        last = conn.execute(
            "SELECT run, nonce, attempt, number FROM started WHERE key=? AND run!=? "
            "ORDER BY run DESC, rowid DESC LIMIT 1",
            (key, run),
        ).fetchone()
    except sqlite3.OperationalError:  # a journal written before attempts' starts were
        return None
    if last is None:
        return None
    r, nonce, aid, number = int(last[0]), str(last[1]), int(last[2]), int(last[3])
    row = conn.execute(
        "SELECT run, state, attempts, earlier FROM tasks WHERE key=?", (key,)
    ).fetchone()
    attempts: list[dict[str, Any]] = []
    state = None
    if row is not None:
        if row[0] == r:
            if row[1] == "DONE":
                return None
            attempts, state = _decode_attempts(row[2]), row[1]
        for line in (row[3] or "").splitlines():  # the task's rows of earlier runs
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                old = json.loads(line)
                if old.get("run") == r:
                    if old.get("state") == "DONE":
                        return None
                    state = old.get("state")
                    attempts = [
                        a if isinstance(a, dict) else _attempt_row(a)
                        for a in old.get("attempts") or []
                    ]
    ended = [a.get("outcome") for a in attempts if a.get("id") == aid and a.get("outcome")]
    waiting = False
    if ended:
        # it ended; if it ended so that its retry continues from it (lost, timed out) and
        # the task was waiting for that retry when the run ended, the retry is this run's
        if ended[0] not in _RESUMABLE_OUTCOMES or state in ("DONE", "FAILED", "CANCELLED"):
            return None
        waiting = True
    status = conn.execute("SELECT status FROM runs WHERE id=?", (r,)).fetchone()
    return {
        "run": r,
        "nonce": nonce,
        "attempt": aid,
        "number": number,
        "status": str(status[0]) if status and status[0] else "running",
        "ended": ended[0] if waiting else None,
    }


class JournalReader:
    """Read-only access for the command line and reports."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise JournalError(
                f"no journal at {self.path}: run a workflow first (pilotfish run SCRIPT), or "
                "point --rundir at the run directory it used"
            )
        #: True when read as an immutable file (its directory cannot be written, so SQLite
        #: cannot make the -shm file a WAL reader needs): what is committed to the main
        #: file is read, a -wal file left by a killed run is not
        self.immutable = False
        uri = "file:" + urllib.parse.quote(str(self.path.absolute())) + "?mode=ro"
        try:
            self.conn = sqlite3.connect(uri, uri=True)
        except sqlite3.Error as e:
            raise sqlite_problem(e, self.path) from e
        try:
            try:
                _check(self.conn, self.path)
            except JournalReadOnly:  # a read-only directory (or file system)
                self.conn.close()
                self.conn = sqlite3.connect(uri + "&immutable=1", uri=True)
                self.immutable = True
                _check(self.conn, self.path)
        except BaseException:
            self.conn.close()
            raise
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

    def events(self, kind: str | None = None) -> list[sqlite3.Row]:
        """Worker, master and drain events, oldest first (none in a journal from before
        they were recorded)."""
        try:
            if kind is None:
                return list(self.conn.execute("SELECT * FROM events ORDER BY time"))
            return list(
                self.conn.execute("SELECT * FROM events WHERE kind=? ORDER BY time", (kind,))
            )
        except sqlite3.OperationalError:  # no events table: an older journal
            return []

    def workers(self) -> list[dict[str, Any]]:
        """Each worker's last known state: name, pid, host, the event that said it, when,
        and its message (on a batch system: the job and why it ended), run by run."""
        last: dict[tuple[int, str], dict[str, Any]] = {}
        for e in self.events():
            if e["kind"] in ("gone", "drained") or not e["name"]:
                continue
            d = last.setdefault((e["run"], e["name"]), {"run": e["run"], "name": e["name"]})
            d.update(state=e["kind"], time=e["time"], pid=e["pid"] or d.get("pid"))
            if e["host"]:
                d["host"] = e["host"]
            if e["message"] or e["kind"] != "started":
                d["message"] = e["message"] or ""
        return list(last.values())

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
        check_private(self.path, "the journal")
        data = row["value"]
        if data is None and row["value_path"]:
            data = read_private(
                self.path.parent / "values" / Path(row["value_path"]).name, "the value file"
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
            rows = [_attempt_row(r) for r in old["attempts"] or []]
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


def _head(task: Any) -> tuple[str, str, str, tuple[str, ...], Any]:
    """What a record needs of a ``pilotfish.Task``: (key, name, kind, dependency keys,
    options). Not the Task itself: a queued record must not keep a finished task, and
    with it its result, alive until the next flush."""
    deps = task._deps
    return (
        task.key,
        task.name,
        task._kind,
        tuple(d.key for d in deps) if deps else (),
        task.options,
    )
