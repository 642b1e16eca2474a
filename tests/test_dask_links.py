"""Linked chains on Dask (issue 26): a task whose inputs are still running is handed to
Dask at once, as a Dask task that depends on its inputs' tasks, so Dask's scheduler
chains them (the rules are the core's: tests/test_links.py). Here: that it happens, that
values (large ones too) pass from worker to worker, that an input that fails or is gone
leaves its dependents unrun and uncharged, and that ``links=False`` turns it off. The
kill of a chain's head on every backend is in the fault matrix."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")

import faulty_matrix as fm  # noqa: E402
import pilotfish  # noqa: E402
from conftest import wait_for  # noqa: E402
from pilotfish import Category  # noqa: E402
from pilotfish.backends.dask import DaskBackend, DaskHooks  # noqa: E402
from pilotfish.wire.messages import RunAttempt  # noqa: E402
from test_callables import add  # noqa: E402
from test_dask_backend import _local_cluster, _start_resource_tracker  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:.*[Ww]orker.*:UserWarning"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    _start_resource_tracker()
    with _local_cluster() as c:
        yield c


def slow_value(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def slow_fail(seconds: float) -> None:
    time.sleep(seconds)
    raise ValueError("the input broke")


def session(cluster: Any, tmp_path: Path, **kw: Any) -> tuple[pilotfish.Session, list[Any]]:
    """A session on ``cluster`` and the RunAttempts its backend handed to Dask."""
    sent: list[RunAttempt] = []
    hook = kw.pop("before_batch", None)

    def before(batch: list[RunAttempt]) -> None:
        sent.extend(batch)
        if hook is not None:
            hook(batch)

    b = DaskBackend(
        address=cluster.scheduler_address,
        rundir=str(tmp_path / "run"),
        hooks=DaskHooks(before_batch=before),
        **kw,
    )
    s = pilotfish.Session(backend=b, rundir=str(tmp_path / "run"), backoff=pilotfish.Backoff(0.01))
    return s, sent


def test_a_chain_goes_to_dask_at_once_linked(cluster: Any, tmp_path: Path) -> None:
    """While the head runs, the three after it are already with Dask, each depending on
    the one before; every link runs once and gets its input's value."""
    s, sent = session(cluster, tmp_path)
    with s:
        head = s.submit(slow_value, 2.0, 1)
        chain = [head]
        for _ in range(3):
            chain.append(s.submit(add, chain[-1], 1))
        wait_for(lambda: len(sent) >= 4, timeout=30)
        assert not head.done()  # the whole chain was handed over while the head ran
        assert [t.result(timeout=60) for t in chain] == [1, 2, 3, 4]
    by_key = {m.key: m for m in sent}
    for up, t in itertools.pairwise(chain):
        m = by_key[t.key]
        assert m.links == ((0, up.attempts[0].id),) and m.deps[0] == b"", m
        assert [a.outcome for a in t.attempts] == ["done"]
    assert len(sent) == 4  # nothing sent twice


def test_a_large_value_passes_from_worker_to_worker(cluster: Any, tmp_path: Path) -> None:
    """A value larger than what travels on the event topic goes to the linked task
    through Dask (worker to worker), and the client still gets it for the head."""
    s, sent = session(cluster, tmp_path)
    big = "x" * 200_000
    with s:
        head = s.submit(slow_value, 0.5, big)
        n = s.submit(len, head)
        assert n.result(timeout=60) == 200_000 and head.result(timeout=60) == big
    assert [m.links for m in sent if m.key == n.key] == [((0, head.attempts[0].id),)]


def test_an_input_that_fails_leaves_its_dependents_unrun(cluster: Any, tmp_path: Path) -> None:
    """The head raises: what was linked to it never runs (its body records every run),
    is not charged, and fails DEPENDENCY_FAILED naming the head."""
    count = str(tmp_path / "count")
    s, sent = session(cluster, tmp_path)
    with s:
        head = s.submit(pilotfish.task(slow_fail).options(retries=0), 0.5)
        after = s.submit(fm.plus, count, head, 1)
        last = s.submit(fm.plus, count, after, 1)
        with pytest.raises(pilotfish.DependencyFailed) as info:
            last.result(timeout=60)
    assert isinstance(info.value.__cause__, ValueError)
    assert not os.path.exists(count)  # no body of the chain ran
    assert any(m.links for m in sent)
    for t in (after, last):
        assert t.failure is not None and t.failure.category is Category.DEPENDENCY_FAILED
        assert t.failure.root == head.key
        assert all(a.outcome == "dropped" and a.started is None for a in t.attempts)


def test_an_input_gone_from_dask_unlinks_and_takes_the_value(cluster: Any, tmp_path: Path) -> None:
    """The head ends before its dependent is handed to Dask (held back here): there is no
    Dask task to depend on any more. The dependent is not run linked: it is dropped
    (Unlinked, not charged) and sent again with the head's value from the client."""
    held: list[pilotfish.Task] = []

    def hold_linked(batch: list[RunAttempt]) -> None:
        if any(m.links for m in batch):  # (the head went in an earlier batch)
            wait_for(lambda: held and held[0].done(), timeout=30)
            time.sleep(0.2)  # the backend lets go of the head's Dask future

    s, sent = session(cluster, tmp_path, before_batch=hold_linked)
    with s:
        head = s.submit(slow_value, 2.0, 20)
        held.append(head)
        wait_for(head.running, timeout=30)
        after = s.submit(add, head, 1)
        assert after.result(timeout=60) == 21
    first, second = after.attempts
    assert first.outcome == "dropped" and first.started is None
    assert first.note is not None and "not charged" in first.note and "no longer" in first.note
    assert second.outcome == "done"
    assert [m.links for m in sent if m.key == after.key] == [((0, head.attempts[0].id),), ()]


def test_links_false_sends_each_task_with_its_inputs_values(cluster: Any, tmp_path: Path) -> None:
    s, sent = session(cluster, tmp_path, links=False)
    with s:
        t = s.submit(add, s.submit(slow_value, 0.3, 1), 1)
        assert t.result(timeout=60) == 2
    assert all(not m.links for m in sent)


def test_links_must_be_a_bool(cluster: Any, tmp_path: Path) -> None:
    with pytest.raises(pilotfish.InvalidTask, match=r"links=.yes. is invalid: give True"):
        pilotfish.Session(
            backend="dask", address=cluster.scheduler_address, rundir=str(tmp_path), links="yes"
        )
