"""The cluster lab for multi-node tests (issue 24): helpers and the tasks they run.

``scripts/lab-up.sh N`` makes N "nodes" on this machine (network + UTS namespaces
node1..nodeN at 10.77.0.1K on the bridge brpf, the host at 10.77.0.1);
``scripts/lab-run.sh K CMD`` runs CMD on node K (its address, its hostname ``nodeK``);
``scripts/lab-down.sh`` removes it all. :class:`DaskLab` runs a Dask scheduler on the
host (bound to 10.77.0.1) and one ``dask worker`` (with its nanny, as dask-jobqueue
starts them) per node. The filesystem is shared, as on a cluster: the tasks below leave
their traces in files that the test reads.

This module is imported by the Dask workers for its tasks: it imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
HOST_IP = "10.77.0.1"


def node_ip(k: int) -> str:
    return f"10.77.0.1{k}"


# --------------------------------------------------------------------------- tasks
def where(i: int, seconds: float) -> tuple[int, str, int]:
    """Sleep, then say where it ran: (i, hostname, pid)."""
    time.sleep(seconds)
    return i, socket.gethostname(), os.getpid()


def fail_here(i: int) -> None:
    """Raise, naming where it ran."""
    raise RuntimeError(f"task {i} failed on {socket.gethostname()} pid {os.getpid()}")


def ticking(trace: str, seconds: float, value: int) -> tuple[int, str, int]:
    """One body run: a line ``start HOST PID TIME`` in ``trace``, then ``tick HOST PID
    TIME`` every 0.05 s for ``seconds``, then ``end ...``; returns (value, host, pid).
    The lines tell how often the body ran, where, and when it was running."""
    host, pid = socket.gethostname(), os.getpid()

    def line(kind: str) -> None:
        with open(trace, "a") as f:
            f.write(f"{kind} {host} {pid} {time.time():.3f}\n")

    line("start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        line("tick")
    line("end")
    return value, host, pid


def read_trace(trace: Path) -> list[tuple[str, str, int, float]]:
    """The lines of a :func:`ticking` trace: (kind, host, pid, time)."""
    if not trace.exists():
        return []
    out = []
    for ln in trace.read_text().splitlines():
        parts = ln.split()
        if len(parts) == 4:
            out.append((parts[0], parts[1], int(parts[2]), float(parts[3])))
    return out


# --------------------------------------------------------------------------- the lab
def script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PILOTFISH_TEST_TOKEN"}
    return subprocess.run(
        [str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def node_pids(k: int) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", f"node{k}"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def kill_node(k: int) -> list[int]:
    """SIGKILL every process of node K (a node lost: power cut, kernel panic)."""
    pids = node_pids(k)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def link(k: int, up: bool) -> None:
    """Cut (``up=False``) or heal node K's link to the bridge: a network partition."""
    subprocess.run(["ip", "link", "set", f"vn{k}", "up" if up else "down"], check=True)


def host_link(k: int, up: bool) -> None:
    """Cut (``up=False``) or heal the link between this host and node K alone (a
    blackhole route on the host: what the host sends node K is dropped, so no TCP
    connection between them makes progress); node K and the other nodes still talk."""
    have = subprocess.run(
        ["ip", "route", "show", "type", "blackhole", node_ip(k)], capture_output=True, text=True
    ).stdout.strip()
    if up and have:
        subprocess.run(["ip", "route", "del", "blackhole", node_ip(k)], check=True)
    elif not up and not have:
        subprocess.run(["ip", "route", "add", "blackhole", node_ip(k)], check=True)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- the tests' side
def session(address: str, rundir: Path, events: list[Any], **kw: Any) -> Any:
    """A Dask session on the lab's scheduler at ``address``: fast retries, every event
    appended to ``events`` as (wall time, event)."""
    import pilotfish

    return pilotfish.Session(
        backend="dask",
        address=address,
        rundir=str(rundir),
        backoff=pilotfish.Backoff(base=0.01),
        on_event=lambda e: events.append((time.time(), e)),
        **kw,
    )


