"""Shared fixtures: sessions that are always closed, and a check that no process leaks.

Every test runs with a unique token in its environment; processes started by the
test inherit it, so after the test we can find any survivor, whoever its parent is
now (an orphaned worker is re-parented to init), and fail the test.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import pilotfish

TOKEN_VAR = "PILOTFISH_TEST_TOKEN"


def _survivors(token: str) -> list[psutil.Process]:
    found = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "status"]):
        if p.pid == me or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get(TOKEN_VAR) == token:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    token = uuid.uuid4().hex
    monkeypatch.setenv(TOKEN_VAR, token)
    yield token
    deadline = time.monotonic() + 5
    alive = _survivors(token)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = _survivors(token)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not alive, "processes left behind: " + ", ".join(
        f"{p.pid} {' '.join(p.cmdline())}" for p in alive if p.is_running()
    )


@pytest.fixture
def session(make_session: Callable[..., pilotfish.Session]) -> Iterator[pilotfish.Session]:
    with make_session(workers=2) as s:
        yield s


def wait_for(pred, timeout: float = 10.0, interval: float = 0.01):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


# ---------------------------------------------------------------- backends (conformance)
#
# Tests that take `session` or `make_session` run once per backend: the same assertions
# hold on every backend. A behaviour a backend cannot offer is skipped explicitly, with
# the reason, by `skip_on(...)`.

BACKENDS = ["local", "dask"]


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[Any]:
    """One LocalCluster (2 worker processes) for the conformance tests on Dask.

    Started without the per-test token in the environment, so its processes are not
    mistaken for leftovers of the test that happened to start it."""
    distributed = pytest.importorskip("distributed")
    import multiprocessing.resource_tracker

    token = os.environ.pop(TOKEN_VAR, None)
    try:
        multiprocessing.resource_tracker.ensure_running()
        # dashboard_address=None still binds :8787 in distributed 2026.8; ":0" does not
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    finally:
        if token is not None:
            os.environ[TOKEN_VAR] = token
    yield cluster
    cluster.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "dask":
        request.applymarker(pytest.mark.filterwarnings("ignore::ResourceWarning"))
        request.applymarker(pytest.mark.filterwarnings("ignore:.*[Ww]orker.*:UserWarning"))
    return name


@pytest.fixture
def make_session(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., pilotfish.Session]]:
    """Make a Session on the test's backend; every session made is closed afterwards."""
    made: list[pilotfish.Session] = []

    def make(**kw: Any) -> pilotfish.Session:
        kw.setdefault("rundir", str(tmp_path / f"run{len(made)}"))
        kw.setdefault("backoff", pilotfish.Backoff(base=0.01))
        if backend == "dask":
            cluster = request.getfixturevalue("dask_cluster")
            kw.pop("workers", None)  # the cluster decides
            kw.setdefault("address", cluster.scheduler_address)
        s = pilotfish.Session(backend=backend, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown(wait=True, cancel_futures=True)


def skip_on(backend: str, *names: str, reason: str) -> None:
    """An explicit, documented skip of a behaviour a backend cannot offer."""
    if backend in names:
        pytest.skip(f"not on {backend}: {reason}")
