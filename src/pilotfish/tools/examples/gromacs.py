"""A real GROMACS ensemble with real failures (``pilotfish demo --gromacs``; needs ``gmx``).

A box of 221 SPC/E waters (2 nm, 663 atoms: seconds per run on one core) is prepared
once (solvate, topology, energy minimisation), then five members are run, each a
``gmx grompp`` program feeding a ``gmx mdrun`` program, and two analyses::

    prepare ──> grompp ──> mdrun     member
                  │                  ok          finishes
                  x  bad .mdp        bad-mdp     grompp exits 1: "Invalid enum 'mdx'",
                                                 its complete stderr kept; mdrun not run
                                     blow-up     dt 0.01: water cannot be settled, SIGSEGV
                                     node-lost   its worker is SIGKILLed after the first
                                                 checkpoint; the retry starts with md.cpt,
                                                 md.log, md.edr and ``-cpi md.cpt``
                                     walltime    ``-maxh`` stops it (exit 0, no md.gro): the
                                                 wrapper exits 75, retried from md.cpt
    analysis of ok, node-lost, walltime          succeeds
    analysis of blow-up                          DEPENDENCY_FAILED, root named

It ends with the failure digest. Facts behind it: ``/work/shared/notes/gromacs.md``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pilotfish
from pilotfish.digest import failure_digest

MDRUN = ["gmx", "mdrun", "-ntmpi", "1", "-ntomp", "1", "-pin", "off", "-deffnm", "md"]
GROMPP = ["gmx", "grompp", "-f", "md.mdp", "-c", "conf.gro", "-p", "topol.top", "-o", "md.tpr"]
ENV = {"GMX_MAXBACKUP": "-1", "OMP_NUM_THREADS": "1"}

PREPARE = """set -e
gmx solvate -cs spc216.gro -box 2.0 2.0 2.0 -o conf.gro
n=$(( $(sed -n 2p conf.gro) / 3 ))
printf '#include "oplsaa.ff/forcefield.itp"\\n#include "oplsaa.ff/spce.itp"\\n' > topol.top
printf '[ system ]\\nwater\\n[ molecules ]\\nSOL %s\\n' "$n" >> topol.top
gmx grompp -f em.mdp -c conf.gro -p topol.top -o em.tpr
gmx mdrun -ntmpi 1 -ntomp 1 -pin off -deffnm em
"""

EM_MDP = """integrator = steep
nsteps = 50
cutoff-scheme = Verlet
coulombtype = PME
rcoulomb = 0.9
rvdw = 0.9
rlist = 0.9
"""


def md_mdp(nsteps: int, dt: float = 0.002, seed: int = 7, extra: str = "") -> str:
    return f"""integrator = md
dt = {dt}
nsteps = {nsteps}
cutoff-scheme = Verlet
nstlist = 10
coulombtype = PME
rcoulomb = 0.9
rvdw = 0.9
rlist = 0.9
tcoupl = V-rescale
tc-grps = System
tau-t = 0.1
ref-t = 300
gen-vel = yes
gen-temp = 300
gen-seed = {seed}
ld-seed = {seed}
constraints = h-bonds
nstxout = 0
nstvout = 0
nstxout-compressed = 0
nstenergy = 500
nstlog = 1000
{extra}"""


# The member lost with its node: on its first attempt (no marker yet) mdrun runs in the
# background until its first checkpoint, then the worker ($PPID) is SIGKILLed, as when a
# node dies; pilotfish kills the program's process group with it.
LOSE_NODE = """if [ ! -e "$MARK" ]; then
  touch "$MARK"
  "$@" &
  while [ ! -s md.cpt ]; do sleep 0.1; done
  sleep 0.5
  kill -9 $PPID
  wait
fi
exec "$@"
"""

# The member with a walltime: mdrun -maxh stops cleanly (exit 0, checkpoint written, no
# md.gro); a job script says "not finished, run me again" with an exit code of its own.
WALLTIME = """"$@" || exit $?
if [ ! -e md.gro ]; then echo "walltime (-maxh) reached; continue from md.cpt" >&2; exit 75; fi
"""


def available() -> bool:
    return shutil.which("gmx") is not None


def count_atoms(paths: list[Path]) -> list[int]:
    """The analysis: atoms in each member's final structure."""
    return [int(Path(p).read_text().splitlines()[1]) for p in paths]


