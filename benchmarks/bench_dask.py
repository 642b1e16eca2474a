#!/usr/bin/env python
"""pilotfish-on-Dask vs raw Dask: the overhead of the Dask backend, on one cluster.

Run from the repository root::

    python benchmarks/bench_dask.py                       # 5 repeats
    python benchmarks/bench_dask.py --repeat 3 --json /tmp/bench_dask.json
    python benchmarks/bench_dask.py --tasks 5000 --profile /tmp/pf.prof

One ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` serves every
variant in one run: raw Dask (``Client.submit(..., pure=False)``, futures as
dependencies), ``Session(backend="dask", journal=None)`` and
``Session(backend="dask", journal=True)``. Each repeat runs every variant once, in a
rotating order; a fresh pilotfish session is opened (and warmed up, untimed) per
measurement. Printed: medians over the repeats and the ratios pilotfish/raw
(ms per task; lower is better). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import logging
import multiprocessing.resource_tracker
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # LocalCluster workers are spawned with this sys.path

import _tasks  # noqa: E402
from bench import machine_meta  # noqa: E402

VARIANTS = ("raw", "raw_gather", "pf", "pf_journal", "pf_unlinked")
LABEL = {
    "raw": "raw Dask",
    "raw_gather": "raw Dask + gather all",
    "pf": "pilotfish journal=None",
    "pf_journal": "pilotfish journal=True",
    "pf_unlinked": "pf journal, links=False",
}
#: DESIGN.md section 6 / issue 26: pilotfish on Dask, journal on, against raw Dask
TARGET = {"noop": 1.1, "chains": 1.5}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =========================================================================== variants
class Raw:
    """``gather=True``: wait by fetching every value to the client, as pilotfish does."""

    def __init__(self, client: Any, gather: bool = False) -> None:
        self.c = client
        self.gather = gather

    def noop(self, n: int) -> list[Any]:
        return [self.c.submit(_tasks.noop, pure=False) for _ in range(n)]

    def chains(self, n: int, length: int) -> tuple[list[Any], list[Any]]:
        keep, finals = [], []
        for i in range(n):
            f = self.c.submit(_tasks.inc, i, pure=False)
            for _ in range(length - 1):
                keep.append(f)
                f = self.c.submit(_tasks.inc, f, pure=False)
            finals.append(f)
        return finals, keep

    def wait(self, futs: list[Any]) -> None:
        import distributed

        if self.gather:
            self.c.gather(futs)
        else:
            distributed.wait(futs)

    def values(self, futs: list[Any]) -> list[Any]:
        return list(self.c.gather(futs))

    def close(self) -> None:
        pass


class Pf:
    """``links=False``: each chain step is sent once its input is done (the session's
    round trip per link, as before linked dispatch); else Dask's scheduler chains them."""

    def __init__(self, address: str, journal: bool, links: bool = True) -> None:
        import pilotfish

        self.rundir = tempfile.mkdtemp(prefix="pilotfish-bench-dask-")
        self.s = pilotfish.Session(
            backend="dask",
            address=address,
            journal=True if journal else None,
            rundir=self.rundir,
            links=links,
        )

    def noop(self, n: int) -> list[Any]:
        return [self.s.submit(_tasks.noop) for _ in range(n)]

    def chains(self, n: int, length: int) -> tuple[list[Any], list[Any]]:
        finals = []
        for i in range(n):
            f = self.s.submit(_tasks.inc, i)
            for _ in range(length - 1):
                f = self.s.submit(_tasks.inc, f)
            finals.append(f)
        return finals, []

    def wait(self, futs: list[Any]) -> None:
        cf.wait(futs)

    def values(self, futs: list[Any]) -> list[Any]:
        return [f.result() for f in futs]

    def close(self) -> None:
        try:
            self.s.shutdown(wait=True)
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)


# =========================================================================== scenarios
def sc_noop(rt: Any, n: int) -> dict[str, float]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    futs = rt.noop(n)
    t1 = time.perf_counter()
    rt.wait(futs)
    t2, cpu1 = time.perf_counter(), time.process_time()
    bad = [f for f in futs if f.exception() is not None]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} no-ops failed; first: {bad[0].exception()!r}")
    return {
        "ms_per_task": (t2 - t0) * 1e3 / n,
        "submit_ms_per_task": (t1 - t0) * 1e3 / n,
        "client_cpu_ms_per_task": (cpu1 - cpu0) * 1e3 / n,
        "wall_s": t2 - t0,
    }


