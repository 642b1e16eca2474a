"""What each part of the HTML report looks like (:mod:`pilotfish.tools.report` puts
them together into the page): the outcomes' labels, colours and patterns, the counts
tables, the failure digest, the failed tasks' rows with their details, the timeline's
legend and the list of runs.

Every task string (keys, messages, tracebacks, stderr) goes through :func:`escaped`:
HTML-escaped, with control characters made visible as in the CLI.

Size is bounded: the text of the failure details shares a budget (``DETAIL_BUDGET``),
each piece cut to its share (at most ``PIECE_MAX``) with the path to the whole file or
``pilotfish show KEY``; at most ``GROUPS_MAX`` digest groups are listed (all are counted).

Stderr files are read only inside the run directory (the journal's directory, after
resolving symbolic links), so a journal from elsewhere cannot make the page embed files
such as ``~/.ssh/id_rsa``. If the run directory was moved, a recorded path is looked up
again below ``sandboxes/`` or ``results/`` of where the journal is now.

Like the report, a reader of the journal's records only: it imports
:mod:`pilotfish.digest`, :mod:`pilotfish.runtime.files` and the standard library.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..digest import clean, exit_label, fmt_dur, fmt_time, headline
from ..runtime.files import NotRegularFile, read_tail

__all__ = [
    "CONTINUED",
    "DETAIL_BUDGET",
    "FAILING",
    "GROUPS_MAX",
    "OUTCOMES",
    "PIECE_MAX",
    "TRANSIENT",
    "counts_html",
    "digest_html",
    "escaped",
    "failed_rows",
    "legend_html",
    "mark_attempts",
    "marker",
    "outcome_css",
    "program_of_outputs",
    "root_of",
    "runs_html",
    "through_outputs",
]

DETAIL_BUDGET = 3 * 512 * 1024  # characters of (escaped) failure detail text in a page
PIECE_MAX = 256 * 1024  # one traceback or stderr shown whole up to this size
PIECE_MIN = 256  # the share of each piece never goes below this
GROUPS_MAX = 200  # digest groups listed (the rest are counted)
HEADLINE_MAX = 160  # characters of a message in a collapsed row

# outcome -> (label, colour (Okabe-Ito, safe for colour-blind readers), pattern drawn on
# top, the shape of its marker in the legend, the tables and the timeline). Pattern, shape
# and label carry the meaning. Shapes are drawn by CSS (report.css, ``.mk-SHAPE``), never
# by a font's glyph, which headless or minimal systems may lack (an empty box).
OUTCOMES: dict[str, tuple[str, str, str, str]] = {
    "done": ("done", "#009E73", "solid", "check"),
    "retried": ("continued", "#9ED9C6", "vertical", "play"),
    "user_error": ("user error", "#D55E00", "slash", "triangle"),
    "command_failed": ("command failed", "#E69F00", "backslash", "square"),
    "missing_output": ("missing output", "#E69F00", "cross", "square-hollow"),
    "timeout": ("timeout", "#CC79A7", "horizontal", "hourglass"),
    "worker_lost": ("worker lost", "#000000", "dots", "x"),
    "runtime_lost": ("runtime lost", "#0072B2", "vertical", "diamond"),
    "environment": ("environment", "#F0E442", "grid", "ring"),
    "invalid_task": ("invalid task", "#56B4E9", "cross", "triangle-down"),
    "dependency_failed": ("dependency failed", "#7f7f7f", "slash", "chevron-up"),
    "cancelled": ("cancelled", "#BBBBBB", "hollow", "circle-slash"),
    "dropped": ("dropped", "#DDDDDD", "hollow", "dot"),
    "running": ("unfinished", "#FFFFFF", "hollow", "ring-dotted"),
}


#: what "continued" means (the legend's tooltip)
CONTINUED = (
    "continued: a failed attempt whose task asked to be tried again (its exit code is in "
    "retry_exit_codes, e.g. 75 after mdrun -maxh, or its exception in retry_on), and was: "
    "not a failure of the task"
)
#: outcomes the retry policy retries by itself (transient): drawn as they are when retried
TRANSIENT = frozenset({"timeout", "worker_lost", "runtime_lost"})
#: outcomes of an attempt that failed
FAILING = frozenset(OUTCOMES) - {"done", "retried", "running", "cancelled", "dropped"}


def mark_attempts(
    attempts: list[dict[str, Any]],
    state: str | None,
    run: int | None,
    history: Callable[[], list[tuple[int, float, str, str]]],
) -> None:
    """Set on each attempt of a task (:meth:`JournalReader.attempts`, in order) what the
    report shows: ``shown``, its outcome, and ``fate``: "failed" (the last attempt of a
    task that is FAILED: a row of the failed-tasks table), "retried" (a failed attempt
    the task was tried again after) or "". A failed attempt that is not transient (a
    program's exit, an exception) and was retried in the same run was retried because the
    task asked for it (``retry_exit_codes``, ``retry_on``; the journal keeps no other
    reason for it): it is shown as "retried" (continued). Also so: the last attempt of a
    run that ended with the task waiting for its retry (RETRYING or READY). ``state`` and
    ``run``: the task's state and the run that recorded it; ``history``: its transitions
    (:meth:`JournalReader.transitions`, read only when needed)."""
    ended_in: dict[int | None, str] = {}

    def waiting(a: dict[str, Any]) -> bool:
        r = a.get("run")
        if r == run:
            return state in ("RETRYING", "READY")
        if not ended_in:
            ended_in.update({h[0]: h[3] for h in history()})
            ended_in.setdefault(None, "")
        return ended_in.get(r) in ("RETRYING", "READY")

    for i, a in enumerate(attempts):
        outcome = a.get("outcome") or "running"
        a["shown"], a["fate"] = outcome, ""
        if outcome not in FAILING:
            continue
        later = attempts[i + 1 :]
        continued = any(b.get("run") == a.get("run") for b in later) or (not later and waiting(a))
        if continued or later:
            a["fate"] = "retried"
        elif state == "FAILED":
            a["fate"] = "failed"
        if continued and outcome not in TRANSIENT:
            a["shown"] = "retried"


def marker(outcome: str) -> str:
    """The outcome's marker: an empty element its CSS class draws (never a glyph)."""
    shape = OUTCOMES[outcome][3] if outcome in OUTCOMES else "dot"
    return f'<i class="mk mk-{shape}" aria-hidden="true"></i>'


def escaped(value: object, *, one_line: bool = False) -> str:
    """Task data as HTML text: control characters made visible, then escaped."""
    return html.escape(clean(value, one_line=one_line), quote=True)


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
    resolving links (or found again there below sandboxes/, results/ or staged/)."""
    root = rundir.resolve()
    candidates = [Path(recorded)]
    parts = Path(recorded).parts
    for anchor in ("sandboxes", "results", "staged"):
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


# --------------------------------------------------------------------------- HTML pieces


def _badge(outcome: str) -> str:
    label = OUTCOMES[outcome][0] if outcome in OUTCOMES else outcome
    cls = outcome if outcome in OUTCOMES else "other"
    return f'<span class="badge o-{cls}">{marker(outcome)} {escaped(label)}</span>'


def outcome_css() -> str:
    return "".join(f".o-{name}{{--c:{v[1]}}}" for name, v in OUTCOMES.items())


def counts_html(tasks: list[dict[str, Any]], failures: list[dict[str, Any]]) -> str:
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


def digest_html(digest: dict[str, Any], anchors: dict[str, int]) -> str:
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
            f"{_badge(g['category'])} <code>{escaped(g['signature'], one_line=True)}</code>"
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
        return f"<code>{escaped(key, one_line=True)}</code>"
    return f'<a href="#f{i}"><code>{escaped(key, one_line=True)}</code></a>'


def _pre(text: str, cls: str, note: str = "", budget: _Budget | None = None) -> str:
    """``text`` in a ``<pre>``, escaped; what it costs in the page is taken from
    ``budget`` (escaping makes quotes and brackets longer)."""
    body = escaped(text)
    if budget is not None:
        budget.spend(len(body))
    n = f'<div class="note">{escaped(note)}</div>' if note else ""
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
    head = f"<h4>stderr <code>{escaped(recorded, one_line=True)}</code></h4>"
    if path is None:
        return f'{head}<div class="note">{escaped(why)}</div>'
    try:
        text, size, whole = _read_tail(path, budget.share())
    except NotRegularFile as e:
        return f'{head}<div class="note">{escaped(e.strerror)}</div>'
    except OSError as e:
        return f'{head}<div class="note">cannot read it: {escaped(e)}</div>'
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
                f"<td>{escaped(v, one_line=True)}</td>"
                for v in (a.get("run"), a.get("number"), a.get("worker") or "-")
            )
            + f"<td>{escaped(a.get('host') or '-', one_line=True)}</td>"
            + f"<td>{escaped(a.get('pid') or '-')}</td><td>{fmt_time(a.get('started'))}</td>"
            + f"<td>{fmt_dur(dur)}</td>"
            + f"<td>{_badge(a.get('shown') or a.get('outcome') or 'running')}</td>"
            + f"<td>{escaped(how)}</td></tr>"
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
    "staged",
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
            + (
                f"its input {_key_link(str(upstream), anchors)}"
                + (
                    f" (its file <code>{escaped(_output_name(f['upstream_output']))}</code>)"
                    if f.get("upstream_output")
                    else ""
                )
                + " failed; "
                if upstream
                else ""
            )
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
        f"<tr><th>{name}</th><td>{escaped(f[name], one_line=True)}</td></tr>"
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
        + (
            f'data-root="{escaped(root_of(t), one_line=True)}" '
            if cat == "dependency_failed"
            else ""
        )
        + f'data-key="{escaped(key, one_line=True)}">'
        f'<summary><span class="k" title="{escaped(key, one_line=True)}">'
        f"{escaped(key, one_line=True)}</span>"
        f'<span class="c">{_badge(cat)}</span><span class="a">{n_att}</span>'
        f'<span class="m" title="{escaped(first, one_line=True)}">'
        f"{escaped(first, one_line=True)}</span></summary>"
        f'<div class="body">{"".join(body)}</div></details>'
    )


def program_of_outputs(outputs: Iterable[tuple[str, str, str | None]]) -> dict[str, str]:
    """``.output(name)`` reference -> the key of its program, from the journal's rows
    ``(key, kind, deps)`` of kind "output": the one dependency of the reference, else the
    key before its last ":" (``PROGRAM:name``)."""
    out: dict[str, str] = {}
    for key, _kind, deps in outputs:
        try:
            listed = json.loads(deps) if deps else []
        except ValueError:
            listed = []
        program = listed[0] if len(listed) == 1 and isinstance(listed[0], str) else ""
        out[key] = program or key.rpartition(":")[0] or key
    return out


def through_outputs(failure: dict[str, Any], programs: dict[str, str]) -> dict[str, Any]:
    """A failure record whose ``upstream`` or ``root`` is an ``.output(name)`` reference,
    with the reference's program there instead (the reference kept as ``upstream_output``
    or ``root_output``): the report's tasks are those the user submitted."""
    f = dict(failure)
    for field in ("upstream", "root"):
        ref = f.get(field)
        seen = 0
        while isinstance(ref, str) and ref in programs and seen < 100:
            f.setdefault(f"{field}_output", ref)
            ref = programs[ref]
            seen += 1
        if seen:
            f[field] = ref
    return f


