"""pilotfish on a real 3-node SLURM (issue 24): the cluster lab with ``--slurm``.

``scripts/lab-up.sh 3 --slurm`` makes nodes node1..node3 (network + UTS namespaces at
10.77.0.11..13, the host at 10.77.0.1 on the bridge brpf) and a SLURM on them:
slurmctld on the host (port 6917), one slurmd per node, conf in
/run/pilotfish-lab/slurm (``SLURM_CONF``), SlurmdTimeout=10, KillWait=5. The client
(this process) makes ``pilotfish.cluster.slurm(jobs=3)``: the scheduler on the host's
10.77.0.1 (TLS), one worker per batch job and one job per node (each node has one CPU),
each worker listening on its node's address (``interface="eth0"`` inside the node).
The tests then cancel a job (scancel), fail a node (every process of node2 killed,
slurmd too) and break one (a program the tasks need missing from node3's PATH), and
check what a cluster user expects: nothing lost, each task DONE once, the body run no
more often than attempts started, the failure naming the job and the node, and how long
detection took.

They run only when asked (``python -m pytest tests/test_multinode_slurm.py``, as its
own CI step), as root (else they skip, saying why); lab-up.sh runs once for the module
and lab-down.sh at its end. Measured numbers are printed (``-s`` shows them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")
# not imported here: workers import this module's helpers, and importing dask_jobqueue
# sets a SIGINT handler, which fails outside a main thread
if importlib.util.find_spec("dask_jobqueue") is None:
    pytest.skip("the SLURM lab tests need dask-jobqueue", allow_module_level=True)

import lab  # noqa: E402
import pilotfish  # noqa: E402
from conftest import TOKEN_VAR, wait_for  # noqa: E402

pytestmark = [
    # Dask's, not ours: transports collected late, warnings about workers that went away
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:.*[Ww]orker.*:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.timeout(150),
]

N = 3
SLURM_CONF = "/run/pilotfish-lab/slurm/slurm.conf"
JOB_NAME = "pf-lab"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lab_slurm(request: pytest.FixtureRequest) -> Iterator[int]:
    """The lab's nodes with SLURM on them (lab-up.sh 3 --slurm), removed at the end
    (lab-down.sh); this process's client commands (sbatch, scontrol) use the lab's
    SLURM, and the jobs find pilotfish and these tests' tasks (sbatch exports the
    environment)."""
    asked = os.environ.get("PILOTFISH_LAB") == "1" or any(
        "test_multinode_slurm" in str(a) for a in request.config.args
    )
    if not asked:
        pytest.skip(
            "multi-node SLURM tests run when asked: python -m pytest "
            "tests/test_multinode_slurm.py (as root: scripts/lab-up.sh makes network "
            "namespaces and starts slurmctld and slurmd's)"
        )
    if os.geteuid() != 0:
        pytest.skip("the cluster lab needs root (network namespaces, a bridge, SLURM daemons)")
    for tool in ("ip", "nsenter", "unshare", "slurmctld", "slurmd", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            pytest.skip(f"the SLURM cluster lab needs {tool}")
    r = lab.script("lab-up.sh", str(N), "--slurm")
    if r.returncode == 77:
        pytest.skip(r.stderr.strip() or "scripts/lab-up.sh --slurm: the lab cannot run here")
    assert r.returncode == 0, f"scripts/lab-up.sh --slurm failed:\n{r.stdout}\n{r.stderr}"
    print(f"\n{r.stdout.strip()}")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = SLURM_CONF
    path = [str(lab.ROOT / "src"), str(lab.ROOT / "tests")]
    os.environ["PYTHONPATH"] = os.pathsep.join([*path, *filter(None, [saved["PYTHONPATH"]])])
    try:
        yield N
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        d = lab.script("lab-down.sh")
        assert d.returncode == 0, f"scripts/lab-down.sh failed:\n{d.stdout}\n{d.stderr}"


@pytest.fixture(scope="module")
def cluster(lab_slurm: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One ``pilotfish.cluster.slurm`` cluster for the module: 3 worker jobs, one per
    node, adaptive (a lost job is replaced). Started without any test's leak-check
    token, and its jobs drop the token (replacements are submitted during a test): they
    outlive tests."""
    from pilotfish.cluster import slurm

    d = tmp_path_factory.mktemp("slurm")
    for k in range(1, N + 1):  # each node's own program directory (see _tool)
        _tool(d, f"node{k}", present=True)
    token = os.environ.pop(TOKEN_VAR, None)
    try:
        c = slurm(
            cores=1,
            memory="500MB",
            walltime="00:30:00",
            jobs=N,
            interface="eth0",  # inside a node: its 10.77.0.1K
            queue="lab",
            log_directory=d / "logs",
            local_directory=str(d / "dask"),
            job_name=JOB_NAME,
            job_script_prologue=[f"unset {TOKEN_VAR}", f'export PATH="{d}/bin/$(hostname):$PATH"'],
            scheduler_options={"interface": "brpf", "dashboard_address": ":0"},
        )
    finally:
        if token is not None:
            os.environ[TOKEN_VAR] = token
    c._pilotfish_lab_dir = d
    try:
        assert c.scheduler_address.startswith(f"tls://{lab.HOST_IP}:"), c.scheduler_address
        _wait_one_worker_per_node(c)
        yield c
    finally:
        with contextlib.suppress(Exception):  # dask-jobqueue may assert on a lost job
            c.close(timeout=20)
        _cancel_all()


