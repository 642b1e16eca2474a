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
from collections.abc import Iterator

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
def session(tmp_path: os.PathLike[str]) -> Iterator[pilotfish.Session]:
    with pilotfish.Session(workers=2, rundir=str(tmp_path / "run")) as s:
        yield s


def wait_for(pred, timeout: float = 10.0, interval: float = 0.01):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
