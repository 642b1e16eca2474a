"""The session's memory of keys (issue 26: memory held by no one): a finished task the
user dropped leaves only a hash of its key behind, and keys stay unique all the same."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

import pilotfish
from conftest import fake_session
from pilotfish.core import workflow as wf


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
        assert plain._cbl is None and waited._cbl is None  # called, then dropped
        assert plain._wl is None and waited._wl is None  # cf.wait removed its waiter
        assert plain._more is None  # nothing rare set: no record for it
        record = s._driver.core._tasks[plain._tid]
        assert record.rare is None and isinstance(record.att, wf.AttemptRecord)
        assert record.attempts == (record.att,) and record.last() is record.att
        assert plain._condition is waited._condition  # the shared one, once finished
        # cf.wait on finished futures installs and removes its waiter: still fine
        for _ in range(3):
            assert cf.wait([plain, waited], timeout=5).not_done == set()
        assert [f.result() for f in cf.as_completed([plain, waited], timeout=5)] != []


def slow(x: int) -> int:
    import time

    time.sleep(0.3)
    return x


def test_waiters_come_and_go_and_rare_attributes_read_back(tmp_path: Path) -> None:
    """Two threads wait on one running task: the waiter list lives while either waits and
    is dropped when the last is removed; a task's rarely set attributes (kept in one
    record made on first use) read back as set, and as their defaults when never set."""
    import concurrent.futures as cf
    import threading

    with fake_session(tmp_path / "r") as s:
        t = s.submit(slow, 5)
        seen: list[set[cf.Future[int]]] = []
        waiters = [
            threading.Thread(target=lambda: seen.append(cf.wait([t], timeout=30).done))
            for _ in range(2)
        ]
        for w in waiters:
            w.start()
        for w in waiters:
            w.join(timeout=30)
        assert seen == [{t}, {t}] and t._wl is None
        assert t._settled is None and t._programs == () and t._output_of is None
        t._programs = ("gmx",)
        t._key_unstable = None  # a default: still no record
        assert t._programs == ("gmx",) and t._more is not None
        assert t._declared_outputs == () and t._cmd_timeout is None
        first = t._more
        t._cmd_timeout = 2.5
        assert t._more is first and t._cmd_timeout == 2.5 and t._programs == ("gmx",)


class Touchy(Exception):
    """A user's exception that cannot be compared (its ``__eq__`` raises)."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("Touchy instances cannot be compared")

    __hash__ = Exception.__hash__


def raise_touchy() -> None:
    raise Touchy("mine")


def test_a_user_exception_that_cannot_be_compared_is_kept_as_it_is(tmp_path: Path) -> None:
    """The task keeps the attempt's exception in its record of rare attributes; storing it
    never compares it with anything (a user's ``__eq__`` may raise or lie)."""
    with fake_session(tmp_path / "r") as s:
        t = s.submit(raise_touchy)
        exc = t.exception(timeout=30)
        assert type(exc) is Touchy and str(exc) == "mine"
        assert t._last_exc is exc


def test_a_rare_field_makes_its_record_only_for_a_value_that_is_not_its_default() -> None:
    """The one descriptor behind the Task's and the core record's rare fields: the default
    (by identity, or ``==`` of exactly its built-in type) makes no record; anything else
    does, a user's value is never compared, and a default must be plain."""
    from pilotfish._rare import Rare

    class Side:
        def __init__(self) -> None:
            self.n = 0
            self.names: tuple[str, ...] = ()

    class Obj:
        __slots__ = ("side",)
        n = Rare("side", Side)
        names = Rare("side", Side)

        def __init__(self) -> None:
            self.side: Side | None = None

    class Liar(int):
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("compared")

        __hash__ = int.__hash__

    o = Obj()
    o.n, o.names = 0, ()
    assert o.side is None and o.n == 0 and o.names == ()
    o.n = Liar(0)  # not exactly an int: kept, never compared
    assert o.side is not None and type(o.n) is Liar
    p = Obj()
    p.names = ("gmx",)
    assert p.side is not None and p.names == ("gmx",) and p.n == 0

    class Mutable:
        def __init__(self) -> None:
            self.items: list[int] = []

    with pytest.raises(TypeError, match="must be plain"):  # as a class body would call it
        Rare("side", Mutable).__set_name__(Obj, "items")
