#!/usr/bin/env python
"""pilotfish vs ProcessPoolExecutor vs Dask: scheduling overhead, side by side.

Run from the repository root::

    python benchmarks/bench.py                  # all peers, --repeat 5
    python benchmarks/bench.py --repeat 3 --json /tmp/bench.json
    python benchmarks/bench.py --only pilotfish,ppe --quick

Every runtime gets 2 worker processes and is measured in its own fresh child
Python process (``bench.py --_child NAME``), one runtime after the other, so
that no runtime's leftover threads/processes disturb another, a hang is bounded
by ``--timeout`` and reported with a stack dump, and everything the child
started can be swept up afterwards. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # workers of all three runtimes import _tasks by name

import _tasks  # noqa: E402

WORKERS = 2
PEERS = ("ppe", "dask", "pilotfish")
LABEL = {"ppe": "ProcessPool", "dask": "Dask", "pilotfish": "pilotfish"}

# (full, quick) problem sizes
SIZES = {
    "noop_tasks": (5000, 500),
    "latency_rounds": (200, 50),
    "chains": (500, 100),
    "chain_len": (4, 4),
}

# Targets from the spec: ratio pilotfish / ProcessPoolExecutor.
#: DESIGN.md section 6: ratios to ProcessPoolExecutor ("min"/"max": what was reached
#: before issue 26, "goal": its goal), and absolute goals of pilotfish's own number
TARGETS: dict[str, dict[str, float]] = {
    "throughput_tps": {"min": 1.35, "goal": 2.5},  # higher is better
    "latency_ms": {"max": 1.4, "goal": 1.1},  # lower is better
    "chains_tps": {"at_least": 20_000},  # tasks/s, pilotfish's own
    "startup_s": {"at_most": 0.25},  # s to the first result, pilotfish's own
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def json_saver(out: dict[str, Any], path: str) -> Callable[[], None]:
    """``save()``: a child's record ``out``, written whole (tmp + rename) to ``path``, so
    the parent reads the last complete state even if the child is killed mid-run."""

    def save() -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, default=str)
        os.replace(tmp, path)

    return save


def child_record(
    out: dict[str, Any], path: str, say: Callable[[str], None]
) -> tuple[Callable[[], None], Callable[[str], None]]:
    """``(save, fail)`` for a child's record: ``fail(where)`` records the exception being
    handled (with its traceback) in ``out["errors"]``, says so and saves."""
    save = json_saver(out, path)

    def fail(where: str) -> None:
        tb = traceback.format_exc()
        out["errors"].append({"where": where, "traceback": tb})
        say(f"ERROR in {where}:\n{tb}")
        save()

    return save, fail


def machine_meta(t0: float) -> dict[str, Any]:
    """What every benchmark's JSON records about the run and the machine."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
        "python": sys.version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


# =========================================================================== runtimes
class Runtime:
    """Uniform face over the three executors."""

    name = ""

    def start(self) -> None: ...
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def wait(self, futs: list[Any]) -> None: ...
    def result(self, fut: Any) -> Any: ...
    def results(self, futs: list[Any]) -> list[Any]: ...
    def chains(self, n: int, length: int) -> list[Any]: ...
    def pids(self) -> list[int]: ...
    def close(self) -> None: ...


class PPE(Runtime):
    name = "ppe"

    def start(self) -> None:
        # Default start method (fork on Linux/3.11): what a user gets. Safe here
        # because this child process runs no other runtime.
        self.ex = cf.ProcessPoolExecutor(WORKERS)

    def submit(self, fn, *args):
        return self.ex.submit(fn, *args)

    def wait(self, futs):
        cf.wait(futs)

    def result(self, fut):
        return fut.result()

    def results(self, futs):
        return [f.result() for f in futs]

    def chains(self, n, length):
        # ProcessPoolExecutor has no data-flow dependencies. Fairest emulation:
        # event-driven, the way a scheduler would do it -- when a step finishes,
        # its done-callback (run on the executor's manager thread) submits the
        # next step with the result. All chains start at once and no client
        # thread blocks; the alternative (a thread pool calling .result() per
        # chain) would need 500 client threads and measure thread switching.
        ex = self.ex

        def step(fut, remaining, final):
            try:
                v = fut.result()
            except BaseException as e:
                final.set_exception(e)
                return
            if remaining == 0:
                final.set_result(v)
                return
            nxt = ex.submit(_tasks.inc, v)
            nxt.add_done_callback(functools.partial(step, remaining=remaining - 1, final=final))

        finals = []
        for i in range(n):
            final: cf.Future = cf.Future()
            f = ex.submit(_tasks.inc, i)
            f.add_done_callback(functools.partial(step, remaining=length - 1, final=final))
            finals.append(final)
        return finals

    def pids(self):
        return sorted(self.ex._processes or {})  # diagnostics only (private attr)

    def close(self):
        self.ex.shutdown(wait=True, cancel_futures=True)


