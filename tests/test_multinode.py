"""pilotfish past the host boundary (issue 24): a 3-node cluster lab on one machine.

``scripts/lab-up.sh 3`` makes nodes node1..node3 (network + UTS namespaces at
10.77.0.11..13, each with its own hostname, the host at 10.77.0.1 on the bridge brpf);
a Dask scheduler runs on the host bound to 10.77.0.1 and one ``dask worker`` (with its
nanny, ``--nthreads 1 --name nodeK``) on each node; the client (this process) talks to
the scheduler over the bridge, as a login node would. The filesystem is shared, as on a
cluster: tasks leave traces in files the tests read. The tests then lose a node
(SIGKILL of all its processes), cut its link (a partition), and close its worker
gracefully (SIGTERM, as scancel or a preemption does), and check what a cluster user
expects: names of real hosts in every record, each task DONE once, the body never run
more often than attempts started, and a retry never running beside its lost attempt.

They run only when asked (``python -m pytest tests/test_multinode.py``, as its own CI
step), as root (else they skip, saying why); lab-up.sh runs once for the module and
lab-down.sh at its end. Measured numbers are printed (``-s`` shows them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")

import lab  # noqa: E402
import pilotfish  # noqa: E402
from conftest import wait_for  # noqa: E402

pytestmark = [
    # Dask's, not ours: transports collected late, warnings about workers that went away
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:.*[Ww]orker.*:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.timeout(150),
]

N = 3
CLIENT_HOST = socket.gethostname()
HEARTBEAT = 5.0  # the session's heartbeat_timeout in the fault tests


@pytest.fixture(scope="module")
def lab_nodes(request: pytest.FixtureRequest) -> Iterator[int]:
    """The lab's nodes (lab-up.sh 3), removed again at the end (lab-down.sh)."""
    asked = os.environ.get("PILOTFISH_LAB") == "1" or any(
        "test_multinode" in str(a) for a in request.config.args
    )
    if not asked:
        pytest.skip(
            "multi-node tests run when asked: python -m pytest tests/test_multinode.py "
            "(as root: scripts/lab-up.sh makes network namespaces)"
        )
    if os.geteuid() != 0:
        pytest.skip("the cluster lab needs root (network namespaces, veth pairs, a bridge)")
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"the cluster lab needs {tool}")
    r = lab.script("lab-up.sh", str(N))
    if r.returncode == 77:
        pytest.skip(r.stderr.strip() or "scripts/lab-up.sh: the lab cannot run here")
    assert r.returncode == 0, f"scripts/lab-up.sh failed:\n{r.stdout}\n{r.stderr}"
    try:
        yield N
    finally:
        d = lab.script("lab-down.sh")
        assert d.returncode == 0, f"scripts/lab-down.sh failed:\n{d.stdout}\n{d.stderr}"


