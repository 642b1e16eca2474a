"""The HTML report (``pilotfish report --html``): one self-contained file, from the journal.

A reader of the journal only: this module imports :mod:`pilotfish.store.reader` (the reader,
and :mod:`~pilotfish.store.schema` for its errors), :mod:`pilotfish.digest` (the failure
digest) and the standard library, nothing of the runtime. The page it writes::

    header        journal, runs, wall time
    timeline      one lane per (run, host, worker); each attempt a bar coloured *and
                  patterned* by outcome (a legend with labels: never colour alone); a lost
                  worker's lane ends with a marker naming its signal or exit code, and
                  the lane of the worker that started after it says so. Drawn on a
                  canvas (only the visible window), so 10,000 attempts scroll and zoom
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

Size is bounded: the text of the failure details shares a budget (``DETAIL_BUDGET``),
each piece cut to its share (at most ``PIECE_MAX``) with the path to the whole file or
``pilotfish show KEY``; at most ``ROWS_MAX`` failed tasks are listed (all are counted and
in the digest). A 10,000-task run stays well under 5 MB.

Stderr files are read only inside the run directory (the journal's directory, after
resolving symbolic links), so a journal from elsewhere cannot make the page embed files
such as ``~/.ssh/id_rsa``. If the run directory was moved, a recorded path is looked up
again below ``sandboxes/`` or ``results/`` of where the journal is now.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import importlib.resources
import json
import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..digest import clean, exit_label, failure_digest, fmt_dur, fmt_time, headline, signature
from ..runtime.files import NotRegularFile, open_regular, read_tail
from ..store.reader import JournalReader
from ..store.rundir import LOCK_NAME
from ..store.schema import JournalError

__all__ = [
    "DETAIL_BUDGET",
    "GROUPS_MAX",
    "PIECE_MAX",
    "ROWS_MAX",
    "build_report",
    "check_target",
    "write_report",
]

DETAIL_BUDGET = 3 * 512 * 1024  # characters of (escaped) failure detail text in a page
PIECE_MAX = 256 * 1024  # one traceback or stderr shown whole up to this size
PIECE_MIN = 256  # the share of each piece never goes below this
ROWS_MAX = 2000  # failed tasks listed (the rest are counted)
GROUPS_MAX = 200  # digest groups listed (the rest are counted)
HEADLINE_MAX = 160  # characters of a message in a collapsed row

# outcome -> (label, colour (Okabe-Ito, safe for colour-blind readers), pattern drawn on
# top, a symbol used in the legend and the tables). Pattern and label carry the meaning.
OUTCOMES: dict[str, tuple[str, str, str, str]] = {
    "done": ("done", "#009E73", "solid", "✓"),
    "user_error": ("user error", "#D55E00", "slash", "!"),
    "command_failed": ("command failed", "#E69F00", "backslash", "✗"),
    "missing_output": ("missing output", "#E69F00", "cross", "∅"),
    "timeout": ("timeout", "#CC79A7", "horizontal", "⌛"),
    "worker_lost": ("worker lost", "#000000", "dots", "☠"),
    "runtime_lost": ("runtime lost", "#0072B2", "vertical", "⚡"),
    "environment": ("environment", "#F0E442", "grid", "⚙"),
    "invalid_task": ("invalid task", "#56B4E9", "cross", "?"),
    "dependency_failed": ("dependency failed", "#7f7f7f", "slash", "↑"),
    "cancelled": ("cancelled", "#BBBBBB", "hollow", "⊘"),
    "dropped": ("dropped", "#DDDDDD", "hollow", "·"),
    "running": ("unfinished", "#FFFFFF", "hollow", "…"),
}
_MARKED = {"worker_lost": "lost", "runtime_lost": "runtime lost", "timeout": "killed: timeout"}


def _h(value: object, *, one_line: bool = False) -> str:
    """Task data as HTML text: control characters made visible, then escaped."""
    return html.escape(clean(value, one_line=one_line), quote=True)


def _json_block(data: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n >= 1024 else f"{n} bytes"


# --------------------------------------------------------------------------- budget


class _Budget:
    """Shares ``DETAIL_BUDGET`` characters among the pieces of text still to come."""

    def __init__(self, total: int, pieces: int) -> None:
        self.left = total
        self.pieces = max(1, pieces)

    def share(self) -> int:
        return max(PIECE_MIN, min(PIECE_MAX, self.left // self.pieces))

    def spend(self, n: int) -> None:
        self.left = max(0, self.left - n)
        self.pieces = max(1, self.pieces - 1)


def _cut_middle(text: str, limit: int, key: str) -> tuple[str, str]:
    """``text`` whole, or its head and tail with a note saying what is left out."""
    if len(text) <= limit:
        return text, ""
    half = limit // 2
    omitted = len(text) - 2 * half
    note = (
        f"{omitted:,} characters in the middle are not in this page; "
        f"`pilotfish show {key}` prints it whole"
    )
    return text[:half] + f"\n[... {omitted:,} characters omitted ...]\n" + text[-half:], note


# --------------------------------------------------------------------------- files


def _locate(recorded: str, rundir: Path) -> tuple[Path | None, str]:
    """The file a journal names, if it may be read: inside the run directory after
    resolving links (or found again there below sandboxes/ or results/)."""
    root = rundir.resolve()
    candidates = [Path(recorded)]
    parts = Path(recorded).parts
    for anchor in ("sandboxes", "results"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            candidates.append(rundir.joinpath(*parts[i:]))
    outside = False
    for c in candidates:
        try:
            real = c.resolve()
        except (OSError, RuntimeError):
            continue
        if not real.is_relative_to(root):
            outside = outside or real.exists()
            continue
        if real.exists():  # read only if regular (a FIFO is named, never opened)
            return real, ""
    if outside:
        return None, f"not read: it is outside the run directory {rundir}"
    return None, "not found here (on another host, or removed)"


def _read_tail(path: Path, limit: int) -> tuple[str, int, bool]:
    """The last ``limit`` bytes of ``path`` (from a whole line), its size, and whether
    that is all of it. Never reads more than ``limit`` bytes, nor anything but a regular
    file (:func:`pilotfish.runtime.files.read_tail`: a FIFO raises, it never blocks)."""
    data, size, start = read_tail(path, limit)
    text = data.decode("utf-8", errors="replace")
    if start and "\n" in text:
        text = text[text.index("\n") + 1 :]
    return text, size, start == 0


# --------------------------------------------------------------------------- model


def _lanes(
    tasks: list[dict[str, Any]], t0: float, now: float
) -> tuple[list[dict[str, Any]], list[list[int]], list[dict[str, Any]]]:
    """Lanes (one per run, host and worker, in order of their first attempt), the bars
    ``[lane, start_ms, end_ms, outcome_index, task_index, attempt_number]`` and the markers
    ``{lane, t, label, kind}`` where a lane ends with a lost worker or master."""
    outcome_ids = {name: i for i, name in enumerate(OUTCOMES)}
    raw: list[tuple[tuple[Any, str, str], float, float, str, int, int, dict[str, Any] | None]] = []
    for ti, t in enumerate(tasks):
        for a in t["attempts"]:
            if not a.get("started") or not a.get("worker"):
                continue  # never started: no bar (the task's table row says so)
            lane = (a.get("run"), str(a.get("host") or "?"), str(a["worker"]))
            outcome = a.get("outcome") or "running"
            if outcome not in outcome_ids:
                outcome = "running"
            end = a.get("ended") or now
            raw.append(
                (lane, a["started"], end, outcome, ti, a.get("number") or 0, a.get("failure"))
            )
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
        [index[ln], round((s - t0) * 1000), round((e - t0) * 1000), outcome_ids[o], ti, n]
        for ln, s, e, o, ti, n, _f in raw
    ]
    bars.sort(key=lambda b: (b[0], b[1]))
    markers: list[dict[str, Any]] = []
    losses: list[tuple[float, tuple[Any, str, str]]] = []
    for ln, _s, e, o, _ti, _n, f in raw:
        if o not in _MARKED:
            continue
        f = f or {}
        what = _MARKED[o]
        if o != "timeout" and (f.get("returncode") is not None or f.get("signal")):
            how = exit_label(f.get("returncode"), f.get("signal"))
            rc = f.get("returncode")
            what = f"{what}: {how}" + (f" ({rc})" if f.get("signal") and rc is not None else "")
        markers.append(
            {"lane": index[ln], "t": round((e - t0) * 1000), "label": f"{ln[2]} {what}", "kind": o}
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
    tasks: list[dict[str, Any]] = []
    for row in reader.tasks():
        failure = json.loads(row["failure"]) if row["failure"] else None
        if failure is not None and "journal_error" in failure and "category" not in failure:
            failure = None
        tasks.append(
            {
                "key": row["key"],
                "name": row["name"],
                "kind": row["kind"],
                "state": row["state"],
                "submitted": row["submitted"],
                "updated": row["updated"],
                "failure": failure,
                "attempts": reader.attempts(row["key"]),
            }
        )
    return {"tasks": tasks, "runs": [dict(r) for r in reader.runs()]}


# --------------------------------------------------------------------------- HTML pieces


def _badge(outcome: str) -> str:
    label, _colour, _pattern, symbol = OUTCOMES.get(outcome, (outcome, "", "", "?"))
    cls = outcome if outcome in OUTCOMES else "other"
    return f'<span class="badge o-{cls}"><b aria-hidden="true">{symbol}</b> {_h(label)}</span>'


def _outcome_css() -> str:
    return "".join(f".o-{name}{{--c:{v[1]}}}" for name, v in OUTCOMES.items())


def _counts_html(tasks: list[dict[str, Any]], failures: list[dict[str, Any]]) -> str:
    states = Counter(t["state"] or "?" for t in tasks)
    cats = Counter(str(f.get("category") or "unknown") for f in failures)
    total = max(1, len(tasks))
    out = ['<div class="counts"><table class="count"><caption>tasks by state</caption>']
    for state in ("DONE", "FAILED", "CANCELLED", "RUNNING", "RETRYING", "READY", "PENDING"):
        if states.get(state):
            n = states.pop(state)
            out.append(_count_row(state.lower(), n, total))
    for state, n in sorted(states.items()):
        out.append(_count_row(str(state).lower(), n, total))
    out.append(f'<tr class="total"><th>total</th><td>{len(tasks):,}</td><td></td></tr></table>')
    out.append('<table class="count"><caption>failed tasks by category</caption>')
    if not cats:
        out.append('<tr><td colspan="3">no failed tasks</td></tr>')
    for cat, n in cats.most_common():
        out.append(
            f"<tr><th>{_badge(cat)}</th><td>{n:,}</td>"
            f'<td><span class="bar o-{cat if cat in OUTCOMES else "other"}" '
            f'style="width:{100 * n / max(1, len(failures)):.1f}%"></span>'
            "</td></tr>"
        )
    out.append("</table></div>")
    return "".join(out)


def _count_row(label: str, n: int, total: int) -> str:
    return (
        f'<tr class="s-{html.escape(label)}"><th>{html.escape(label)}</th><td>{n:,}</td>'
        f'<td><span class="bar" style="width:{100 * n / total:.1f}%"></span></td></tr>'
    )


def _digest_html(digest: dict[str, Any], anchors: dict[str, int]) -> str:
    groups = digest["groups"]
    if not groups:
        return "<p>No failed tasks.</p>"
    out = [
        f"<p>{digest['failed']:,} failed task(s) in {len(groups):,} group(s), largest first. "
        'Click a group to list only its tasks below.</p><ol class="digest">'
    ]
    for gi, g in enumerate(groups[:GROUPS_MAX]):
        extra = []
        if g["roots"]:
            roots = ", ".join(
                f"{_key_link(r['key'], anchors)} ({r['count']:,})" for r in g["roots"]
            )
            more = g["root_count"] - len(g["roots"])
            extra.append(f"roots: {roots}" + (f" and {more:,} more" if more > 0 else ""))
        else:
            extra.append("e.g. " + ", ".join(_key_link(k, anchors) for k in g["examples"]))
        if g["took_down"]:
            extra.append(f"root of {g['took_down']:,} dependency failure(s)")
        out.append(
            f'<li class="group" data-group="{gi}"><button type="button" class="gfilter" '
            f'data-group="{gi}"><b>{g["count"]:,} task(s)</b></button> '
            f"{_badge(g['category'])} <code>{_h(g['signature'], one_line=True)}</code>"
            f'<div class="sub">{" · ".join(extra)}</div></li>'
        )
    out.append("</ol>")
    if len(groups) > GROUPS_MAX:
        rest = sum(g["count"] for g in groups[GROUPS_MAX:])
        out.append(
            f'<p class="note">and {len(groups) - GROUPS_MAX:,} smaller group(s) of {rest:,} '
            "task(s) in all: <code>pilotfish failures --group</code> lists every group.</p>"
        )
    return "".join(out)


def _key_link(key: str, anchors: dict[str, int]) -> str:
    i = anchors.get(key)
    if i is None:
        return f"<code>{_h(key, one_line=True)}</code>"
    return f'<a href="#f{i}"><code>{_h(key, one_line=True)}</code></a>'


def _pre(text: str, cls: str, note: str = "", budget: _Budget | None = None) -> str:
    """``text`` in a ``<pre>``, escaped; what it costs in the page is taken from
    ``budget`` (escaping makes quotes and brackets longer)."""
    body = _h(text)
    if budget is not None:
        budget.spend(len(body))
    n = f'<div class="note">{_h(note)}</div>' if note else ""
    return f'{n}<pre class="{cls}">{body}</pre>'


def _stderr_html(f: dict[str, Any], rundir: Path, budget: _Budget, key: str) -> str:
    recorded = f.get("stderr_path")
    if not recorded:
        tail = f.get("stderr_tail")
        if not tail:
            return ""
        text, note = _cut_middle(str(tail), budget.share(), key)
        return f"<h4>stderr (last lines, from the record)</h4>{_pre(text, 'stderr', note, budget)}"
    path, why = _locate(str(recorded), rundir)
    head = f"<h4>stderr <code>{_h(recorded, one_line=True)}</code></h4>"
    if path is None:
        return f'{head}<div class="note">{_h(why)}</div>'
    try:
        text, size, whole = _read_tail(path, budget.share())
    except NotRegularFile as e:
        return f'{head}<div class="note">{_h(e.strerror)}</div>'
    except OSError as e:
        return f'{head}<div class="note">cannot read it: {_h(e)}</div>'
    if whole:
        note = f"complete ({_kib(size)})"
    else:
        note = (
            f"the last {_kib(len(text.encode()))} of {_kib(size)}; the whole file: "
            f"{recorded} (or `pilotfish show {key} --full`)"
        )
    return head + _pre(text, "stderr", note, budget)


def _attempts_html(attempts: list[dict[str, Any]]) -> str:
    if not attempts:
        return '<div class="note">no attempt was started</div>'
    rows = []
    for a in attempts:
        dur = (a["ended"] - a["started"]) if a.get("ended") and a.get("started") else None
        f = a.get("failure") or {}
        how = ""
        if f.get("returncode") is not None or f.get("signal"):
            how = exit_label(f.get("returncode"), f.get("signal"))
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{_h(v, one_line=True)}</td>"
                for v in (a.get("run"), a.get("number"), a.get("worker") or "-")
            )
            + f"<td>{_h(a.get('host') or '-', one_line=True)}</td>"
            + f"<td>{_h(a.get('pid') or '-')}</td><td>{fmt_time(a.get('started'))}</td>"
            + f"<td>{fmt_dur(dur)}</td><td>{_badge(a.get('outcome') or 'running')}</td>"
            + f"<td>{_h(how)}</td></tr>"
        )
    return (
        '<table class="attempts"><tr><th>run</th><th>#</th><th>worker</th><th>host</th>'
        "<th>pid</th><th>started</th><th>took</th><th>outcome</th><th>exit</th></tr>"
        + "".join(rows)
        + "</table>"
    )


_FIELDS = (
    "exc_type",
    "returncode",
    "signal",
    "worker",
    "host",
    "pid",
    "attempt",
    "sandbox",
    "stdout_path",
    "stderr_path",
)


def _failure_row(
    i: int,
    t: dict[str, Any],
    group: int,
    rundir: Path,
    budget: _Budget,
    anchors: dict[str, int],
    took: dict[str, list[str]],
) -> str:
    f = t["failure"] or {}
    key = str(t["key"])
    cat = str(f.get("category") or "unknown")
    first = headline(dict(f, key=key))
    if len(first) > HEADLINE_MAX:
        first = first[: HEADLINE_MAX - 1] + "…"
    last_run = t["attempts"][-1].get("run") if t["attempts"] else None
    n_att = sum(1 for a in t["attempts"] if a.get("run") == last_run)
    body: list[str] = []
    if cat == "dependency_failed":
        root, upstream = f.get("root"), f.get("upstream")
        body.append(
            '<p class="dep">did not run because '
            + (f"its input {_key_link(str(upstream), anchors)} failed; " if upstream else "")
            + (
                f"the failure began in the root task {_key_link(str(root), anchors)}, "
                f"which took {len(took.get(str(root), ())):,} task(s) with it"
                if root
                else ""
            )
            + "</p>"
        )
    victims = took.get(key)
    if victims:
        shown = ", ".join(_key_link(k, anchors) for k in victims[:5])
        more = f" and {len(victims) - 5:,} more" if len(victims) > 5 else ""
        body.append(
            f'<p class="took">root of <b>{len(victims):,}</b> dependency failure(s): '
            f"it took {shown}{more} with it</p>"
        )
    message, note = _cut_middle(str(f.get("message") or ""), budget.share(), key)
    body.append("<h4>message</h4>" + _pre(message, "message", note, budget))
    fields = [
        f"<tr><th>{name}</th><td>{_h(f[name], one_line=True)}</td></tr>"
        for name in _FIELDS
        if f.get(name) not in (None, "")
    ]
    if f.get("time"):
        fields.append(f"<tr><th>time</th><td>{fmt_time(f['time'])}</td></tr>")
    if fields:
        body.append('<table class="fields">' + "".join(fields) + "</table>")
    if f.get("traceback"):
        tb, note = _cut_middle(str(f["traceback"]), budget.share(), key)
        body.append("<h4>traceback (complete)</h4>" if not note else "<h4>traceback</h4>")
        body.append(_pre(tb, "traceback", note, budget))
    body.append(_stderr_html(f, rundir, budget, key))
    body.append("<h4>attempts</h4>" + _attempts_html(t["attempts"]))
    return (
        f'<details class="failure" id="f{i}" data-group="{group}" '
        f'data-key="{_h(key, one_line=True)}">'
        f'<summary><span class="k">{_h(key, one_line=True)}</span>'
        f'<span class="c">{_badge(cat)}</span><span class="a">{n_att}</span>'
        f'<span class="m">{_h(first, one_line=True)}</span></summary>'
        f'<div class="body">{"".join(body)}</div></details>'
    )


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
    rows = _failed_rows(listed, records, reader.path.parent, anchors)
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
        legend=_legend_html(bars),
        digest_html=_digest_html(digest, anchors),
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
    """The failed tasks as (digest group, submission order, task): by digest group
    (largest first), then submission order."""
    group_index = {(g["category"], g["signature"]): i for i, g in enumerate(digest["groups"])}
    dep_group = next(
        (i for i, g in enumerate(digest["groups"]) if g["category"] == "dependency_failed"), -1
    )

    def group_of(rec: dict[str, Any]) -> int:
        cat = str(rec.get("category") or "unknown").lower()
        if cat == "dependency_failed":
            return dep_group
        return group_index.get((cat, signature(rec)), len(group_index))

    return sorted(
        ((group_of(rec), n, t) for n, (rec, t) in enumerate(zip(records, failed, strict=True))),
        key=lambda x: (x[0], x[1]),
    )


def _failed_rows(
    listed: list[tuple[int, int, dict[str, Any]]],
    records: list[dict[str, Any]],
    rundir: Path,
    anchors: dict[str, int],
) -> list[str]:
    """One row per listed failed task, their details sharing ``DETAIL_BUDGET``; a root
    failure's row names the tasks whose dependency it failed."""
    took: dict[str, list[str]] = {}
    for rec in records:
        if str(rec.get("category")) == "dependency_failed" and rec.get("root"):
            took.setdefault(str(rec["root"]), []).append(str(rec["key"]))
    pieces = sum(
        1
        + bool(t["failure"].get("traceback"))
        + bool(t["failure"].get("stderr_path") or t["failure"].get("stderr_tail"))
        for _g, _n, t in listed
    )
    budget = _Budget(DETAIL_BUDGET, pieces)
    return [
        _failure_row(i, t, g, rundir, budget, anchors, took) for i, (g, _n, t) in enumerate(listed)
    ]


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
            {"id": name, "label": v[0], "colour": v[1], "pattern": v[2], "symbol": v[3]}
            for name, v in OUTCOMES.items()
        ],
        "lanes": lanes,
        "bars": bars,
        "markers": markers,
        "keys": {str(ti): clean(k, one_line=True) for ti, k in keys.items()},
        "rows": {str(ti): a for ti, a in failed_anchor.items() if a >= 0},
        "runs": [{"id": r["id"], "t": round(((r["started"] or t0) - t0) * 1000)} for r in runs],
    }


