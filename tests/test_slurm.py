"""pilotfish on a real single-node SLURM through dask-jobqueue (issue 18).

Every worker is a SLURM batch job (``pilotfish.cluster.slurm(...)``, bound to the
loopback interface: test traffic stays on 127.0.0.1). The tests cancel jobs, let one
reach its walltime and kill a worker process inside a job, and check that each loss is
a classified failure naming the job and how it ended, that Dask's own rerun never runs
an attempt twice (a marker file gets one line per execution), and that "no worker
left" ends in RUNTIME_LOST instead of a future pending forever.

They run only when asked (``python -m pytest tests/test_slurm.py``, as .ci/run does),
so the default suite stays fast; a session fixture then starts SLURM with
scripts/slurm-up.sh if it is not running (root only; else they skip, saying why) and
stops it again at the end if it started it. Each test's jobs are cancelled at its
teardown and the conftest leak check (the test token is in every job's environment:
sbatch exports it) finds any process left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")
# not imported here: workers import this module for its tasks, and importing
# dask_jobqueue sets a SIGINT handler, which fails outside a main thread
if importlib.util.find_spec("dask_jobqueue") is None:
    pytest.skip("the SLURM tests need dask-jobqueue", allow_module_level=True)

import pilotfish  # noqa: E402
from conftest import TOKEN_VAR, wait_for, with_env  # noqa: E402
from pilotfish import Category  # noqa: E402
from pilotfish.cluster import slurm as slurm_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    # Dask's, not ours: transports collected late after a cluster closes, and warnings
    # about workers that went away (the point of these tests)
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:.*[Ww]orker.*:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.timeout(120),
]


# --------------------------------------------------------------------------- tasks
def _record(marker: str) -> int:
    """Append this execution (SLURM job, pid) to ``marker``; returns how many ran."""
    with open(marker, "a") as f:
        f.write(f"{os.environ.get('SLURM_JOB_ID', '-')} {os.getpid()}\n")
    return len(Path(marker).read_text().splitlines())


def sleep_first(marker: str, seconds: float, value: int) -> int:
    """The first execution sleeps (its job is killed meanwhile); any later one returns."""
    if _record(marker) == 1:
        time.sleep(seconds)
    return value


def die_first(marker: str, value: int) -> int:
    """The first execution kills its own Dask worker process (its job runs on)."""
    if _record(marker) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def _executions(marker: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in marker.read_text().splitlines()]  # type: ignore[misc]


# --------------------------------------------------------------------------- fixtures
def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    return r.returncode == 0 and any(
        s.strip().rstrip("*") in ("idle", "mixed", "allocated", "completing")
        for s in r.stdout.split()
    )


@pytest.fixture(scope="session")
def slurm_up(request: pytest.FixtureRequest) -> Iterator[None]:
    """One SLURM per test session: started here (and stopped at the end) if needed."""
    asked = os.environ.get("PILOTFISH_SLURM") == "1" or any(
        "test_slurm" in str(a) for a in request.config.args
    )
    if not asked:
        pytest.skip(
            "SLURM tests run when asked: python -m pytest tests/test_slurm.py "
            "(they start a single-node SLURM as root with scripts/slurm-up.sh)"
        )
    started = False
    if not _slurm_answers():
        if os.geteuid() != 0:
            pytest.skip("SLURM is not running here and starting it needs root")
        env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}
        r = subprocess.run(
            [str(ROOT / "scripts" / "slurm-up.sh")],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        if r.returncode == 77:
            pytest.skip(r.stderr.strip() or "scripts/slurm-up.sh: SLURM cannot run here")
        assert r.returncode == 0, f"scripts/slurm-up.sh failed:\n{r.stdout}\n{r.stderr}"
        started = True
    yield
    if started:
        subprocess.run([str(ROOT / "scripts" / "slurm-down.sh")], timeout=120, check=False)


def _jobs_named(name: str) -> list[str]:
    r = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=10
    )
    return r.stdout.split()


@pytest.fixture
def make_cluster(slurm_up: None, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``make_cluster(jobs=..., walltime=..., adaptive=...)``: a SLURMCluster made by
    pilotfish.cluster.slurm on 127.0.0.1, its first worker up; all its jobs cancelled
    (and gone) at teardown."""
    name = f"pf-test-{uuid.uuid4().hex[:8]}"
    made: list[Any] = []
    assert not _jobs_named(name)

    def make(jobs: int = 1, walltime: str = "00:10:00", adaptive: bool = True) -> Any:
        cluster = slurm_cluster(
            cores=1,
            memory="500MB",
            walltime=walltime,
            jobs=jobs,
            interface="lo",
            queue="debug",
            adaptive=adaptive,
            log_directory=tmp_path / "slurm-logs",
            local_directory=str(tmp_path / "dask"),
            job_name=name,
            scheduler_options={"dashboard_address": ":0"},
        )
        made.append(cluster)
        assert cluster.scheduler_address.startswith("tls://")  # nobody else gets in
        with distributed.Client(
            cluster.scheduler_address, set_as_default=False, security=cluster.security
        ) as c:
            c.wait_for_workers(jobs, timeout=60)
        return cluster

    yield make
    for cluster in made:
        # dask-jobqueue may assert on a job it lost track of: cancelled below anyway
        with contextlib.suppress(Exception):
            cluster.close(timeout=20)
    _cancel_all(name)