def main(rundir: str, console: Any = None) -> dict[str, Any]:
    """Run the ensemble in ``rundir``; return its failure digest."""
    say = console.print if console is not None else print
    inputs = Path(rundir).absolute() / "gromacs-inputs"
    members = _write_inputs(inputs)

    def on_event(e: object) -> None:
        if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost":
            say(f"  [event] worker {e.worker} lost ({e.signal or e.returncode}): {e.held}")

    with pilotfish.Session(
        workers=2, rundir=rundir, on_event=on_event, backoff=pilotfish.Backoff(base=0.05)
    ) as s:
        prep = s.executable(
            ["sh", "-c", PREPARE],
            inputs={"em.mdp": str(inputs / "em.mdp")},
            outputs=["em.gro", "topol.top"],
            env=ENV,
            name="prepare",
        )
        runs: dict[str, pilotfish.Task] = {}
        tprs: dict[str, pilotfish.Task] = {}
        for name in members:
            tprs[name], runs[name] = _member(s, name, inputs, prep)
        good = s.submit(
            count_atoms, [runs[n].output("md.gro") for n in ("ok", "node-lost", "walltime")]
        )
        doomed = s.submit(count_atoms, [runs["blow-up"].output("md.gro")])
        shown = [
            *((n, tprs[n] if n == "bad-mdp" else t) for n, t in runs.items()),
            ("analysis", good),
            ("analysis of blow-up", doomed),
        ]
        for name, t in shown:
            _say_outcome(say, name, t)
        return failure_digest(s.failures())


def _write_inputs(inputs: Path) -> list[str]:
    """The .mdp files of the energy minimisation and of each member (one with a bad
    option, one that blows up, two slow ones: the node lost, the walltime reached);
    returns the members' names."""
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "em.mdp").write_text(EM_MDP)
    mdps = {
        "ok": md_mdp(1500),
        "bad-mdp": md_mdp(1500).replace("integrator = md", "integrator = mdx"),
        "blow-up": md_mdp(5000, dt=0.01, extra="verlet-buffer-tolerance = -1\n"),
        "node-lost": md_mdp(5000, seed=11),
        "walltime": md_mdp(5000, seed=13),
    }
    for name, text in mdps.items():
        (inputs / f"{name}.mdp").write_text(text)
    (inputs / "node-lost.marker").unlink(missing_ok=True)
    return list(mdps)


def _member(
    s: pilotfish.Session, name: str, inputs: Path, prep: pilotfish.Task
) -> tuple[pilotfish.Task, pilotfish.Task]:
    """One member: grompp (its .tpr), then mdrun; the node-lost and walltime members
    resume from their checkpoint."""
    tpr = s.executable(
        GROMPP,
        inputs={
            "md.mdp": str(inputs / f"{name}.mdp"),
            "conf.gro": prep.output("em.gro"),
            "topol.top": prep.output("topol.top"),
        },
        outputs=["md.tpr"],
        env=ENV,
        name=f"grompp-{name}",
    )
    common: dict[str, Any] = {
        "inputs": {"md.tpr": tpr.output("md.tpr")},
        "outputs": ["md.gro", "md.log"],
        "env": ENV,
        "name": f"mdrun-{name}",
    }
    if name == "node-lost":
        cpt = [*MDRUN, "-cpt", "0.02"]
        marker = inputs / "node-lost.marker"
        return tpr, s.executable(
            ["sh", "-c", LOSE_NODE, "sh", *cpt],
            resume_files=["md.cpt", "md.log", "md.edr"],
            resume_argv=[*cpt, "-cpi", "md.cpt"],
            retries=2,
            **{**common, "env": {**ENV, "MARK": str(marker)}},
        )
    if name == "walltime":
        maxh = [*MDRUN, "-maxh", "0.0006"]
        return tpr, s.executable(
            ["sh", "-c", WALLTIME, "sh", *maxh],
            resume_files=["md.cpt", "md.log", "md.edr"],
            resume_argv=["sh", "-c", WALLTIME, "sh", *maxh, "-cpi", "md.cpt"],
            retry_exit_codes=[75],
            retries=5,
            **common,
        )
    return tpr, s.executable(MDRUN, **common)


def _say_outcome(say: Any, name: str, t: pilotfish.Task) -> None:
    """How task ``t`` ended, its attempts' outcomes, where its stderr is, its notes."""
    try:
        t.result()
        what = "ok"
    except Exception as e:
        first = str(e).strip().splitlines()[0]
        what = f"{type(e).__name__}: {first if len(first) <= 70 else first[:69] + '…'}"
    outcomes = [a.outcome for a in t.attempts]
    say(f"  {name}: {what}  (attempts: {', '.join(o or '?' for o in outcomes) or '-'})")
    if t.failure is not None and t.failure.stderr_path:
        say(f"      complete stderr kept: {t.failure.stderr_path}")
    for a in t.attempts:
        if a.note:
            say(f"      attempt {a.number}: {a.note}")


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(main(os.environ.get("PILOTFISH_RUNDIR", ".pilotfish-gromacs")), indent=1))
