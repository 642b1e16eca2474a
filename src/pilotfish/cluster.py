"""Dask clusters made of batch jobs, set up for pilotfish (SLURM via dask-jobqueue).

On a cluster, Dask workers are batch jobs: they are cancelled, preempted and killed at
their walltime. :func:`slurm` starts a ``dask_jobqueue.SLURMCluster`` with the settings
pilotfish relies on, and :func:`slurm_job` asks SLURM how a job ended; the Dask backend
uses it to say *why* a worker left (``SLURM job 123 CANCELLED``, ``... TIMEOUT at its
walltime of 00:01:00``) instead of only "a worker was removed"::

    import pilotfish
    from pilotfish.cluster import slurm

    with slurm(cores=1, memory="2GB", walltime="04:00:00", jobs=4, queue="compute") as cluster:
        with pilotfish.Session(backend="dask", address=cluster.scheduler_address) as s:
            ...

How a worker learns its job: every Dask worker of a pilotfish session reports its
``SLURM_JOB_ID`` (a worker plugin), so this works for any deployment whose workers run
inside SLURM jobs (dask-jobqueue, a hand-written ``sbatch`` script), provided
``scontrol`` is on the client's ``PATH``. Without it, the job id is still named.

dask-jobqueue is an optional dependency (``pip install 'pilotfish[slurm]'``); this
module imports it only when :func:`slurm` is called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from ._cluster_args import check_behaviour, check_passed_on, check_places, check_sizes
from .errors import EnvironmentMismatch

__all__ = ["SlurmJob", "describe_job_end", "parse_walltime", "slurm", "slurm_job"]

#: clusters made by :func:`slurm`, by scheduler address (the Dask backend asks them for
#: replacement jobs and reads their walltime)
_clusters: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

#: SLURM job states after which the job's processes are gone
ENDED = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "SPECIAL_EXIT",
    }
)

_WHY = {
    "CANCELLED": "scancel by a user or an administrator, or preemption",
    "TIMEOUT": "killed by SLURM at its walltime",
    "PREEMPTED": "preempted by a higher-priority job",
    "NODE_FAIL": "its node failed",
    "BOOT_FAIL": "its node failed to boot",
    "OUT_OF_MEMORY": "killed for exceeding its memory limit",
    "FAILED": "it ended with a non-zero exit code",
    "DEADLINE": "it reached its deadline",
    "REQUEUED": "requeued (preemption or an administrator); it will start again",
    "REQUEUE_HOLD": "requeued and held",
    "SUSPENDED": "suspended (preemption with PreemptMode=SUSPEND, or scontrol suspend)",
    "COMPLETED": "its batch script ended (exit code 0)",
}


@dataclasses.dataclass(frozen=True, slots=True)
class SlurmJob:
    """What ``scontrol show job`` says about one job (fields as SLURM names them)."""

    job_id: str
    state: str  # JobState: RUNNING, CANCELLED, TIMEOUT, PREEMPTED, ...
    reason: str = ""
    time_limit: str = ""  # TimeLimit, e.g. "00:01:00"
    run_time: str = ""  # RunTime
    nodes: str = ""  # NodeList
    exit_code: str = ""  # ExitCode, e.g. "0:15"
    stdout: str = ""  # StdOut path (per-job log)
    stderr: str = ""  # StdErr path
    restarts: int = 0  # Restarts: how often it was requeued
    end_time: str = ""  # EndTime: "Unknown" while it runs, and while a requeue ends it

    @property
    def requeued(self) -> bool:
        """Requeued (preemption with PreemptMode=REQUEUE, ``scontrol requeue``): its
        processes are gone (or being killed) and it waits to start again.

        While a requeue kills the job's processes (up to KillWait, 30 s by default) SLURM
        shows the job ``COMPLETING`` with its ``Restarts`` already counted and no
        ``EndTime``; a job that ends for good while completing has its ``EndTime``."""
        if self.state in ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
            return True
        if self.restarts <= 0:
            return False
        return self.state == "PENDING" or (
            self.state == "COMPLETING" and self.end_time == "Unknown"
        )

    @property
    def ended(self) -> bool:
        """Its processes are gone or stopped (the worker in it will not come back)."""
        return self.state in ENDED or self.state == "SUSPENDED" or self.requeued

    @property
    def walltime(self) -> float | None:
        """``time_limit`` in seconds (None: unlimited or unknown)."""
        return parse_walltime(self.time_limit)


_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?(\+[0-9]+)?$")


def slurm_job(job_id: str, timeout: float = 3.0, settle: float = 0.0) -> SlurmJob | None:
    """Ask ``scontrol show job`` about ``job_id``; None when SLURM cannot tell (no
    ``scontrol`` here, the controller does not answer, the job is long forgotten).

    ``settle``: while the job is ``COMPLETING`` (its processes being killed; SLURM shows
    that instead of CANCELLED or TIMEOUT for a moment), ask again for up to that many
    seconds, to learn how it ended."""
    deadline = time.monotonic() + settle
    while True:
        job = _scontrol_job(job_id, timeout)
        done = job is None or job.state != "COMPLETING" or job.requeued
        if done or time.monotonic() >= deadline:
            return job
        time.sleep(0.1)


def _scontrol_job(job_id: str, timeout: float) -> SlurmJob | None:
    job_id = str(job_id).strip()
    if not _JOB_ID.match(job_id):  # it comes from a worker's environment: checked here
        return None
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "show", "job", "-o", job_id],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    line = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    f = _fields(line)
    if not f.get("JobId"):
        return None
    return SlurmJob(
        job_id=f.get("JobId", job_id),
        state=f.get("JobState", "UNKNOWN"),
        reason=f.get("Reason", ""),
        time_limit=f.get("TimeLimit", ""),
        run_time=f.get("RunTime", ""),
        nodes=f.get("NodeList", ""),
        exit_code=f.get("ExitCode", ""),
        stdout=_log_path(f.get("StdOut", ""), job_id),
        stderr=_log_path(f.get("StdErr", ""), job_id),
        restarts=int(f.get("Restarts", "0")) if f.get("Restarts", "").isdigit() else 0,
        end_time=f.get("EndTime", ""),
    )


def _log_path(path: str, job_id: str) -> str:
    """A job's log path as SLURM names it (``%j``/``%J``: the job id; ``%%``: ``%``)."""
    if path in ("", "(null)"):
        return ""
    base = job_id.split("_")[0].split("+")[0]
    return path.replace("%%", "\0").replace("%J", base).replace("%j", base).replace("\0", "%")


