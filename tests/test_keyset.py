"""The set of used task-key hashes (client/keyset.py) against Python's own set."""

from __future__ import annotations

import random

from pilotfish.client.keyset import HashSet


def test_it_agrees_with_a_set_through_adds_removals_and_growth() -> None:
    rng = random.Random(7)
    ours, theirs = HashSet(), set()
    keys = [f"task-{i}" for i in range(20_000)] + ["", "x"]
    for k in keys:
        h = hash(k)
        ours.add(h)
        theirs.add(h)
        if rng.random() < 0.1:  # a submit that failed half-way: its key is free again
            gone = hash(rng.choice(keys))
            ours.discard(gone)
            theirs.discard(gone)
    for k in keys + [f"other-{i}" for i in range(20_000)]:
        assert (hash(k) in ours) == (hash(k) in theirs), k
    assert len(ours) == len(theirs)
    ours.add(hash("task-1"))  # again: no second entry
    assert len(ours) == len(theirs | {hash("task-1")})


def test_hash_zero_and_extremes_are_kept() -> None:
    s = HashSet()
    for h in (0, 1, 2**63 - 1, -(2**63), -2, 1 << 10, (1 << 10) + 1):
        s.add(h)
        assert h in s
    assert 3 not in s
    s.discard(0)
    assert 0 not in s and 1 not in s  # 0 is kept as 1: one entry for both
    assert 2**63 - 1 in s and -(2**63) in s