def journal_record(rundir: Path, key: str) -> tuple[int, list[str]]:
    """(how often the journal recorded ``key`` DONE, the outcomes of its attempts)."""
    from pilotfish.store.reader import JournalReader

    j = JournalReader(rundir / "journal.db")
    try:
        done = sum(1 for _run, _t, _from, to in j.transitions(key) if to.lower() == "done")
        outcomes = [str(a.get("outcome")) for a in j.attempts(key)]
    finally:
        j.close()
    return done, outcomes


class DaskLab:
    """A Dask scheduler on the host at 10.77.0.1 (or, with ``head=K``, on node K: a head
    node, so the client's link to it can be cut alone) and one worker (nanny + worker
    process, ``--nthreads 1``, ``--name nodeK``) on each other node of 1..n, as
    subprocesses of the test; :meth:`close` ends them all and every process left in the
    node namespaces."""

    def __init__(
        self, n: int, logdir: Path, head: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.n = n
        self.head = head
        at = HOST_IP if head is None else node_ip(head)
        self.port = _free_port(HOST_IP)  # a node has ports of its own: free there too
        self.address = f"tcp://{at}:{self.port}"
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
        self.env.update(env or {})
        self.py = sys.executable
        self.nodes = [k for k in range(1, n + 1) if k != head]  # those with a worker
        try:
            self._spawn("scheduler", head, "distributed.cli.dask_scheduler", "--host", at,
                        "--port", str(self.port), "--no-dashboard")  # fmt: skip
            for k in self.nodes:
                self.start_worker(k)
            self.wait_workers(len(self.nodes))
        except BaseException:
            self.close()
            raise

    def _spawn(self, name: str, node: int | None, module: str, *args: str) -> None:
        log = (self.logdir / f"{name}.log").open("ab")
        cmd = [self.py, "-m", module, *args]
        if node is not None:
            cmd = [str(SCRIPTS / "lab-run.sh"), str(node), *cmd]
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=log, cwd=self.logdir, env=self.env
        )
        log.close()

    def start_worker(self, k: int) -> None:
        self._spawn(f"node{k}", k, "distributed.cli.dask_worker", self.address,
                    "--nthreads", "1", "--name", f"node{k}", "--host", node_ip(k),
                    "--no-dashboard", "--death-timeout", "60")  # fmt: skip

    def nanny_pid(self, k: int) -> int:
        """The pid of node K's nanny (lab-run.sh execs it: SIGTERM here is what
        scancel or a preemption sends a dask-jobqueue worker job)."""
        return self.procs[f"node{k}"].pid

    def wait_workers(self, n: int, timeout: float = 60) -> None:
        import distributed

        with distributed.Client(self.address, timeout=30, set_as_default=False) as c:
            c.wait_for_workers(n, timeout=timeout)

    def names(self) -> dict[str, str]:
        """The workers the scheduler has: name -> address."""
        import distributed

        with distributed.Client(self.address, timeout=30, set_as_default=False) as c:
            info = c.scheduler_info(n_workers=-1)["workers"]
        return {str(w["name"]): addr for addr, w in info.items()}

    def restore(self, timeout: float = 60) -> None:
        """Every node's worker present again: a node whose worker is gone, disturbed or
        replaced by its nanny is emptied (its link up, its processes killed, its old
        worker gone from the scheduler) and gets a fresh one."""
        have = self.names()
        for k in self.nodes:
            name, p = f"node{k}", self.procs.get(f"node{k}")
            if name in have and p is not None and p.poll() is None and self._pristine(k):
                continue
            link(k, up=True)
            kill_node(k)
            if p is not None:
                p.wait(timeout=10)
            deadline = time.monotonic() + timeout
            while name in self.names() and time.monotonic() < deadline:
                time.sleep(0.1)
            self.start_worker(k)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.names()) == len(self.nodes):
                return
            time.sleep(0.2)
        raise AssertionError(f"workers after restore: {self.names()}")

    def _pristine(self, k: int) -> bool:
        """Node K's link is up (a test may have cut it)."""
        r = subprocess.run(["ip", "link", "show", f"vn{k}"], capture_output=True, text=True)
        return ",UP" in r.stdout

    def log(self, name: str) -> str:
        p = self.logdir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def close(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(OSError):
                p.kill()
        for k in range(1, self.n + 1):
            link(k, up=True)  # a partition left by a failed test
            host_link(k, up=True)
            kill_node(k)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(node_pids(k) for k in range(1, self.n + 1)):
            time.sleep(0.1)