def _fields(line: str) -> dict[str, str]:
    """``Key=value Key2=value with spaces`` (scontrol -o) -> dict; a value runs up to the
    next ``Key=``."""
    out: dict[str, str] = {}
    for m in re.finditer(
        r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s[A-Za-z][A-Za-z0-9_:/]*=|$)", line
    ):
        out.setdefault(m.group(1), m.group(2).strip())
    return out


def describe_job_end(job: SlurmJob) -> str:
    """One phrase for a failure record: 'SLURM job 12 CANCELLED (cancelled ...; ran ...)'."""
    state = "REQUEUED" if job.requeued else job.state
    bits = [_WHY.get(state, "")]
    if state == "TIMEOUT" and job.time_limit:
        bits = [f"killed by SLURM at its walltime of {job.time_limit}"]
    if job.run_time and not (job.requeued and job.run_time == "00:00:00"):
        # (a requeue resets RunTime while it still kills the job's processes)
        bits.append(f"it ran {job.run_time}")
        if state != "TIMEOUT" and job.time_limit and job.time_limit != "UNLIMITED":
            bits[-1] += f" of its walltime of {job.time_limit}"
    if job.exit_code and state in ("FAILED", "OUT_OF_MEMORY", "COMPLETED"):
        bits.append(f"ExitCode={job.exit_code}")
    if job.restarts:
        bits.append(f"requeued {job.restarts} time{'s' if job.restarts > 1 else ''}")
    if job.reason and job.reason not in ("None", "(null)"):
        bits.append(f"Reason={job.reason}")
    if job.nodes and job.nodes != "(null)":
        bits.append(f"on {job.nodes}")
    if job.stderr and job.stderr != "(null)":
        bits.append(f"job log {job.stderr}")
    return f"SLURM job {job.job_id} {state} ({'; '.join(b for b in bits if b)})"


