"""The session's memory of keys (issue 26: memory held by no one): a finished task the
user dropped leaves only a hash of its key behind, and keys stay unique all the same."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

import pilotfish
from conftest import fake_session


def ident(x: int) -> int:
    return x


def test_a_dropped_task_leaves_only_its_keys_hash(tmp_path: Path) -> None:
    with fake_session(tmp_path / "r") as s:
        t = s.submit(ident, 1)
        first_key = t.key
        mine = s.submit(pilotfish.task(ident, key="member-001"), 2)
        assert t.result(timeout=30) == 1 and mine.result(timeout=30) == 2
        del t, mine
        gc.collect()
        table = s._tasks
        again = s.submit(ident, 1)  # the same call: the next suffix, never the same key
        assert again.key == f"{first_key}-2", again.key
        # a submit lets the session forget what was freed: keys no longer findable, used
        assert first_key not in table._ids and "member-001" not in table._ids
        assert table.used(first_key) and table.used("member-001")
        with pytest.raises(pilotfish.InvalidTask, match="already used"):
            s.submit(pilotfish.task(ident, key="member-001"), 3)
        assert again.result(timeout=30) == 1
        assert not s._dups or list(s._dups.values()) == [2]  # only repeated calls counted


def test_a_finished_task_holds_no_dict_lists_or_condition_of_its_own(tmp_path: Path) -> None:
    """Issue 26, memory per held future: a Task is slotted (no __dict__ filled), Future's
    waiter and callback lists and its Condition exist only if someone asked for them,
    and a finished task's Condition is the shared one; waiting and callbacks still work."""
    import concurrent.futures as cf

    with fake_session(tmp_path / "r") as s:
        plain = s.submit(ident, 1)
        waited = s.submit(ident, 2)
        called: list[int] = []
        waited.add_done_callback(lambda f: called.append(f.result()))
        done, _ = cf.wait([plain, waited], timeout=30)
        assert done == {plain, waited} and called == [2]
        assert not plain.__dict__, plain.__dict__
        assert plain._cbl is None
        assert plain._condition is waited._condition  # the shared one, once finished
        # cf.wait on finished futures installs and removes its waiter: still fine
        for _ in range(3):
            assert cf.wait([plain, waited], timeout=5).not_done == set()
        assert [f.result() for f in cf.as_completed([plain, waited], timeout=5)] != []
