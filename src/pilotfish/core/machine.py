"""What every pure state machine of pilotfish shares: its story and its invariant error.

The workflow (:mod:`.workflow`), the attempt ledger (:mod:`.ledger`) and the local
master's dispatcher (``pilotfish.backends.local.dispatch``) are built alike, as Dask's
worker state machine is:

* one entry, ``handle(stimulus) -> list[command]``, dispatched by ``match`` with
  ``assert_never`` (a stimulus nobody handles is a type error, not a silent no-op);
* a :class:`Story`, a bounded log of the last stimuli it handled, which goes into the
  message of every error it raises about itself (an impossible transition, a broken
  invariant), so a bug report says what happened just before;
* ``validate()``, which checks the machine's invariants and raises
  :class:`InvariantViolation` naming the broken one. The tests call it after every
  step (``debug = True``: ``handle`` validates after each stimulus); production does
  not (the class attribute ``debug`` is False), so it stays off the hot path.
"""

from __future__ import annotations

import reprlib
from collections import deque
from typing import Any

from ..errors import PilotfishError

__all__ = ["STORY_LENGTH", "InvariantViolation", "Story"]

#: how many recent stimuli a machine remembers for its error messages
STORY_LENGTH = 200

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 120
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 8


class Story:
    """The last ``maxlen`` stimuli a machine handled, oldest first (kept as given: they
    are rendered only when an error needs them, so recording one costs an append)."""

    __slots__ = ("_log", "append")

    def __init__(self, maxlen: int = STORY_LENGTH) -> None:
        self._log: deque[Any] = deque(maxlen=maxlen)
        self.append = self._log.append

    def __len__(self) -> int:
        return len(self._log)

    def __iter__(self) -> Any:
        return iter(self._log)

    def lines(self) -> list[str]:
        """Each recorded stimulus on one line, shortened (no payload dumps)."""
        return [_short(s) for s in self._log]

    def text(self, last: int = 30) -> str:
        """The newest ``last`` stimuli, for an error message."""
        lines = self.lines()[-last:]
        skipped = len(self) - len(lines)
        head = f"  ... {skipped} earlier\n" if skipped else ""
        return head + "\n".join(f"  {ln}" for ln in lines) if lines else "  (none yet)"


def _short(stimulus: Any) -> str:
    fields = getattr(stimulus, "__dataclass_fields__", None)
    if fields is None:
        return _repr.repr(stimulus)
    inner = ", ".join(f"{f}={_repr.repr(getattr(stimulus, f))}" for f in fields)
    return f"{type(stimulus).__name__}({inner})"


class InvariantViolation(PilotfishError, AssertionError):
    """``validate()`` found a machine's state broken: a pilotfish bug. The message names
    the machine, the invariant and the recent stimuli (its story)."""

    def __init__(self, machine: str, invariant: str, story: Story | None = None) -> None:
        text = story.text() if story is not None else "  (no story)"
        super().__init__(
            f"{machine}: invariant broken: {invariant}\nrecent stimuli, oldest first:\n{text}"
        )
        self.machine = machine
        self.invariant = invariant

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.__class__, str(self), self.machine, self.invariant))


def _rebuild(
    cls: type[InvariantViolation], text: str, machine: str, invariant: str
) -> InvariantViolation:
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    err.failure = None
    err.machine, err.invariant = machine, invariant
    return err


def add_story(err: BaseException, story: Story) -> BaseException:
    """Attach the recent stimuli to ``err`` (PEP 678 note) and return it."""
    err.add_note(f"recent stimuli, oldest first:\n{story.text()}")
    return err
