"""The README's safety promises about the local backend, each checked on a real run.

The README says: "No network socket is opened" (the local backend talks over socket
pairs only), "The run directory is private (0700)", sandboxes are 0700, the journal is
0600, and resume loads pickles only from files nobody else can write. The promises a
user relies on without reading the code are the ones a careless change breaks silently:
a stray ``listen()`` in a debug helper, a ``mkdir`` without a mode under a loose umask.
Each test here runs the promise end to end, under the loosest umask a user may have.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import pilotfish


def _big(n: int) -> bytes:
    return b"x" * n  # a value large enough to go to rundir/values/


def _fail() -> None:
    raise ValueError("expected failure")


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask of 000: every file anyone creates without an explicit mode is 0666/0777."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _inet(pid: int) -> list[str]:
    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.NoSuchProcess:
        return []
    return [f"{c.laddr} {c.status}" for c in conns]


def test_local_backend_opens_no_network_socket(tmp_path: Path) -> None:
    """README: "No network socket is opened." A local run (client, master, workers,
    a program task) has no TCP/UDP socket at all, listening or not, so nobody on the
    network can reach it."""
    before = set(_inet(os.getpid()))
    with pilotfish.Session(workers=2, rundir=tmp_path / "run") as s:
        assert s.submit(pow, 2, 10).result() == 1024
        assert s.executable([sys.executable, "-c", "print(1)"]).result().returncode == 0
        procs = s.processes()
        pids = [procs["master"], *procs["workers"]]
        assert all(pids)
        found = {pid: _inet(pid) for pid in pids}
        after = set(_inet(os.getpid()))
    assert all(not c for c in found.values()), f"inet sockets in local processes: {found}"
    assert after <= before, f"the client opened inet sockets: {sorted(after - before)}"


def test_everything_pilotfish_creates_in_the_run_directory_is_private(
    tmp_path: Path, loose_umask: None
) -> None:
    """README: the run directory is private (0700), sandboxes are 0700, the journal is
    0600. Under a umask of 000, a run that writes every kind of file pilotfish makes (the
    journal and its WAL, a large value in values/, a successful program's results/, a
    failed program's kept sandbox, a Python task's scratch directory) leaves nothing in
    the run directory that group or others can read, write or enter, except what the
    user's own program created inside its (private) sandbox."""
    rundir = tmp_path / "run"

    def touch_scratch() -> str:
        d = pilotfish.scratch_dir()
        (d / "ckpt").write_bytes(b"1")
        return str(d)

    with pilotfish.Session(workers=1, rundir=rundir, keep_sandboxes="all") as s:
        big = s.submit(_big, 2_000_000)
        ok = s.executable(["sh", "-c", "echo out > out.txt"], outputs=["out.txt"], key="prog-ok")
        bad = s.executable(["sh", "-c", "echo err >&2; exit 3"], key="prog-bad", retries=0)
        scratch = s.submit(touch_scratch)
        failing = s.submit(_fail)
        assert len(big.result()) == 2_000_000
        assert ok.result().returncode == 0
        with pytest.raises(pilotfish.CommandFailed):
            bad.result()
        with pytest.raises(ValueError):
            failing.result()
        scratch_dir = Path(scratch.result())
        user_files = {
            Path(ok.result().sandbox) / "out.txt",
            scratch_dir / "ckpt",
            *(Path(ok.result().outputs[n]) for n in ok.result().outputs),
        }
        bad_box = Path(bad.failure.sandbox) if bad.failure and bad.failure.sandbox else None
        # the program's own stdout/stderr capture files are pilotfish's; anything else in
        # a sandbox the program wrote itself under the user's umask
    assert bad_box is not None and bad_box.is_dir()
    loose: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(rundir):
        d = Path(dirpath)
        mode = stat.S_IMODE(d.stat().st_mode)
        if mode & 0o077:
            loose.append(f"{d} {mode:04o}")
        for f in filenames:
            p = d / f
            if p in user_files or p.is_symlink():
                continue
            mode = stat.S_IMODE(p.lstat().st_mode)
            if mode & 0o077:
                loose.append(f"{p} {mode:04o}")
    assert (rundir / "journal.db").exists()
    assert any((rundir / "values").iterdir()), "the large value was not written to a file"
    assert not loose, "readable or writable by others: " + ", ".join(loose)
