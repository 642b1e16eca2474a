#!/usr/bin/env python
"""pilotfish under faults: re-dispatch latency, chaos wall time, journal cost.

Run from the repository root::

    python benchmarks/bench_faults.py                     # all scenarios, --repeat 5
    python benchmarks/bench_faults.py --repeat 3 --json /tmp/faults.json
    python benchmarks/bench_faults.py --only chaos --chaos-tasks 2000

Scenarios (each in its own fresh child Python process, bounded by --timeout,
with every master/worker pid it saw swept up afterwards):

1. ``kill``    -- SIGKILL the worker running a task; time until the client hears the
   worker is lost, and until the task's retry has started elsewhere.
2. ``chaos``   -- N short tasks while a random worker is SIGKILLed every 200 ms, vs
   the same run without kills; every task must be DONE exactly once, right value.
3. ``journal`` -- no-op throughput with ``journal=True`` vs ``journal=None``,
   alternating on/off in the same process.

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # pilotfish workers inherit sys.path and import the tasks by name

import _fault_tasks  # noqa: E402
import _tasks  # noqa: E402
from bench import (  # noqa: E402
    _cleanup_current,
    json_saver,
    log,
    machine_meta,
    supervise_child,
)

WORKERS = 2
SCENARIOS = ("kill", "chaos", "journal")
TARGETS = {
    "kill_restart_ms": 100.0,  # worker SIGKILL -> retry started, under 100 ms
    "journal_ratio": 0.90,  # throughput journal on / off, at least 0.90
}


class Problem(Exception):
    """pilotfish misbehaved (wrong value, task run twice, hang...): reported, not hidden."""


# =========================================================================== helpers
class Recorder:
    """``on_event`` callback: thread-safe, cheap, with a condition to wait on."""

    def __init__(self, keep_task_events: bool = True) -> None:
        self.cv = threading.Condition()
        self.keep = keep_task_events
        self.task_events: list[tuple[float, Any]] = []  # (received, event)
        self.worker_events: list[tuple[float, Any]] = []
        self.done = collections.Counter()  # key -> number of ->DONE events
        self.retrying = 0
        self.live: set[int] = set()  # started and not lost/stopped
        self.seen: set[int] = set()  # every worker pid ever started

    def __call__(self, ev: Any) -> None:
        import pilotfish

        now = time.time()
        with self.cv:
            if isinstance(ev, pilotfish.TaskEvent):
                if ev.finish is pilotfish.State.DONE:
                    self.done[ev.key] += 1
                elif ev.finish is pilotfish.State.RETRYING:
                    self.retrying += 1
                if self.keep:
                    self.task_events.append((now, ev))
            elif isinstance(ev, pilotfish.WorkerEvent):
                self.worker_events.append((now, ev))
                if ev.kind == "started":
                    self.live.add(ev.pid)
                    self.seen.add(ev.pid)
                elif ev.kind in ("lost", "stopped", "start_failed"):
                    self.live.discard(ev.pid)
            self.cv.notify_all()

    def wait_for(self, pred: Any, timeout: float, what: str) -> None:
        with self.cv:
            if not self.cv.wait_for(pred, timeout):
                raise Problem(f"timed out after {timeout:g} s waiting for {what}")

    def worker_event(self, kind: str, pid: int | None = None, after: float = 0.0):
        with self.cv:
            for recv, ev in self.worker_events:
                if ev.kind == kind and (pid is None or ev.pid == pid) and recv >= after:
                    return recv, ev
        return None


class Bench:
    """A Session in a fresh temp run directory; remembers every pid it saw."""

    def __init__(self, out: dict, rec: Recorder, **kw: Any) -> None:
        import pilotfish

        self.out = out
        self.rec = rec
        self.rundir = tempfile.mkdtemp(prefix="pilotfish-bfaults-")
        self.s = pilotfish.Session(workers=WORKERS, rundir=self.rundir, on_event=rec, **kw)
        self._note_pids()

    def _note_pids(self) -> None:
        p = self.s.processes()
        pids = set(self.out.setdefault("pids", []))
        if p.get("master"):
            pids.add(p["master"])
        pids.update(p.get("workers", []))
        pids.update(self.rec.seen)
        self.out["pids"] = sorted(pids)

    def ready(self, timeout: float = 60.0) -> None:
        """Both workers started (so start-up is never inside a measurement)."""
        self.rec.wait_for(lambda: len(self.rec.live) >= WORKERS, timeout, "2 workers started")
        self._note_pids()

    def close(self) -> float:
        t0 = time.perf_counter()
        try:
            self._note_pids()
            self.s.shutdown(wait=True, cancel_futures=True)
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)
        return time.perf_counter() - t0


def wait_all(futs: list, timeout: float, what: str) -> None:
    _done, not_done = cf.wait(futs, timeout=timeout)
    if not_done:
        ex = sorted(not_done, key=lambda t: t.key)[:5]
        raise Problem(
            f"{what}: {len(not_done)} of {len(futs)} tasks not finished after {timeout:g} s; "
            f"e.g. {[(t.key, t.state.name, len(t.attempts)) for t in ex]}"
        )


def _med(xs: list, k: str | None = None) -> float | None:
    vals = [v for v in ((x.get(k) if k else x) for x in xs) if v is not None]
    return statistics.median(vals) if vals else None


# =========================================================================== 1. kill
def sc_kill(out: dict, args: argparse.Namespace, save: Any) -> None:
    import pilotfish

    rec = Recorder()
    b = Bench(out, rec)
    tmp = tempfile.mkdtemp(prefix="bfaults-kill-")
    try:
        b.ready()
        wait_all([b.s.submit(_tasks.inc, i) for i in range(200)], 60, "warm-up")
        for r in range(args.repeat):
            b.ready()
            res = _one_kill(b, rec, tmp, r, pilotfish)
            out["kill"].append(res)
            save()
            log(
                f"[kill] repeat {r + 1}/{args.repeat}: lost {res['lost_ms']:.1f} ms, "
                f"retry dispatched {res['redispatch_ms']:.1f} ms, "
                f"retry started {res['restart_ms']:.1f} ms (backoff {res['backoff_ms']:.1f} ms, "
                f"ran on {res['retry_on']}), replacement worker up {res['replacement_ms']:.0f} ms, "
                f"{res['quick_done_after_kill']} quick tasks finished after the kill"
            )
    finally:
        out["shutdown_s"] = b.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _one_kill(b: Bench, rec: Recorder, tmp: str, r: int, pilotfish: Any) -> dict:
    s = b.s
    pidfile = os.path.join(tmp, f"pid-{r}")
    marker = os.path.join(tmp, f"marker-{r}")
    base = 100_000 * (r + 1)
    quick = [s.submit(_tasks.inc, base + i) for i in range(25)]
    sleeper = s.submit(_fault_tasks.sleep_once, pidfile, marker, 5.0)
    quick += [s.submit(_tasks.inc, base + 25 + i) for i in range(25)]
    deadline = time.monotonic() + 30
    while not os.path.exists(pidfile):
        if time.monotonic() > deadline:
            raise Problem(f"the sleeping task never started: {sleeper!r} {sleeper.attempts}")
        time.sleep(0.001)
    with open(pidfile) as f:
        victim = int(f.read())
    workers_before = s.processes()["workers"]
    if victim not in workers_before:
        raise Problem(f"task reports pid {victim}, not one of the workers {workers_before}")
    survivor = [p for p in workers_before if p != victim]

    t0 = time.time()
    os.kill(victim, signal.SIGKILL)

    try:
        value = sleeper.result(timeout=30)
    except cf.TimeoutError:
        raise Problem(
            f"retried task not done 30 s after SIGKILL of its worker: {sleeper!r} "
            f"attempts={sleeper.attempts}"
        ) from None
    rec.wait_for(
        lambda: rec.worker_event("lost", victim) is not None, 10, f"'lost' event of pid {victim}"
    )
    rec.wait_for(
        lambda: any(p not in workers_before for p in rec.live) and len(rec.live) >= WORKERS,
        60,
        "the replacement worker",
    )
    wait_all(quick, 30, "quick tasks")
    b._note_pids()

    # ---- checks: exactly what happened to every task
    problems = []
    att = sleeper.attempts
    if len(att) != 2 or att[0].outcome != "worker_lost" or att[1].outcome != "done":
        problems.append(f"sleeper attempts: {[(a.number, a.pid, a.outcome) for a in att]}")
    if value == victim or att[-1].pid == victim:
        problems.append(f"retry ran on the killed pid {victim}")
    for t in [*quick, sleeper]:
        n = rec.done[t.key]
        if n != 1:
            problems.append(f"{t.key}: {n} DONE events")
    rerun = [(t.key, [(a.number, a.pid, a.outcome) for a in t.attempts]) for t in quick]
    rerun = [x for x in rerun if len(x[1]) != 1]
    if rerun:
        problems.append(f"{len(rerun)} quick task(s) with more than 1 attempt: {rerun[:5]}")
    wrong = [(t.key, t.result()) for i, t in enumerate(quick) if t.result() != base + i + 1]
    if wrong:
        problems.append(f"wrong values: {wrong[:5]}")
    if problems:
        raise Problem("; ".join(problems))

    # ---- timings (all clocks are time.time() on this host)
    lost_recv, lost_ev = rec.worker_event("lost", victim)  # type: ignore[misc]
    evs = [(recv, e) for recv, e in rec.task_events if e.key == sleeper.key]

    def when(start: Any, finish: Any, after: float = t0) -> float | None:
        for _recv, e in evs:
            if e.start is start and e.finish is finish and e.time >= after:
                return e.time
        return None

    S = pilotfish.State
    t_retrying = when(S.RUNNING, S.RETRYING)
    t_ready = when(S.RETRYING, S.READY)
    t_dispatch = when(S.READY, S.RUNNING)
    t_done = when(S.RUNNING, S.DONE)
    repl = [(recv, e) for recv, e in rec.worker_events if e.kind == "started" and recv >= t0]

    def ms(t: float | None) -> float | None:
        return None if t is None else (t - t0) * 1e3

    in_flight = sum(1 for t in quick if _done_time(rec, t.key) >= t0)
    return {
        "victim": victim,
        "lost_ms": ms(lost_recv),  # (a) client receives WorkerEvent 'lost'
        "lost_master_ms": ms(lost_ev.time),  # master noticed the death
        "retrying_ms": ms(t_retrying),  # client: attempt 1 failed, RUNNING -> RETRYING
        "backoff_ms": None
        if t_ready is None or t_retrying is None
        else (t_ready - t_retrying) * 1e3,
        "redispatch_ms": ms(t_dispatch),  # READY -> RUNNING of attempt 2
        "restart_ms": ms(att[1].started),  # (b) attempt 2 started on a worker
        "done_ms": ms(t_done),
        "replacement_ms": ms(repl[0][0]) if repl else None,
        "retry_on": "survivor"
        if att[1].pid in survivor
        else ("replacement" if att[1].pid is not None else "?"),
        "quick_done_after_kill": in_flight,
        "quick_attempts_max": max(len(t.attempts) for t in quick),
    }


def _done_time(rec: Recorder, key: str) -> float:
    import pilotfish

    with rec.cv:
        for _recv, e in rec.task_events:
            if e.key == key and e.finish is pilotfish.State.DONE:
                return e.time
    return float("inf")


# =========================================================================== 2. chaos
def sc_chaos(out: dict, args: argparse.Namespace, save: Any) -> None:
    # alternate the order (kills first on odd repeats) so drift hits both alike
    for r in range(args.repeat):
        modes = ("kills", "clean") if r % 2 == 0 else ("clean", "kills")
        row: dict[str, Any] = {}
        for mode in modes:
            res = _one_chaos(out, args, kills=(mode == "kills"), seed=r)
            row[mode] = res
            log(
                f"[chaos] repeat {r + 1}/{args.repeat} {mode}: wall {res['wall_s']:.2f} s, "
                f"kills {res['kills']}, lost events {res['lost_events']}, "
                f"extra attempts {res['extra_attempts']}, max attempts {res['max_attempts']}, "
                f"mean live workers {_f(res['mean_live_workers'], '{:.2f}')}, "
                f"kill->replacement {_f(res['kill_to_replacement_ms'], '{:.0f}')} ms"
            )
        row["ratio"] = row["kills"]["wall_s"] / row["clean"]["wall_s"]
        out["chaos"].append(row)
        save()


def _one_chaos(out: dict, args: argparse.Namespace, kills: bool, seed: int) -> dict:
    import pilotfish

    n = args.chaos_tasks
    rec = Recorder(keep_task_events=False)
    b = Bench(out, rec, poison_after=50)
    fn = pilotfish.task(_fault_tasks.square_sleep, retries=50)
    stop = threading.Event()
    killed: list[tuple[float, int]] = []
    skipped = [0]
    rng = random.Random(seed)

    def killer() -> None:
        nxt = time.monotonic() + args.chaos_interval
        while not stop.wait(max(0.0, nxt - time.monotonic())):
            nxt += args.chaos_interval
            try:
                # processes() lists only workers that have said hello (started);
                # never kill one twice (an unreaped zombie still accepts kill()).
                done_pids = {p for _, p in killed}
                pids = [p for p in b.s.processes()["workers"] if p not in done_pids]
                if not pids:
                    skipped[0] += 1
                    continue
                pid = rng.choice(pids)
                os.kill(pid, signal.SIGKILL)
                killed.append((time.time(), pid))
            except ProcessLookupError:
                skipped[0] += 1
            except Exception:
                log(f"[chaos] killer error: {traceback.format_exc()}")

    th = threading.Thread(target=killer, name="chaos-killer", daemon=True)
    try:
        b.ready()
        wait_all([b.s.submit(_tasks.inc, i) for i in range(100)], 60, "warm-up")
        rec.done.clear()
        t0 = time.perf_counter()
        if kills:
            th.start()
        futs = [b.s.submit(fn, i) for i in range(n)]
        try:
            wait_all(futs, args.chaos_timeout, f"chaos ({'kills' if kills else 'clean'})")
        finally:
            stop.set()
            if kills:
                th.join(5)
        wall = time.perf_counter() - t0
        b._note_pids()

        # ---- checks
        problems = []
        states = collections.Counter(t.state.name for t in futs)
        if states != {"DONE": n}:
            bad = [t for t in futs if t.state is not pilotfish.State.DONE][:3]
            problems.append(
                f"final states {dict(states)}; e.g. "
                + "; ".join(f"{t.key}: {t.failure.one_line() if t.failure else t}" for t in bad)
            )
        wrong = [(i, t.result()) for i, t in enumerate(futs) if t.done() and not t.exception()]
        wrong = [(i, v) for i, v in wrong if v != i * i]
        if wrong:
            problems.append(f"{len(wrong)} wrong values, e.g. {wrong[:5]}")
        with rec.cv:
            multi = {t.key: rec.done[t.key] for t in futs if rec.done[t.key] != 1}
        if multi:
            problems.append(
                f"{len(multi)} tasks without exactly 1 DONE event: {list(multi.items())[:5]}"
            )
        attempts = [t.attempts for t in futs]
        n_att = [len(a) for a in attempts]
        outcomes = collections.Counter(x.outcome for a in attempts for x in a)
        with rec.cv:
            lost_pids = [e.pid for _r, e in rec.worker_events if e.kind == "lost"]
            start_failed = sum(1 for _r, e in rec.worker_events if e.kind == "start_failed")
        killed_pids = [p for _, p in killed]
        unseen = sorted(set(killed_pids) - set(lost_pids))
        # a kill after the last task finished is legitimately not seen before shutdown
        if unseen:
            rec.wait_for(
                lambda: (
                    set(killed_pids) <= {e.pid for _r, e in rec.worker_events if e.kind == "lost"}
                ),
                5,
                f"'lost' events for killed pids {unseen}",
            )
        if problems:
            raise Problem("; ".join(problems))
        t_end = time.time()
        mean_live, repl_ms = _worker_availability(rec, t_end - wall, t_end, killed)
        return {
            "n": n,
            "mean_live_workers": mean_live,
            "kill_to_replacement_ms": repl_ms,
            "wall_s": wall,
            "tps": n / wall,
            "kills": len(killed),
            "kill_ticks_skipped": skipped[0],
            "lost_events": len(lost_pids),
            "start_failed_events": start_failed,
            "extra_attempts": sum(n_att) - n,
            "max_attempts": max(n_att),
            "outcomes": dict(outcomes),
            "retrying_events": rec.retrying,
        }
    finally:
        stop.set()
        out.setdefault("shutdown_s", []).append(b.close())


def _worker_availability(
    rec: Recorder, t0: float, t1: float, killed: list[tuple[float, int]]
) -> tuple[float | None, float | None]:
    """Time-averaged number of started workers over [t0, t1] and the median time from
    a kill to the 'started' event of the worker replacing the killed one."""
    with rec.cv:
        evs = sorted((e.time, e.kind, e.pid) for _r, e in rec.worker_events)
    live: set[int] = set()
    area, last = 0.0, t0
    for t, kind, pid in evs:
        if t > t0:
            area += len(live) * (min(t, t1) - last)
            last = min(t, t1)
        if kind == "started":
            live.add(pid)
        elif kind in ("lost", "stopped", "start_failed"):
            live.discard(pid)
    area += len(live) * max(0.0, t1 - last)
    mean = area / (t1 - t0) if t1 > t0 else None
    # killed pid -> its slot name ('lost') -> the slot replacing it ('replaced',
    # message "replaces wN") -> when that one said hello ('started')
    with rec.cv:
        wevs = [e for _r, e in rec.worker_events]
    slot_of = {e.pid: e.worker for e in wevs if e.kind == "lost"}
    replaced_by = {
        e.message.split()[-1]: e.worker
        for e in wevs
        if e.kind == "replaced" and e.message.startswith("replaces ")
    }
    started_at = {e.worker: e.time for e in wevs if e.kind == "started"}
    gaps = []
    for tk, pid in killed:
        t = started_at.get(replaced_by.get(slot_of.get(pid, ""), ""))
        if t is not None:
            gaps.append((t - tk) * 1e3)
    return mean, (statistics.median(gaps) if gaps else None)


# =========================================================================== 3. journal
def sc_journal(out: dict, args: argparse.Namespace, save: Any) -> None:
    n = args.journal_tasks
    for r in range(args.repeat):
        row = {}
        for mode in ("on", "off"):  # on, off, on, off, ... in this one process
            rec = Recorder(keep_task_events=False)
            b = Bench(out, rec, journal=True if mode == "on" else None)
            try:
                b.ready()
                wait_all([b.s.submit(_tasks.inc, -1 - i) for i in range(300)], 60, "warm-up")
                c0, t0 = time.process_time(), time.perf_counter()
                futs = [b.s.submit(_tasks.inc, i) for i in range(n)]
                t1 = time.perf_counter()
                wait_all(futs, 300, f"journal {mode}")
                c2, t2 = time.process_time(), time.perf_counter()
                writer_cpu = _thread_cpu("pilotfish-journal")
            finally:
                shut = b.close()
            c3 = time.process_time()
            wrong = [i for i, t in enumerate(futs) if t.result() != i + 1]
            if wrong:
                raise Problem(f"journal {mode}: {len(wrong)} wrong values, e.g. index {wrong[:5]}")
            row[mode] = {
                "tps": n / (t2 - t0),
                "wall_s": t2 - t0,
                "submit_s": t1 - t0,
                "cpu_us_per_task": (c2 - c0) / n * 1e6,
                "cpu_us_per_task_incl_shutdown": (c3 - c0) / n * 1e6,
                "shutdown_s": shut,
                # CPU of the journal's writer thread so far (all of this session's life)
                "writer_cpu_us_per_task": None
                if writer_cpu is None
                else writer_cpu / (n + 300) * 1e6,
            }
        row["ratio"] = row["on"]["tps"] / row["off"]["tps"]
        out["journal"].append(row)
        save()
        log(
            f"[journal] repeat {r + 1}/{args.repeat}: on {row['on']['tps']:,.0f} tasks/s "
            f"({row['on']['cpu_us_per_task']:.0f} us CPU/task), off {row['off']['tps']:,.0f} "
            f"tasks/s ({row['off']['cpu_us_per_task']:.0f} us CPU/task), ratio {row['ratio']:.3f}"
        )


def _thread_cpu(name: str) -> float | None:
    """CPU seconds (user + system) of this process's thread called ``name`` (Linux)."""
    th = next((t for t in threading.enumerate() if t.name == name), None)
    if th is None or th.native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{th.native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SCENARIO_FN = {"kill": sc_kill, "chaos": sc_chaos, "journal": sc_journal}


# =========================================================================== child
def child_main(args: argparse.Namespace) -> int:
    import faulthandler

    faulthandler.enable()
    if args._deadline > 0:  # dump every thread's stack shortly before the parent kills us
        faulthandler.dump_traceback_later(args._deadline, exit=False)
    name = args._child
    out: dict[str, Any] = {"scenario": name, "ok": False, "errors": [], "pids": [], name: []}

    save = json_saver(out, args._out)

    try:
        SCENARIO_FN[name](out, args, save)
    except Exception as e:
        out["errors"].append(
            {
                "where": name,
                "problem": isinstance(e, Problem),
                "message": str(e),
                "traceback": traceback.format_exc(),
            }
        )
        kind = "PROBLEM" if isinstance(e, Problem) else "ERROR"
        log(f"[{name}] {kind}:\n{traceback.format_exc()}")
    out["ok"] = not out["errors"]
    save()
    faulthandler.cancel_dump_traceback_later()
    return 0 if out["ok"] else 1


# =========================================================================== parent
def run_child(name: str, args: argparse.Namespace) -> dict:
    fd, outpath = tempfile.mkstemp(prefix=f"bfaults-{name}-", suffix=".json")
    os.close(fd)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        name,
        "--_out",
        outpath,
        "--_deadline",
        str(max(5, args.timeout - 15)),
        "--repeat",
        str(args.repeat),
        "--chaos-tasks",
        str(args.chaos_tasks),
        "--chaos-interval",
        str(args.chaos_interval),
        "--chaos-timeout",
        str(args.chaos_timeout),
        "--journal-tasks",
        str(args.journal_tasks),
    ]
    log(f"=== {name} (timeout {args.timeout:g} s)")
    res, rc, timed_out, tail = supervise_child(
        name, cmd, outpath, args.timeout, lambda _line, _tb: True, tail_len=300
    )
    res.setdefault("scenario", name)
    res.setdefault(name, [])
    if timed_out or (rc != 0 and not res.get("errors")):
        res.setdefault("errors", []).append(
            {
                "where": "timeout" if timed_out else f"child exit code {rc}",
                "message": "\n".join(tail[-60:]),
            }
        )
    res.setdefault("errors", [])
    return res