def _cancel_all(name: str) -> None:
    """Cancel every job called ``name`` until none is left for 2 s (a job dask-jobqueue
    was submitting while its cluster closed appears late)."""
    quiet_since = time.monotonic()
    deadline = quiet_since + 60
    while time.monotonic() < deadline:
        if _jobs_named(name):
            subprocess.run(["scancel", "-n", name], check=False, timeout=10)
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 2:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"SLURM jobs {name} still in the queue: {_jobs_named(name)}")
    # a job that left the queue may still be completing: slurmd has sent its processes
    # SIGTERM (a Dask nanny then closes its worker gracefully) and sends SIGKILL after
    # KillWait. Wait for them as SLURM does (the leftover check that follows is meant for
    # what nobody would ever end, not for SLURM's own kill protocol at work)
    token = os.environ.get(TOKEN_VAR, "")
    if token:
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not with_env(TOKEN_VAR, token), 30, 0.2)


@contextlib.contextmanager
def _session(cluster: Any, tmp_path: Path, **kw: Any) -> Iterator[pilotfish.Session]:
    """A Session on ``cluster``. When the test fails inside it, the session is stopped at
    once instead of waiting (as ``Executor.__exit__`` does) for attempts that sleep for
    minutes: the test then reports its own failure, not a pytest timeout."""
    s = pilotfish.Session(
        backend="dask", address=cluster.scheduler_address, rundir=str(tmp_path / "run"), **kw
    )
    try:
        yield s
    except BaseException:
        s.shutdown(wait=False, cancel_futures=True, _stop_now=True)
        raise
    s.shutdown(wait=True)


def _first_run(marker: Path, timeout: float = 60) -> str:
    """The SLURM job of the first execution recorded in ``marker``, once its line is
    written (the file exists a moment before: ``open(..., "a")`` creates it)."""
    wait_for(lambda: marker.exists() and marker.read_text().endswith("\n"), timeout=timeout)
    return _executions(marker)[0][0]


def _result(t: Any, job: str, timeout: float = 60) -> Any:
    """``t.result(timeout)``; when it does not come, a failure saying what each attempt
    did and what SLURM says of ``job`` and of every job in the queue."""
    try:
        return t.result(timeout=timeout)
    except TimeoutError:
        show = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=10
        )
        queue = subprocess.run(
            ["squeue", "-o", "%i %j %T %r"], capture_output=True, text=True, timeout=10
        )
        attempts = [(a.outcome, a.worker, a.failure and a.failure.message) for a in t.attempts]
        raise AssertionError(
            f"no result within {timeout} s; attempts {attempts}; scontrol: "
            f"{show.stdout.strip() or show.stderr.strip()}; squeue:\n{queue.stdout}"
        ) from None


