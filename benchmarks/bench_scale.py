"""One session, many no-op tasks: is the rate flat and is client memory bounded?

    python benchmarks/bench_scale.py                 # 1,000,000 no-ops (a few minutes)
    python benchmarks/bench_scale.py -n 200000 --json /tmp/scale.json

Tasks are submitted in windows of ``--window`` (10,000): window i+1 is submitted
before window i is waited for, so the workers never run dry, and a window's Tasks
are dropped once it is done, as a user who keeps only what they need does. For each
tenth of the run it prints the rate, the client's resident memory, and the memory
grown per finished task. The journal is on (the default), so every task is also a row
on disk. Not a test: nothing is asserted; read the table. The issue's goals: the
last tenth's rate within 20% of the first's, and < 1 KB of client memory per finished
task the user no longer holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from _tasks import noop

import pilotfish


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1_000_000, help="tasks (default 1,000,000)")
    ap.add_argument("--window", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the per-tenth numbers here")
    a = ap.parse_args()
    me = psutil.Process()
    tenth = max(a.window, a.n // 10 // a.window * a.window)
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        pilotfish.Session(workers=a.workers, rundir=os.path.join(tmp, "run")) as s,
    ):
        s.submit(noop).result()
        rss0 = me.memory_info().rss
        t0 = tprev = time.perf_counter()
        done = prev_done = 0
        previous: list[pilotfish.Task] = []
        submitted = 0
        while done < a.n:
            current = []
            if submitted < a.n:
                k = min(a.window, a.n - submitted)
                current = [s.submit(noop) for _ in range(k)]
                submitted += k
            pilotfish.wait(previous)
            done += len(previous)
            previous = current
            del current
            if done - prev_done >= tenth or (done >= a.n and done > prev_done):
                now = time.perf_counter()
                rss = me.memory_info().rss
                rows.append(
                    {
                        "done": done,
                        "rate": (done - prev_done) / (now - tprev),
                        "rss_mb": rss / 2**20,
                        "bytes_per_done": (rss - rss0) / done,
                        "held": len(s.tasks),
                    }
                )
                r = rows[-1]
                print(
                    f"{done:>9,} done  {r['rate']:>8,.0f} tasks/s  client RSS "
                    f"{r['rss_mb']:7.1f} MB  {r['bytes_per_done']:7.0f} B/task since start"
                    f"  (tasks held: {r['held']:,})",
                    flush=True,
                )
                tprev, prev_done = now, done
        total = time.perf_counter() - t0
        counts = s.counts()
    first, last = rows[0]["rate"], rows[-1]["rate"]
    print(
        f"\n{a.n:,} tasks in {total:.1f} s ({a.n / total:,.0f}/s); last tenth / first tenth "
        f"rate = {last / first:.2f}; client memory grew {rows[-1]['bytes_per_done']:.0f} B per "
        f"finished task; counts {counts}"
    )
    if a.json:
        Path(a.json).write_text(json.dumps({"n": a.n, "rows": rows, "total_s": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
