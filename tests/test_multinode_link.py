"""The client's link to a Dask scheduler on another node, cut (issue 24 item 6).

The lab (``scripts/lab-up.sh 3``, see ``tests/test_multinode.py``) with the scheduler on
a head node (node3) and one worker on each of node1 and node2; the client (this process)
on the host. A blackhole route on the host cuts the host's link to node3 alone: the
scheduler and its workers still talk, the client hears nothing. For 10 s (shorter than
Dask's 30 s TCP timeout, so the connection holds): the session must say the scheduler
went silent, within seconds, and that it is heard again; every task must finish once,
with one attempt, its body run once. The measured numbers are printed (``-s``).

Run as its own CI step with ``tests/test_multinode.py`` (root only; skips otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")

import lab  # noqa: E402
import pilotfish  # noqa: E402
from conftest import wait_for  # noqa: E402
from pilotfish.store.reader import JournalReader  # noqa: E402

# the module's lab (up and down) and its marks (Dask's warnings, the timeout)
from test_multinode import lab_nodes, pytestmark  # noqa: E402, F401

HEAD = 3  # the node the scheduler runs on
CUT = 10.0  # s the client's link to it is cut


@pytest.fixture(scope="module")
def head_cluster(
    lab_nodes: int,  # noqa: F811  (the fixture imported above)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    c = lab.DaskLab(lab_nodes, tmp_path_factory.mktemp("dask-head"), head=HEAD)
    try:
        yield c
    finally:
        c.close()


def test_client_scheduler_link_cut_for_10_s(head_cluster: Any, tmp_path: Path) -> None:
    events: list[tuple[float, Any]] = []
    rundir, trace = tmp_path / "run", tmp_path / "trace"
    with lab.session(head_cluster.address, rundir, events) as s:
        ts = [s.submit(lab.ticking, str(trace), 6.0, i) for i in range(4)]
        wait_for(lambda: len(lab.read_trace(trace)) >= 2, timeout=60, interval=0.05)
        t_cut = time.time()
        lab.host_link(HEAD, up=False)
        try:
            wait_for(
                lambda: any(getattr(e, "kind", "") == "silent" for _, e in events),
                timeout=CUT,
                interval=0.1,
            )
            noticed = time.time() - t_cut
            time.sleep(max(0.0, CUT - noticed))
        finally:
            lab.host_link(HEAD, up=True)
        t_heal = time.time()
        values = [t.result(timeout=90)[0] for t in ts]
        back = wait_for(
            lambda: [w for w, e in events if getattr(e, "kind", "") == "answering"],
            timeout=30,
            interval=0.1,
        )
        attempts = [[a.outcome for a in t.attempts] for t in ts]
        keys = [t.key for t in ts]
    kinds = [
        (round(w - t_cut, 2), e.kind) for w, e in events if isinstance(e, pilotfish.MasterEvent)
    ]
    print(
        f"\nclient-scheduler link cut {t_heal - t_cut:.1f} s: reported silent after "
        f"{noticed:.2f} s, answering {back[0] - t_heal:.2f} s after the heal; "
        f"master events {kinds}; attempts {attempts}"
    )
    assert values == [0, 1, 2, 3]
    assert all(a == ["done"] for a in attempts), attempts  # no loss, no retry
    starts = [r for r in lab.read_trace(trace) if r[0] == "start"]
    assert len(starts) == 4, starts  # each body ran once
    assert [k for _, k in kinds] == ["started", "silent", "answering"], kinds
    j = JournalReader(rundir / "journal.db")
    try:
        for key in keys:
            assert lab.journal_record(rundir, key) == (1, ["done"]), key
        logged = [e["kind"] for e in j.events() if e["kind"].startswith("master-")]
        assert logged == ["master-silent", "master-answering"], logged
    finally:
        j.close()


LONG_CUT = 30.0  # s: past both sides' TCP timeouts, so the connection breaks
TCP_TIMEOUT = "12s"  # the client's and the scheduler's (Dask's default 30 s; least 11 s)


@pytest.fixture
def short_tcp_cluster(
    lab_nodes: int,  # noqa: F811  (the fixture imported above)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    env = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": TCP_TIMEOUT}
    c = lab.DaskLab(lab_nodes, tmp_path_factory.mktemp("dask-short-tcp"), head=HEAD, env=env)
    try:
        yield c
    finally:
        c.close()


def test_client_scheduler_link_cut_past_the_tcp_timeout(
    short_tcp_cluster: Any, tmp_path: Path
) -> None:
    """The cut outlasts the TCP timeouts: the client's connection breaks, the scheduler
    drops the client and lets go of its tasks. Two short bodies end during the cut (their
    results wait in the scheduler's log of the session's topic), two long ones are still
    running when the scheduler lets go (their workers end themselves: a released call
    must not run on beside its retry). After the heal pilotfish must reconnect, record
    what ran during the cut as it ran (the grants and results it missed), retry the lost
    attempts unblamed; every task DONE once, body runs <= started attempts, no retry
    beside the body it replaces."""
    import dask

    events: list[tuple[float, Any]] = []
    rundir, trace = tmp_path / "run", tmp_path / "trace"
    tcp = dask.config.set({"distributed.comm.timeouts.tcp": TCP_TIMEOUT})
    with tcp, lab.session(short_tcp_cluster.address, rundir, events, heartbeat_timeout=90) as s:
        fn = pilotfish.task(lab.ticking, retries=0)  # a charged retry would fail the test
        ts = [s.submit(fn, str(trace), secs, i) for i, secs in enumerate((6, 6, 40, 40))]
        wait_for(lambda: len(lab.read_trace(trace)) >= 2, timeout=60, interval=0.05)
        t_cut = time.time()
        lab.host_link(HEAD, up=False)
        try:
            time.sleep(LONG_CUT)
        finally:
            lab.host_link(HEAD, up=True)
        t_heal = time.time()
        values = [t.result(timeout=150)[0] for t in ts]
        attempts = [[a.outcome for a in t.attempts] for t in ts]
        notes = [a.note for t in ts for a in t.attempts if a.outcome == "runtime_lost"]
        keys = [t.key for t in ts]
    kinds = [
        (round(w - t_cut, 2), e.kind) for w, e in events if isinstance(e, pilotfish.MasterEvent)
    ]
    rows = lab.read_trace(trace)
    runs: dict[tuple[str, int], list[float]] = {}
    for _kind, host, pid, when in rows:
        runs.setdefault((host, pid), []).append(when)
    starts = [(r[1], r[2], r[3]) for r in rows if r[0] == "start"]
    ends = {(r[1], r[2]) for r in rows if r[0] == "end"}
    bodies = [
        (round(w - t_cut, 1), round(max(runs[(h, p)]) - t_cut, 1), (h, p) in ends)
        for h, p, w in starts
    ]
    print(
        f"\nclient-scheduler link cut {t_heal - t_cut:.1f} s (TCP timeouts {TCP_TIMEOUT}): "
        f"master events {kinds}; attempts {attempts}; bodies (started, last heard, ended) "
        f"{bodies} s after the cut"
    )
    assert values == [0, 1, 2, 3]
    assert [k for _, k in kinds][-2:] == ["lost", "restarted"], kinds
    assert all(a[-1] == "done" and set(a[:-1]) <= {"runtime_lost"} for a in attempts), attempts
    assert attempts[0] == attempts[1] == ["done"], attempts  # ran during the cut: recorded
    assert all(n and n.startswith("not charged") for n in notes), notes
    started = sum(len(a) for a in attempts)
    assert len(starts) <= started, (starts, attempts)  # no body ran unrecorded
    after = [w for _h, _p, w in starts if w > t_heal]
    for h, p, w in starts:  # a lost body ended before its retry began (or just after)
        if w < t_heal and (h, p) not in ends and after:
            assert max(runs[(h, p)]) <= min(after) + 1.0, (h, p, runs[(h, p)], after)
    for key in keys:
        done, _outcomes = lab.journal_record(rundir, key)
        assert done == 1, key