# --------------------------------------------------------------------------- tests
def test_scancel_of_a_worker_job_is_worker_lost_naming_the_job(
    make_cluster: Callable[..., Any], tmp_path: Path
) -> None:
    """A user (or an administrator) scancels the batch job whose worker runs an attempt.
    Dask alone silently reruns the task elsewhere; here the attempt is WORKER_LOST
    naming 'SLURM job N CANCELLED', pilotfish retries it on the other job, and the
    first run's user code is never run a second time by Dask."""
    cluster = make_cluster(jobs=2)
    marker = tmp_path / "runs"
    with _session(cluster, tmp_path) as s:
        t = s.submit(sleep_first, str(marker), 300, 5)
        job = _first_run(marker)
        subprocess.run(["scancel", job], check=True, timeout=10)
        assert _result(t, job) == 5
        runs = _executions(marker)
        assert len(runs) == 2, runs  # the cancelled run and pilotfish's retry, nothing else
        assert runs[1][0] != job
        first = t.attempts[0].failure
        assert first is not None and first.category is Category.WORKER_LOST
        assert f"SLURM job {job} CANCELLED" in first.message, first.message
        assert t.attempts[1].outcome == "done"


def test_requeued_worker_job_is_worker_lost_naming_requeue(
    make_cluster: Callable[..., Any], tmp_path: Path
) -> None:
    """A worker job is requeued while it runs an attempt (what preemption with
    PreemptMode=REQUEUE does; here ``scontrol requeue``): WORKER_LOST naming the job as
    REQUEUED, retried on the other job, never run a second time by Dask."""
    cluster = make_cluster(jobs=2)
    marker = tmp_path / "runs"
    with _session(cluster, tmp_path) as s:
        t = s.submit(sleep_first, str(marker), 300, 4)
        job = _first_run(marker)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=10)
        assert _result(t, job) == 4
        runs = _executions(marker)
        assert len(runs) == 2 and runs[1][0] != job, runs
        first = t.attempts[0].failure
        assert first is not None and first.category is Category.WORKER_LOST
        assert f"SLURM job {job} REQUEUED" in first.message, first.message


def test_all_jobs_gone_with_work_queued_is_runtime_lost(
    make_cluster: Callable[..., Any], tmp_path: Path
) -> None:
    """The only worker job is cancelled while one attempt runs and more are queued, and
    nothing replaces it (a fixed-size cluster). Dask alone leaves the futures pending
    forever; here a 'gone' worker event comes at once and, after no_workers_timeout,
    every attempt in flight or queued fails RUNTIME_LOST naming the job and its end."""
    cluster = make_cluster(jobs=1, adaptive=False)
    marker = tmp_path / "runs"
    events: list[Any] = []
    with _session(cluster, tmp_path, no_workers_timeout=3, on_event=events.append) as s:
        running = s.submit(pilotfish.task(sleep_first).options(retries=1), str(marker), 300, 1)
        queued = [
            s.submit(pilotfish.task(sleep_first).options(retries=1), str(marker), 0, i)
            for i in range(3)
        ]
        job = _first_run(marker)
        t0 = time.monotonic()
        subprocess.run(["scancel", job], check=True, timeout=10)
        pilotfish.wait([running, *queued], timeout=40)
        took = time.monotonic() - t0
        assert all(t.done() for t in [running, *queued]), "still pending"
        assert took < 30, took
        gone = [e for e in events if isinstance(e, pilotfish.WorkersGone)]
        assert gone, events
        assert f"SLURM job {job} CANCELLED" in gone[0].message
        for t in queued:
            f = t.failure
            assert f is not None and f.category is Category.RUNTIME_LOST, f
            assert "no_workers_timeout=3" in f.message and f"SLURM job {job} CANCELLED" in (
                f.message
            ), f.message
        lost = running.attempts[0].failure
        assert lost is not None and lost.category is Category.WORKER_LOST
        assert f"SLURM job {job} CANCELLED" in lost.message
        assert running.failure is not None
        assert running.failure.category is Category.RUNTIME_LOST
        assert len(_executions(marker)) == 1  # nothing ran after the job was gone


