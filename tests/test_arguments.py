"""Every argument of every public function is checked at the call (issue 22, the
argument rule): a bad call raises at once, naming the argument, its value and what is
expected, instead of failing later somewhere unrelated ('<' not supported, AttributeError
... strip) or being accepted (jobs=2.5, walltime="00:00:00") or, worst, writing a line
of its own into a SLURM job script (queue="debug\\ntouch INJECTED"). One table of bad
calls and the message fragments each must produce."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from pilotfish.digest import failure_digest


def _done() -> cf.Future[int]:
    f: cf.Future[int] = cf.Future()
    f.set_result(1)
    return f


def _slurm(tmp: Path, **kw: Any) -> Callable[[], Any]:
    def call() -> Any:
        from pilotfish.cluster import slurm

        kw.setdefault("jobs", 0)
        kw.setdefault("log_directory", str(tmp / "logs"))
        # a free port for the dashboard: Dask's 8787 may be taken (another test's cluster)
        kw.setdefault("scheduler_options", {"dashboard_address": ":0"})
        return slurm(**kw)

    return call


SLURM_BAD: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("jobs str", {"jobs": "2"}, TypeError, "jobs='2') is invalid: give an int >= 0"),
    ("jobs float", {"jobs": 2.5}, TypeError, "jobs=2.5) is invalid"),
    ("jobs bool", {"jobs": True}, TypeError, "jobs=True) is invalid"),
    ("jobs negative", {"jobs": -1}, ValueError, "jobs=-1) is invalid: give an int >= 0"),
    ("cores str", {"cores": "4"}, TypeError, "cores='4') is invalid: give an int >= 1"),
    ("cores 0", {"cores": 0}, ValueError, "cores=0) is invalid"),
    ("processes > cores", {"cores": 1, "processes": 2}, ValueError, "at most cores=1"),
    ("walltime int", {"walltime": 3600}, TypeError, "walltime=3600) is invalid: give a str"),
    ("walltime zero", {"walltime": "00:00:00"}, ValueError, "give a positive SLURM time"),
    ("walltime junk", {"walltime": "1h"}, ValueError, "walltime='1h') is invalid"),
    ("walltime newline", {"walltime": "01:00:00\n#SBATCH --x"}, ValueError, "newline"),
    ("memory empty", {"memory": ""}, ValueError, "memory='') is invalid: give a size"),
    ("memory junk", {"memory": "lots"}, ValueError, "memory='lots') is invalid"),
    ("memory int", {"memory": 4}, TypeError, "memory=4) is invalid: give a str"),
    ("queue injection", {"queue": "debug\ntouch INJECTED"}, ValueError,
     "queue='debug\\ntouch INJECTED') is invalid: it contains a newline"),
    ("queue empty", {"queue": " "}, ValueError, "queue=' ') is invalid"),
    ("interface injection", {"interface": "lo\rx"}, ValueError, "interface="),
    ("account injection", {"account": "me\nrm -rf ~"}, ValueError, "account="),
    ("job_extra_directives", {"job_extra_directives": ["--exclusive", "-x\nid"]},
     ValueError, "job_extra_directives="),
    ("log_directory newline", {"log_directory": "logs\nx"}, ValueError, "log_directory="),
    ("log_directory int", {"log_directory": 3}, TypeError, "log_directory=3) is invalid"),
    ("adaptive str", {"adaptive": "yes"}, TypeError, "adaptive='yes') is invalid"),
    ("lost_worker_timeout", {"lost_worker_timeout": "soon"}, ValueError,
     "lost_worker_timeout='soon') is invalid"),
    ("wait negative", {"wait": -1}, ValueError, "wait=-1) is invalid"),
    ("security str", {"security": "tls"}, TypeError, "security='tls') is invalid"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "exc", "fragment"), [c[1:] for c in SLURM_BAD], ids=[c[0] for c in SLURM_BAD]
)
def test_slurm_rejects_bad_arguments_at_the_call(
    kw: dict[str, Any], exc: type[Exception], fragment: str, tmp_path: Path
) -> None:
    """A user's pilotfish.cluster.slurm(...) call with jobs="2" or walltime=3600 failed
    deep in dask-jobqueue; jobs=2.5 and walltime="00:00:00" were accepted; a queue with
    a newline ran an extra shell line in the job script. Each is refused before any
    cluster starts, and nothing was written (no log directory made)."""
    pytest.importorskip("dask_jobqueue")
    with pytest.raises(exc) as info:
        _slurm(tmp_path, **kw)()
    assert fragment in str(info.value)
    assert "pilotfish.cluster.slurm(" in str(info.value)
    assert not (tmp_path / "logs").exists()


def test_no_caller_string_becomes_a_line_of_the_job_script(tmp_path: Path) -> None:
    """The accepted arguments reach the job script as one line each (no SLURM needed)."""
    pytest.importorskip("dask_jobqueue")
    with _slurm(
        tmp_path, queue="debug", account="proj", walltime="1-02:00:00", memory="1GB",
        job_extra_directives=["--exclusive"], interface="lo",
    )() as cluster:  # fmt: skip
        lines = cluster.job_script().splitlines()
    assert "#SBATCH -p debug" in lines and "#SBATCH -A proj" in lines
    assert "#SBATCH -t 1-02:00:00" in lines and "#SBATCH --exclusive" in lines


BAD_CALLS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("wait timeout", lambda: pilotfish.wait([_done()], timeout="1"), TypeError,
     "pilotfish.wait(timeout='1') is invalid: give a number of seconds"),
    ("wait return_when", lambda: pilotfish.wait([_done()], return_when="ALL"), ValueError,
     "pilotfish.wait(return_when='ALL') is invalid"),
    ("as_completed timeout", lambda: pilotfish.as_completed([_done()], timeout="x"), TypeError,
     "pilotfish.as_completed(timeout='x') is invalid"),
    ("Retry delay", lambda: pilotfish.Retry(delay=-1), TypeError,
     "pilotfish.Retry(delay=-1) is invalid"),
    ("Retry args", lambda: pilotfish.Retry(args="abc"), TypeError,
     "pilotfish.Retry(args='abc') is invalid: give a tuple"),
    ("Retry kwargs", lambda: pilotfish.Retry(kwargs=[1]), TypeError,
     "pilotfish.Retry(kwargs=[1]) is invalid"),
    ("Backoff", lambda: pilotfish.Backoff(base=-1), ValueError, "need base >= 0"),
    ("task retries", lambda: pilotfish.task(retries=-1), pilotfish.InvalidTask,
     "retries=-1 is invalid"),
    ("task timeout", lambda: pilotfish.task(timeout="10"), pilotfish.InvalidTask,
     "timeout='10' is invalid"),
    ("options unknown", lambda: pilotfish.task(print).options(retires=1),
     pilotfish.InvalidTask, "unknown task option(s) ['retires']"),
    ("DrainPolicy", lambda: pilotfish.DrainPolicy(tasks="3"), ValueError,
     "drain_after tasks='3' must be an int >= 2"),
    ("failure_digest str", lambda: failure_digest("x"), TypeError,
     "failure_digest(records='x') is invalid: give an iterable of FailureRecords"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "exc", "fragment"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_public_functions_reject_bad_arguments_at_the_call(
    call: Callable[[], Any], exc: type[Exception], fragment: str
) -> None:
    """Bad arguments to public functions used to be accepted (wait(timeout="1"),
    Retry(delay=-1), failure_digest("x")) or fail later with an unrelated error
    (as_completed(timeout="x"): "can only concatenate str"). Each is refused at once."""
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


SESSION_BAD: list[tuple[str, Callable[[pilotfish.Session], Any], type[Exception], str]] = [
    ("map timeout str", lambda s: s.map(abs, [1], timeout="1"), TypeError,
     "pilotfish.Session.map(timeout='1') is invalid"),
    ("map timeout str chunked", lambda s: s.map(abs, [1, 2], timeout="1", chunksize=2),
     TypeError, "Session.map(timeout='1') is invalid"),
    ("map chunksize float", lambda s: s.map(abs, [1], chunksize=2.5), pilotfish.InvalidTask,
     "map(chunksize=2.5) is invalid"),
    ("shutdown wait", lambda s: s.shutdown(wait="no"), TypeError,
     "Session.shutdown(wait='no') is invalid: give True or False"),
    ("shutdown cancel_futures", lambda s: s.shutdown(cancel_futures="x"), TypeError,
     "Session.shutdown(cancel_futures='x') is invalid"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "exc", "fragment"), [c[1:] for c in SESSION_BAD], ids=[c[0] for c in SESSION_BAD]
)
def test_session_methods_reject_bad_arguments_at_the_call(
    call: Callable[[pilotfish.Session], Any], exc: type[Exception], fragment: str, tmp_path: Path
) -> None:
    """``map(abs, xs, timeout="1")`` failed with "can only concatenate str (not float)"
    from inside concurrent.futures, and ``shutdown(wait="no")`` was taken as a truthy wait.
    Each is refused at the call, and the session still works afterwards."""
    from pilotfish.backends.fake import FakeBackend

    with pilotfish.Session(backend=FakeBackend(), journal=None, rundir=tmp_path) as s:
        with pytest.raises(exc) as info:
            call(s)
        assert fragment in str(info.value)
        assert s.submit(abs, -3).result() == 3


def test_the_worker_command_replaces_the_job_shell(tmp_path: Path) -> None:
    """On a SLURM that tracks a job's processes by parentage (proctrack/linuxproc, as on
    CI's single-node SLURM), a cancelled job's Dask nanny that outlived its batch shell
    (it was restarting the worker process the cancel's SIGTERM had killed) ran on as an
    orphan, out of reach of SLURM's SIGKILL. The worker command is ``exec``'d: the nanny
    is the job's own process."""
    pytest.importorskip("dask_jobqueue")
    with _slurm(tmp_path)() as cluster:
        last = cluster.job_script().strip().splitlines()[-1]
    assert last.startswith("exec ") and "-m distributed.cli.dask_worker" in last, last


def test_a_slurm_clusters_lost_worker_timeout_is_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pilotfish.cluster.slurm(lost_worker_timeout=...)`` set Dask's
    ``distributed.deploy.lost-worker-timeout`` for the whole process, so every other
    cluster in it (a LocalCluster) closed the nanny of a worker whose restart took longer
    than 1 s. The timeout now holds for that cluster only: the process's setting is
    unchanged, and the cluster reads its own when a worker leaves."""
    pytest.importorskip("dask_jobqueue")
    import dask

    before = dask.config.get("distributed.deploy.lost-worker-timeout")
    with _slurm(tmp_path, lost_worker_timeout="3s")() as cluster:
        assert dask.config.get("distributed.deploy.lost-worker-timeout") == before
        seen: list[Any] = []

        def dasks_own(self: Any, op: Any, msg: Any) -> None:  # what it reads there
            seen.append((op, dask.config.get("distributed.deploy.lost-worker-timeout")))

        monkeypatch.setattr(type(cluster), "_update_worker_status", dasks_own)
        cluster._update_worker_status("remove", "tcp://10.0.0.9:1")
        assert seen == [("remove", "3s")]
        assert dask.config.get("distributed.deploy.lost-worker-timeout") == before
