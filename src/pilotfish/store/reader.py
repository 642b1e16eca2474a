"""Reading the journal: :class:`JournalReader`, which never writes.

The command line and the report open one on a run directory's journal; the writer
(:class:`pilotfish.store.journal.Journal`) keeps one on its own connection, so resume
asks the journal what it holds (a DONE task's value, an attempt an earlier run left
running) through the same methods, and the tests read what resume reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

from ..core.workflow import RESUMABLE
from .schema import (
    CLIENT_DIED,
    JournalError,
    JournalReadOnly,
    attempt_row,
    check_journal,
    client_gone,
    decode_attempts,
    decode_history,
    safe_text,
    sqlite_problem,
)
from .trust import check_private, read_private

#: an attempt that ended so is continued by the next one (the core's rule, as outcomes)
_RESUMABLE_OUTCOMES = frozenset(c.value for c in RESUMABLE)


class JournalReader:
    """Read-only access for the command line, reports and resume."""

    def __init__(
        self, path: str | os.PathLike[str], *, conn: sqlite3.Connection | None = None
    ) -> None:
        """Open the journal at ``path`` read-only; ``conn``: the writer's own connection
        instead (open and checked; this reader then never closes it)."""
        self.path = Path(path)
        #: True when read as an immutable file (its directory cannot be written, so SQLite
        #: cannot make the -shm file a WAL reader needs): what is committed to the main
        #: file is read, a -wal file left by a killed run is not
        self.immutable = False
        self._private = False  # the journal file was found private (values may be read)
        self._shared = conn is not None
        self.conn = conn if conn is not None else self._connect()
        self.conn.row_factory = sqlite3.Row

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise JournalError(
                f"no journal at {self.path}: run a workflow first (pilotfish run SCRIPT), or "
                "point --rundir at the run directory it used"
            )
        uri = "file:" + urllib.parse.quote(str(self.path.absolute())) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True)
        except sqlite3.Error as e:
            raise sqlite_problem(e, self.path) from e
        try:
            try:
                check_journal(conn, self.path)
            except JournalReadOnly:  # a read-only directory (or file system)
                conn.close()
                conn = sqlite3.connect(uri + "&immutable=1", uri=True)
                self.immutable = True
                check_journal(conn, self.path)
        except BaseException:
            conn.close()
            raise
        return conn

    def counts(self) -> dict[str, int]:
        """Tasks per state; an ``.output()`` reference (kind "output") is not counted: it
        is a reference to a program's file, not a task the user submitted."""
        return {
            r["state"]: r["n"]
            for r in self.conn.execute(
                "SELECT state, count(*) AS n FROM tasks WHERE kind != 'output' GROUP BY state"
            )
        }

    def failure_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.conn.execute(
            "SELECT failure FROM tasks WHERE state='FAILED' AND kind != 'output'"
        ):
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
        died = {
            int(r["id"])
            for r in self.runs()
            if r["status"] == CLIENT_DIED
            or (r["status"] == "running" and client_gone(r["pid"], r["host"]))
        }
        for e in self.events():
            if e["kind"] in ("gone", "drained") or not e["name"]:
                continue
            d = last.setdefault((e["run"], e["name"]), {"run": e["run"], "name": e["name"]})
            d.update(state=e["kind"], time=e["time"], pid=e["pid"] or d.get("pid"))
            if e["host"]:
                d["host"] = e["host"]
            if e["message"] or e["kind"] != "started":
                d["message"] = e["message"] or ""
        for (run, _name), d in last.items():  # its client died: nobody saw the end
            if run in died and d.get("state") == "started":
                d["state"] = "unknown"
                d["message"] = "its client died; how this worker ended was not recorded"
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

    def task_state(self, key: str) -> str | None:
        """The state ``key`` had when the journal last recorded it, or None (unknown)."""
        row = self.conn.execute("SELECT state FROM tasks WHERE key=?", (safe_text(key),)).fetchone()
        return None if row is None else str(row[0])

    def done_value(self, key: str) -> bytes | None:
        """The pickled value of ``key`` if it is DONE in the journal, else None (see
        :meth:`earlier`)."""
        return self.earlier(key)[2]

    def earlier(self, key: str) -> tuple[str | None, str | None, bytes | None]:
        """What an earlier run left of ``key``, in one read: its state (None: not in the
        journal), its failure's category (if it FAILED), and its pickled value if it is
        DONE and the value was kept. The value is read only from a private journal and a
        private file in its ``values/`` (the row holds the file's name; the run directory
        may have moved), else :class:`JournalError`."""
        row = self.conn.execute(
            "SELECT state, value, value_path, failure FROM tasks WHERE key=?", (safe_text(key),)
        ).fetchone()
        if row is None:
            return None, None, None
        state = str(row[0])
        if state != "DONE":
            category = None
            if state == "FAILED":
                try:
                    category = str(json.loads(row[3])["category"]) if row[3] else "unknown"
                except (ValueError, TypeError, KeyError):
                    category = "unknown"
            return state, category, None
        if not self._private:
            check_private(self.path, "the journal")
            self._private = True
        if row[1] is not None:
            return state, None, bytes(row[1])
        if row[2]:
            path = self.path.parent / "values" / Path(row[2]).name
            if not path.exists() and not path.is_symlink():
                return state, None, None
            return state, None, read_private(path, "the value file")
        return state, None, None

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
            rows = [attempt_row(r) for r in old["attempts"] or []]
            out.extend(dict(a, run=old["run"]) for a in rows)
        out.extend(dict(a, run=row["run"]) for a in decode_attempts(row["attempts"]))
        return out

    def transitions(self, key: str) -> list[tuple[int, float, str, str]]:
        """(run, time, from, to) for every state transition of ``key``, in order."""
        row = self.task(key)
        if row is None:
            return []
        out: list[tuple[int, float, str, str]] = []
        for line in (row["earlier"] or "").splitlines():
            old = json.loads(line)
            out.extend((old["run"], t, a, b) for t, a, b in decode_history(old["history"]))
        out.extend((row["run"], t, a, b) for t, a, b in decode_history(row["history"]))
        return out

    def failures(self) -> list[dict[str, Any]]:
        """Each failed task's failure (not an ``.output()`` reference's: its program's
        failure is there, and a task that used the reference names that program as its
        root)."""
        out = []
        for r in self.tasks("FAILED"):
            if r["kind"] == "output":
                continue
            f = json.loads(r["failure"]) if r["failure"] else {}
            f["attempts"] = len(json.loads(r["attempts"] or "[]"))
            f["name"] = r["name"]
            f["call"] = r["call"] if "call" in r.keys() else None  # noqa: SIM118 (sqlite3.Row)
            out.append(f)
        return out

    # ------------------------------------------------------------------ resume
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

    def interrupted(self, key: str, this_run: int) -> dict[str, Any] | None:
        """resume: the latest attempt of ``key`` a run before ``this_run`` started and never
        ended (that run's client died, or stopped, while it ran), or that ended lost or
        timed out while the task waited for its retry (``ended``: that outcome):
        ``{"run", "nonce", "attempt", "number", "status", "ended"}`` (``status``: that
        run's, "running" if its client died), or None (none started, or the last one
        ended so that nothing continues from it: done, failed, cancelled)."""
        key = safe_text(key)
        try:
            last = self.conn.execute(
                "SELECT run, nonce, attempt, number FROM started WHERE key=? AND run!=? "
                "ORDER BY run DESC, rowid DESC LIMIT 1",
                (key, this_run),
            ).fetchone()
        except sqlite3.OperationalError:  # a journal written before attempts' starts were
            return None
        if last is None:
            return None
        r, nonce, aid, number = int(last[0]), str(last[1]), int(last[2]), int(last[3])
        found = self._in_run(key, r)
        if found is None:  # DONE in that run
            return None
        state, attempts = found
        ended = [a.get("outcome") for a in attempts if a.get("id") == aid and a.get("outcome")]
        waiting = False
        if ended:
            # it ended; if it ended so that its retry continues from it (lost, timed out) and
            # the task was waiting for that retry when the run ended, the retry is this run's
            if ended[0] not in _RESUMABLE_OUTCOMES or state in ("DONE", "FAILED", "CANCELLED"):
                return None
            waiting = True
        status = self.conn.execute("SELECT status FROM runs WHERE id=?", (r,)).fetchone()
        return {
            "run": r,
            "nonce": nonce,
            "attempt": aid,
            "number": number,
            "status": str(status[0]) if status and status[0] else "running",
            "ended": ended[0] if waiting else None,
        }

    def _in_run(self, key: str, run: int) -> tuple[str | None, list[dict[str, Any]]] | None:
        """The state and attempts ``key``'s row had in run ``run`` (its current row, or
        one of its earlier runs'), ``(None, [])`` if unknown; None if it was DONE."""
        row = self.conn.execute(
            "SELECT run, state, attempts, earlier FROM tasks WHERE key=?", (key,)
        ).fetchone()
        attempts: list[dict[str, Any]] = []
        state = None
        if row is None:
            return state, attempts
        if row[0] == run:
            if row[1] == "DONE":
                return None
            attempts, state = decode_attempts(row[2]), row[1]
        for line in (row[3] or "").splitlines():  # the task's rows of earlier runs
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                old = json.loads(line)
                if old.get("run") == run:
                    if old.get("state") == "DONE":
                        return None
                    state = old.get("state")
                    attempts = [
                        a if isinstance(a, dict) else attempt_row(a)
                        for a in old.get("attempts") or []
                    ]
        return state, attempts

    def close(self) -> None:
        """Close the connection this reader opened (never the writer's it was given)."""
        if not self._shared:
            self.conn.close()
