"""Guardrails that run with the suite: lint, format and types."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.timeout(300)
def test_ruff_lint() -> None:
    """ruff finds nothing in src, tests and benchmarks."""
    r = _run("ruff", "check", "src", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(300)
def test_ruff_format() -> None:
    """The code is formatted with ruff format."""
    r = _run("ruff", "format", "--check", "src", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(300)
def test_mypy() -> None:
    """mypy passes (strict on the core, errors, wire and commands)."""
    r = _run("mypy")
    assert r.returncode == 0, r.stdout + r.stderr
