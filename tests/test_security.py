"""Who can connect (issue 22 item 17): a Dask scheduler on plain TCP runs whatever anyone
who reaches its port submits, as the user who started the workers. The cluster that
``pilotfish.cluster.slurm`` sets up speaks TLS with credentials of its own, a client
without them is refused, and a session that connects to a plain-TCP scheduler another
machine can reach says so. Real schedulers, no SLURM needed."""

from __future__ import annotations

import gc
import logging
import multiprocessing.resource_tracker
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")
pytest.importorskip("cryptography")

import pilotfish  # noqa: E402
from conftest import TOKEN_VAR  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:.*[Ww]orker.*:UserWarning"),
]


def _square(x: int) -> int:
    return x * x


def _start_resource_tracker() -> None:
    token = os.environ.pop(TOKEN_VAR, None)  # the tracker outlives the test: no token
    try:
        multiprocessing.resource_tracker.ensure_running()
    finally:
        if token is not None:
            os.environ[TOKEN_VAR] = token


@pytest.fixture
def tls_cluster() -> Iterator[tuple[Any, Any]]:
    """A LocalCluster (one worker process) whose scheduler and worker speak TLS with
    temporary credentials, as ``pilotfish.cluster.slurm`` sets up."""
    from distributed.security import Security

    _start_resource_tracker()
    sec = Security.temporary()
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", security=sec
    ) as c:
        yield c, sec


def _refused(address: str, **kw: Any) -> bool:
    try:
        with distributed.Client(address, timeout=3, set_as_default=False, **kw):
            return False
    except Exception:
        pass
    # the refused Client closes itself when collected, taking a lock all of Dask's loop
    # runners share: collected inside the making of the next Client, it deadlocks (seen
    # once in CI). Collect it here.
    gc.collect()
    return True


@pytest.mark.timeout(120)
def test_tls_scheduler_runs_the_session_and_refuses_strangers(
    tls_cluster: tuple[Any, Any], tmp_path: Path
) -> None:
    """A shared cluster's scheduler on plain TCP lets anyone who reaches its port run
    code as the user. With TLS credentials: the session that has them runs tasks, a
    client without them (TLS without a certificate, or plain TCP to the same port) is
    refused."""
    cluster, sec = tls_cluster
    address = cluster.scheduler_address
    assert address.startswith("tls://")
    with pilotfish.Session(
        backend="dask", address=address, security=sec, rundir=str(tmp_path / "run")
    ) as s:
        assert s.submit(sum, [s.submit(_square, i) for i in range(4)]).result(timeout=60) == 14
    assert _refused(address)  # TLS, but no certificate
    assert _refused("tcp://" + address.split("://", 1)[1])  # plain TCP to the TLS port


def test_session_without_the_credentials_is_refused_clearly(
    tls_cluster: tuple[Any, Any], tmp_path: Path
) -> None:
    """Someone else's session (no credentials) gets nothing run; its tasks fail
    RUNTIME_LOST naming the scheduler it could not connect to."""
    cluster, _ = tls_cluster
    with pilotfish.Session(
        backend="dask",
        address=cluster.scheduler_address,
        connect_timeout=2,
        heartbeat_timeout=2,
        heartbeat_interval=0.5,
        rundir=str(tmp_path / "run"),
    ) as s:
        t = s.submit(_square, 3)
        with pytest.raises(pilotfish.RuntimeLost, match="cannot connect to the Dask scheduler"):
            t.result(timeout=60)


def test_bad_security_is_refused_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(pilotfish.InvalidTask, match="security='yes' is invalid"):
        pilotfish.Session(
            backend="dask", address="tls://127.0.0.1:1", security="yes", rundir=str(tmp_path)
        )


def _public_ip() -> str | None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing address
            ip = str(sock.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.timeout(120)
def test_plain_tcp_scheduler_other_machines_reach_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A scheduler started with Dask's defaults on a shared cluster listens on plain TCP
    on an interface every node can reach: the session says (a pilotfish.dask warning in
    the log, not an exception) that anyone who reaches it can run code as the user, and
    how to fix it (TLS: Security). One on loopback is not warned about."""
    ip = _public_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    _start_resource_tracker()
    caplog.set_level(logging.WARNING, logger="pilotfish.dask")
    with distributed.LocalCluster(
        n_workers=0, processes=False, protocol="tcp://", host=ip, dashboard_address=":0"
    ) as open_cluster:
        assert open_cluster.scheduler_address.startswith(f"tcp://{ip}:")
        with pilotfish.Session(
            backend="dask", address=open_cluster.scheduler_address, rundir=str(tmp_path / "a")
        ):
            pass
    warned = [r.getMessage() for r in caplog.records if "plain TCP" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "anyone who can reach that port can submit tasks that run as you" in warned[0]
    assert "Security" in warned[0]
    caplog.clear()
    with (
        distributed.LocalCluster(
            n_workers=0,
            processes=False,
            protocol="tcp://",
            host="127.0.0.1",
            dashboard_address=":0",
        ) as local,
        pilotfish.Session(backend="dask", address=local.scheduler_address, rundir=str(tmp_path)),
    ):
        pass
    assert not [r for r in caplog.records if "plain TCP" in r.getMessage()]


@pytest.mark.timeout(120)
def test_slurm_cluster_speaks_tls_and_the_session_finds_its_credentials(tmp_path: Path) -> None:
    """``pilotfish.cluster.slurm()`` used to start its scheduler on plain TCP with no
    credentials. Now its scheduler is TLS with credentials of its own (the job script
    hands the workers their copies, files only the user can read), a client without
    them is refused, and the README's ``Session(backend="dask",
    address=cluster.scheduler_address)`` connects unchanged (no SLURM needed: no jobs)."""
    pytest.importorskip("dask_jobqueue")
    from pilotfish.cluster import slurm

    logs = tmp_path / "logs"
    with slurm(
        jobs=0,
        interface="lo",
        log_directory=str(logs),
        scheduler_options={"dashboard_address": ":0"},  # 8787 may be another cluster's
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        script = cluster.job_script()
        assert f"tls://127.0.0.1:{address.rsplit(':', 1)[1]}" in script
        for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):
            assert flag in script
        [creds] = logs.glob(".pilotfish-tls-*")
        assert stat.S_IMODE(creds.stat().st_mode) == 0o700
        files = list(creds.iterdir())
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
        assert "PRIVATE KEY" not in script  # the script names the files only
        assert _refused(address)
        with pilotfish.Session(backend="dask", address=address, rundir=str(tmp_path / "run")) as s:
            assert s.processes()["refused_starts"] == 0  # connected, fence installed
    del cluster
    import gc

    gc.collect()
    assert not creds.exists()  # the credentials went with the cluster
