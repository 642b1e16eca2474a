"""``Session(preload=[modules])`` (issue 25 item 15, DESIGN section 2): every worker
imports them as it starts, not on its first task. Conformance: on every backend."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import pilotfish


def preloaded(name: str, wait: float) -> tuple[bool, int]:
    """Was ``name`` imported in this worker process without this task importing it?
    (A worker may still be importing it in the background: wait a little.)"""
    deadline = time.monotonic() + wait
    while name not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.05)
    mod = sys.modules.get(name)
    return mod is not None, getattr(mod, "LOADED_PID", -1)


def test_workers_import_preloaded_modules_at_start(
    make_session: pilotfish.Session, backend: str
) -> None:
    with make_session(workers=2, preload=["preload_marker"]) as s:  # type: ignore[operator]
        got = [s.submit(preloaded, "preload_marker", 10.0) for _ in range(4)]
        for t in got:
            seen, pid = t.result(timeout=120)
            assert seen, "the worker had not imported the preloaded module"
            # imported by the worker process that ran it; on RADICAL-Pilot each task runs
            # in a fork of the worker (which inherits the import), on fake in this process
            if backend not in ("radical", "fake"):
                assert pid == t.attempts[-1].pid, (pid, t.attempts)


def test_without_preload_nothing_is_imported(tmp_path: Path) -> None:
    """The control: a fresh local worker has not imported it."""
    with pilotfish.Session(workers=1, rundir=str(tmp_path / "r")) as s:
        assert s.submit(preloaded, "preload_marker", 0.0).result(timeout=60) == (False, -1)


def test_bad_preload_is_refused_at_once(tmp_path: Path) -> None:
    for bad, words in [
        ("numpy", "give a list of module names"),
        (["json", 3], "3 is not a module name"),
        (["not a module"], "is not a module name"),
        (["pilotfish_no_such_module_xyz"], "is not importable here"),
    ]:
        with pytest.raises(pilotfish.InvalidTask, match="preload") as info:
            pilotfish.Session(workers=1, rundir=str(tmp_path / "r"), preload=bad)
        assert words in str(info.value), info.value
    from pilotfish.backends.fake import FakeBackend

    with pytest.raises(pilotfish.InvalidTask, match="configure the backend object"):
        pilotfish.Session(backend=FakeBackend(rundir=str(tmp_path / "f")), preload=["json"])
    assert not (tmp_path / "r").exists()  # refused before anything was made
