"""The HTML report (``pilotfish report --html``): one self-contained file, from the journal.

A reader of the journal only: this module imports :mod:`pilotfish.store.reader` (the reader,
and :mod:`~pilotfish.store.schema` for its errors), :mod:`pilotfish.digest` (the failure
digest), :mod:`pilotfish.runtime.files` (reading a file safely), :mod:`.report_parts`
(what each part of the page looks like) and the standard library. The page it writes::

    header        journal, runs, wall time
    timeline      one lane per (run, host, worker); each attempt a bar coloured *and
                  patterned* by outcome (a legend with labels: never colour alone); a lost
                  worker's lane ends with a marker naming its signal or exit code (a
                  timeout's with its own marker), and the lane of the worker that started
                  after it says so; no label overlaps another or leaves the timeline (cut
                  with an ellipsis, the whole in its tooltip). Drawn on a canvas (only
                  the visible window), so 10,000 attempts scroll and zoom
    counts        tasks by state, failed tasks by category
    digest        :func:`pilotfish.digest.failure_digest`, each group a filter
    failures      one row per failed task (key, category, attempts, message); a row opens
                  in place (``<details>``) to the complete message, traceback and stderr
                  (read from the kept file), the attempts, and for a dependency failure
                  its root; a root says how many tasks it took with it

Nothing is fetched from anywhere: styles and the script are inline, the data is a JSON
block, and a Content-Security-Policy (``default-src 'none'``, the script allowed by its
hash) forbids any request. Every task string (keys, messages, tracebacks, stderr) is
HTML-escaped, with control characters made visible as in the CLI.

Size is bounded: at most ``ROWS_MAX`` failed tasks are listed (all are counted and in the
digest), and their details share a budget (:mod:`.report_parts` says how), so a
10,000-task run stays well under 5 MB. Stderr files are read only inside the run
directory (:mod:`.report_parts` too).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import html
import importlib.resources
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from ..digest import clean, exit_label, failure_digest, fmt_dur, fmt_time, signature
from ..runtime.files import NotRegularFile, open_regular
from ..store.reader import JournalReader
from ..store.rundir import LOCK_NAME
from ..store.schema import JournalError
from .report_parts import (
    DETAIL_BUDGET,
    GROUPS_MAX,
    OUTCOMES,
    PIECE_MAX,
    counts_html,
    digest_html,
    escaped,
    failed_rows,
    legend_html,
    mark_attempts,
    outcome_css,
    program_of_outputs,
    root_of,
    runs_html,
    through_outputs,
)

__all__ = [
    "DETAIL_BUDGET",
    "GROUPS_MAX",
    "PIECE_MAX",
    "ROWS_MAX",
    "build_report",
    "check_target",
    "write_report",
]

ROWS_MAX = 2000  # failed tasks listed (the rest are counted)
_MARKED = {"worker_lost": "lost", "runtime_lost": "runtime lost", "timeout": "killed: timeout"}


def _json_block(data: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


# --------------------------------------------------------------------------- model


def _lanes(
    tasks: list[dict[str, Any]], t0: float, now: float
) -> tuple[list[dict[str, Any]], list[list[int]], list[dict[str, Any]]]:
    """Lanes (one per run, host and worker, in order of their first attempt), the bars
    ``[lane, start_ms, end_ms, outcome_index, task_index, attempt_number, fate]`` (fate: 1
    the task failed with it, 2 it was retried, else 0) and the markers
    ``{lane, t, label, kind, key}`` where a lane's attempt ended with a lost worker or
    master, or a timeout."""
    outcome_ids = {name: i for i, name in enumerate(OUTCOMES)}
    raw: list[tuple[tuple[Any, str, str], float, float, str, int, int, dict[str, Any] | None]] = []
    fate_ids = {"": 0, "failed": 1, "retried": 2}
    fates: list[int] = []
    for ti, t in enumerate(tasks):
        for a in t["attempts"]:
            if not a.get("started") or not a.get("worker"):
                continue  # never started: no bar (the task's table row says so)
            lane = (a.get("run"), str(a.get("host") or "?"), str(a["worker"]))
            outcome = a.get("shown") or a.get("outcome") or "running"
            if outcome not in outcome_ids:
                outcome = "running"
            end = a.get("ended") or now
            raw.append(
                (lane, a["started"], end, outcome, ti, a.get("number") or 0, a.get("failure"))
            )
            fates.append(fate_ids.get(a.get("fate") or "", 0))
    first: dict[tuple[Any, str, str], float] = {}
    last: dict[tuple[Any, str, str], float] = {}
    for lane, start, end, *_ in raw:
        first[lane] = min(first.get(lane, start), start)
        last[lane] = max(last.get(lane, end), end)
    order = sorted(first, key=lambda ln: (ln[0] or 0, ln[1], _natural(ln[2]), first[ln]))
    index = {ln: i for i, ln in enumerate(order)}
    lanes = [
        {"run": ln[0], "host": ln[1], "worker": ln[2], "label": f"{ln[2]} @ {ln[1]}", "after": ""}
        for ln in order
    ]
    bars = [
        [index[ln], round((s - t0) * 1000), round((e - t0) * 1000), outcome_ids[o], ti, n, fate]
        for (ln, s, e, o, ti, n, _f), fate in zip(raw, fates, strict=True)
    ]
    bars.sort(key=lambda b: (b[0], b[1]))
    markers: list[dict[str, Any]] = []
    losses: list[tuple[float, tuple[Any, str, str]]] = []
    for ln, _s, e, o, ti, _n, f in raw:
        if o not in _MARKED:
            continue
        f = f or {}
        what = _MARKED[o]
        if o != "timeout" and (f.get("returncode") is not None or f.get("signal")):
            how = exit_label(f.get("returncode"), f.get("signal"))
            rc = f.get("returncode")
            what = f"{what}: {how}" + (f" ({rc})" if f.get("signal") and rc is not None else "")
        markers.append(
            {
                "lane": index[ln],
                "t": round((e - t0) * 1000),
                "label": f"{ln[2]} {what}",
                "kind": o,
                "key": clean(tasks[ti]["key"], one_line=True),
            }
        )
        if o == "worker_lost":
            losses.append((e, ln))
    # the replacement of a lost worker (the journal has no worker events): on the same
    # run and host, the first lane to begin after the loss whose name sorts after every
    # worker seen before it (local workers are numbered w1, w2, ...; a new one is w3)
    taken: set[tuple[Any, str, str]] = set()
    for when, lost in sorted(losses):
        before = [ln for ln in order if ln[:2] == lost[:2] and first[ln] < when]
        newest = max((_natural(ln[2]) for ln in before), default=())
        later = [
            ln
            for ln in order
            if ln[:2] == lost[:2]
            and ln not in taken
            and first[ln] >= when
            and _natural(ln[2]) > newest
        ]
        if later:
            ln = min(later, key=lambda c: first[c])
            taken.add(ln)
            lanes[index[ln]]["after"] = f"new after {lost[2]} was lost"
    return lanes, bars, markers


def _natural(name: str) -> tuple[Any, ...]:
    """``w2`` before ``w10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _collect(reader: JournalReader) -> dict[str, Any]:
    """The tasks (not the ``.output(name)`` references: journal kind "output", a program's
    file, not a task the user submitted; the journal's counts leave them out too) with
    their attempts, and the runs. A dependency failure whose input or root is such a
    reference names the reference's program instead (:func:`program_of_outputs`)."""
    tasks: list[dict[str, Any]] = []
    rows = reader.tasks()
    programs = program_of_outputs(
        (str(r["key"]), str(r["kind"]), r["deps"]) for r in rows if r["kind"] == "output"
    )
    for row in rows:
        if row["kind"] == "output":
            continue
        failure = json.loads(row["failure"]) if row["failure"] else None
        if failure is not None and "journal_error" in failure and "category" not in failure:
            failure = None
        if failure is not None:
            failure = through_outputs(failure, programs)
        attempts = reader.attempts(row["key"])
        mark_attempts(
            attempts, row["state"], row["run"], functools.partial(reader.transitions, row["key"])
        )
        tasks.append(
            {
                "key": row["key"],
                "name": row["name"],
                "kind": row["kind"],
                "state": row["state"],
                "submitted": row["submitted"],
                "updated": row["updated"],
                "failure": failure,
                "attempts": attempts,
            }
        )
    return {"tasks": tasks, "runs": [dict(r) for r in reader.runs()]}