@pytest.fixture
def fresh(cluster: Any) -> Iterator[Any]:
    """The cluster, with a worker on every node again after the test (a failed node's
    slurmd restarted by lab-up.sh, the adaptive cluster's replacement job running)."""
    yield cluster
    r = lab.script("lab-up.sh", str(N), "--slurm")
    assert r.returncode == 0, f"scripts/lab-up.sh --slurm failed:\n{r.stdout}\n{r.stderr}"
    _wait_one_worker_per_node(cluster)


TOOL = "pf-labtool"


def _tool(d: Path, host: str, present: bool) -> None:
    """The program ``pf-labtool`` in node ``host``'s own directory on its jobs' PATH
    (``D/bin/nodeK``, put there by the job script): present, or removed (a node whose
    software is broken: a missing module, a failed mount)."""
    p = d / "bin" / host / TOOL
    if present:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text('#!/bin/sh\necho "$1 $(hostname)"\nsleep 0.3\n')
        p.chmod(0o755)
    else:
        p.unlink(missing_ok=True)


def _workers(cluster: Any) -> dict[str, str]:
    """The scheduler's workers: address -> host IP."""
    with distributed.Client(
        cluster.scheduler_address, set_as_default=False, security=cluster.security, timeout=30
    ) as c:
        info = c.scheduler_info(n_workers=-1)["workers"]
    return {addr: str(w.get("host")) for addr, w in info.items()}


def _wait_one_worker_per_node(cluster: Any, timeout: float = 90) -> None:
    want = sorted(lab.node_ip(k) for k in range(1, N + 1))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sorted(_workers(cluster).values()) == want:
            return
        time.sleep(0.3)
    raise AssertionError(f"workers (address -> host) are {_workers(cluster)}, not one per node")


def _squeue(*args: str) -> list[str]:
    r = subprocess.run(
        ["squeue", "-h", "-n", JOB_NAME, *args], capture_output=True, text=True, timeout=10
    )
    return r.stdout.split()


def _job_on(host: str) -> str:
    """The running worker job on node ``host``."""
    jobs = _squeue("-t", "RUNNING", "-w", host, "-o", "%i")
    assert len(jobs) == 1, f"worker jobs running on {host}: {jobs}"
    return jobs[0]


def _cancel_all() -> None:
    deadline = time.monotonic() + 30
    while _squeue("-o", "%i") and time.monotonic() < deadline:
        subprocess.run(["scancel", "-n", JOB_NAME], check=False, timeout=10)
        time.sleep(0.2)