def parse_walltime(text: str) -> float | None:
    """SLURM's time format in seconds: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM``, ``D-HH:MM:SS``; None for ``UNLIMITED``, ``INFINITE`` or nonsense."""
    text = (text or "").strip()
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "NONE", "PARTITION_LIMIT"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        if not d.isdigit():
            return None
        days = int(d)
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or len(parts) > 3:
            return None
        h, m, s = ([*map(int, parts), 0, 0])[:3]
        return float(days * 86400 + h * 3600 + m * 60 + s)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    nums = [int(p) for p in parts]
    if len(nums) == 1:
        return float(nums[0] * 60)  # minutes
    if len(nums) == 2:
        return float(nums[0] * 60 + nums[1])
    return float(nums[0] * 3600 + nums[1] * 60 + nums[2])


def slurm(
    cores: int = 1,
    memory: str = "2GB",
    walltime: str = "01:00:00",
    jobs: int = 1,
    *,
    processes: int = 1,
    interface: str | None = None,
    queue: str | None = None,
    log_directory: str | Path = "pilotfish-slurm-logs",
    adaptive: bool = True,
    lost_worker_timeout: str = "1s",
    wait: float | None = None,
    security: Any = True,
    **jobqueue_options: Any,
) -> Any:
    """Start a ``dask_jobqueue.SLURMCluster`` of ``jobs`` worker jobs, set up for pilotfish.

    Pass ``cluster.scheduler_address`` to ``Session(backend="dask", address=...)``.
    Defaults, and why:

    * ``adaptive=True``: ``cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)``, so a job
      that is cancelled, preempted or reaches its walltime is replaced; with
      ``lost_worker_timeout`` (Dask's ``distributed.deploy.lost-worker-timeout``, 15 s by
      default, set here for this cluster only) at 1 s the replacement is submitted about 1 s
      after the job's worker left. ``adaptive=False``: ``cluster.scale(jobs=jobs)`` once.
    * ``log_directory``: every job's stdout/stderr are kept there
      (``dask-worker-<jobid>.err``); failure records name the file.
    * ``processes=1``: one Dask worker per job, so a lost worker names one job.
    * ``interface``: the network interface of the scheduler and the workers (``"lo"``
      keeps a single-node test on 127.0.0.1; on a real cluster e.g. ``"ib0"``).
    * ``wait``: seconds to wait for the first worker (None: do not wait).
    * ``security=True``: the scheduler and the workers speak TLS with credentials made
      for this cluster (``distributed.Security.temporary()``, needs ``cryptography``): a
      client without them is refused, so nobody else who can reach the scheduler's port
      can run code as you. The workers' copies of the credentials are written, readable
      by you only, to ``shared_temp_directory`` (default: ``log_directory``, which the
      jobs must see anyway). A ``Session(backend="dask", address=cluster.scheduler_address)``
      in this process finds the credentials by the address. Give a ``Security`` of your
      own instead, or ``False`` for plain TCP that anyone who reaches it can use.

    Other keywords go to ``SLURMCluster`` (``account``, ``job_extra_directives``,
    ``worker_extra_args``, ...). The cluster is a context manager; ``close()`` cancels
    its jobs. pilotfish's Dask backend finds a cluster made here by its scheduler address
    (same process): it reads the walltime (warning at submit when a task's timeout is
    longer) and asks it for replacement jobs when every worker is gone.
    """
    _, slurm_cluster = _jobqueue()
    # every argument checked at the call (:mod:`pilotfish._cluster_args` says how)
    check_sizes(
        cores=cores,
        jobs=jobs,
        processes=processes,
        walltime=walltime,
        memory=memory,
        parse_walltime=parse_walltime,
    )
    check_places(interface=interface, queue=queue, log_directory=log_directory)
    check_behaviour(adaptive, lost_worker_timeout, wait, security)
    check_passed_on(jobqueue_options)
    if security is True:
        security = _temporary_security()
    logs = Path(log_directory).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = dict(
        cores=cores, memory=memory, processes=processes, walltime=walltime, log_directory=str(logs)
    )
    if queue is not None:
        opts["queue"] = queue
    if interface is not None:
        opts["interface"] = interface
    cluster = _new_cluster(slurm_cluster, opts, security, jobqueue_options)
    _lost_worker_timeout(cluster, lost_worker_timeout)
    _start_jobs(cluster, walltime=walltime, jobs=jobs, adaptive=adaptive, wait=wait)
    return cluster


