"""What the journal's file holds, and whether this pilotfish may open it.

One place for the rules the writer (:mod:`.journal`) and the reader (:mod:`.reader`)
share:

- the schema (:func:`create_schema`: the tables, made if missing, so a journal from an
  older pilotfish gains the tables it lacks; :data:`SCHEMA_VERSION`) and the encodings
  of a task row's attempts and history (:func:`encode`, :func:`decode_attempts`,
  :func:`decode_history`: rows written before an attempt's ``note`` existed read too);
- opening and checking (:func:`check_journal`: not a pilotfish journal, from a newer
  pilotfish, or damaged by ``PRAGMA quick_check``), and what an SQLite error means
  (:func:`sqlite_problem`: damaged, not a database, read-only), each said in one message
  (:func:`damaged_error`, :func:`read_only_error`);
- the one escaping rule for text (:func:`as_text`, :func:`as_json`): whatever a record
  holds is stored as valid UTF-8 text, nothing is dropped.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import PilotfishError

SCHEMA_VERSION = 1
#: a run's status when a later session found it "running" with its client gone
CLIENT_DIED = "client died"


def client_gone(pid: int | None, host: str | None) -> bool:
    """Is the client of a run marked "running" surely gone: it ran on this host and its
    process no longer exists? (Another host's, or another user's process: not sure.)"""
    if not pid or host != os.uname().nodename:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL, ended REAL, argv TEXT, pid INTEGER, host TEXT,
    status TEXT);
CREATE TABLE IF NOT EXISTS tasks (
    key TEXT PRIMARY KEY, name TEXT, kind TEXT, deps TEXT, options TEXT, run INTEGER,
    submitted REAL, state TEXT, updated REAL, failure TEXT, value BLOB, value_path TEXT,
    attempts TEXT, history TEXT, earlier TEXT, call TEXT);
CREATE TABLE IF NOT EXISTS events (
    run INTEGER, time REAL, kind TEXT, name TEXT, pid INTEGER, host TEXT, message TEXT,
    data TEXT);
CREATE TABLE IF NOT EXISTS started (
    run INTEGER, key TEXT, nonce TEXT, attempt INTEGER, number INTEGER, time REAL);
CREATE INDEX IF NOT EXISTS started_key ON started (key);
"""


def create_schema(conn: sqlite3.Connection, created: float) -> None:
    """Make the tables that are missing (all of them in a new journal), and the columns
    added since (``tasks.call``: the schema version stays, a pilotfish before it reads
    such a journal), and record the schema version and, in a new journal, when it was
    ``created``."""
    conn.executescript(_SCHEMA)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(tasks)")}
    if "call" not in columns:  # a journal from before issue 25: readable by both
        conn.execute("ALTER TABLE tasks ADD COLUMN call TEXT")
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (str(created),))


# --------------------------------------------------------------------------- row format

ATTEMPT_FIELDS = (
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


def encode(history: list[tuple[float, str, str]], attempts: list[Any]) -> tuple[str, str]:
    """Compact, fast encodings (this runs once per task): attempts as JSON lists in
    ``ATTEMPT_FIELDS`` order, history as ``time from to;...``."""
    h = ";".join(["%.6f %s %s" % step for step in history])  # noqa: UP031 (faster here)
    return "[" + ",".join([_attempt_json(a) for a in attempts]) + "]", h


_NAMES: dict[str, str] = {}  # worker, host and outcome names as JSON strings


def _name(v: str | None) -> str:
    """``v`` as a JSON string by :func:`as_json`'s rule; the few names that recur
    (workers, hosts, outcomes) are encoded once."""
    if v is None:
        return "null"
    out = _NAMES.get(v)
    if out is None:
        if len(_NAMES) > 4096:
            _NAMES.clear()
        out = _NAMES[v] = as_json(v)
    return out


def _num(v: Any) -> str:
    return "null" if v is None else repr(v)


def _attempt_json(a: Any) -> str:
    """One attempt as a JSON list. Most attempts (no failure, no note, plain numbers)
    are written here directly: ``json.dumps`` of the row cost a no-op task ~4 us."""
    failure, note = a.failure, getattr(a, "note", None)
    if (
        failure is None
        and note is None
        and type(a.number) is int
        and type(a.id) is int
        and type(a.dispatched) is float
        and (a.pid is None or type(a.pid) is int)
        and (a.started is None or type(a.started) is float)
        and (a.ended is None or type(a.ended) is float)
    ):
        return (
            f"[{a.number},{a.id},{a.dispatched!r},{_name(a.worker)},{_name(a.host)},"
            f"{_num(a.pid)},{_num(a.started)},{_num(a.ended)},{_name(a.outcome)},null,null]"
        )
    return as_json(
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
            failure.to_dict() if failure is not None else None,
            note,
        )
    )


def attempt_row(r: list[Any]) -> dict[str, Any]:
    """One attempt; rows written before ``note`` existed have one field less."""
    return dict(
        zip(ATTEMPT_FIELDS, [*r, None] if len(r) == len(ATTEMPT_FIELDS) - 1 else r, strict=True)
    )


def decode_attempts(text: str | None) -> list[dict[str, Any]]:
    return [attempt_row(r) for r in json.loads(text or "[]")]


def decode_history(text: str | None) -> list[tuple[float, str, str]]:
    out = []
    for item in (text or "").split(";"):
        if item:
            t, a, b = item.split(" ")
            out.append((float(t), a, b))
    return out


# --------------------------------------------------------------------------- errors


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


def check_journal(conn: sqlite3.Connection, path: Path, *, intact: bool = False) -> None:
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


# --------------------------------------------------------------------------- text


def safe_text(s: str) -> str:
    """``s`` as SQLite can store it (valid UTF-8): lone surrogates backslash-escaped."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def as_text(v: Any) -> str | None:
    """The one escaping rule for a text field of any record (task, attempt, failure,
    event, drain): whatever it holds becomes valid UTF-8 text, nothing is dropped. A
    str's lone surrogates and bytes that are not UTF-8 are backslash-escaped
    (``"\\udc80"``, ``"\\xff"``), NUL and every other character are kept, anything else is
    its ``str()``; None stays None."""
    if v is None or (type(v) is str and v.isascii()):
        return v
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).decode("utf-8", "backslashreplace")
    return safe_text(v if isinstance(v, str) else str(v))


def _scrub(obj: Any) -> Any:
    """``obj`` with every str and bytes in it (keys too) made text by :func:`as_text`."""
    if isinstance(obj, str | bytes | bytearray | memoryview):
        return as_text(obj)
    if isinstance(obj, dict):
        return {as_text(k) if isinstance(k, str | bytes) else k: _scrub(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_scrub(v) for v in obj]
    return obj


def as_json(obj: Any) -> str:
    """The one rule for a JSON column: ASCII JSON whose strings are text by
    :func:`as_text` (so a reader never gets a lone surrogate back); objects JSON does not
    know are their ``str()``. The fast path costs one ``json.dumps`` and one substring
    search."""
    try:
        out = json.dumps(obj)
    except (TypeError, ValueError):
        return json.dumps(_scrub(obj), default=str)
    # a surrogate escape: a lone surrogate, or a character beyond the BMP (then kept)
    return json.dumps(_scrub(obj)) if "\\ud" in out else out


def escape_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with each str in it made storable by :func:`safe_text`."""
    return tuple(safe_text(v) if isinstance(v, str) else v for v in row)
