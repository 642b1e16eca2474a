#!/usr/bin/env python
"""pilotfish on RADICAL-Pilot vs plain RADICAL-Pilot raptor, on one shared pilot.

Run from the repository root, in the *activated* venv that has radical.pilot::

    source /path/to/venv/bin/activate
    python benchmarks/bench_radical.py                  # 500 no-ops, 3 repeats
    python benchmarks/bench_radical.py --quick          # 1 repeat, 100 no-ops
    python benchmarks/bench_radical.py --json /tmp/bench_radical.json

One RP session and one ``local.localhost`` pilot serve both peers in one run:

* ``raptor``: RP's own raptor master (``rp.RAPTOR_MASTER``, default ``Master``
  class) with 2 default workers, and ``rp.TASK_FUNCTION`` tasks made with
  ``rp.pythontask`` from ``_tasks.noop``;
* ``pilotfish``: ``pilotfish.Session(backend=RadicalBackend(2, pilot=...,
  task_manager=...))`` submitting ``_tasks.noop``.

Per repeat, each peer (in alternating order) gets a fresh master and workers, an
untimed warm-up, the no-op throughput scenario and the sequential round trip, and is
stopped again before the other peer starts. The whole run happens in one child
process, bounded by ``--timeout``; every RP process inherits a unique token in its
environment, and any process still carrying it after ``session.close`` is reported as
leaked and killed. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # pilotfish workers get this sys.path; raptor workers PYTHONPATH

import _tasks  # noqa: E402
from bench import (  # noqa: E402
    _cleanup_current,
    child_record,
    log,
    machine_meta,
    supervise_child,
)

WORKERS = 2
PEERS = ("raptor", "pilotfish")
LABEL = {"raptor": "RP raptor", "pilotfish": "pilotfish"}
TOKEN_VAR = "PILOTFISH_BENCH_RADICAL_TOKEN"
TAG = "[bench-radical]"

# (full, quick)
SIZES = {
    "tasks": (500, 100),
    "rounds": (20, 10),
    "warmup_tasks": (100, 30),
    "warmup_rounds": (5, 3),
}


def say(msg: str) -> None:
    log(f"{TAG} {msg}")


class Problem(Exception):
    """A peer misbehaved (task not DONE, wait timed out, master died, ...)."""


# =========================================================================== helpers
def _bounded(fn: Any, timeout: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; raise Problem if it takes longer than ``timeout``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, name=f"bench-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise Problem(f"{what} did not return within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _latency_stats(lat_ms: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(lat_ms),
        "p90_ms": _pct(lat_ms, 0.9),
        "max_ms": max(lat_ms),
    }


def token_procs(token: str) -> list[Any]:
    """Live (non-zombie) processes, other than this one, whose environment has the token."""
    from pilotfish.runtime.procs import with_env

    return with_env(TOKEN_VAR, {token})


def sweep(token: str, grace: float) -> dict[str, str]:
    """Wait up to ``grace`` s for the token's processes to end; kill and return the rest."""
    import psutil

    deadline = time.monotonic() + grace
    left = token_procs(token)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = token_procs(token)
    leaked: dict[str, str] = {}
    for p in left:
        with contextlib.suppress(psutil.Error):
            leaked[str(p.pid)] = " ".join(p.cmdline())[:200]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=2)
    return leaked