class Dask(Runtime):
    name = "dask"

    def start(self) -> None:
        import logging

        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.ERROR)
        self.cluster = LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        )
        self.client = Client(self.cluster)

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def wait(self, futs):
        from distributed import wait

        wait(futs)

    def result(self, fut):
        return fut.result()

    def results(self, futs):
        return self.client.gather(futs)

    def chains(self, n, length):
        finals = []
        self._keep = []  # hold intermediates, like the other runtimes do
        for i in range(n):
            f = self.client.submit(_tasks.inc, i, pure=False)
            for _ in range(length - 1):
                self._keep.append(f)
                f = self.client.submit(_tasks.inc, f, pure=False)
            finals.append(f)
        return finals

    def pids(self):
        return sorted(self.client.run(os.getpid).values())

    def close(self):
        self._keep = []
        with contextlib.suppress(Exception):
            self.client.close()
        self.cluster.close()


class Pilotfish(Runtime):
    name = "pilotfish"

    def start(self) -> None:
        import pilotfish

        # keep the run directory out of the repository (default is ./.pilotfish)
        self.rundir = tempfile.mkdtemp(prefix="pilotfish-bench-")
        self.s = pilotfish.Session(workers=WORKERS, rundir=self.rundir)

    def submit(self, fn, *args):
        return self.s.submit(fn, *args)

    def wait(self, futs):
        cf.wait(futs)

    def result(self, fut):
        return fut.result()

    def results(self, futs):
        return [f.result() for f in futs]

    def chains(self, n, length):
        finals = []
        for i in range(n):
            f = self.s.submit(_tasks.inc, i)
            for _ in range(length - 1):
                f = self.s.submit(_tasks.inc, f)  # Task argument = dependency
            finals.append(f)
        return finals

    def pids(self):
        p = self.s.processes()
        return sorted([p["master"]] if p.get("master") else []) + sorted(p.get("workers", []))

    def close(self):
        try:
            self.s.shutdown(wait=True)
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)


RUNTIMES = {"ppe": PPE, "dask": Dask, "pilotfish": Pilotfish}


# =========================================================================== scenarios
def sc_throughput(rt: Runtime, n: int, distinct: bool = False) -> dict:
    t0 = time.perf_counter()
    if distinct:
        futs = [rt.submit(_tasks.inc, i) for i in range(n)]
    else:
        futs = [rt.submit(_tasks.noop) for _ in range(n)]
    t1 = time.perf_counter()
    rt.wait(futs)
    t2 = time.perf_counter()
    bad = [f for f in futs if f.exception() is not None]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} no-op tasks failed; first: {bad[0].exception()!r}")
    return {"tps": n / (t2 - t0), "wall_s": t2 - t0, "submit_s": t1 - t0}


def sc_latency(rt: Runtime, rounds: int) -> dict:
    lat = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        rt.result(rt.submit(_tasks.noop))
        lat.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(lat), "p90_ms": _pct(lat, 0.9), "max_ms": max(lat)}


