"""A pilotfish raptor worker that loses a task (RADICAL-Pilot loads it by path).

Each worker drops the first task numbered 1 (the end of its uid) it takes off RP's
queue, unclaimed, as a worker that died between RP's queue and its claim would; the
master must notice that the task waits unclaimed while a worker is idle, and push it
again.
"""

from __future__ import annotations

from typing import Any

import radical.utils as ru

from pilotfish.backends.radical.arrivals import attempt_id
from pilotfish.backends.radical.worker import PilotfishWorker as _Worker

DROPS = {1}


class PilotfishWorker(_Worker):  # type: ignore[misc]
    def _request_cb(self, tasks: Any) -> None:
        dropped: set[str] = self.__dict__.setdefault("lossy_dropped", set())
        keep = []
        for t in ru.as_list(tasks):
            uid = str(t["uid"])
            if attempt_id(uid) in DROPS and uid not in dropped:
                dropped.add(uid)
            else:
                keep.append(t)
        if keep:
            super()._request_cb(keep)
