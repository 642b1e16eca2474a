"""The bundled demo ensemble (``pilotfish demo``): every kind of failure, handled.

* eight simulation members succeed;
* member 13 raises a user exception (bad parameters);
* an MD-like program exits 2 after writing 300 lines of stderr;
* an analysis depends on member 13, so it fails with DependencyFailed at once;
* one member kills its own worker on the first try (a node failure): the worker is
  replaced and the member retried;
* a two-program chain passes a file from one program to the next;
* independent work keeps going throughout;
* it ends with the failure digest: the failures grouped by cause, largest group first.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import pilotfish
from pilotfish.digest import failure_digest


def simulate(seed: int, steps: int = 20000) -> float:
    """A stand-in for a simulation: a deterministic number from a seed."""
    if seed == 13:
        raise ValueError(
            f"seed {seed}: unstable parameters (time step too large for {steps} steps); reduce dt"
        )
    x = 0.0
    for i in range(steps):
        x += math.sin(seed * 0.001 * i)
    time.sleep(0.1)
    return x / steps


def simulate_on_flaky_node(seed: int, marker: str) -> float:
    """The first attempt dies with its node (SIGKILL of the worker); the retry succeeds."""
    if not os.path.exists(marker):
        Path(marker).write_text("the node died here once\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return simulate(seed)


def analyse(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "mean": sum(values) / len(values)}


def main(rundir: str, console: Any = None) -> dict[str, Any]:
    """Run the ensemble in ``rundir``; return its failure digest (plain data, see
    :func:`pilotfish.digest.failure_digest`), which ``pilotfish demo`` prints last."""
    say = console.print if console is not None else print
    Path(rundir).mkdir(mode=0o700, parents=True, exist_ok=True)  # private: pickles live there
    marker = os.path.join(rundir, "flaky-node-marker")
    if os.path.exists(marker):
        os.unlink(marker)

    def on_event(e: object) -> None:
        if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost":
            say(
                f"  [event] worker {e.worker} lost ({e.signal or e.returncode}); "
                f"it held {', '.join(e.held) or 'nothing'}"
            )

    with pilotfish.Session(
        workers=2, rundir=rundir, on_event=on_event, backoff=pilotfish.Backoff(base=0.05)
    ) as s:
        # first, so that its node dies early and the replacement worker takes over
        flaky = s.submit(simulate_on_flaky_node, 21, marker)
        members = [s.submit(simulate, seed) for seed in (1, 2, 3, 4, 5, 6, 7, 8)]
        bad = s.submit(simulate, 13)
        md = s.executable(
            [
                "sh",
                "-c",
                'for i in $(seq 1 300); do echo "step $i: energy drift warning" >&2; done; '
                'echo "FATAL: LINCS constraint failure at step 300" >&2; exit 2',
            ],
            name="mdrun",
        )
        prep = s.executable(
            ["sh", "-c", "echo 'atoms 1024' > topol.tpr"], outputs=["topol.tpr"], name="grompp"
        )
        run = s.executable(
            ["sh", "-c", "cat topol.tpr; echo 'converged' > confout.gro"],
            inputs={"topol.tpr": prep.output("topol.tpr")},
            outputs=["confout.gro"],
            name="mdrun-ok",
        )
        good = s.submit(analyse, [*members, flaky])
        doomed = s.submit(analyse, [bad, *members[:2]])
        for name, t in [
            ("ensemble analysis", good),
            ("chain", run),
            ("analysis of member 13", doomed),
            ("mdrun", md),
        ]:
            try:
                r = t.result()
                say(f"  {name}: ok -> {r if not hasattr(r, 'stdout') else r.stdout}")
            except Exception as e:
                first = str(e).strip().splitlines()[0]
                first = first if len(first) <= 60 else first[:59] + "…"
                say(f"  {name}: {type(e).__name__}: {first}")
        say(
            f"  flaky member: {len(flaky.attempts)} attempts, outcomes "
            f"{[a.outcome for a in flaky.attempts]}"
        )
        return failure_digest(s.failures())
