"""``HashSet``: the ``hash()`` of every task key a session used, 16 bytes per key.

A session remembers every key it ever used (keys are unique for the whole session), long
after the task itself is gone. A Python ``set`` of those hashes costs ~90 bytes per key
(a 36-byte int object and its table entry): the largest share of what a million
finished tasks leave behind. Here the hashes live in one ``array('q')``, an
open-addressing table with linear probing kept at most half full.

``hash()`` of a str is never -1 (CPython reserves it), which marks a removed entry; 0
marks an empty one, so a key whose hash is 0 (only ``""`` in practice) is stored as 1.
Like any set of hashes it answers "maybe" for a key whose 64-bit hash equals a used
one's (odds about 3e-8 among a million keys): the caller treats that as used.
"""

from __future__ import annotations

from array import array

__all__ = ["HashSet"]

_EMPTY = 0
_REMOVED = -1
_FIRST = 1 << 10


class HashSet:
    __slots__ = ("_mask", "_n", "_t")

    def __init__(self) -> None:
        self._t = array("q", bytes(8 * _FIRST))
        self._mask = _FIRST - 1
        self._n = 0  # entries in use, removed ones included (they lengthen probes)

    def __len__(self) -> int:
        return sum(1 for v in self._t if v not in (_EMPTY, _REMOVED))

    def _slot(self, h: int) -> int:
        """Where ``h`` is, or the empty slot where its probe ended."""
        t, mask = self._t, self._mask
        i = h & mask
        while True:
            v = t[i]
            if v in (h, _EMPTY):
                return i
            i = (i + 1) & mask

    def __contains__(self, h: int) -> bool:
        h = h or 1
        return self._t[self._slot(h)] == h

    def add(self, h: int) -> None:
        h = h or 1
        i = self._slot(h)
        if self._t[i] == h:
            return
        self._t[i] = h
        self._n += 1
        if 2 * self._n > self._mask:
            self._grow()

    def discard(self, h: int) -> None:
        h = h or 1
        i = self._slot(h)
        if self._t[i] == h:
            self._t[i] = _REMOVED  # keeps the probes of later entries going

    def _grow(self) -> None:
        old = self._t
        live = [v for v in old if v not in (_EMPTY, _REMOVED)]
        size = self._mask + 1  # removed entries gone, it may be large enough as it is
        while 3 * len(live) > size:  # at most a third full: doubles when half full
            size *= 2
        self._t = array("q", bytes(8 * size))
        self._mask = size - 1
        self._n = 0
        for v in live:
            self._t[self._slot(v)] = v
            self._n += 1
