"""Resume: what a task of this run takes from an earlier run of the same run directory.

A task already DONE there is restored (its journaled value, nothing runs); a task whose
attempt was interrupted there (the client died, or that run ended before its retry
started) continues that attempt: its first attempt's lineage names it, so
``resume_files`` and ``previous_attempt_files()`` find its sandbox.
"""

from __future__ import annotations

import logging
import pickle
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.programs import find_sandbox, newest_sandbox, sandbox_index
from ..store.schema import CLIENT_DIED

if TYPE_CHECKING:
    from ..store.journal import Journal
    from .task import Task

log = logging.getLogger("pilotfish")

__all__ = ["SUMMARY", "Earlier", "Resumer"]

#: the attribute of the log record that carries a resumed run's summary (``pilotfish
#: resume`` prints it itself)
SUMMARY = "pilotfish_resume_summary"

#: the ``make_lineage`` ``earlier`` of an interrupted attempt, and the note of a Python
#: task's attempt that continues it
Earlier = tuple[tuple[str, int, int | None, str], str]


#: a task DONE before whose value the journal did not keep (``journal_values``,
#: ``keep_result``): it runs again
NOT_KEPT = "done, value not kept"


def _was(state: str | None, category: str | None) -> str:
    """What a task not taken from the journal was there: "failed <category>",
    :data:`NOT_KEPT`, "unfinished <state>" or "new"."""
    if state is None:
        return "new"
    if state == "FAILED":
        return f"failed {category}"
    if state == "DONE":
        return NOT_KEPT
    return f"unfinished {state.lower()}"