def sc_chains(rt: Any, n: int, length: int) -> dict[str, float]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    finals, keep = rt.chains(n, length)
    rt.wait(finals)
    t1, cpu1 = time.perf_counter(), time.process_time()
    got = rt.values(finals)
    del keep
    if got != [i + length for i in range(n)]:
        raise RuntimeError(f"wrong chain results: first {got[:5]}")
    return {
        "ms_per_task": (t1 - t0) * 1e3 / (n * length),
        "client_cpu_ms_per_task": (cpu1 - cpu0) * 1e3 / (n * length),
        "wall_s": t1 - t0,
    }


def warm_up(rt: Any) -> None:
    rt.wait(rt.noop(200))
    rt.values(rt.chains(20, 4)[0])


# =========================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=5, help="repeats (default 5)")
    ap.add_argument("--tasks", type=int, default=2000, help="no-op tasks (default 2000)")
    ap.add_argument("--chains", type=int, default=500, help="chains (default 500)")
    ap.add_argument("--chain-len", type=int, default=4, help="tasks per chain (default 4)")
    ap.add_argument(
        "--only", default=",".join(VARIANTS), help=f"variants among {','.join(VARIANTS)}"
    )
    ap.add_argument("--json", metavar="PATH", help="write raw numbers and medians to PATH")
    ap.add_argument(
        "--profile",
        metavar="PATH",
        help="cProfile the client thread during the pilotfish journal=None measurements "
        "(pstats file; only the thread that submits and waits, not Dask's event loop)",
    )
    args = ap.parse_args(argv)
    variants = [v for v in VARIANTS if v in args.only.split(",")]
    if args.repeat < 1 or not variants:
        ap.error("need --repeat >= 1 and at least one variant")

    import distributed

    logging.getLogger("distributed").setLevel(logging.ERROR)
    multiprocessing.resource_tracker.ensure_running()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    raw: dict[str, dict[str, list[dict[str, float]]]] = {
        v: {"noop": [], "chains": []} for v in variants
    }
    t_start = time.time()
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        raws = {"raw": Raw(client), "raw_gather": Raw(client, gather=True)}
        warm_up(raws["raw"])
        for r in range(args.repeat):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                rt: Any = (
                    raws[v]
                    if v in raws
                    else Pf(cluster.scheduler_address, v != "pf", links=v != "pf_unlinked")
                )
                try:
                    if v not in raws:
                        warm_up(rt)
                    use = prof is not None and v == "pf"
                    with prof if use else contextlib.nullcontext():  # type: ignore[attr-defined]
                        a = sc_noop(rt, args.tasks)
                        b = sc_chains(rt, args.chains, args.chain_len)
                finally:
                    rt.close()
                raw[v]["noop"].append(a)
                raw[v]["chains"].append(b)
                log(
                    f"repeat {r + 1}/{args.repeat} {LABEL[v]:<24} no-op "
                    f"{a['ms_per_task']:.3f} ms/task "
                    f"(client CPU {a['client_cpu_ms_per_task']:.3f}), "
                    f"chains {b['ms_per_task']:.3f} ms/task "
                    f"(client CPU {b['client_cpu_ms_per_task']:.3f})"
                )

    med = {
        v: {
            sc: {k: statistics.median(x[k] for x in raw[v][sc]) for k in raw[v][sc][0]}
            for sc in ("noop", "chains")
        }
        for v in variants
    }
    print(
        f"\nmedians over {args.repeat} repeats, {args.tasks} no-ops, "
        f"{args.chains} chains x {args.chain_len}; ms per task (lower is better)"
    )
    print(
        f"{'variant':<26}{'no-op':>9}{'ratio':>8}{'chains':>9}{'ratio':>8}  client CPU no-op/chain"
    )
    for v in variants:
        n, c = med[v]["noop"], med[v]["chains"]
        line = f"{LABEL[v]:<26}{n['ms_per_task']:>9.3f}"
        if "raw" in med and v not in raws:
            rn = n["ms_per_task"] / med["raw"]["noop"]["ms_per_task"]
            line += f"{rn:>7.2f}x"
        else:
            line += " " * 8
        line += f"{c['ms_per_task']:>9.3f}"
        if "raw" in med and v not in raws:
            rc = c["ms_per_task"] / med["raw"]["chains"]["ms_per_task"]
            line += f"{rc:>7.2f}x"
        else:
            line += " " * 8
        line += f"  {n['client_cpu_ms_per_task']:.3f}/{c['client_cpu_ms_per_task']:.3f}"
        print(line)
    print(
        f"target (journal on): no-ops at most {TARGET['noop']}x raw Dask, "
        f"chains at most {TARGET['chains']}x"
    )
    if prof is not None:
        prof.dump_stats(args.profile)
        print(f"client-thread profile written to {args.profile}")
    if args.json:
        doc = {
            "meta": {
                **machine_meta(t_start),
                "loadavg": os.getloadavg(),
                "distributed": distributed.__version__,
                "args": vars(args),
            },
            "medians": med,
            "raw": raw,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