def sc_chains(rt: Runtime, n: int, length: int) -> dict:
    t0 = time.perf_counter()
    finals = rt.chains(n, length)
    rt.wait(finals)
    t1 = time.perf_counter()
    got = rt.results(finals)
    want = [i + length for i in range(n)]
    if list(got) != want:
        raise RuntimeError(f"wrong chain results: first got {list(got)[:5]}, want {want[:5]}")
    return {"wall_s": t1 - t0, "tps": n * length / (t1 - t0)}


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# =========================================================================== child
def child_main(args: argparse.Namespace) -> int:
    import faulthandler

    faulthandler.enable()
    if args._deadline > 0:  # dump every thread's stack shortly before the parent kills us
        faulthandler.dump_traceback_later(args._deadline, exit=False)
    name = args._child
    out: dict[str, Any] = {
        "runtime": name,
        "ok": False,
        "errors": [],
        "pids": [],
        "throughput": [],
        "throughput_distinct": [],
        "latency": [],
        "chains": [],
    }

    save, fail = child_record(out, args._out, lambda msg: log(f"[{name}] {msg}"))

    sz = _sizes(args)
    rt = RUNTIMES[name]()
    try:
        t0 = time.perf_counter()
        rt.start()
        rt.result(rt.submit(_tasks.noop))
        out["startup_s"] = time.perf_counter() - t0
        # warm-up (untimed): every worker up, code paths and imports hot
        t0 = time.perf_counter()
        rt.wait([rt.submit(_tasks.noop) for _ in range(200)])
        rt.wait([rt.submit(_tasks.inc, i) for i in range(200)])
        for _ in range(20):
            rt.result(rt.submit(_tasks.noop))
        rt.results(rt.chains(20, sz["chain_len"]))
        out["pids"] = rt.pids()
        out["warmup_s"] = time.perf_counter() - t0
        log(
            f"[{name}] started in {out['startup_s']:.2f}s, warm-up {out['warmup_s']:.2f}s, "
            f"pids {out['pids']}"
        )
        save()
    except Exception:
        fail("start/warm-up")
        with contextlib.suppress(Exception):
            rt.close()
        return 1

    for r in range(args.repeat):
        for key, fn in (
            ("throughput", lambda: sc_throughput(rt, sz["noop_tasks"])),
            ("latency", lambda: sc_latency(rt, sz["latency_rounds"])),
            ("chains", lambda: sc_chains(rt, sz["chains"], sz["chain_len"])),
            ("throughput_distinct", lambda: sc_throughput(rt, sz["noop_tasks"], distinct=True)),
        ):
            try:
                res = fn()
            except Exception:
                fail(f"{key} (repeat {r + 1})")
                continue
            out[key].append(res)
            save()
            log(
                f"[{name}] repeat {r + 1}/{args.repeat} {key}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in res.items())
            )

    t0 = time.perf_counter()
    try:
        rt.close()
        out["shutdown_s"] = time.perf_counter() - t0
    except Exception:
        fail("shutdown")
    out["ok"] = not out["errors"]
    save()
    faulthandler.cancel_dump_traceback_later()
    return 0 if out["ok"] else 1


# =========================================================================== parent
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is "alive" for kill(0) but is not a leak of running work
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


