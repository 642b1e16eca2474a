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
from pilotfish.runtime import procs as _procs

TOKEN_VAR = "PILOTFISH_TEST_TOKEN"


def _survivors(token: str) -> list[psutil.Process]:
    return _procs.with_env(TOKEN_VAR, {token})


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
    desc = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            desc.append(f"{p.pid} {' '.join(p.cmdline())}")
            p.kill()
    assert not desc, "processes left behind: " + ", ".join(desc)


@pytest.fixture
def session(make_session: Callable[..., pilotfish.Session]) -> Iterator[pilotfish.Session]:
    with make_session(workers=2) as s:
        yield s


def fake_session(rundir: str | Path, workers: int | None = 2, **kw: Any) -> pilotfish.Session:
    """A Session on :class:`pilotfish.backends.fake.FakeBackend` (``workers`` threads in
    this process): for what the client alone decides (arguments, keys, dependencies,
    policies, journal, events), where a real worker process would only cost time."""
    from pilotfish.backends.fake import FakeBackend

    fake = FakeBackend(workers=workers or 2, rundir=str(rundir), preload=kw.pop("preload", ()))
    return pilotfish.Session(workers, backend=fake, rundir=str(rundir), **kw)


#: backends that send a retry to another worker than its task failed on (RADICAL-Pilot's
#: workers pull tasks off a queue: a retry may reach the same worker)
RETRY_ELSEWHERE = ("local", "dask", "fake")


def environment_attempts(task: Any, backend: str) -> None:
    """A task failed ENVIRONMENT as the policy says on every backend: one attempt, or,
    where draining is on (by default on Dask and RADICAL-Pilot), one free retry (the
    first failure may be that worker's image), on *another* worker where the backend
    can choose, both ENVIRONMENT, never a third."""
    outcomes = [a.outcome for a in task.attempts]
    assert outcomes in (["environment"], ["environment", "environment"]), task.attempts
    if len(outcomes) == 2:
        first, second = task.attempts
        assert first.note and first.note.startswith("not charged: ENVIRONMENT"), first
        if backend in RETRY_ELSEWHERE:
            assert first.worker != second.worker, task.attempts


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
# the reason, by `skip_on(...)`. `--backends` chooses the backends: local, dask and fake
# by default; `.ci/run` runs the suite on radical in its own step (RADICAL-Pilot needs an
# activated venv and a private HOME):
#     pytest tests/test_callables.py tests/test_commands.py --backends radical -k radical
# "fake" is :class:`pilotfish.backends.fake.FakeBackend`: the same Session, workflow core,
# ledger and driver, with attempts run in threads of the test process, so what needs a
# process of its own (a timeout that kills, a worker killed, a crash, containment of
# children, per-process state, a process's stdio, interpreter exit) is skipped there.

ALL_BACKENDS = ("local", "dask", "radical", "fake")

# Reasons for skip_on(backend, "fake", reason=...), one wording per limit of the fake.
FAKE_NO_PROCESS = "FakeBackend runs attempts in threads of the test process"
FAKE_NO_KILL = FAKE_NO_PROCESS + ": user code cannot be killed (a timeout lets it run on)"
FAKE_NO_WORKER = FAKE_NO_PROCESS + ": there is no worker process to kill or crash"
FAKE_NO_CLIENT = (
    FAKE_NO_PROCESS + ": a client killed is the runtime killed, and the fake is a backend "
    "object, not a name a client's script can ask for"
)
FAKE_NO_CONTAINMENT = (
    FAKE_NO_PROCESS + ", which is no child subreaper: what an attempt detaches escapes"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default="local,dask,fake",
        help="comma-separated backends the conformance tests run on "
        f"(of {', '.join(ALL_BACKENDS)}; default: local,dask,fake)",
    )


def _chosen_backends(config: pytest.Config) -> list[str]:
    names = [n.strip() for n in str(config.getoption("--backends")).split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_BACKENDS]
    if bad or not names:
        raise pytest.UsageError(
            f"--backends={config.getoption('--backends')!r}: unknown backend(s) {bad}; "
            f"choose from {', '.join(ALL_BACKENDS)}"
        )
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _chosen_backends(metafunc.config), indirect=True)


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


RP_MODULE_VAR = "PILOTFISH_RP_TEST_PILOT"


def with_env(var: str, value: str) -> list[psutil.Process]:
    """Live processes (not this one) whose environment has var=value."""
    return _procs.with_env(var, {value})


