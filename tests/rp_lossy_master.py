"""A pilotfish raptor master that loses requests (RADICAL-Pilot loads it by path).

RP delivers a task to the master it names; a request lost on the way there was a task
that waited forever. This master drops the requests for the client's first RP tasks
(numbers 1 and 2, the end of their uids) before the real master sees them, as RP
would if it lost them, so a test can check that the client's sweep sends them again.
"""

from __future__ import annotations

from typing import Any

from pilotfish.backends.radical.arrivals import attempt_id
from pilotfish.backends.radical.master import PilotfishMaster as _Master

DROPS = {1, 2}


class PilotfishMaster(_Master):  # type: ignore[misc]
    def request_cb(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return super().request_cb([t for t in tasks if attempt_id(t["uid"]) not in DROPS])