_current: dict[str, Any] = {}


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def supervise_child(
    name: str,
    cmd: list[str],
    outpath: str,
    timeout: float,
    show: Callable[[str, bool], bool],
    tail_len: int = 400,
) -> tuple[dict[str, Any], int, bool, list[str]]:
    """Run one benchmark child in its own process group, bounded by ``timeout``.

    Its output is relayed line by line (``show(line, in_traceback)`` decides what is
    logged); its JSON result is read from ``outpath``; afterwards anything left of
    its process group, and every runtime pid it reported under ``"pids"``, is killed
    (pilotfish's master runs in its own session, outside the group) and reported
    as leaked. Shared by bench.py and bench_faults.py.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_len)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
        cwd=os.getcwd(),
    )
    _current["proc"] = proc

    def pump() -> None:
        # show progress lines, and whole tracebacks / faulthandler dumps
        assert proc.stdout is not None
        in_tb = False
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            starts_tb = line.startswith(("Traceback", "Timeout (", "Fatal Python error"))
            if starts_tb:
                in_tb = True
            elif in_tb and line and not line[0].isspace() and not line.startswith("Thread 0x"):
                in_tb = False  # the "ExcType: message" line ends a traceback
            if show(line, starts_tb or in_tb):
                log("  " + line)

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    timed_out = False
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"[{name}] TIMEOUT after {timeout:g} s -- killing its process group")
        _kill_group(proc.pid)
        rc = proc.wait()
    th.join(5)
    _current.pop("proc", None)

    res: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError), open(outpath) as f:
        res = json.load(f)
    with contextlib.suppress(OSError):
        os.unlink(outpath)
    res["returncode"] = rc
    res["timed_out"] = timed_out

    _kill_group(proc.pid)
    time.sleep(0.2)
    leaked = [p for p in res.get("pids", []) if _alive(p)]
    if leaked:
        time.sleep(2)  # give a slow shutdown a moment
        leaked = [p for p in leaked if _alive(p)]
    if leaked:
        res["leaked"] = {p: _cmdline(p) for p in leaked}
        log(f"[{name}] LEAKED processes after the child exited: {res['leaked']} -- killing")
        for p in leaked:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
    return res, rc, timed_out, list(tail)


def run_child(name: str, args: argparse.Namespace) -> dict:
    fd, outpath = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")
    os.close(fd)
    deadline = max(5, args.timeout - 20)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        name,
        "--_out",
        outpath,
        "--_deadline",
        str(deadline),
        "--repeat",
        str(args.repeat),
    ]
    if args.quick:
        cmd.append("--quick")
    log(f"=== {LABEL[name]}: {' '.join(cmd[1:2])} --_child {name} (timeout {args.timeout}s)")

    def show(line: str, in_tb: bool) -> bool:
        return bool(args.verbose or line.startswith(f"[{name}]") or in_tb)

    res, rc, timed_out, tail = supervise_child(name, cmd, outpath, args.timeout, show)
    res.setdefault("runtime", name)
    if timed_out or rc != 0:
        res.setdefault("errors", []).append(
            {
                "where": "timeout" if timed_out else f"child exit code {rc}",
                "output_tail": "\n".join(tail),
            }
        )
        if not args.verbose:
            last = tail[-40:]
            log(f"[{name}] child output (last {len(last)} lines):")
            for line in last:
                log("  | " + line)
    res.setdefault("errors", [])
    return res


def _cleanup_current() -> None:
    proc = _current.get("proc")
    if proc is not None and proc.poll() is None:
        _kill_group(proc.pid)


# =========================================================================== report
def _med(xs: list[dict], k: str) -> float | None:
    vals = [x[k] for x in xs if k in x]
    return statistics.median(vals) if vals else None


def summarize(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    m: dict[str, dict[str, float | None]] = {}
    for name, r in results.items():
        m[name] = {
            "startup_s": r.get("startup_s"),
            "throughput_tps": _med(r.get("throughput", []), "tps"),
            "latency_ms": _med(r.get("latency", []), "median_ms"),
            "chains_wall_s": _med(r.get("chains", []), "wall_s"),
            "chains_tps": _med(r.get("chains", []), "tps"),
            "throughput_distinct_tps": _med(r.get("throughput_distinct", []), "tps"),
            "shutdown_s": r.get("shutdown_s"),
        }
    return m


ROWS = [
    # key, label, fmt, higher_is_better
    ("throughput_tps", "1. no-op throughput   [tasks/s]", "{:,.0f}", True),
    ("latency_ms", "2. round trip median  [ms]", "{:.2f}", False),
    ("chains_wall_s", "3. chains wall time   [s]", "{:.3f}", False),
    ("chains_tps", "3. chains throughput [tasks/s]", "{:,.0f}", True),
    ("throughput_distinct_tps", "   inc(i) throughput  [tasks/s]", "{:,.0f}", True),
    ("startup_s", "   start-up (cold)    [s]", "{:.2f}", False),
    ("shutdown_s", "   shutdown           [s]", "{:.2f}", False),
]


def _fmt(v: float | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def verdict(key: str, ratio: float | None, value: float | None = None) -> str:
    t = TARGETS.get(key)
    if t is None:
        return ""
    if "at_least" in t or "at_most" in t:
        if value is None:
            return ""
        if "at_least" in t:
            ok = value >= t["at_least"]
            return f"pilotfish >= {t['at_least']:,.0f}: {'PASS' if ok else 'FAIL'}"
        ok = value <= t["at_most"]
        return f"pilotfish <= {t['at_most']:g}: {'PASS' if ok else 'FAIL'}"
    if ratio is None:
        return ""
    if "min" in t:
        ok = "PASS" if ratio >= t["min"] else "FAIL"
        goal = " +goal" if ratio >= t["goal"] else ""
        return f">= {t['min']}x (goal {t['goal']}x): {ok}{goal}"
    ok = "PASS" if ratio <= t["max"] else "FAIL"
    goal = " +goal" if ratio <= t["goal"] else ""
    return f"<= {t['max']}x (goal {t['goal']}x): {ok}{goal}"


def print_table(m: dict, args: argparse.Namespace, sz: dict) -> None:
    peers = [p for p in PEERS if p in m]
    cols = [LABEL[p] for p in peers]
    have_pf = "pilotfish" in m
    if have_pf and "ppe" in m:
        cols.append("pf/PPE")
    if have_pf and "dask" in m:
        cols.append("pf/Dask")
    w0 = 32
    hdr = f"{'':{w0}}" + "".join(f"{c:>12}" for c in cols) + "   target"
    print()
    print(
        f"Medians of {args.repeat} repeat(s), {WORKERS} workers each; "
        f"{sz['noop_tasks']} no-ops, {sz['latency_rounds']} round trips, "
        f"{sz['chains']} chains x {sz['chain_len']}.  "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs."
    )
    print("Ratios are pilotfish / peer of the same row (> 1 = pilotfish larger).")
    print(hdr)
    print("-" * len(hdr))
    for key, label, fmt, _hib in ROWS:
        line = f"{label:{w0}}"
        for p in peers:
            line += f"{_fmt(m[p][key], fmt):>12}"
        ratio_ppe = None
        if have_pf and "ppe" in m:
            ratio_ppe = _ratio(m["pilotfish"][key], m["ppe"][key])
            line += f"{_fmt(ratio_ppe, '{:.2f}x'):>12}"
        if have_pf and "dask" in m:
            line += f"{_fmt(_ratio(m['pilotfish'][key], m['dask'][key]), '{:.2f}x'):>12}"
        v = verdict(key, ratio_ppe, m["pilotfish"][key] if have_pf else None)
        if v:
            line += "   " + v
        print(line)
    print()
    print("Rows 1-3 are the spec's scenarios; 'inc(i) throughput' is the same as row 1 with a")
    print("distinct argument per task (supplemental, no target).")


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    return {k: v[1 if args.quick else 0] for k, v in SIZES.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=None, help="repeats per scenario (default 5)")
    ap.add_argument("--json", metavar="PATH", help="write raw numbers to PATH")
    ap.add_argument(
        "--only",
        default=",".join(PEERS),
        help="comma-separated peers among pilotfish,ppe,dask (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="small smoke run (fewer tasks, repeat 1)")
    ap.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds allowed per runtime before it is killed (default 600)",
    )
    ap.add_argument("--verbose", action="store_true", help="show all child output")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_deadline", type=float, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 5
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    if args._child:
        return child_main(args)

    wanted = [p.strip().lower() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PEERS]
    if unknown or not wanted:
        ap.error(f"--only: unknown peer(s) {unknown}; choose from {','.join(PEERS)}")
    peers = [p for p in PEERS if p in wanted]
    if "dask" in peers:
        try:
            import distributed  # noqa: F401
        except ImportError as e:
            log(f"Dask is not available ({e}); skipping it. pip install 'dask[distributed]'")
            peers.remove("dask")

    import atexit

    atexit.register(_cleanup_current)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    sz = _sizes(args)
    results: dict[str, dict] = {}
    t0 = time.time()
    try:
        for p in peers:
            results[p] = run_child(p, args)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        _cleanup_current()
        if not results:
            return 130

    m = summarize(results)
    print_table(m, args, sz)
    problems = [(p, e) for p, r in results.items() for e in r.get("errors", [])]
    for p, r in results.items():
        if r.get("leaked"):
            print(f"!! {LABEL[p]}: processes left running after shutdown: {r['leaked']}")
    for p, e in problems:
        print(f"!! {LABEL[p]}: error in {e['where']}")
        if e.get("traceback"):
            print("   " + e["traceback"].rstrip().replace("\n", "\n   "))
    if args.json:
        doc = {
            "meta": {
                **machine_meta(t0),
                "workers": WORKERS,
                "repeat": args.repeat,
                "quick": args.quick,
                "sizes": sz,
                "targets": TARGETS,
            },
            "medians": m,
            "raw": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"raw numbers written to {args.json}")
    return 1 if problems or any(r.get("leaked") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