# --------------------------------------------------------------------------- page


def build_report(reader: JournalReader, *, now: float | None = None) -> str:
    """The whole report of the journal ``reader`` reads, as one HTML string."""
    now = time.time() if now is None else now
    data = _collect(reader)
    tasks, runs = data["tasks"], data["runs"]
    failed = [t for t in tasks if t["state"] == "FAILED" and t["failure"]]
    records = [dict(t["failure"], key=t["key"]) for t in failed]
    digest = failure_digest(records)
    t0, t_end = _time_span(tasks, now)
    lanes, bars, markers = _lanes(tasks, t0, t_end)
    ranked = _rank_failed(records, failed, digest)
    listed = ranked[:ROWS_MAX]
    anchors = {str(t["key"]): i for i, (_g, _n, t) in enumerate(listed)}
    rows = failed_rows(listed, records, reader.path.parent, anchors)
    payload = _timeline_data(tasks, runs, (lanes, bars, markers), anchors, t0, t_end)
    more = ""
    if len(ranked) > len(listed):
        more = (
            f'<p class="note">{len(ranked) - len(listed):,} more failed task(s) are not '
            "listed in this page (they are counted above and in the digest): "
            "<code>pilotfish failures</code> lists them all.</p>"
        )
    return _page(
        reader,
        now,
        tasks=tasks,
        runs=runs,
        failed=failed,
        legend=legend_html(bars),
        digest_section=digest_html(digest, anchors),
        rows=rows,
        more=more,
        payload=payload,
    )