@pytest.fixture(scope="module")
def cluster(lab_nodes: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.DaskLab]:
    """One Dask cluster for the module (started without any test's leak-check token:
    it outlives tests); a test that disturbs a node restarts that node's worker."""
    c = lab.DaskLab(lab_nodes, tmp_path_factory.mktemp("dask"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def fresh(cluster: lab.DaskLab) -> Iterator[lab.DaskLab]:
    """The cluster, with every node's worker present again after the test."""
    yield cluster
    cluster.restore()


def _start_on_some_node(trace: Path) -> str:
    """The host the first body run (see lab.ticking) started on."""
    wait_for(lambda: lab.read_trace(trace), timeout=60, interval=0.05)
    return lab.read_trace(trace)[0][1]


def _node(host: str) -> int:
    assert host.startswith("node"), host
    return int(host[4:])


# --------------------------------------------------------------------------- tests
def test_tasks_spread_over_nodes_and_records_name_them(fresh: lab.DaskLab, tmp_path: Path) -> None:
    """A cluster user expects tasks to run on every node, and every record (attempt,
    failure) to name the node that ran it (its hostname, its address on the cluster
    network), never the client's host or 127.0.0.1."""
    events: list[Any] = []
    with lab.session(fresh.address, tmp_path / "run", events) as s:
        ts = [s.submit(lab.where, i, 0.3) for i in range(12)]
        results = [t.result(timeout=90) for t in ts]
        bad = [s.submit(lab.fail_here, i) for i in range(6)]
        for b in bad:
            assert isinstance(b.exception(timeout=60), RuntimeError)
    hosts = {h for _i, h, _pid in results}
    print(f"\nhosts that ran the 12 tasks: {sorted(hosts)}")
    assert hosts == {f"node{k}" for k in range(1, N + 1)}
    for t, (_i, host, pid) in zip(ts, results, strict=True):
        (a,) = t.attempts
        assert a.outcome == "done" and a.host == host and a.pid == pid
        assert a.worker is not None and lab.node_ip(_node(host)) in a.worker, a.worker
    for b in bad:
        a = b.attempts[-1]
        f = a.failure
        assert f is not None and f.host == a.host and a.host is not None
        assert a.host.startswith("node") and a.host in f.message
        assert f.worker is not None and lab.node_ip(_node(a.host)) in f.worker
    for t in [*ts, *bad]:
        for a in t.attempts:
            assert a.host != CLIENT_HOST and "127.0.0.1" not in str(a.worker)
            if a.failure is not None:
                assert a.failure.host != CLIENT_HOST and "127.0.0.1" not in str(a.failure.worker)


def test_node_lost_task_finishes_on_another_node_once(fresh: lab.DaskLab, tmp_path: Path) -> None:
    """A node dies (every process SIGKILLed: power cut, kernel panic) while it runs a
    task: the user expects that attempt to be WORKER_LOST naming that node's host, the
    task to finish DONE on another node, recorded once, and the body to run no more
    often than attempts started (Dask's own rerun must not run it behind our back)."""
    events: list[Any] = []
    rundir, trace = tmp_path / "run", tmp_path / "trace"
    with lab.session(fresh.address, rundir, events) as s:
        t = s.submit(lab.ticking, str(trace), 20, 42)
        victim = _start_on_some_node(trace)
        t_kill = time.time()
        killed = lab.kill_node(_node(victim))
        value, host, _pid = t.result(timeout=90)
        assert value == 42 and host != victim
        first, *_, last = t.attempts
        assert first.outcome == "worker_lost" and first.host == victim, first
        f = first.failure
        assert f is not None and f.category is pilotfish.Category.WORKER_LOST
        assert lab.node_ip(_node(victim)) in str(f.worker), f
        assert last.outcome == "done" and last.host == host
        started = sum(1 for a in t.attempts if a.started is not None)
        lost_at = [
            w for w, e in events if isinstance(e, pilotfish.WorkerEvent) and e.kind == "lost"
        ]
        assert first.ended is not None and last.ended is not None
        lost_after = (lost_at[0] - t_kill) if lost_at else float("nan")
        print(
            f"\nnode lost: {victim} ({len(killed)} processes) SIGKILLed; attempt 1 "
            f"worker_lost after {first.ended - t_kill:.2f} s, WorkerEvent lost after "
            f"{lost_after:.2f} s; done on {host} {last.ended - t_kill:.2f} s after the "
            f"kill; {len(t.attempts)} attempts"
        )
        key = t.key
    runs = [r for r in lab.read_trace(trace) if r[0] == "start"]
    assert len(runs) <= started, (runs, t.attempts)
    done, outcomes = lab.journal_record(rundir, key)
    assert done == 1 and outcomes.count("done") == 1, outcomes


def test_retry_does_not_overlap_its_lost_attempt(fresh: lab.DaskLab, tmp_path: Path) -> None:
    """A node's worker is closed gracefully (SIGTERM to its nanny, what scancel or a
    preemption sends) while a task runs: the user expects the retry elsewhere not to
    run side by side with the lost attempt's body for more than ~1 s (issue 24 item 1:
    two runs writing the same outputs at once corrupt them)."""
    events: list[Any] = []
    rundir, trace = tmp_path / "run", tmp_path / "trace"
    with lab.session(fresh.address, rundir, events) as s:
        t = s.submit(lab.ticking, str(trace), 8, 7)
        victim = _start_on_some_node(trace)
        time.sleep(0.5)  # the body is well under way
        t_term = time.time()
        os.kill(fresh.nanny_pid(_node(victim)), signal.SIGTERM)
        value, host, _pid = t.result(timeout=90)
        assert value == 7
        wait_for(lambda: any(r[0] == "end" and r[1] == victim for r in lab.read_trace(trace))
                 or not lab.node_pids(_node(victim)), timeout=30, interval=0.1)  # fmt: skip
        started = sum(1 for a in t.attempts if a.started is not None)
        key = t.key
    rows = lab.read_trace(trace)
    old = [r[3] for r in rows if r[1] == victim]
    new = [r[3] for r in rows if r[1] != victim]
    runs = [r for r in rows if r[0] == "start"]
    first = t.attempts[0]
    overlap = (max(old) - min(new)) if old and new else 0.0
    ended = any(r[0] == "end" and r[1] == victim for r in rows)
    retry_start = (min(new) - t_term) if new else float("nan")
    print(
        f"\ngraceful close: SIGTERM to {victim}'s nanny; attempt 1 {first.outcome} "
        f"{(first.ended or t_term) - t_term:.2f} s later; its body ran on until "
        f"{max(old) - t_term:.2f} s (ended: {ended}); retry on {host} started "
        f"{retry_start:.2f} s after the SIGTERM; overlap {overlap:.2f} s; attempts "
        f"{[a.outcome for a in t.attempts]}, body runs {len(runs)}"
    )
    assert len(runs) <= started, (runs, t.attempts)
    done, outcomes = lab.journal_record(rundir, key)
    assert done == 1 and outcomes.count("done") == 1, outcomes
    assert overlap <= 1.0, f"the retry ran beside its lost attempt for {overlap:.2f} s"
    # issue 24 item 2: the words say it was running, not "holding the unfetched result"
    assert first.failure is not None and first.outcome == "worker_lost", first
    assert "unfetched" not in first.failure.message and victim in first.failure.message


def test_partition_loses_the_attempt_within_heartbeat_timeout(
    fresh: lab.DaskLab, tmp_path: Path
) -> None:
    """A node's link is cut (a network partition) while it runs a long task and healed
    15 s later: the user expects the attempt to be lost within the session's
    heartbeat_timeout and the task to finish on another node; after the heal, the
    partitioned node's late result must not be recorded a second time."""
    events: list[Any] = []
    rundir, trace = tmp_path / "run", tmp_path / "trace"
    with lab.session(fresh.address, rundir, events, heartbeat_timeout=HEARTBEAT) as s:
        t = s.submit(lab.ticking, str(trace), 25, 9)
        victim = _start_on_some_node(trace)
        k = _node(victim)
        t_cut = time.time()
        lab.link(k, up=False)
        try:
            lost = None
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and lost is None:
                if t.attempts[0].outcome is not None:
                    lost = time.time() - t_cut
                time.sleep(0.1)
        finally:
            lab.link(k, up=True)
        t_heal = time.time()
        value, host, _pid = t.result(timeout=90)
        assert value == 9
        wait_for(lambda: any(r[0] == "end" and r[1] == victim for r in lab.read_trace(trace))
                 or not lab.node_pids(k), timeout=40, interval=0.1)  # fmt: skip
        started = sum(1 for a in t.attempts if a.started is not None)
        first = t.attempts[0]
        key = t.key
    seen = "not lost during the cut" if lost is None else f"lost after {lost:.2f} s"
    kinds = [(round(w - t_cut, 2), e.kind) for w, e in events if hasattr(e, "kind")]
    print(
        f"\npartition: {victim}'s link cut for {t_heal - t_cut:.1f} s "
        f"(heartbeat_timeout={HEARTBEAT}); attempt 1 {seen}; outcomes "
        f"{[a.outcome for a in t.attempts]}, hosts {[a.host for a in t.attempts]}; result "
        f"from {host} {(t.attempts[-1].ended or t_heal) - t_heal:.1f} s after the heal; "
        f"events {kinds}"
    )
    runs = [r for r in lab.read_trace(trace) if r[0] == "start"]
    assert len(runs) <= started, (runs, t.attempts)
    done, outcomes = lab.journal_record(rundir, key)
    assert done == 1 and outcomes.count("done") == 1, outcomes
    assert lost is not None and lost <= HEARTBEAT + 1.0, f"attempt not lost in the cut: {lost}"
    assert first.outcome == "worker_lost" and host != victim