def root_of(task: dict[str, Any]) -> str:
    """The key of the task where a dependency failure began (its upstream if the record
    has no root)."""
    f = task.get("failure") or {}
    return str(f.get("root") or f.get("upstream") or "")


def _dep_head(root: str, n: int, group: int, anchors: dict[str, int]) -> str:
    """The line above the dependency failures of one root, naming it."""
    return (
        f'<div class="dep-head" data-root="{escaped(root, one_line=True)}" data-group="{group}">'
        f"<b>{n:,}</b> task(s) did not run because "
        + (f"the root task {_key_link(root, anchors)} failed:" if root else "an input failed:")
        + "</div>"
    )


def failed_rows(
    listed: list[tuple[int, int, dict[str, Any]]],
    records: list[dict[str, Any]],
    rundir: Path,
    anchors: dict[str, int],
) -> list[str]:
    """One row per listed failed task, their details sharing ``DETAIL_BUDGET``; a root
    failure's row names the tasks whose dependency it failed. ``listed`` has the root
    causes first, then the dependency failures grouped by root: each group is headed by
    a line naming its root."""
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
    per_root = Counter(root_of(t) for _g, _n, t in listed if _is_dep(t))
    own = len(listed) - sum(per_root.values())
    out: list[str] = []
    if own and per_root:
        out.append(f'<div class="fsection">failed on their own: {own:,}</div>')
    last: str | None = None
    for i, (g, _n, t) in enumerate(listed):
        if _is_dep(t) and root_of(t) != last:
            if last is None:
                out.append(
                    f'<div class="fsection">did not run because an input failed: '
                    f"{sum(per_root.values()):,}, by the root task where the failure began</div>"
                )
            last = root_of(t)
            out.append(_dep_head(last, per_root[last], g, anchors))
        out.append(_failure_row(i, t, g, rundir, budget, anchors, took))
    return out