class Resumer:
    """Reads the journal (and the sandboxes) of earlier runs for a resumed session.

    It takes the session's ``lock`` around each journal read (the journal is shared with
    the driver), never around a scan of the sandboxes. ``pending`` holds, per task id,
    the earlier attempt its first attempt continues, until
    that attempt is dispatched (or the task ends without one)."""

    def __init__(self, journal: Journal, rundir: str, nonce: str, lock: threading.RLock) -> None:
        self.journal = journal
        self.lock = lock
        self.root = Path(rundir) / "sandboxes"
        self.nonce = nonce
        self.pending: dict[int, Earlier] = {}
        self._index: dict[str, list[tuple[int, Path]]] | None = None
        #: what each task submitted in this run was before: "done" (taken from the
        #: journal), "failed <category>", "unfinished <state>", "new"
        self.before: Counter[str] = Counter()

    def restore_value(self, task: Task) -> tuple[bytes, Any] | None:
        """The journaled value of a task already DONE with this key, if any."""
        with self.lock:
            state, category, data = self.journal.earlier(task.key)
            if data is None and task._output_of is None:
                self.before[_was(state, category)] += 1
        if data is None:
            if task._key_unstable is not None:
                log.warning(
                    "pilotfish resume: task %s is not DONE in the journal %s, perhaps because "
                    "its automatic key is not the same in every process: %s. It runs again; "
                    "give it a key (pilotfish.task(fn, key=...)) so resume can find it.",
                    task.key,
                    self.journal.path,
                    task._key_unstable,
                )
            return None
        try:
            restored = data, pickle.loads(data)
        except Exception:
            log.warning(
                "pilotfish: cannot unpickle the journaled value of %s; rerunning it", task.key
            )
            self.before["unfinished DONE but its value could not be read"] += 1
            return None
        if task._output_of is None:
            self.before["done"] += 1
        return restored

    def summary(self) -> str | None:
        """What this resumed run took from the journal and what it ran, in one line; None
        if it submitted nothing."""
        b = self.before
        total = sum(b.values())
        if not total:
            return None
        failed = {k.removeprefix("failed "): n for k, n in b.items() if k.startswith("failed ")}
        unfinished = {
            k.removeprefix("unfinished "): n for k, n in b.items() if k.startswith("unfinished ")
        }

        def detail(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {n}" for k, n in sorted(d.items(), key=lambda kv: -kv[1]))

        parts = [f"{b['done']} DONE before, taken from the journal (not run)"]
        n = sum(failed.values())
        parts.append(f"{n} failed before, run again" + (f" ({detail(failed)})" if n else ""))
        if b[NOT_KEPT]:
            parts.append(
                f"{b[NOT_KEPT]} DONE before without a kept value (journal_values, "
                "keep_result), run again"
            )
        n = sum(unfinished.values())
        if n:
            parts.append(f"{n} unfinished before, run again ({detail(unfinished)})")
        parts.append(f"{b['new']} new, run for the first time")
        return (
            f"pilotfish resume of {self.journal.path.parent}: {total} task(s): "
            + "; ".join(parts)
            + ". Resume reruns every task that did not end DONE with its value kept, "
            "failed ones included."
        )

    def report(self) -> None:
        """Say :meth:`summary` once, at the end of the run (the ``pilotfish`` logger,
        WARNING: seen without any logging set up; ``pilotfish resume`` prints it)."""
        text = self.summary()
        if text is not None:
            log.warning("%s", text, extra={SUMMARY: text})

    def earlier_attempt(self, task: Task) -> Earlier | None:
        """The attempt of an earlier run that ``task`` (not DONE) was running when that
        run's client died, which its first attempt continues from (``resume_files``,
        ``previous_attempt_files()``); its sandbox is left in place. Found in the journal
        (attempts are journaled when they start); an attempt started within the journal's
        last flush interval may not be there: then the task's newest sandbox (found by the
        key's own safe_dirname prefix, never a path made from the key) if its attempt is
        unknown to the journal."""
        try:
            found = self._interrupted(task.key)
        except (sqlite3.Error, OSError) as e:
            log.warning(
                "pilotfish resume: cannot tell whether task %s was interrupted in an earlier "
                "run (%s); it starts fresh",
                task.key,
                e,
            )
            return None
        if found is None:
            return None
        nonce, aid, number, how = found
        which = (f"attempt {number} " if number is not None else "an attempt ") + how
        tag = f"{nonce}a{aid}"
        box = find_sandbox(self.root, task.key, tag) or find_sandbox(
            self.root, task.key, tag + "c0"
        )
        note = f"previous_attempt_files() is {which}: " + (
            f"{box}, left in place" if box else "it made no scratch directory here"
        )
        return (nonce, aid, number, how), note

    def _interrupted(self, key: str) -> tuple[str, int, int | None, str] | None:
        """(nonce, attempt id, number or None, how it was found) of ``key``'s interrupted
        attempt in an earlier run, from the journal, else from its newest sandbox."""
        with self.lock:
            hit = self.journal.interrupted(key)
            state = self.journal.task_state(key)
        if hit is not None:
            why = (
                f"it ended {hit['ended']} and its retry had not started"
                if hit.get("ended")
                else "interrupted"
            ) + (
                " when the client died"
                if hit["status"] in ("running", CLIENT_DIED)
                else f" when that run ended ({hit['status']})"
            )
            return hit["nonce"], hit["attempt"], hit["number"], f"of run {hit['run']} ({why})"
        if state in ("DONE", "FAILED", "CANCELLED"):
            return None  # that run ended the task: nothing was interrupted
        if self._index is None:  # one scan for the whole resumed run
            self._index = sandbox_index(self.root)
        found = newest_sandbox(self.root, key, self._index)
        if found is None or not found[1] or found[1] == self.nonce:
            return None
        _, nonce, aid = found
        with self.lock:
            known = self.journal.started_run(nonce, aid)
        if known is not None and known[1]:
            return None  # a journaled attempt that ended, not an interrupted one
        run = f"run {known[0]}" if known else "an earlier run"
        return (
            nonce,
            aid,
            None,
            f"of {run} (interrupted when the client died; its start was not journaled: "
            f"its sandbox was found by searching {self.root})",
        )

    # ---------------------------------------------------------------- dispatch
    def for_dispatch(self, tid: int, own: Any) -> Earlier | None:
        """The earlier attempt a dispatch of ``tid`` continues: only while the task has no
        attempt of its own to continue (``own``, the core's ``resume``)."""
        if own is None:
            return self.pending.get(tid)
        self.pending.pop(tid, None)
        return None

    def ended(self, tid: int) -> None:
        self.pending.pop(tid, None)
