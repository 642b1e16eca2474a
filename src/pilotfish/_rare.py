"""Attributes most objects of a class leave at their defaults, kept in one side record.

A task is held by the user for as long as they like, so every slot it carries costs
memory per held task (issue 26). Fields that few tasks ever set (retries used, settled
inputs, a program's outputs, the last failure, ...) live in a small record that is made
the first time one of them is set to something other than its default; a task that never
sets one keeps ``None`` in a single slot. :class:`Rare` is the descriptor that reads and
writes such a field as if it were the object's own attribute. The client's ``Task`` and
the core's task record both use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Rare"]

#: the defaults a rare field may have: immutable, and compared without user code
_PLAIN = (type(None), bool, int, float, str, tuple)


class Rare:
    """The attribute of the same name in the side record kept in slot ``slot``, made by
    ``make()`` on the first set of a value other than the field's default (the default is
    ``make()``'s, so it is written in one place).

    Setting the default never makes a record. Whether a value *is* the default is decided
    by identity, or by ``==`` only when the value has exactly the default's built-in type:
    a value of the user's (an exception whose ``__eq__`` raises or lies) is never
    compared."""

    __slots__ = ("default", "make", "name", "slot")

    def __init__(self, slot: str, make: Callable[[], Any]) -> None:
        self.slot = slot
        self.make = make
        self.name = ""
        self.default: Any = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.default = getattr(self.make(), name)
        if type(self.default) not in _PLAIN or (type(self.default) is tuple and self.default != ()):
            raise TypeError(f"{owner.__name__}.{name}: a rare field's default must be plain")

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        side = getattr(obj, self.slot)
        return self.default if side is None else getattr(side, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        side = getattr(obj, self.slot)
        if side is None:
            d = self.default
            if value is d or (type(value) is type(d) and value == d):
                return
            side = self.make()
            setattr(obj, self.slot, side)
        setattr(side, self.name, value)
