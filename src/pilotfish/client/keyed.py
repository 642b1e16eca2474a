"""What a session's ``Task`` is to the modules that pickle and hash calls
(:mod:`.payloads`, :mod:`.settled`), without importing the Task itself."""

from __future__ import annotations

__all__ = ["Keyed"]


class Keyed:
    """What a session's ``Task`` is to them: an object whose canonical form is its
    stable ``key`` (pickled as a dependency, never by value). ``Task`` subclasses it, so a
    Task is recognised by type, never by the name of the module that defines it."""

    __slots__ = ()
    key: str