def pid_alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@pytest.fixture(scope="session")
def rp_pilot() -> Iterator[tuple[Any, Any]]:
    """One RADICAL-Pilot ``local.localhost`` pilot and its TaskManager for the test run.

    Its start-up costs ~15 s, so it is paid once; every test starts its own pilotfish
    raptor master and workers on it and must end them. Started under a private HOME,
    with the per-test token removed from the environment (RP's processes outlive the
    test that happens to start the pilot); a token of its own lets the teardown check
    that no RP process survived ``session.close``."""
    rp = pytest.importorskip("radical.pilot")
    import sys
    import tempfile

    saved = {k: os.environ.get(k) for k in (TOKEN_VAR, "HOME", "RADICAL_REPORT_ANIME")}
    home = tempfile.mkdtemp(prefix="pf-rp-home-")
    pilot_token = uuid.uuid4().hex
    os.environ.pop(TOKEN_VAR, None)
    os.environ.update(HOME=home, RADICAL_REPORT_ANIME="0", **{RP_MODULE_VAR: pilot_token})
    if sys.prefix != sys.base_prefix:  # RP's local resource needs an "activated" venv
        os.environ.setdefault("VIRTUAL_ENV", sys.prefix)
        os.environ["PATH"] = os.path.join(sys.prefix, "bin") + os.pathsep + os.environ["PATH"]
    cwd = os.getcwd()
    os.chdir(home)  # RP writes its client session directory into the cwd
    session = None
    try:
        session = rp.Session()
        pmgr = rp.PilotManager(session)
        pilot = pmgr.submit_pilots(
            rp.PilotDescription(
                {"resource": "local.localhost", "cores": 8, "runtime": 60, "exit_on_error": False}
            )
        )
        pilot.wait([rp.PMGR_ACTIVE, *rp.FINAL], timeout=180)
        assert pilot.state == rp.PMGR_ACTIVE, f"pilot did not start: {pilot.state}"
        tmgr = rp.TaskManager(session)  # an RP pilot belongs to one TaskManager only
        tmgr.add_pilots(pilot)
    except BaseException:
        if session is not None:
            session.close(download=False)
        raise
    finally:
        os.chdir(cwd)
        for k in (TOKEN_VAR, "HOME"):
            if saved[k] is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = saved[k]  # type: ignore[assignment]
        os.environ.pop(RP_MODULE_VAR, None)
    yield pilot, tmgr
    session.close(download=False)
    deadline = time.monotonic() + 15
    left = with_env(RP_MODULE_VAR, pilot_token)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = with_env(RP_MODULE_VAR, pilot_token)
    desc = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in left if p.is_running()]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not desc, "RP processes left after session.close: " + "; ".join(desc)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "dask":
        request.applymarker(pytest.mark.filterwarnings("ignore::ResourceWarning"))
        request.applymarker(pytest.mark.filterwarnings("ignore:.*[Ww]orker.*:UserWarning"))
    if name == "radical":
        # RP's zmq sockets/contexts are garbage-collected unclosed in RP's own threads
        for w in (
            "ignore::pytest.PytestUnraisableExceptionWarning",
            "ignore::ResourceWarning",
            "ignore::DeprecationWarning",
        ):
            request.applymarker(pytest.mark.filterwarnings(w))
    return name


@pytest.fixture
def make_session(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., pilotfish.Session]]:
    """Make a Session on the test's backend; every session made is closed afterwards
    (on radical: and its raptor master and workers are gone)."""
    made: list[pilotfish.Session] = []

    def make(**kw: Any) -> pilotfish.Session:
        kw.setdefault("rundir", str(tmp_path / f"run{len(made)}"))
        kw.setdefault("backoff", pilotfish.Backoff(base=0.01))
        if backend == "dask":
            cluster = request.getfixturevalue("dask_cluster")
            kw.pop("workers", None)  # the cluster decides
            kw.setdefault("address", cluster.scheduler_address)
        elif backend == "radical":
            pilot, tmgr = request.getfixturevalue("rp_pilot")
            kw.setdefault("pilot", pilot)
            kw.setdefault("task_manager", tmgr)
        s = fake_session(**kw) if backend == "fake" else pilotfish.Session(backend=backend, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        procs = s.processes() if backend == "radical" else {}
        s.shutdown(wait=True, cancel_futures=True)
        pids = [p for p in [procs.get("master"), *procs.get("workers", [])] if p]
        if pids:
            wait_for(lambda pids=pids: not [p for p in pids if pid_alive(p)], 15, 0.1)


def skip_on(backend: str, *names: str, reason: str) -> None:
    """An explicit, documented skip of a behaviour a backend cannot offer."""
    if backend in names:
        pytest.skip(f"not on {backend}: {reason}")
