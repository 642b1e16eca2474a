"""What a raptor master received of its client's tasks, for the client's sweep.

:class:`Arrivals` (kept by :class:`~.master_book.MasterBook`, under its lock) remembers
every task uid the master received and when the highest task number so far went up, so
the master can answer a sweep (which of these tasks, sent a grace period ago, did it
never receive?) atomically with its request callback. Task numbers are the number at
the end of a task's uid (:func:`attempt_id`).

Loaded inside the pilot (absolute imports only, like :mod:`.master`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

__all__ = ["ARRIVALS_KEPT", "Arrivals", "attempt_id"]

ARRIVALS_KEPT = 1800.0  # s of task arrivals a client's sweep may ask about


def attempt_id(uid: str) -> int:
    """The ledger id of a task: the client numbers every task it submits
    (``pf.TOKEN.TAG.N``), so ``N`` is unique among this master's tasks."""
    try:
        return int(str(uid).rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return hash(uid)  # not one of ours: never matches a ledger entry


class Arrivals:
    """Which of its client's tasks the master received, and when the highest number so
    far went up (a sweep asks what had arrived a grace period ago; older than
    ``ARRIVALS_KEPT``: settled). Its owner's lock held for every call."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        # every task uid this master received (a client's sweep asks about the others),
        # and those it withdrew, unreceived, for a sweep: cancelled if they come later
        self.seen: set[str] = set()
        self.tomb: set[str] = set()
        self.last = clock()  # when a task of ours last arrived
        self._times: list[float] = []
        self._tops: list[int] = []
        self._settled = 0
        self._top = 0

    def arrived(self, uids: list[str]) -> None:
        """These tasks of ours arrived (new ones: not seen, not withdrawn)."""
        if not uids:
            return
        self.seen.update(uids)
        top = max(attempt_id(u) for u in uids)
        now = self.last = self.clock()
        if top > self._top:
            self._top = top
            self._times.append(now)
            self._tops.append(top)
        old = bisect.bisect_left(self._times, now - ARRIVALS_KEPT)
        if old:
            self._settled = self._tops[old - 1]
            del self._times[:old], self._tops[:old]

    def _top_at(self, when: float) -> int:
        """The highest task number of ours received at ``when`` or before."""
        i = bisect.bisect_right(self._times, when)
        return self._tops[i - 1] if i else self._settled

    def sweep(self, uids: list[str], graces: list[float]) -> tuple[list[str], list[str]]:
        """(known, gone): see :meth:`MasterBook.sweep`; the gone ones are withdrawn."""
        now = self.clock()
        known, gone = [], []
        for u, g in zip(uids, graces, strict=False):
            if u in self.seen:
                known.append(u)
            elif now - self.last >= g or attempt_id(u) < self._top_at(now - g):
                gone.append(u)
        self.tomb.update(gone)
        return known, gone
