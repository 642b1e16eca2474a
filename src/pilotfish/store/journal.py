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

This module is the writer, :class:`Journal`. Readers (the CLI, the report, and resume
through the writer's own) use :class:`~pilotfish.store.reader.JournalReader`, which never
writes; what the file holds, how it is checked on opening and the one escaping rule for
text are in :mod:`pilotfish.store.schema`; which files pickles are loaded from, in
:mod:`pilotfish.store.trust`.

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
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.workflow import unpack_history
from .reader import JournalReader
from .schema import (
    CLIENT_DIED,
    JournalError,
    as_json,
    as_text,
    check_journal,
    client_gone,
    create_schema,
    encode,
    escape_row,
    read_only_error,
    safe_text,
)
from .trust import check_private, loose, refuse

__all__ = ["VALUE_INLINE_MAX", "Journal", "JournalError"]

VALUE_INLINE_MAX = 1 << 20

log = logging.getLogger("pilotfish")

# One row per task. A row from an earlier run is kept in ``earlier`` (one JSON line per
# run) when the task is submitted again (resume), so no attempt is ever forgotten.
_UPSERT = """
INSERT INTO tasks (key, name, kind, deps, options, run, submitted, state, updated, failure,
                   value, value_path, attempts, history, call)
VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
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
    history = excluded.history, call = coalesce(excluded.call, tasks.call)
"""

_INSERT_EVENT = "INSERT INTO events VALUES (?,?,?,?,?,?,?,?)"

_DATA_ERRORS = (ValueError, TypeError, OverflowError, sqlite3.InterfaceError)


def _transient(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


class _Rows:
    """How records become rows: every text field through the one escaping rule, options
    encoded once per ``TaskOptions`` object, large values in files of ``values/``."""

    def __init__(self, path: Path, run: int) -> None:
        self.path = path
        self.run = run
        self.values_dir = path.parent / "values"
        self._opts_json: dict[int, tuple[Any, str]] = {}

    def task(self, rec: tuple[Any, ...]) -> tuple[Any, ...]:
        """A task record (of :meth:`Journal.record` or :meth:`Journal.record_submit`) as
        a row of ``tasks``; a value above ``VALUE_INLINE_MAX`` is written to its file here
        (OSError: the journal is broken); a record that cannot be encoded, as a row that
        says why."""
        (
            (task_key, task_name, kind, deps, options, call),
            state,
            history,
            attempts,
            failure,
            value,
            now,
        ) = rec
        if isinstance(history, bytes):  # as the core keeps it (Journal.record)
            history = unpack_history(history)
        key, name = safe_text(task_key), safe_text(task_name)
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
                    as_json(options.to_dict()),
                )
            head = (
                key,
                name,
                kind,
                as_json(list(deps)) if deps else "[]",
                cached[1],
                self.run,
            )
            call = as_text(call)
            if state is None:  # submitted, nothing else known yet: the cheap row
                return (*head, now, "PENDING", now, None, None, None, "[]", "", call)
            value_path = None
            if value is not None and len(value) > VALUE_INLINE_MAX:
                value_path, value = str(self._value_file(task_key, value)), None
            return (
                *head,
                history[0][0] if history else now,
                state,
                now,
                as_json(failure.to_dict()) if failure is not None else None,
                value,
                value_path,
                *encode(history, attempts),
                call,
            )
        except OSError:
            raise  # the values directory cannot be written: the journal is broken
        except Exception as e:
            log.warning("pilotfish: journal record of task %r is incomplete: %s", key, e)
            note = json.dumps({"journal_error": f"{type(e).__name__}: {e}"}, default=str)
            head = (key, name, str(kind), "[]", "{}", self.run)
            return (*head, now, state or "PENDING", now, note, None, None, "[]", "", None)

    def event(self, e: tuple[Any, ...]) -> tuple[Any, ...]:
        """An event as a row: every text field through :func:`as_text`, whatever it holds."""
        time_, kind, name, pid, host, message, data = e
        return (
            self.run,
            time_ if isinstance(time_, int | float) else None,
            as_text(kind),
            as_text(name),
            pid if isinstance(pid, int) else None,
            as_text(host),
            as_text(message),
            as_text(data),
        )

    def minimal(self, row: tuple[Any, ...], e: BaseException) -> tuple[Any, ...]:
        """The last resort for a task row SQLite refuses even escaped: its key and name in
        ASCII, its state and times, and why (``journal_error``)."""
        note = json.dumps({"journal_error": f"{type(e).__name__}: {e}"})
        head = (ascii(row[0]), ascii(row[1]), "call", "[]", "{}", self.run)
        return (*head, row[6], row[7], row[8], note, None, None, "[]", "", None)

    def _value_file(self, key: str, value: bytes) -> Path:
        self.values_dir.mkdir(mode=0o700, exist_ok=True)
        name = hashlib.blake2b(key.encode(), digest_size=16).hexdigest() + ".pkl"
        path = self.values_dir / name
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        return path


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
        self.error: JournalError | None = None  # set while records cannot be written
        self._retry_for = retry_for
        self._cause = ""
        existed = self._prepare_file(resume)
        self.conn = self._open(existed)
        #: what resume reads (a DONE task's value, an interrupted attempt), on this
        #: connection, through the reader the command line uses
        self.reader = JournalReader(self.path, conn=self.conn)
        self.run = self._begin_run()
        self._rows = _Rows(self.path, self.run)
        self._flush_interval = flush_interval
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

    def _prepare_file(self, resume: bool) -> bool:
        """Refuse a run directory or journal that cannot be written, or (``resume``) is
        not private; create the journal file (0600) if it is not there, or make the
        user's own loose one private. Returns whether it existed."""
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
            return False
        for side in ("", "-wal", "-shm"):
            p = Path(str(self.path) + side)
            problem = loose(os.stat(p)) if p.exists() else None
            if problem is not None and resume:
                raise refuse(p, "the journal", problem)
            if problem is not None and "owned" in problem:
                raise JournalError(
                    f"the journal {p} {problem}: pilotfish writes only its own "
                    "journals; choose another rundir or journal path"
                )
            if problem is not None:
                os.chmod(p, 0o600)
        return True

    def _open(self, existed: bool) -> sqlite3.Connection:
        """Connect, check (an ``existed`` journal also for damage, before anything is
        written: a damaged journal is never written to), and make the schema."""
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            check_journal(conn, self.path, intact=existed)
        except BaseException:
            conn.close()
            raise
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        create_schema(conn, time.time())
        for side in ("-wal", "-shm"):
            p = Path(str(self.path) + side)
            if p.exists():
                os.chmod(p, 0o600)
        return conn

    def _begin_run(self) -> int:
        """This run's row (status "running" until :meth:`close`), and its id. Runs of
        this host still "running" whose client process is gone (SIGKILLed, crashed: it
        never closed the journal) become "client died" first."""
        for rid, pid, host in self.conn.execute(
            "SELECT id, pid, host FROM runs WHERE status='running'"
        ).fetchall():
            if client_gone(pid, host):
                self.conn.execute("UPDATE runs SET status=? WHERE id=?", (CLIENT_DIED, rid))
        cur = self.conn.execute(
            "INSERT INTO runs (started, argv, pid, host, status) VALUES (?, ?, ?, ?, 'running')",
            (time.time(), json.dumps(sys.argv), os.getpid(), os.uname().nodename),
        )
        return int(cur.lastrowid or 0)

    # ------------------------------------------------------------------ reading (resume)
    def earlier(self, key: str) -> tuple[str | None, str | None, bytes | None]:
        """State, failure category and kept DONE value of ``key`` in the journal
        (:meth:`JournalReader.earlier`)."""
        return self.reader.earlier(key)

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
        history: bytes | list[tuple[float, str, str]],
        attempts: Sequence[Any],
        failure: Any = None,
        value: bytes | None = None,
    ) -> None:
        """Snapshot of one task (a ``pilotfish.Task``): on submit, on a failed attempt,
        and when final. Serialised by the writer thread, off the session's hot path;
        the latest snapshot of a key in a batch wins, so a task that finishes within one
        flush interval costs one row."""
        if not isinstance(history, bytes):  # packed (the core's), else a list to copy
            history = list(history)
        self._q.append((_head(task), state, history, list(attempts), failure, value, time.time()))

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
                blob: str | None = as_json(data)
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
            d.get("name") or "",  # text by as_text when written, whatever it is
            None,
            d.get("host"),
            d.get("reason") or "",
            {"kind": d.get("kind"), "keys": d.get("keys"), "attempts": d.get("attempts")},
        )

    def record_submit(self, task: Any, now: float, call: str | None = None) -> None:
        """A new task (state PENDING or later: the latest snapshot in a batch wins);
        ``call``: the description of its call or argv (later records carry none, and the
        row keeps this one)."""
        self._q.append((_head(task, call), None, None, None, None, None, now))

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
                [(self.run, as_text(k), as_text(n), *rest) for k, n, *rest in batch],
                "INSERT INTO started VALUES (?,?,?,?,?,?)",
            )
        except sqlite3.Error as e:  # kept, and retried with the next flush
            st.extendleft(reversed(batch))
            log.warning("pilotfish: journal records of started attempts not written yet (%s)", e)

    def interrupted(self, key: str) -> dict[str, Any] | None:
        """resume: the latest attempt of ``key`` an earlier run started and left running
        or waiting for its retry, or None (:meth:`JournalReader.interrupted`)."""
        return self.reader.interrupted(key, self.run)

    def task_state(self, key: str) -> str | None:
        """The state ``key`` had when the journal last recorded it, or None (unknown)."""
        return self.reader.task_state(key)

    def started_run(self, nonce: str, attempt: int | None = None) -> tuple[int, bool] | None:
        """The run whose session had ``nonce``, and whether ``attempt`` of it was journaled
        as started (:meth:`JournalReader.started_run`)."""
        return self.reader.started_run(nonce, attempt)

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
            key = rec[0][0]
            before = latest.get(key)
            if before is not None and rec[0][5] is None and before[0][5] is not None:
                # the description of the call comes with the submit record only (the task
                # does not keep it): the latest record of the batch carries it on
                rec = ((*rec[0][:5], before[0][5]), *rec[1:])
            latest[key] = rec
        if not latest:
            return
        try:
            task_row = self._rows.task
            self._write([task_row(rec) for rec in latest.values()])
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
                self._commit([escape_row(row)])
            except _DATA_ERRORS as e:
                self._commit([self._rows.minimal(row, e)])

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

    def _flush_events(self) -> None:
        """Write the queued events; one that cannot be written stays queued (warned
        about), and never keeps the task records of the same flush from being written."""
        ev = self._events
        batch = [ev.popleft() for _ in range(len(ev))]
        if not batch:
            return
        try:
            self._commit([self._rows.event(e) for e in batch], _INSERT_EVENT)
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


def _head(
    task: Any, call: str | None = None
) -> tuple[str, str, str, tuple[str, ...], Any, str | None]:
    """What a record needs of a ``pilotfish.Task``: (key, name, kind, dependency keys,
    options, the description of its call, given with the submit record only). Not the
    Task itself: a queued record must not keep a finished task, and with it its result,
    alive until the next flush."""
    deps = task._deps
    return (
        task.key,
        task.name,
        "output" if task._output_of is not None else task._kind,
        tuple(d.key for d in deps) if deps else (),
        task.options,
        call,
    )