def _time_span(tasks: list[dict[str, Any]], now: float) -> tuple[float, float]:
    """The timeline's start and end: the first attempt's start, the last time known."""
    starts = [a["started"] for t in tasks for a in t["attempts"] if a.get("started")]
    ends = [a["ended"] for t in tasks for a in t["attempts"] if a.get("ended")]
    t0 = min(starts) if starts else now
    # an attempt with no end (a run still going, or its client killed) is drawn up to the
    # last time the journal knows of
    t_end = max(ends + starts) if starts else now
    for t in tasks:
        if t.get("updated") and any(a.get("started") and not a.get("ended") for a in t["attempts"]):
            t_end = max(t_end, t["updated"])
    return t0, t_end


def _rank_failed(
    records: list[dict[str, Any]], failed: list[dict[str, Any]], digest: dict[str, Any]
) -> list[tuple[int, int, dict[str, Any]]]:
    """The failed tasks as (digest group, submission order, task): first the root causes
    (tasks that failed on their own) by digest group (largest first), then submission
    order; then the dependency failures, grouped by their root in the order the roots
    are listed (roots not listed last, by key), each group in submission order."""
    group_index = {(g["category"], g["signature"]): i for i, g in enumerate(digest["groups"])}
    dep_group = next(
        (i for i, g in enumerate(digest["groups"]) if g["category"] == "dependency_failed"), -1
    )
    own: list[tuple[int, int, dict[str, Any]]] = []
    deps: list[tuple[int, int, dict[str, Any]]] = []
    for n, (rec, t) in enumerate(zip(records, failed, strict=True)):
        cat = str(rec.get("category") or "unknown").lower()
        if cat == "dependency_failed":
            deps.append((dep_group, n, t))
        else:
            own.append((group_index.get((cat, signature(rec)), len(group_index)), n, t))
    own.sort(key=lambda x: (x[0], x[1]))
    place = {str(t["key"]): i for i, (_g, _n, t) in enumerate(own)}
    deps.sort(key=lambda x: (place.get(root_of(x[2]), len(place)), root_of(x[2]), x[1]))
    return own + deps


def _timeline_data(
    tasks: list[dict[str, Any]],
    runs: list[Any],
    drawn: tuple[Any, list[Any], Any],
    anchors: dict[str, int],
    t0: float,
    t_end: float,
) -> dict[str, Any]:
    """What the page's script draws the timeline from (``drawn``: lanes, bars and
    markers of :func:`_lanes`)."""
    lanes, bars, markers = drawn
    task_of_bar = sorted({b[4] for b in bars})
    keys = {ti: str(tasks[ti]["key"]) for ti in task_of_bar}
    failed_anchor = {ti: anchors.get(str(tasks[ti]["key"]), -1) for ti in task_of_bar}
    return {
        "t0": t0,
        "span": max(1, round((max(t_end, t0) - t0) * 1000)),
        "outcomes": [
            {"id": name, "label": v[0], "colour": v[1], "pattern": v[2], "shape": v[3]}
            for name, v in OUTCOMES.items()
        ],
        "lanes": lanes,
        "bars": bars,
        "markers": markers,
        "keys": {str(ti): clean(k, one_line=True) for ti, k in keys.items()},
        "rows": {str(ti): a for ti, a in failed_anchor.items() if a >= 0},
        "runs": [{"id": r["id"], "t": round(((r["started"] or t0) - t0) * 1000)} for r in runs],
    }


def _csp(script: str) -> str:
    """The page's Content-Security-Policy: nothing from outside, only its own script."""
    digest_b64 = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        f"script-src 'sha256-{digest_b64}'; base-uri 'none'; form-action 'none'"
    )


def _page(
    reader: JournalReader,
    now: float,
    *,
    tasks: list[dict[str, Any]],
    runs: list[Any],
    failed: list[dict[str, Any]],
    legend: str,
    digest_section: str,
    rows: list[str],
    more: str,
    payload: dict[str, Any],
) -> str:
    """The page: its head, the timeline, counts, digest and failed tasks sections."""
    wall, run_lines = runs_html(runs)
    script = _SCRIPT
    csp = _csp(script)
    n_failed = len(failed)
    title = f"pilotfish report — {len(tasks):,} tasks, {n_failed:,} failed"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>{_STYLE}{outcome_css()}</style></head>