def test_worker_process_killed_inside_a_surviving_job(
    make_cluster: Callable[..., Any], tmp_path: Path
) -> None:
    """The task's process (the Dask worker, e.g. killed by the OOM killer) dies, but its
    SLURM job runs on and its nanny starts a new worker: WORKER_LOST saying the job is
    still RUNNING (so the job is not to blame), retried in the same job, run once more."""
    cluster = make_cluster(jobs=1)
    marker = tmp_path / "runs"
    with _session(cluster, tmp_path) as s:
        t = s.submit(die_first, str(marker), 7)
        assert t.result(timeout=60) == 7
        runs = _executions(marker)
        assert len(runs) == 2 and runs[0][0] == runs[1][0], runs
        first = t.attempts[0].failure
        assert first is not None and first.category is Category.WORKER_LOST
        assert f"SLURM job {runs[0][0]} is still RUNNING" in first.message, first.message


@pytest.mark.timeout(200)
def test_worker_job_reaching_its_walltime(
    make_cluster: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The slow one (60-90 s: SLURM's limits are whole minutes, checked every 30 s). A
    worker job reaches its 1-minute walltime during an attempt whose timeout is longer
    (warned at submit): WORKER_LOST naming TIMEOUT and the walltime, then the attempt
    is retried on the replacement job that the adaptive cluster starts."""
    cluster = make_cluster(jobs=1, walltime="00:01:00")
    marker = tmp_path / "runs"
    with _session(cluster, tmp_path) as s:
        with caplog.at_level(logging.WARNING, logger="pilotfish.dask"):
            t = s.submit(pilotfish.task(sleep_first).options(timeout=600), str(marker), 600, 9)
        assert any("walltime" in r.getMessage() for r in caplog.records), caplog.text
        assert t.result(timeout=180) == 9
        runs = _executions(marker)
        assert len(runs) == 2 and runs[0][0] != runs[1][0], runs
        first = t.attempts[0].failure
        assert first is not None and first.category is Category.WORKER_LOST
        assert f"SLURM job {runs[0][0]} TIMEOUT" in first.message, first.message
        assert "walltime of 00:01:00" in first.message, first.message


@pytest.mark.timeout(120)
def test_readme_slurm_example(slurm_up: None, tmp_path: Path) -> None:
    """The README's SLURM example runs as written (on the single-node SLURM)."""
    from test_readme import run_readme_example

    before = set(_jobs_named("dask-worker"))
    try:
        out = run_readme_example("slurm", tmp_path)
    finally:
        wait_for(lambda: not set(_jobs_named("dask-worker")) - before, timeout=30, interval=0.2)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "285"
    assert list((tmp_path / "slurm-logs").glob("dask-worker-*.err"))  # per-job logs kept


# --------------------------------------------------------------------------- no SLURM needed
# (these run in the default suite: what scontrol says, and what pilotfish makes of it)
_SCONTROL = (
    "JobId=42 JobName=dask-worker UserId=me(1) JobState=TIMEOUT Reason=TimeLimit "
    "Dependency=(null) ExitCode=0:15 RunTime=00:01:07 TimeLimit=00:01:00 NodeList=n[1-2] "
    "WorkDir=/home/me/a dir StdErr=/logs/dask-worker-%J.err StdOut=/logs/o-%j.out Power="
)


def test_scontrol_line_and_job_end() -> None:
    """A job killed at its walltime is described with its state and walltime; values
    with spaces and SLURM's %J in log paths come out right."""
    from pilotfish import cluster

    f = cluster._fields(_SCONTROL)
    assert f["WorkDir"] == "/home/me/a dir" and f["JobState"] == "TIMEOUT"
    job = cluster.SlurmJob(
        "42",
        f["JobState"],
        f["Reason"],
        f["TimeLimit"],
        f["RunTime"],
        f["NodeList"],
        f["ExitCode"],
        cluster._log_path(f["StdOut"], "42"),
        cluster._log_path(f["StdErr"], "42"),
    )
    assert job.ended and job.walltime == 60
    text = cluster.describe_job_end(job)
    assert text.startswith("SLURM job 42 TIMEOUT (killed by SLURM at its walltime of 00:01:00")
    assert "/logs/dask-worker-42.err" in text and "Reason=TimeLimit" in text
    assert cluster.slurm_job("1; rm -rf /") is None  # a job id is checked before use


def test_requeue_is_told_while_the_job_is_still_completing() -> None:
    """``scontrol requeue`` (or preemption with PreemptMode=REQUEUE) shows the job
    COMPLETING, with its Restarts counted and no EndTime, while SLURM kills its
    processes (up to KillWait): that is already a requeue, not an unexplained end. A job
    requeued before that is now cancelled has an EndTime: not a requeue."""
    from pilotfish import cluster

    line = (
        "JobId=247 JobName=w JobState=COMPLETING Reason=None Requeue=1 Restarts=1 "
        "RunTime=00:00:00 TimeLimit=00:10:00 EndTime=Unknown NodeList=vm"
    )
    f = cluster._fields(line)
    requeuing = cluster.SlurmJob(
        "247",
        f["JobState"],
        f["Reason"],
        f["TimeLimit"],
        f["RunTime"],
        f["NodeList"],
        restarts=int(f["Restarts"]),
        end_time=f["EndTime"],
    )
    assert requeuing.requeued and requeuing.ended
    text = cluster.describe_job_end(requeuing)
    assert text.startswith("SLURM job 247 REQUEUED (requeued"), text
    assert "it ran 00:00:00" not in text and "requeued 1 time" in text
    cancelled = dataclasses.replace(requeuing, end_time="2026-12-07T19:11:50")
    assert not cancelled.requeued
    pending = dataclasses.replace(requeuing, state="PENDING", end_time="Unknown")
    assert pending.requeued
    first_run = dataclasses.replace(requeuing, restarts=0)
    assert not first_run.requeued


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5", 300.0),
        ("01:30", 90.0),
        ("00:01:00", 60.0),
        ("1-02", 93600.0),
        ("1-02:03:04", 93784.0),
        ("UNLIMITED", None),
        ("soon", None),
    ],
)
def test_parse_walltime(text: str, seconds: float | None) -> None:
    """SLURM's time formats (a bare number is minutes)."""
    from pilotfish.cluster import parse_walltime

    assert parse_walltime(text) == seconds