def _legend_html(bars: list[Any]) -> str:
    """The outcomes drawn (and the usual four), each with its swatch and count."""
    outcome_counts = Counter(b[3] for b in bars)
    outcome_names = list(OUTCOMES)
    return "".join(
        f'<span class="legend-item" data-outcome="{name}"><canvas class="swatch" width="28" '
        f'height="14" data-outcome="{i}"></canvas> {html.escape(OUTCOMES[name][0])} '
        f"({outcome_counts.get(i, 0):,})</span>"
        for i, name in enumerate(outcome_names)
        if outcome_counts.get(i) or name in ("done", "user_error", "command_failed", "worker_lost")
    )


def _runs_html(runs: list[Any]) -> tuple[float | None, str]:
    """The wall time of all runs together, and one list item per run."""
    wall = None
    if runs:
        first_start = min(r["started"] for r in runs if r["started"]) if runs else None
        last_end = max((r["ended"] or 0) for r in runs)
        wall = (last_end - first_start) if first_start and last_end else None
    run_lines = "".join(
        f"<li>run {r['id']} ({_h(r['status'], one_line=True)}): started {fmt_time(r['started'])}"
        + (
            f", {fmt_dur(r['ended'] - r['started'])}"
            if r["ended"] and r["started"]
            else ", not closed (still running, or its client was killed)"
        )
        + f" on {_h(r['host'], one_line=True)}</li>"
        for r in runs
    )
    return wall, run_lines


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
    digest_html: str,
    rows: list[str],
    more: str,
    payload: dict[str, Any],
) -> str:
    """The page: its head, the timeline, counts, digest and failed tasks sections."""
    wall, run_lines = _runs_html(runs)
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
<style>{_STYLE}{_outcome_css()}</style></head>
<body>
<header><h1>{html.escape(title)}</h1>
<p class="meta">journal <code>{_h(reader.path, one_line=True)}</code> · {len(runs)} run(s) ·
wall time {fmt_dur(wall)} · report written {fmt_time(now)}</p>
<ul class="runs">{run_lines}</ul></header>
<section id="timeline"><h2>timeline</h2>
<p class="help">One lane per worker and host; each attempt is a bar, its outcome shown by
colour <em>and</em> pattern (legend below). ✕ marks where a worker was lost. Scroll
sideways; zoom with the buttons or Ctrl+wheel; hover a bar for its task, click a failed
one to open its row.</p>
<div class="tools"><button type="button" id="zin">zoom in</button>
<button type="button" id="zout">zoom out</button><button type="button" id="zfit">fit</button>
<span id="zlabel"></span></div>
<div class="legend">{legend}</div>
<div class="tl"><div class="labels" id="labels"></div>
<div class="scroller" id="scroller"><div class="spacer" id="spacer">
<canvas id="tl-canvas"></canvas><div class="markers" id="markers"></div></div></div></div>
<div id="tip" role="tooltip" hidden></div>
<noscript><p class="note">The timeline needs JavaScript; the tables below do not.</p></noscript>
</section>
<section id="counts"><h2>counts</h2>{_counts_html(tasks, [t["failure"] for t in failed])}</section>
<section id="digest"><h2>failure digest</h2>{digest_html}</section>
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
    LOCK_NAME,
)


def check_target(journal: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Where a report of ``journal`` may be written, or :class:`JournalError` saying why
    not. The rule (``pilotfish report --help`` states it): never the journal itself, its
    ``-wal``/``-shm``/``-journal`` files or lock, nor anything inside ``values/``,
    ``sandboxes/`` or ``results/`` of its run directory; an existing file is replaced only
    if it is a report pilotfish wrote (``_MARK`` in its first 4 KiB)."""
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