def _jobqueue() -> tuple[Any, Any]:
    """``dask`` and ``SLURMCluster``, or :class:`EnvironmentMismatch` saying what to install."""
    try:
        import dask
        from dask_jobqueue.slurm import SLURMCluster
    except ImportError as e:
        raise EnvironmentMismatch(
            f"pilotfish.cluster.slurm needs dask-jobqueue ({e}); install it with: "
            "pip install 'pilotfish[slurm]'"
        ) from e
    return dask, SLURMCluster


def _temporary_security() -> Any:
    """TLS credentials made for one cluster (``security=True``)."""
    try:
        from distributed.security import Security

        return Security.temporary()  # type: ignore[no-untyped-call]
    except ImportError as e:
        raise EnvironmentMismatch(
            f"pilotfish.cluster.slurm(security=True) needs the cryptography package for "
            f"the cluster's TLS credentials ({e}); install it with: "
            "pip install 'pilotfish[slurm]' (or pass security=False for plain TCP, "
            "which anyone who can reach the scheduler can use)"
        ) from e


def _lost_worker_timeout(cluster: Any, timeout: str) -> None:
    """Give ``cluster`` its own ``distributed.deploy.lost-worker-timeout``. Dask reads that
    setting when a worker leaves (``SpecCluster._update_worker_status``); setting it for
    the process changed every other cluster in it too, e.g. a LocalCluster, whose nannies
    were then closed when a restart took longer than 1 s."""
    import dask

    def update_worker_status(op: Any, msg: Any) -> Any:
        with dask.config.set({"distributed.deploy.lost-worker-timeout": timeout}):
            return type(cluster)._update_worker_status(cluster, op, msg)

    cluster._update_worker_status = update_worker_status


def _new_cluster(
    slurm_cluster: Any, opts: dict[str, Any], security: Any, jobqueue_options: dict[str, Any]
) -> Any:
    """The ``SLURMCluster`` of ``opts`` (and the caller's ``jobqueue_options``), its TLS
    credentials in files the jobs can read (removed with the cluster), and its worker
    command run with ``exec``."""
    import dask

    creds: Path | None = None
    if security is not False:
        where = Path(jobqueue_options.get("shared_temp_directory") or opts["log_directory"])
        security, creds = _credential_files(security, where.expanduser())
        opts["security"] = security
    opts.update(jobqueue_options)
    # The worker command replaces the job's shell (``exec``), so SLURM's SIGTERM and,
    # after KillWait, its SIGKILL reach the Dask nanny itself, the job's own process. Where
    # SLURM tracks a job's processes by parentage (proctrack/linuxproc, no cgroups), a
    # nanny that outlived its shell (it restarts a worker process that the cancel's
    # SIGTERM killed, then waits on it) became an orphan out of SLURM's reach and ran on.
    py = str(opts.get("python") or dask.config.get("jobqueue.slurm.python", None) or "")
    py = py or sys.executable
    opts["python"] = py if py.startswith("exec ") else f"exec {shlex.quote(py)}"
    try:
        cluster: Any = slurm_cluster(**opts)
    except BaseException:
        if creds is not None:
            shutil.rmtree(creds, ignore_errors=True)
        raise
    if creds is not None:  # removed with the cluster (or at exit)
        weakref.finalize(cluster, shutil.rmtree, creds, True)
    return cluster


