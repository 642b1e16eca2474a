"""The adapter that runs CPython's own ``concurrent.futures`` tests against
``pilotfish.Session`` (see test_cpython_executor.py): only what a user switching
from ``ProcessPoolExecutor`` would change, a fresh run directory per executor."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pilotfish

#: where the adapter's sessions keep their run directories (set by the test module)
ROOT_ENV = "PILOTFISH_CF_ROOT"


class PilotfishSession(pilotfish.Session):
    def __init__(self, max_workers: int | None = None, **kwargs: Any) -> None:
        root = os.environ.get(ROOT_ENV) or None
        kwargs.setdefault("rundir", tempfile.mkdtemp(prefix="session-", dir=root))
        super().__init__(max_workers=max_workers, **kwargs)