# =========================================================================== report
def summarize(results: dict[str, dict]) -> dict[str, Any]:
    m: dict[str, Any] = {}
    k = results.get("kill", {}).get("kill", [])
    if k:
        m["kill"] = {
            f: _med(k, f)
            for f in (
                "lost_ms",
                "lost_master_ms",
                "retrying_ms",
                "backoff_ms",
                "redispatch_ms",
                "restart_ms",
                "done_ms",
                "replacement_ms",
            )
        }
        m["kill"]["retry_on"] = dict(collections.Counter(x["retry_on"] for x in k))
        m["kill"]["quick_attempts_max"] = max(x["quick_attempts_max"] for x in k)
    c = results.get("chaos", {}).get("chaos", [])
    if c:
        m["chaos"] = {
            "n": c[0]["kills"]["n"],
            "clean_wall_s": _med([x["clean"]["wall_s"] for x in c]),
            "kills_wall_s": _med([x["kills"]["wall_s"] for x in c]),
            "ratio": _med([x["ratio"] for x in c]),
            "kills": _med([x["kills"]["kills"] for x in c]),
            "extra_attempts": _med([x["kills"]["extra_attempts"] for x in c]),
            "clean_extra_attempts": max(x["clean"]["extra_attempts"] for x in c),
            "max_attempts": max(x["kills"]["max_attempts"] for x in c),
            "mean_live_workers": _med([x["kills"]["mean_live_workers"] for x in c]),
            "clean_mean_live_workers": _med([x["clean"]["mean_live_workers"] for x in c]),
            "kill_to_replacement_ms": _med([x["kills"]["kill_to_replacement_ms"] for x in c]),
        }
    j = results.get("journal", {}).get("journal", [])
    if j:
        m["journal"] = {
            f"{mode}_{f}": _med([x[mode][f] for x in j])
            for mode in ("on", "off")
            for f in (
                "tps",
                "cpu_us_per_task",
                "cpu_us_per_task_incl_shutdown",
                "writer_cpu_us_per_task",
                "shutdown_s",
            )
        }
        m["journal"]["ratio"] = _med([x["ratio"] for x in j])
    return m


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def print_table(m: dict, args: argparse.Namespace) -> None:
    print()
    print(
        f"Medians of {args.repeat} repeat(s), {WORKERS} workers; Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (at the end)."
    )
    if "kill" in m:
        k = m["kill"]
        ok = k["restart_ms"] is not None and k["restart_ms"] < TARGETS["kill_restart_ms"]
        print("\n1. Worker SIGKILL -> re-dispatch (ms after the kill)")
        rows = [
            ("(a) client gets WorkerEvent 'lost'", k["lost_ms"], ""),
            ("    master noticed the death", k["lost_master_ms"], ""),
            ("    task RUNNING -> RETRYING", k["retrying_ms"], ""),
            ("    retry backoff (RETRYING -> READY)", k["backoff_ms"], "(default Backoff)"),
            ("    retry dispatched (READY -> RUNNING)", k["redispatch_ms"], ""),
            (
                "(b) retry started on a worker",
                k["restart_ms"],
                f"target < {TARGETS['kill_restart_ms']:.0f}: {'PASS' if ok else 'FAIL'}",
            ),
            ("    retry DONE", k["done_ms"], ""),
            ("    replacement worker started", k["replacement_ms"], ""),
        ]
        for label, v, note in rows:
            print(f"  {label:42}{_f(v, '{:9.1f}')}   {note}")
        print(
            f"  retry ran on: {k['retry_on']}; 50 quick tasks alongside: max attempts "
            f"{k['quick_attempts_max']} (must be 1)"
        )
    if "chaos" in m:
        c = m["chaos"]
        print(
            f"\n2. Chaos: {c['n']:,} tasks (1 ms each, retries=50, poison_after=50), "
            f"SIGKILL a random worker every {args.chaos_interval * 1e3:.0f} ms"
        )
        print(f"  {'wall time, no kills [s]':42}{_f(c['clean_wall_s'], '{:9.2f}')}")
        print(f"  {'wall time, with kills [s]':42}{_f(c['kills_wall_s'], '{:9.2f}')}")
        print(f"  {'ratio kills / no kills':42}{_f(c['ratio'], '{:9.2f}')}x")
        print(f"  {'workers killed':42}{_f(c['kills'], '{:9.0f}')}")
        print(
            f"  {'extra attempts (with kills)':42}{_f(c['extra_attempts'], '{:9.0f}')}"
            f"   max attempts of one task {c['max_attempts']}; without kills: "
            f"{c['clean_extra_attempts']} extra"
        )
        print(
            f"  {'mean started workers, kills / no kills':42}"
            f"{_f(c['mean_live_workers'], '{:9.2f}')} / "
            f"{_f(c['clean_mean_live_workers'], '{:.2f}')}"
        )
        print(
            f"  {'kill -> its replacement started [ms]':42}"
            f"{_f(c['kill_to_replacement_ms'], '{:9.0f}')}"
        )
        print("  every task DONE exactly once with the right value: verified (else an error)")
    if "journal" in m:
        j = m["journal"]
        ok = j["ratio"] is not None and j["ratio"] >= TARGETS["journal_ratio"]
        print(
            f"\n3. Journal cost: {args.journal_tasks:,} inc(i) tasks, journal=True vs None, "
            "alternating in one process"
        )
        print(f"  {'':42}{'on':>9}{'off':>9}")
        print(
            f"  {'throughput [tasks/s]':42}{_f(j['on_tps'], '{:9,.0f}')}"
            f"{_f(j['off_tps'], '{:9,.0f}')}"
        )
        print(
            f"  {'client CPU per task [us]':42}{_f(j['on_cpu_us_per_task'], '{:9.0f}')}"
            f"{_f(j['off_cpu_us_per_task'], '{:9.0f}')}"
        )
        print(
            f"  {'  incl. shutdown (final flush) [us]':42}"
            f"{_f(j['on_cpu_us_per_task_incl_shutdown'], '{:9.0f}')}"
            f"{_f(j['off_cpu_us_per_task_incl_shutdown'], '{:9.0f}')}"
        )
        print(
            f"  {'  of which journal writer thread [us]':42}"
            f"{_f(j['on_writer_cpu_us_per_task'], '{:9.0f}')}{'-':>9}"
        )
        print(
            f"  {'shutdown [s]':42}{_f(j['on_shutdown_s'], '{:9.2f}')}"
            f"{_f(j['off_shutdown_s'], '{:9.2f}')}"
        )
        print(
            f"  {'ratio on/off (throughput)':42}{_f(j['ratio'], '{:9.3f}')}   "
            f"target >= {TARGETS['journal_ratio']}: {'PASS' if ok else 'FAIL'}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=5, help="repeats per scenario (default 5)")
    ap.add_argument("--json", metavar="PATH", help="write raw numbers to PATH")
    ap.add_argument(
        "--only", default=",".join(SCENARIOS), help="comma-separated among kill,chaos,journal"
    )
    ap.add_argument("--chaos-tasks", type=int, default=10_000, help="tasks per chaos run")
    ap.add_argument(
        "--chaos-interval", type=float, default=0.2, help="seconds between kills (default 0.2)"
    )
    ap.add_argument(
        "--chaos-timeout", type=float, default=240, help="seconds allowed per chaos run"
    )
    ap.add_argument("--journal-tasks", type=int, default=5000, help="tasks per journal run")
    ap.add_argument(
        "--timeout", type=float, default=600, help="seconds allowed per scenario (default 600)"
    )
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_deadline", type=float, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args._child:
        return child_main(args)

    wanted = [p.strip().lower() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in SCENARIOS]
    if unknown or not wanted:
        ap.error(f"--only: unknown scenario(s) {unknown}; choose from {','.join(SCENARIOS)}")

    import atexit

    atexit.register(_cleanup_current)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    t0 = time.time()
    results: dict[str, dict] = {}
    try:
        for name in SCENARIOS:
            if name in wanted:
                results[name] = run_child(name, args)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        _cleanup_current()

    m = summarize(results)
    print_table(m, args)
    bad = False
    for name, r in results.items():
        if r.get("leaked"):
            bad = True
            print(f"!! {name}: processes left running: {r['leaked']}")
        for e in r.get("errors", []):
            bad = True
            kind = "PROBLEM (pilotfish misbehaved)" if e.get("problem") else "error"
            print(f"!! {name}: {kind} in {e['where']}: {e.get('message', '')}")
    if args.json:
        doc = {
            "meta": {
                **machine_meta(t0),
                "loadavg_end": os.getloadavg(),
                "workers": WORKERS,
                "repeat": args.repeat,
                "chaos_tasks": args.chaos_tasks,
                "chaos_interval": args.chaos_interval,
                "journal_tasks": args.journal_tasks,
                "targets": TARGETS,
            },
            "medians": m,
            "raw": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"raw numbers written to {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