# =========================================================================== peers
class RaptorPeer:
    """Plain RADICAL-Pilot: a default raptor master, default workers, function tasks."""

    name = "raptor"

    def __init__(self, rp: Any, pilot: Any, tmgr: Any, wait_timeout: float) -> None:
        self.rp, self.pilot, self.tmgr = rp, pilot, tmgr
        self.wait_timeout = wait_timeout
        self.cond = threading.Condition()
        self.final: dict[str, str] = {}
        self.want: set[str] = set()
        # serialize the call once (the string is identical for every no-op task)
        self.fn = rp.pythontask(_tasks.noop)()
        self.master: Any = None
        self.workers: list[Any] = []

        def cb(task: Any, state: str) -> None:  # a plain function: unregister finds it by id
            if state in rp.FINAL:
                with self.cond:
                    self.final[task.uid] = state
                    self.want.discard(task.uid)
                    if not self.want or task.uid == getattr(self.master, "uid", None):
                        self.cond.notify_all()

        self.cb = cb

    def _td(self) -> Any:
        return self.rp.TaskDescription({"mode": self.rp.TASK_FUNCTION, "function": self.fn})

    def start(self) -> None:
        rp = self.rp
        self.tmgr.register_callback(self.cb)
        self.master = self.tmgr.submit_raptors(
            [rp.TaskDescription({"mode": rp.RAPTOR_MASTER, "named_env": "rp"})], self.pilot.uid
        )[0]
        self.workers = self.master.submit_workers(
            [
                rp.TaskDescription(
                    {
                        "mode": rp.RAPTOR_WORKER,
                        "named_env": "rp",
                        # dill pickles _tasks.noop by reference: the worker imports _tasks
                        "environment": {"PYTHONPATH": HERE},
                    }
                )
                for _ in range(WORKERS)
            ]
        )

    def run(self, n: int) -> None:
        """Submit ``n`` no-ops in one call and wait until all are final and DONE."""
        tasks = self.master.submit_tasks([self._td() for _ in range(n)])
        self._wait([t.uid for t in tasks])

    def _wait(self, uids: list[str]) -> None:
        deadline = time.monotonic() + self.wait_timeout
        with self.cond:
            self.want = {u for u in uids if u not in self.final}
            while self.want:
                if self.master.uid in self.final:
                    raise Problem(
                        f"raptor master {self.master.uid} is {self.final[self.master.uid]} "
                        f"with {len(self.want)} of {len(uids)} tasks not final"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            missing = set(self.want)
            self.want = set()
        if missing:
            states = self._states(missing)
            raise Problem(
                f"{len(missing)} of {len(uids)} raptor tasks not final after "
                f"{self.wait_timeout:g} s: {states}"
            )
        bad = [u for u in uids if self.final.get(u) != self.rp.DONE]
        if bad:
            t = self.tmgr.get_tasks([bad[0]])[0]
            raise Problem(
                f"{len(bad)} of {len(uids)} raptor tasks not DONE; first {bad[0]}: "
                f"{t.state} {t.exception!r}"
            )
        with self.cond:  # keep the dict small between measurements
            for u in uids:
                self.final.pop(u, None)

    def _states(self, uids: set[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tmgr.get_tasks(sorted(uids)):
            counts[t.state] = counts.get(t.state, 0) + 1
        return counts

    def round_trip(self) -> None:
        t = self.master.submit_tasks([self._td()])[0]
        self._wait([t.uid])

    def processes(self) -> list[int]:
        return []  # RP does not tell the client its raptor pids; the token sweep covers them

    def stop(self) -> None:
        rp = self.rp
        if self.master is None:
            return
        try:
            if self.master.state not in rp.FINAL:
                with contextlib.suppress(Exception):
                    _bounded(lambda: self.master.rpc("stop"), 15, "raptor master rpc stop")
            uids = [self.master.uid] + [w.uid for w in self.workers]
            self.tmgr.wait_tasks(uids, timeout=20)
            left = [t.uid for t in self.tmgr.get_tasks(uids) if t.state not in rp.FINAL]
            if left:
                self.tmgr.cancel_tasks(left)
                self.tmgr.wait_tasks(left, timeout=20)
                still = [t.uid for t in self.tmgr.get_tasks(left) if t.state not in rp.FINAL]
                if still:
                    raise Problem(f"raptor master/workers not final after stop+cancel: {still}")
        finally:
            with contextlib.suppress(Exception):
                self.tmgr.unregister_callback(self.cb)


class PilotfishPeer:
    """``pilotfish.Session(backend=RadicalBackend(2, pilot=..., task_manager=...))``."""

    name = "pilotfish"

    def __init__(self, pilot: Any, tmgr: Any, rundir: str, wait_timeout: float) -> None:
        self.pilot, self.tmgr, self.rundir = pilot, tmgr, rundir
        self.wait_timeout = wait_timeout
        self.s: Any = None
        self.pids: list[int] = []
        # imported here, not in start(): the first repeat's start counted pilotfish's
        # import (~0.2 s) where raptor's peer has radical.pilot imported already
        import pilotfish
        from pilotfish.backends.radical.backend import RadicalBackend

        self._session, self._backend = pilotfish.Session, RadicalBackend

    def start(self) -> None:
        b = self._backend(WORKERS, pilot=self.pilot, task_manager=self.tmgr, rundir=self.rundir)
        self.s = self._session(backend=b, rundir=self.rundir)

    def run(self, n: int) -> None:
        futs = [self.s.submit(_tasks.noop) for _ in range(n)]
        self._wait(futs)

    def _wait(self, futs: list[Any]) -> None:
        _done, not_done = cf.wait(futs, timeout=self.wait_timeout)
        if not_done:
            states: dict[str, int] = {}
            for f in not_done:
                k = str(f.state)
                states[k] = states.get(k, 0) + 1
            raise Problem(
                f"{len(not_done)} of {len(futs)} pilotfish tasks not done after "
                f"{self.wait_timeout:g} s: {states}"
            )
        bad = [f for f in futs if f.exception() is not None]
        if bad:
            raise Problem(
                f"{len(bad)} of {len(futs)} pilotfish tasks failed; first: {bad[0].exception()!r}"
            )

    def round_trip(self) -> None:
        self._wait([self.s.submit(_tasks.noop)])

    def processes(self) -> list[int]:
        p = self.s.processes()
        self.pids = [x for x in [p.get("master"), *p.get("workers", [])] if x]
        return self.pids

    def stop(self) -> None:
        if self.s is None:
            return
        _bounded(lambda: self.s.shutdown(wait=True, cancel_futures=True), 60, "Session.shutdown")
        # pilotfish's raptor master and workers must be gone (they run on the shared pilot)
        import psutil

        deadline = time.monotonic() + 15
        alive = [p for p in self.pids if _alive(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if _alive(p)]
        if alive:
            for pid in alive:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()
            raise Problem(f"pilotfish master/workers still running 15 s after shutdown: {alive}")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def measure(peer: Any, sz: dict[str, int]) -> dict[str, Any]:
    """Start, warm up (untimed), throughput, round trip, stop. Raises Problem."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        peer.start()
        peer.round_trip()  # first no-op done: master and at least one worker up
        out["startup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        peer.run(sz["warmup_tasks"])
        for _ in range(sz["warmup_rounds"]):
            peer.round_trip()
        out["warmup_s"] = time.perf_counter() - t0
        out["pids"] = peer.processes()

        n = sz["tasks"]
        t0 = time.perf_counter()
        peer.run(n)
        t1 = time.perf_counter()
        out["throughput"] = {"tps": n / (t1 - t0), "wall_s": t1 - t0, "tasks": n}

        lat = []
        for _ in range(sz["rounds"]):
            t0 = time.perf_counter()
            peer.round_trip()
            lat.append((time.perf_counter() - t0) * 1e3)
        out["latency"] = _latency_stats(lat)
        out["latency"]["all_ms"] = lat
    finally:
        t0 = time.perf_counter()
        peer.stop()
        out["stop_s"] = time.perf_counter() - t0
    return out


# =========================================================================== child
def child_main(args: argparse.Namespace) -> int:
    import faulthandler

    faulthandler.enable()
    if args._deadline > 0:  # dump every thread's stack shortly before the parent kills us
        faulthandler.dump_traceback_later(args._deadline, exit=False)
    home = args._home
    token = os.environ.get(TOKEN_VAR, "")
    # RP on local.localhost runs its agent from the client's *activated* venv, writes under
    # $HOME, and puts its client session directory into the cwd.
    os.environ.update(HOME=home, RADICAL_REPORT_ANIME="0")
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("VIRTUAL_ENV", sys.prefix)
    bindir = os.path.join(sys.prefix, "bin")
    os.environ["PATH"] = os.pathsep.join(
        [bindir] + [p for p in os.environ.get("PATH", "").split(os.pathsep) if p != bindir]
    )
    os.chdir(home)

    sz = _sizes(args)
    out: dict[str, Any] = {"ok": False, "errors": [], "pids": [], "runs": {p: [] for p in PEERS}}

    save, fail = child_record(out, args._out, say)

    import radical.pilot as rp

    session = None
    try:
        t0 = time.perf_counter()
        session = rp.Session()
        out["session_s"] = time.perf_counter() - t0
        pmgr = rp.PilotManager(session)
        pilot = pmgr.submit_pilots(
            rp.PilotDescription(
                {
                    "resource": "local.localhost",
                    "cores": args.cores,
                    "runtime": int(args.timeout // 60) + 10,  # minutes
                    "exit_on_error": False,
                }
            )
        )
        tmgr = rp.TaskManager(session)  # an RP pilot belongs to one TaskManager only
        tmgr.add_pilots(pilot)
        pilot.wait([rp.PMGR_ACTIVE, *rp.FINAL], timeout=args.pilot_timeout)
        out["pilot_start_s"] = time.perf_counter() - t0
        out["pilot"] = pilot.uid
        if pilot.state != rp.PMGR_ACTIVE:
            raise Problem(f"pilot {pilot.uid} is {pilot.state} after {args.pilot_timeout:g} s")
        say(
            f"session {out['session_s']:.1f} s, pilot {pilot.uid} active "
            f"{out['pilot_start_s']:.1f} s after rp.Session() ({args.cores} cores)"
        )
        save()
    except Exception:
        fail("session/pilot start")
        if session is not None:
            with contextlib.suppress(Exception):
                _bounded(lambda: session.close(download=False), 60, "session.close")
        out["leaked"] = sweep(token, 20)
        save()
        return 1

    def make(name: str, r: int) -> Any:
        if name == "raptor":
            return RaptorPeer(rp, pilot, tmgr, args.wait_timeout)
        rundir = os.path.join(home, f"pilotfish-run{r}")
        return PilotfishPeer(pilot, tmgr, rundir, args.wait_timeout)

    for r in range(args.repeat):
        order = PEERS if r % 2 == 0 else PEERS[::-1]
        for name in order:
            if pilot.state != rp.PMGR_ACTIVE:
                out["errors"].append({"where": f"{name} repeat {r + 1}", "traceback": pilot.state})
                continue
            peer = make(name, r)
            try:
                res = measure(peer, sz)
            except Exception:
                fail(f"{name} (repeat {r + 1})")
                continue
            res["repeat"] = r + 1
            with contextlib.suppress(Exception):  # diagnostics (private attribute)
                res["tmgr_callbacks"] = len(tmgr._callbacks[rp.constants.TASK_STATE].get("*", {}))
            out["runs"][name].append(res)
            out["pids"] = sorted(set(out["pids"]) | set(res.get("pids", [])))
            save()
            say(
                f"repeat {r + 1}/{args.repeat} {name}: "
                f"{res['throughput']['tps']:.1f} tasks/s ({sz['tasks']} no-ops in "
                f"{res['throughput']['wall_s']:.1f} s), round trip median "
                f"{res['latency']['median_ms']:.0f} ms; start {res['startup_s']:.1f} s, "
                f"stop {res['stop_s']:.1f} s"
            )

    t0 = time.perf_counter()
    try:
        _bounded(lambda: session.close(download=False), 90, "session.close")
    except Exception:
        fail("session.close")
    out["close_s"] = time.perf_counter() - t0
    out["leaked"] = sweep(token, 20)
    if out["leaked"]:
        say(f"LEAKED after session.close (killed): {out['leaked']}")
    say(f"session closed in {out['close_s']:.1f} s; leftover RP processes: {len(out['leaked'])}")
    out["ok"] = not out["errors"] and not out["leaked"]
    save()
    faulthandler.cancel_dump_traceback_later()
    return 0 if out["ok"] else 1


# =========================================================================== report
def _med(runs: list[dict], *path: str) -> float | None:
    vals = []
    for r in runs:
        v: Any = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def summarize(res: dict) -> dict[str, dict[str, float | None]]:
    m: dict[str, dict[str, float | None]] = {}
    for p in PEERS:
        runs = res.get("runs", {}).get(p, [])
        m[p] = {
            "throughput_tps": _med(runs, "throughput", "tps"),
            "latency_ms": _med(runs, "latency", "median_ms"),
            "startup_s": _med(runs, "startup_s"),
            "stop_s": _med(runs, "stop_s"),
        }
    return m


ROWS = [
    ("throughput_tps", "no-op throughput      [tasks/s]", "{:.1f}"),
    ("latency_ms", "round trip median     [ms]", "{:.0f}"),
    ("startup_s", "master+workers start  [s]", "{:.1f}"),
    ("stop_s", "stop                  [s]", "{:.1f}"),
]


def _fmt(v: float | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def print_table(m: dict, res: dict, args: argparse.Namespace, sz: dict) -> None:
    print()
    print(
        f"Medians of {args.repeat} repeat(s) on one local.localhost pilot ({args.cores} cores), "
        f"{WORKERS} workers each; {sz['tasks']} no-ops, {sz['rounds']} round trips.  "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs."
    )
    print(
        f"Pilot active {_fmt(res.get('pilot_start_s'), '{:.1f}')} s after rp.Session(); "
        f"session.close {_fmt(res.get('close_s'), '{:.1f}')} s."
    )
    w0 = 32
    hdr = f"{'':{w0}}" + "".join(f"{LABEL[p]:>12}" for p in PEERS) + f"{'pf/raptor':>12}"
    print(hdr)
    print("-" * len(hdr))
    for key, label, fmt in ROWS:
        a, b = m["pilotfish"][key], m["raptor"][key]
        ratio = None if a is None or not b else a / b
        line = f"{label:{w0}}" + "".join(f"{_fmt(m[p][key], fmt):>12}" for p in PEERS)
        print(line + f"{_fmt(ratio, '{:.2f}x'):>12}")
    print()
    print("pf/raptor > 1: pilotfish larger (faster for throughput, slower for the others).")


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    sz = {k: v[1 if args.quick else 0] for k, v in SIZES.items()}
    if args.tasks is not None:
        sz["tasks"] = args.tasks
    if args.rounds is not None:
        sz["rounds"] = args.rounds
    return sz


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=None, help="repeats (default 3; 1 with --quick)")
    ap.add_argument("--tasks", type=int, default=None, help="no-ops per throughput run (500)")
    ap.add_argument("--rounds", type=int, default=None, help="sequential round trips (20)")
    ap.add_argument("--cores", type=int, default=8, help="pilot cores (default 8)")
    ap.add_argument("--json", metavar="PATH", help="write raw numbers to PATH")
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 no-ops, 1 repeat")
    ap.add_argument(
        "--timeout", type=float, default=1200, help="seconds for the whole run (default 1200)"
    )
    ap.add_argument(
        "--wait-timeout",
        type=float,
        default=300,
        help="seconds any single wait for tasks may take (default 300)",
    )
    ap.add_argument(
        "--pilot-timeout", type=float, default=300, help="seconds for the pilot to become active"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary HOME (RP sandboxes)")
    ap.add_argument("--verbose", action="store_true", help="show all child output")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_home", help=argparse.SUPPRESS)
    ap.add_argument("--_deadline", type=float, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1 or (args.tasks is not None and args.tasks < 1):
        ap.error("--repeat and --tasks must be >= 1")

    if args._child:
        return child_main(args)

    try:
        import psutil  # noqa: F401
        import radical.pilot  # noqa: F401
    except ImportError as e:
        log(f"needs radical.pilot and psutil ({e}); pip install 'pilotfish[radical]'")
        return 1
    if sys.prefix == sys.base_prefix and not os.environ.get("VIRTUAL_ENV"):
        log("note: not running in a venv; RP's local.localhost expects an activated venv")

    import atexit

    atexit.register(_cleanup_current)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    sz = _sizes(args)
    home = tempfile.mkdtemp(prefix="pf-bench-radical-")
    token = uuid.uuid4().hex
    os.environ[TOKEN_VAR] = token  # inherited by the child and every RP process it starts
    fd, outpath = tempfile.mkstemp(prefix="bench-radical-", suffix=".json")
    os.close(fd)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        "--_out",
        outpath,
        "--_home",
        home,
        "--_deadline",
        str(max(5, args.timeout - 30)),
        "--repeat",
        str(args.repeat),
        "--tasks",
        str(sz["tasks"]),
        "--rounds",
        str(sz["rounds"]),
        "--cores",
        str(args.cores),
        "--timeout",
        str(args.timeout),
        "--wait-timeout",
        str(args.wait_timeout),
        "--pilot-timeout",
        str(args.pilot_timeout),
    ]
    if args.quick:
        cmd.append("--quick")
    log(
        f"=== RP raptor vs pilotfish on one pilot: {sz['tasks']} no-ops, {sz['rounds']} round "
        f"trips, {args.repeat} repeat(s), timeout {args.timeout:g} s, HOME {home}"
    )

    def show(line: str, in_tb: bool) -> bool:
        return bool(args.verbose or line.startswith(TAG) or in_tb)

    t_start = time.time()
    try:
        res, rc, timed_out, tail = supervise_child(
            "bench-radical", cmd, outpath, args.timeout, show
        )
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        _cleanup_current()
        res, rc, timed_out, tail = {}, 130, False, []
    finally:
        os.environ.pop(TOKEN_VAR, None)
        late = sweep(token, 5)  # anything outside the child's process group
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    res.setdefault("errors", [])
    res.setdefault("runs", {p: [] for p in PEERS})
    leaked = dict(res.get("leaked") or {})
    leaked.update(late)
    res["leaked"] = leaked
    if timed_out or rc != 0:
        res["errors"].append(
            {
                "where": "timeout" if timed_out else f"child exit code {rc}",
                "output_tail": "\n".join(tail),
            }
        )
        if not args.verbose:
            for line in tail[-40:]:
                log("  | " + line)

    m = summarize(res)
    print_table(m, res, args, sz)
    if leaked:
        print(f"!! RP processes left running after session.close (killed): {leaked}")
    for e in res["errors"]:
        print(f"!! error in {e['where']}")
        if e.get("traceback"):
            print("   " + str(e["traceback"]).rstrip().replace("\n", "\n   "))
    for p in PEERS:
        if len(res["runs"].get(p, [])) < args.repeat:
            print(f"!! {LABEL[p]}: {len(res['runs'].get(p, []))} of {args.repeat} repeats done")
    if args.keep:
        print(f"RP session and sandboxes kept under {home}")
    if args.json:
        doc = {
            "meta": {
                **machine_meta(t_start),
                "loadavg": os.getloadavg(),
                "workers": WORKERS,
                "cores": args.cores,
                "repeat": args.repeat,
                "quick": args.quick,
                "sizes": sz,
            },
            "medians": m,
            "ratio_pilotfish_over_raptor": {
                k: (m["pilotfish"][k] / m["raptor"][k])
                if m["pilotfish"][k] is not None and m["raptor"][k]
                else None
                for k in m["raptor"]
            },
            "raw": res,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"raw numbers written to {args.json}")
    incomplete = any(len(res["runs"].get(p, [])) < args.repeat for p in PEERS)
    return 1 if res["errors"] or leaked or incomplete or rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
