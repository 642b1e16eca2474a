"""CPython's own generic executor tests (``Lib/test/test_concurrent_futures.py``), with
their assertions unchanged, run against ``pilotfish.Session``: code written for
``ProcessPoolExecutor`` behaves the same when switched to pilotfish.

The suite file comes from the interpreter's own ``test`` package or from Debian's
``libpython3.X-testsuite`` (``.ci/run`` installs it); without either, this module is
skipped with that reason. Workers import the suite's functions (``mul``,
``sleep_and_print``...) as ``test.test_concurrent_futures``, so a small ``test`` package
on ``sys.path`` joins the interpreter's ``test`` directory and the suite's.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig
import unittest
from pathlib import Path
from typing import Any

import pytest

_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
_TESTS_DIR = str(Path(__file__).resolve().parent)


def _suite_dir() -> str | None:
    own = Path(sysconfig.get_paths()["stdlib"]) / "test"
    for d in (own, Path(f"/usr/lib/python{_VERSION}/test")):
        if (d / "test_concurrent_futures.py").is_file():
            return str(d)
    return None


_SUITE = _suite_dir()
if _SUITE is None:
    pytest.skip(
        f"CPython's test_concurrent_futures.py is not installed (Debian: apt-get install "
        f"libpython{_VERSION}-testsuite)",
        allow_module_level=True,
    )


def _shim(root: Path) -> str:
    """A ``test`` package whose path is the interpreter's ``test`` directory plus the
    suite's, first on ``sys.path`` (here, in the workers, and in the suite's
    subprocesses)."""
    stdlib_test = str(Path(sysconfig.get_paths()["stdlib"]) / "test")
    pkg = root / "shim" / "test"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        f"__path__ = [{str(pkg)!r}, {stdlib_test!r}, {_SUITE!r}]\n", encoding="utf-8"
    )
    return str(pkg.parent)


_ROOT = Path(os.environ.get("PYTEST_CF_TMP") or __import__("tempfile").mkdtemp(prefix="pf-cf-"))
_SHIM = _shim(_ROOT)
sys.path.insert(0, _SHIM)
if "test" in sys.modules:  # the interpreter's own test package was imported already
    sys.modules["test"].__path__.append(_SUITE)  # type: ignore[union-attr]
os.environ["PILOTFISH_CF_ROOT"] = str(_ROOT)

cft: Any = importlib.import_module("test.test_concurrent_futures")
from cpython_cf_adapter import PilotfishSession  # noqa: E402

_PREAMBLE = (
    f"import sys; sys.path[:0] = [{_SHIM!r}, {_TESTS_DIR!r}]; import os; "
    f"os.environ['PILOTFISH_CF_ROOT'] = {str(_ROOT)!r}; import concurrent.futures; "
    "from cpython_cf_adapter import PilotfishSession; "
    "concurrent.futures.PilotfishSession = PilotfishSession\n"
)


def _assert_python_ok(*args: str, **env: Any) -> Any:
    """The suite's subprocess tests import the executor from ``concurrent.futures`` by
    name: the same script runs, after a line that puts the adapter there."""
    if len(args) == 2 and args[0] == "-c":
        args = ("-c", _PREAMBLE + args[1])
    return _orig_assert_python_ok(*args, **env)


_orig_assert_python_ok = cft.assert_python_ok
cft.assert_python_ok = _assert_python_ok


class PilotfishMixin(cft.ExecutorMixin):  # type: ignore[misc]
    executor_type = PilotfishSession
    worker_count = 2  # the suite's default is 5; this machine class has 2 CPUs


def _case(name: str, tests: type, **skips: str) -> type:
    """``tests`` (one of the suite's generic classes) on pilotfish; ``skips`` names the
    tests that check a pool's internals, each with its one-line reason."""
    attrs: dict[str, Any] = {}
    for test, reason in skips.items():
        attrs[test] = unittest.skip(reason)(getattr(tests, test))
    return type(name, (tests, PilotfishMixin, cft.BaseTestCase), attrs)


PilotfishExecutorTest = _case("PilotfishExecutorTest", cft.ExecutorTest)
PilotfishWaitTest = _case("PilotfishWaitTest", cft.WaitTests)
PilotfishAsCompletedTest = _case("PilotfishAsCompletedTest", cft.AsCompletedTests)
PilotfishShutdownTest = _case(
    "PilotfishShutdownTest",
    cft.ExecutorShutdownTest,
    test_cancel_futures="pilotfish cancels every task not yet running on a worker; the test "
    "needs some of 50 just-submitted tasks to be uncancellable, as the workers+1 calls a "
    "ProcessPoolExecutor has already queued are",
)
PilotfishInitializerTest = _case("PilotfishInitializerTest", cft.InitializerMixin)