def _output_name(ref: object) -> str:
    """``md.tpr`` of the reference ``PROGRAM:md.tpr``."""
    return str(ref).rpartition(":")[2] or str(ref)


def _is_dep(t: dict[str, Any]) -> bool:
    return str((t.get("failure") or {}).get("category")) == "dependency_failed"


def legend_html(bars: list[Any]) -> str:
    """The outcomes drawn (and the usual four), each with its swatch, marker and count of
    attempts; for a failing outcome, how many of them the task failed with (the rows of
    the failed-tasks table) and how many were retried."""
    names = list(OUTCOMES)
    total: Counter[int] = Counter()
    fates: dict[int, Counter[int]] = {}
    for b in bars:
        total[b[3]] += 1
        fates.setdefault(b[3], Counter())[b[6]] += 1
    out = []
    for i, name in enumerate(names):
        n = total.get(i, 0)
        if not n and name not in ("done", "user_error", "command_failed", "worker_lost"):
            continue
        failed, retried = fates.get(i, Counter())[1], fates.get(i, Counter())[2]
        count = f"{n:,}"
        if name in FAILING and (failed, retried) != (n, 0):
            parts = [f"{failed:,} failed"] if failed else []
            parts += [f"{retried:,} retried"] if retried else []
            if n - failed - retried:
                parts.append(f"{n - failed - retried:,} other")
            count = f"{n:,}: " + ", ".join(parts) if n else "0"
        title = (
            CONTINUED
            if name == "retried"
            else f"attempts that ended {OUTCOMES[name][0]}"
            + (
                "; failed: the task failed with it (a row of the failed-tasks table); "
                "retried: the task was tried again"
                if name in FAILING
                else ""
            )
        )
        out.append(
            f'<span class="legend-item" data-outcome="{name}" title="{html.escape(title)}">'
            f'<canvas class="swatch" width="28" height="14" data-outcome="{i}"></canvas>'
            f'{marker(name)}{html.escape(OUTCOMES[name][0])} <span class="n">({count})</span>'
            "</span>"
        )
    return "".join(out)


def runs_html(runs: list[Any]) -> tuple[float | None, str]:
    """The wall time of all runs together, and one list item per run."""
    wall = None
    if runs:
        first_start = min(r["started"] for r in runs if r["started"]) if runs else None
        last_end = max((r["ended"] or 0) for r in runs)
        wall = (last_end - first_start) if first_start and last_end else None
    run_lines = "".join(
        f"<li>run {r['id']} ({escaped(r['status'], one_line=True)}): "
        f"started {fmt_time(r['started'])}"
        + (
            f", {fmt_dur(r['ended'] - r['started'])}"
            if r["ended"] and r["started"]
            else ", not closed (still running, or its client was killed)"
        )
        + f" on {escaped(r['host'], one_line=True)}</li>"
        for r in runs
    )
    return wall, run_lines