def _lost_events(events: list[Any]) -> list[tuple[float, Any]]:
    return [(w, e) for w, e in events if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost"]


def _node(host: str) -> int:
    assert host.startswith("node"), host
    return int(host[4:])


# --------------------------------------------------------------------------- tests
def test_scancel_of_the_job_running_a_task(fresh: Any, tmp_path: Path) -> None:
    """The worker job running a task is scancelled mid-body: the user expects the
    attempt to be WORKER_LOST naming the job (CANCELLED, as SLURM says) and its node,
    the task DONE once on another node, the body run no more often than attempts
    started, and the cancelled body not running beside its retry for more than ~1 s."""
    events: list[Any] = []
    rundir, trace = tmp_path / "run", tmp_path / "trace"
    with lab.session(fresh.scheduler_address, rundir, events) as s:
        t = s.submit(lab.ticking, str(trace), 8, 11)
        wait_for(lambda: lab.read_trace(trace), timeout=60, interval=0.05)
        victim = lab.read_trace(trace)[0][1]
        job = _job_on(victim)
        time.sleep(0.5)  # the body is well under way
        t_cancel = time.time()
        subprocess.run(["scancel", job], check=True, timeout=10)
        value, host, _pid = t.result(timeout=90)
        assert value == 11
        wait_for(lambda: any(r[0] == "end" and r[1] == victim for r in lab.read_trace(trace))
                 or not _squeue("-j", job, "-o", "%i"), timeout=30, interval=0.1)  # fmt: skip
        started = sum(1 for a in t.attempts if a.started is not None)
        key = t.key
    rows = lab.read_trace(trace)
    old = [r[3] for r in rows if r[1] == victim]
    new = [r[3] for r in rows if r[1] != victim]
    runs = [r for r in rows if r[0] == "start"]
    first, last = t.attempts[0], t.attempts[-1]
    overlap = max(0.0, (max(old) - min(new))) if old and new else 0.0
    lost = _lost_events(events)
    message = first.failure.message if first.failure is not None else ""
    print(
        f"\nscancel: job {job} on {victim} cancelled; attempt 1 {first.outcome} "
        f"{(first.ended or t_cancel) - t_cancel:.2f} s later (WorkerEvent lost after "
        f"{(lost[0][0] - t_cancel) if lost else float('nan'):.2f} s); its body ran on "
        f"until {max(old) - t_cancel:.2f} s; retry on {host} started "
        f"{(min(new) - t_cancel) if new else float('nan'):.2f} s after the scancel; "
        f"overlap {overlap:.2f} s; attempts {[a.outcome for a in t.attempts]}, body runs "
        f"{len(runs)}\n  message: {message}"
    )
    assert len(runs) <= started, (runs, t.attempts)
    done, outcomes = lab.journal_record(rundir, key)
    assert done == 1 and outcomes.count("done") == 1, outcomes
    assert host != victim and last.outcome == "done" and last.host == host
    f = first.failure
    assert first.outcome == "worker_lost" and f is not None, first
    assert f.category is pilotfish.Category.WORKER_LOST
    assert f"SLURM job {job} CANCELLED" in f.message and victim in f.message, f.message
    assert overlap <= 1.0, f"the retry ran beside its cancelled attempt for {overlap:.2f} s"


def test_node_failure_with_its_slurmd(fresh: Any, tmp_path: Path) -> None:
    """node2 fails (every process killed, slurmd too: power cut, kernel panic) while it
    runs a task: the user expects that attempt WORKER_LOST naming node2 and its job
    within seconds, and the task DONE once on another node. SLURM itself notices only
    after SlurmdTimeout=10 s, so the job is RUNNING as far as SLURM knows; the worker's
    nanny does not answer either, so the message says the node stopped answering, not
    that a nanny starts a new worker."""
    events: list[Any] = []
    rundir = tmp_path / "run"
    traces = [tmp_path / f"trace{i}" for i in range(N)]
    with lab.session(fresh.scheduler_address, rundir, events) as s:
        ts = [s.submit(lab.ticking, str(tr), 6, i) for i, tr in enumerate(traces)]
        wait_for(lambda: all(lab.read_trace(tr) for tr in traces), timeout=60, interval=0.05)
        on = {lab.read_trace(tr)[0][1]: i for i, tr in enumerate(traces)}
        assert sorted(on) == [f"node{k}" for k in range(1, N + 1)], on  # one task per node
        i = on["node2"]
        job = _job_on("node2")
        time.sleep(0.5)
        t_kill = time.time()
        killed = lab.kill_node(2)
        results = [t.result(timeout=90) for t in ts]
        t = ts[i]
        started = sum(1 for a in t.attempts if a.started is not None)
        keys = [x.key for x in ts]
    value, host, _pid = results[i]
    assert value == i and host != "node2"
    first, last = t.attempts[0], t.attempts[-1]
    f = first.failure
    lost = _lost_events(events)
    detected = (first.ended or t_kill) - t_kill
    print(
        f"\nnode failure: node2 ({len(killed)} processes, slurmd included) SIGKILLed, job "
        f"{job}; attempt 1 {first.outcome} after {detected:.2f} s (WorkerEvent lost after "
        f"{(lost[0][0] - t_kill) if lost else float('nan'):.2f} s); done on {host} "
        f"{(last.ended or t_kill) - t_kill:.2f} s after the kill; attempts "
        f"{[a.outcome for a in t.attempts]}\n  message: {f.message if f else None}"
    )
    runs = [r for r in lab.read_trace(traces[i]) if r[0] == "start"]
    assert len(runs) <= started, (runs, t.attempts)
    for x, key in zip(ts, keys, strict=True):
        done, outcomes = lab.journal_record(rundir, key)
        assert done == 1 and outcomes.count("done") == 1, (x, outcomes)
    assert first.outcome == "worker_lost" and first.host == "node2", first
    assert f is not None and f.category is pilotfish.Category.WORKER_LOST
    assert lab.node_ip(2) in str(f.worker), f
    assert f"SLURM job {job}" in f.message and "node2" in f.message, f.message
    assert "as far as SLURM knows" in f.message and "stopped answering" in f.message
    # the node is dead: not "still RUNNING ... a nanny starts a new one"
    assert "nanny starts" not in f.message and "still RUNNING" not in f.message, f.message


def test_broken_node_is_drained(fresh: Any, tmp_path: Path) -> None:
    """node3 is broken: a program every task needs is missing from its PATH (a failed
    mount, a missing module). With Dask's default drain_after=(3 tasks, 600 s), the user
    expects node3 to be drained (a HostDrained event naming its worker or host), every
    task DONE once on the other nodes, and the failed attempts there not charged to the
    tasks' retries (each ENVIRONMENT attempt noted "not charged")."""
    d: Path = fresh._pilotfish_lab_dir
    events: list[Any] = []
    rundir = tmp_path / "run"
    _tool(d, "node3", present=False)
    try:
        t0 = time.time()
        with lab.session(fresh.scheduler_address, rundir, events) as s:
            ts = [s.executable([TOOL, str(i)], requires_programs=[TOOL]) for i in range(12)]
            for t in ts:
                t.result(timeout=120)
            t_done = time.time()
            keys = [t.key for t in ts]
            attempts = [t.attempts for t in ts]
    finally:
        _tool(d, "node3", present=True)
    drained = [(w, e) for w, e in events if isinstance(e, pilotfish.HostDrained)]
    env = [a for per in attempts for a in per if a.outcome == "environment"]
    first_env = min((a.ended or t0) for a in env) if env else float("nan")
    done_hosts = sorted({per[-1].host or "?" for per in attempts})
    print(
        f"\nbroken node3 ({TOOL} missing from its PATH): {len(env)} attempts ENVIRONMENT "
        f"on {sorted({a.host or '?' for a in env})}; drained "
        f"{[(round(w - t0, 2), e.kind, e.name, e.host) for w, e in drained]} "
        f"({(drained[0][0] - first_env) if drained else float('nan'):.2f} s after the "
        f"first ENVIRONMENT failure, {(drained[0][0] - t0) if drained else float('nan'):.2f}"
        f" s after submit); all 12 done after {t_done - t0:.1f} s on {done_hosts}; notes "
        f"{sorted({str(a.note) for a in env})}\n  reason: "
        f"{drained[0][1].reason if drained else None}"
    )
    assert all(per[-1].outcome == "done" for per in attempts)
    assert "node3" not in done_hosts
    for key in keys:
        done, outcomes = lab.journal_record(rundir, key)
        assert done == 1 and outcomes.count("done") == 1, outcomes
    assert env and all(a.host == "node3" for a in env), env
    assert all(a.note and a.note.startswith("not charged") for a in env), env
    assert drained, f"node3 was not drained after {len(env)} ENVIRONMENT failures"
    e = drained[0][1]
    assert e.host == "node3" or "node3" in e.name or lab.node_ip(3) in e.name, e