<body>
<header><h1>{html.escape(title)}</h1>
<p class="meta">journal <code>{escaped(reader.path, one_line=True)}</code> · {len(runs)} run(s) ·
wall time {fmt_dur(wall)} · report written {fmt_time(now)}</p>
<ul class="runs">{run_lines}</ul></header>
<section id="timeline"><h2>timeline</h2>
<p class="help">One lane per worker and host; each attempt is a bar, its outcome shown by
colour <em>and</em> pattern (legend below); a marker with the outcome's shape and a label
marks where a worker was lost, a program was killed at its timeout or the runtime was lost. Scroll
sideways; zoom with the buttons or Ctrl+wheel; hover a bar for its task, click a failed
one to open its row.</p>
<div class="tools"><button type="button" id="zin">zoom in</button>
<button type="button" id="zout">zoom out</button><button type="button" id="zfit">fit</button>
<span id="zlabel"></span></div>
<div class="legend">{legend}</div>
<div class="tl"><div class="labels" id="labels"></div>
<div class="scroller" id="scroller"><div class="spacer" id="spacer">
<canvas id="tl-canvas"></canvas><div class="axis" id="axis"></div>
<div class="markers" id="markers"></div></div></div></div>
<div id="tip" role="tooltip" hidden></div>
<noscript><p class="note">The timeline needs JavaScript; the tables below do not.</p></noscript>
</section>
<section id="counts"><h2>counts</h2>{counts_html(tasks, [t["failure"] for t in failed])}</section>
<section id="digest"><h2>failure digest</h2>{digest_section}</section>
<section id="failures"><h2>failed tasks</h2>
<p class="help">Click a row to see its complete message, traceback and stderr.
<input type="search" id="filter" placeholder="filter by key or message" aria-label="filter">
<button type="button" id="showall" hidden>show all groups</button></p>
<div class="ftable"><div class="fhead"><span class="k">key</span><span class="c">category</span>
<span class="a">attempts</span><span class="m">message</span></div>
{"".join(rows) if rows else "<p>No failed tasks.</p>"}</div>{more}</section>
<script type="application/json" id="pf-data">{_json_block(payload)}</script>
<script>{script}</script>
</body></html>
"""


#: in the head of every page this module writes (and wrote): only such a file is replaced
_MARK = b"<title>pilotfish report"

#: what pilotfish keeps in a run directory: a report is never written over or into them
_KEPT = (
    "journal.db",
    "journal.db-wal",
    "journal.db-shm",
    "journal.db-journal",
    "values",
    "sandboxes",
    "results",
    "staged",
    LOCK_NAME,
)


def check_target(journal: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Where a report of ``journal`` may be written, or :class:`JournalError` saying why
    not. The rule (``pilotfish report --help`` states it): never the journal itself, its
    ``-wal``/``-shm``/``-journal`` files or lock, nor anything inside ``values/``,
    ``sandboxes/``, ``results/`` or ``staged/`` of its run directory; an existing file
    is replaced only if it is a report pilotfish wrote (``_MARK`` in its first 4 KiB)."""
    target = Path(out)
    if target.is_dir():
        target = target / "report.html"
    where = target.parent.resolve() / target.name  # the link itself is what is replaced
    journal = Path(journal)
    rundir = journal.parent.resolve()
    kept = [rundir / k for k in _KEPT] + [
        journal.resolve().parent / (journal.name + side)
        for side in ("", "-wal", "-shm", "-journal", ".lock")
    ]
    for k in kept:
        if where == k or where.is_relative_to(k):
            raise JournalError(
                f"refusing to write the report to {target}: it would replace {k}, which "
                "pilotfish keeps for the run. Give --out another file (the default is "
                "RUNDIR/report.html)"
            )
    if os.path.lexists(where):
        try:
            with open_regular(where) as fh:
                ours = _MARK in fh.read(4096)
        except OSError as e:
            why = e.strerror if isinstance(e, NotRegularFile) else f"cannot read it ({e})"
            raise JournalError(
                f"refusing to write the report to {target}: it exists and is {why}; "
                "give --out a new file name"
            ) from e
        if not ours:
            raise JournalError(
                f"refusing to write the report to {target}: it exists and is not a report "
                "pilotfish wrote (only those are replaced); give --out a new file name, or "
                "move that file away yourself"
            )
    return target


def write_report(journal: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the report of ``journal`` to ``out`` (atomically; mode 0600, since it holds
    the run's messages and stderr) and return its path. ``out`` is checked first by
    :func:`check_target` (a directory means ``out/report.html``)."""
    target = check_target(journal, out)
    reader = JournalReader(journal)
    try:
        page = build_report(reader)
    finally:
        reader.close()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def _asset(name: str) -> str:
    """The page's stylesheet or script, kept beside this module as package data (CSS and
    JavaScript are edited and linted as what they are, not as Python strings)."""
    return importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


_STYLE = _asset("report.css")
_SCRIPT = _asset("report.js")
