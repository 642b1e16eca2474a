"""``timeout_retries=`` (issue 25 item 17): by default one timed-out attempt is retried,
not ``retries`` of them (on every backend: tests/test_fault_matrix.py); the option says
otherwise, and a program with ``resume_files`` (each retry continues from its
checkpoint) keeps its whole budget."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import pilotfish
from conftest import fake_session


def hang(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def test_timeout_retries_option(tmp_path: Path) -> None:
    with fake_session(tmp_path / "r") as s:
        t = s.submit(pilotfish.task(hang, timeout=0.2, timeout_retries=0), 0.6)
        with pytest.raises(pilotfish.TaskTimeout):
            t.result(timeout=30)
        assert [a.outcome for a in t.attempts] == ["timeout"]
        for bad in (-1, 1.5, True, "2"):
            with pytest.raises(pilotfish.InvalidTask, match="timeout_retries"):
                pilotfish.task(hang, timeout_retries=bad)
        prog = s.executable(["sleep", "5"], timeout=0.3, resume_files=["x.cpt"], retries=2)
        assert prog.options.timeout_retries == 2  # continues from a checkpoint: all of them
        plain = s.executable(["sleep", "5"], timeout=0.3, key="plain")
        assert plain.options.timeout_retries is None  # the default: 1
        for x in (prog, plain):
            x.cancel()