def _start_jobs(
    cluster: Any, *, walltime: str, jobs: int, adaptive: bool, wait: float | None
) -> None:
    """Ask for the jobs (kept at ``jobs`` if ``adaptive``), make the cluster known to
    the Dask backend by its address, and wait for a first worker; on any error the
    cluster is closed."""
    try:
        cluster._pilotfish_walltime = walltime  # read by the Dask backend (same process)
        cluster._pilotfish_jobs = jobs
        if adaptive:
            cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
        else:
            cluster.scale(jobs=jobs)
        _clusters[str(cluster.scheduler_address)] = cluster
        if wait is not None and jobs:
            import distributed

            client: Any = distributed.Client
            with client(cluster, set_as_default=False) as c:
                c.wait_for_workers(1, timeout=wait)
    except BaseException:
        with contextlib.suppress(Exception):
            cluster.close()
        raise


def _credential_files(security: Any, where: Path) -> tuple[Any, Path | None]:
    """``security`` with its in-memory PEM credentials (``Security.temporary()``) written
    to files only the user can read, in a new directory (mode 0700) under ``where`` that
    the worker jobs must see: the job script names the files, never their contents."""
    from distributed.security import Security

    fields = (
        "tls_ca_file",
        "tls_client_cert",
        "tls_client_key",
        "tls_scheduler_cert",
        "tls_scheduler_key",
        "tls_worker_cert",
        "tls_worker_key",
    )
    values = {f: getattr(security, f, None) for f in fields}
    if not any(isinstance(v, str) and "\n" in v for v in values.values()):
        return security, None  # files already (the user's certificates)
    import tempfile

    where.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=".pilotfish-tls-", dir=where))  # mode 0700
    written: dict[str, str] = {}
    out: dict[str, Any] = {}
    for f, v in values.items():
        if isinstance(v, str) and "\n" in v:
            if v not in written:
                path = d / f"{len(written)}.pem"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(v)
                written[v] = str(path)
            out[f] = written[v]
        else:
            out[f] = v
    sec = Security(  # type: ignore[no-untyped-call]
        require_encryption=True,
        tls_min_version=getattr(security, "tls_min_version", None),
        **out,
    )
    return sec, d


def cluster_for(address: str) -> Any:
    """The cluster :func:`slurm` made in this process for scheduler ``address``, or None."""
    return _clusters.get(address)


def request_replacements(cluster: Any, names: set[str]) -> bool:
    """Ask an adaptive ``cluster`` (a Dask ``SpecCluster``, e.g. dask-jobqueue's, after
    ``adapt()``) for new jobs in place of its jobs ``names`` (Dask worker names) whose
    workers are gone, now rather than after Dask's lost-worker-timeout. The gone jobs
    leave the cluster's spec (new jobs get new names, so Dask's own delayed clean-up
    cannot take a replacement for the job it replaces); ``scale`` then submits as many
    new jobs. Returns whether it asked (a fixed-size cluster is not asked)."""
    import asyncio

    loop = getattr(cluster, "loop", None)
    if loop is None or not hasattr(cluster, "worker_spec") or not names:
        return False
    if getattr(cluster, "_adaptive", None) is None:  # a fixed size was asked for: kept
        return False

    def replace() -> None:
        try:
            live = {d.get("name") for d in cluster.scheduler_info.get("workers", {}).values()}
            target = len(cluster.worker_spec)
            gone = [
                n
                for n in list(cluster.workers)
                if n not in live
                and not any(str(x).startswith(f"{n}-") for x in live)
                and any(x == n or str(x).startswith(f"{n}-") for x in names)
            ]
            for n in gone:
                job = cluster.workers.pop(n)
                cluster.worker_spec.pop(n, None)
                cluster._futures.add(asyncio.ensure_future(job.close()))
            if gone:
                try:
                    cluster.scale(jobs=target)  # dask-jobqueue: n counts workers
                except TypeError:
                    cluster.scale(target)
        except Exception:  # the cluster's own adaptive loop replaces them later
            import logging

            logging.getLogger("pilotfish.cluster").info(
                "pilotfish: could not ask the cluster for replacement jobs", exc_info=True
            )

    try:
        loop.add_callback(replace)
    except Exception:
        return False
    return True