def test_removal_message_names_the_job_and_its_end() -> None:
    """What a lost worker's attempts say: the job's end, or that the job runs on."""
    from pilotfish.backends.dask.jobs import describe_removal
    from pilotfish.cluster import SlurmJob

    who = "Dask worker tcp://127.0.0.1:1 (pid 7) at host n1"
    cancelled = SlurmJob("9", "CANCELLED", "None", "00:10:00", "00:00:03", "n1")
    what, ended = describe_removal(who, "x", "9", cancelled)
    assert "SLURM job 9 CANCELLED (scancel" in what and ended.startswith("SLURM job 9 CANC")
    running = SlurmJob("9", "RUNNING", "None", "00:10:00", "00:00:03", "n1")
    what, ended = describe_removal(who, "x", "9", running)
    assert "SLURM job 9 is still RUNNING" in what and ended == ""
    what, ended = describe_removal(who, "x", "9", running, nanny_answers=False)
    assert "nanny does not answer" in what and "node n1 stopped answering" in what
    assert "as far as SLURM knows" in what and "nanny starts" not in what and ended == ""
    assert "still RUNNING" not in what
    what, ended = describe_removal(who, "x", "9", running, nanny_answers=True)
    assert "still RUNNING and its nanny answers" in what and "stopped answering" not in what
    what, ended = describe_removal(who, "x", "9", None)
    assert "in SLURM job 9" in what and "scontrol" in what
    what, ended = describe_removal(who, "x", "", None)
    assert "SLURM" not in what and ended == ""


def test_nanny_probe_tells_a_listening_port_from_a_closed_one() -> None:
    """What tells a worker process that ended inside its job (its nanny answers) from a
    node that stopped answering: a plain connect to the nanny's address."""
    import socket

    from pilotfish.backends.dask.jobs import nanny_answers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert nanny_answers(f"tls://127.0.0.1:{port}", timeout=1) is True
    assert nanny_answers(f"tcp://127.0.0.1:{port}", timeout=1) is False
    assert nanny_answers("inproc://x") is None
