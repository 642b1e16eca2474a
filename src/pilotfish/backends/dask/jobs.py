"""Dask workers that run in batch jobs (SLURM): which job each runs in, how a lost
worker's job ended, and the jobs' walltime.

A worker plugin (:class:`.worker.WorkerJob`) makes every Dask worker report its
``SLURM_JOB_ID`` (with its pid and host) on the session's topic as it joins. When it
leaves, the client asks ``scontrol show job`` (:func:`pilotfish.cluster.slurm_job`,
waiting up to :data:`JOB_SETTLE` s while the job is ``COMPLETING``), and
:func:`describe_removal` says what the loss of its attempts reports. Once a job's
walltime is known (from the cluster made by :func:`pilotfish.cluster.slurm`, else from
the first job's ``scontrol``), an attempt whose ``timeout`` is longer is warned about
at submit (:meth:`BatchJobs.warn`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ... import cluster as _cluster
from ...wire.messages import RunAttempt

__all__ = ["JOB_SETTLE", "NANNY_PROBE", "BatchJobs", "describe_removal", "nanny_answers"]

log = logging.getLogger("pilotfish.dask")

#: s to wait for a lost worker's batch job to leave COMPLETING (to learn CANCELLED, TIMEOUT)
JOB_SETTLE = 3.0


def describe_removal(
    who: str, cause: str, job: str, info: Any, nanny_answers: bool | None = None
) -> tuple[str, str]:
    """What a removed worker's loss says (for its attempts' WORKER_LOST), and how its
    batch job ended ('' if it did not, or it ran in none). ``info``: what SLURM said
    about ``job`` (:func:`pilotfish.cluster.slurm_job`), None if it said nothing.
    ``nanny_answers``: whether the worker's nanny still accepts connections
    (:func:`nanny_answers`; None: not asked, or the worker had no nanny); it tells, while
    SLURM still calls the job RUNNING, a worker process that ended inside the job (its
    nanny starts a new one) from a node that stopped answering."""
    if not job:
        return (
            f"{who} was removed from the cluster ({cause}); Dask does not report its exit "
            "status: see the worker's and its nanny's log",
            "",
        )
    if info is None:
        return (
            f"{who}, in SLURM job {job}, was removed from the cluster ({cause}); SLURM did "
            "not say how the job ended (no scontrol here, or it did not answer): see "
            f"`scontrol show job {job}` and the job's log",
            "",
        )
    if info.ended:
        ended = _cluster.describe_job_end(info)
        return f"{who} was removed from the cluster: its {ended}", ended
    if info.state == "COMPLETING":
        ended = (
            f"SLURM job {job} COMPLETING (it is ending, but SLURM did not say why within "
            f"{JOB_SETTLE:g} s: see `scontrol show job {job}`)"
        )
        return f"{who} was removed from the cluster: its {ended}", ended
    log_ = f"; see its log {info.stderr}" if info.stderr and info.stderr != "(null)" else ""
    node = f"its node{' ' + info.nodes if info.nodes else ''}"
    slurm_late = (
        "which SLURM reports only after its SlurmdTimeout (`scontrol show node` then says "
        "NOT_RESPONDING)"
    )
    if nanny_answers is False:
        return (
            f"{who} was removed from the cluster ({cause}), and its nanny does not answer "
            f"either: {node} stopped answering (it died, or it is cut off) or every process "
            f"of the job was killed; its SLURM job {job} is {info.state} only as far as "
            f"SLURM knows: SLURM notices a dead node only after its SlurmdTimeout "
            f"(`scontrol show node` then says NOT_RESPONDING){log_}",
            "",
        )
    if nanny_answers is True:
        return (
            f"{who} was removed from the cluster ({cause}); its SLURM job {job} is still "
            f"{info.state} and its nanny answers: the worker process ended inside the job "
            f"(killed, crashed, or out of memory) and the nanny starts a new one{log_}",
            "",
        )
    return (
        f"{who} was removed from the cluster ({cause}), but its SLURM job {job} is still "
        f"{info.state} as far as SLURM knows: either the worker process ended inside the "
        f"job (killed, crashed, or out of memory; a nanny starts a new one), or {node} "
        f"stopped answering, {slurm_late}{log_}",
        "",
    )


#: s a removed worker's nanny has to accept a connection (:func:`nanny_answers`)
NANNY_PROBE = 1.0


def nanny_answers(address: str, timeout: float = NANNY_PROBE) -> bool | None:
    """Whether anything accepts a TCP connection at a nanny's ``address``
    (``tls://host:port``, ``tcp://...``) within ``timeout`` s: a plain connect, closed at
    once (no TLS, no Dask handshake). None when the address cannot be parsed."""
    import socket

    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


class BatchJobs:
    """Worker address -> (job id, worker name), as the workers said (guarded by the
    backend's lock), and the worker jobs' walltime."""

    def __init__(self) -> None:
        self.of: dict[str, tuple[str, str]] = {}
        self.walltime: tuple[float, str] | None = None  # (seconds, as SLURM wrote it)
        self._walltime_asked = False
        self._warned_timeouts: set[float] = set()

    def from_cluster(self, address: str) -> None:
        """The walltime of a cluster :func:`pilotfish.cluster.slurm` made in this process."""
        made = _cluster.cluster_for(address)
        text = str(getattr(made, "_pilotfish_walltime", "") or "")
        secs = _cluster.parse_walltime(text) if text else None
        if secs is not None:
            self.walltime = (secs, text)

    def learn(self, job: str) -> None:
        """A worker said it runs in ``job``: ask SLURM for the walltime (once: every job
        of a cluster has the same walltime)."""
        if job and self.walltime is None and not self._walltime_asked:
            self._walltime_asked = True
            info = _cluster.slurm_job(job)
            secs = info.walltime if info is not None else None
            if info is not None and secs is not None:
                self.walltime = (secs, info.time_limit)

    def job_of(self, addr: str) -> tuple[str, Any]:
        """(job id, what SLURM says about it now) for the worker at ``addr`` ('' , None if
        it did not run in a batch job or never said so)."""
        job = self.of.get(addr, ("", ""))[0]
        if not job:
            return "", None
        return job, _cluster.slurm_job(job, settle=JOB_SETTLE)

    def warn(self, attempts: Sequence[RunAttempt]) -> None:
        """Warn (once per timeout value) when a task may run longer than its worker job."""
        if self.walltime is None:
            return
        secs, text = self.walltime
        for a in attempts:
            t = a.timeout
            if t is None or t <= secs or t in self._warned_timeouts or a.attempt < 0:
                continue
            self._warned_timeouts.add(t)
            log.warning(
                "pilotfish: task %r has timeout=%g s, longer than the walltime of the batch "
                "jobs that run the Dask workers (%s = %g s): SLURM ends the job first, and "
                "an attempt still running then is WORKER_LOST (job TIMEOUT), not TIMEOUT. "
                "Ask for a longer walltime or give the task a shorter timeout",
                a.key,
                t,
                text,
                secs,
            )
