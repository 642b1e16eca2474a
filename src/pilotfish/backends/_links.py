"""Linked attempts waiting at a master for their inputs' values (a pure table).

With linked dispatch (:attr:`pilotfish.core.workflow.Workflow.links`), a task whose inputs
are still running reaches the backend at once, its ``RunAttempt.links`` naming the input
attempts whose values it takes. A master that sees those attempts' results (the local
master, whose workers send every result through it) resolves the links itself, as Dask's
scheduler does for a task's dependencies: the linked attempt waits here, off the queue,
and is queued with the values in place the moment the last input succeeds, without a
round trip through the client.

The rules, written once:

* An attempt is taken only if each input it is linked to is in flight here (queued,
  held, running, or itself waiting here) or succeeded here moments ago (the latest
  values are kept a while, :data:`RECENT`: a linked attempt often arrives just after its
  input ended); otherwise it cannot be linked (``Unlinked``: the session sends it again
  once its inputs are DONE, with their values).
* An input's success puts its value in place; the last one makes the attempt ready.
* An input that ends without a value (failed, lost, timed out, withdrawn) unlinks every
  attempt waiting for it, and, in turn, every attempt waiting for those: none of them
  ran, none is charged (the session's core drops them too, whichever it hears first).
* A waiting attempt the session cancels just leaves.

No I/O, no clock: the dispatcher feeds it and carries out what it returns. Tested in
``tests/test_links.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..errors import InvalidTask
from ..wire.messages import RunAttempt

__all__ = ["RECENT", "LinkTable", "check_links"]

#: the values of the latest successes kept for linked attempts that arrive after their
#: input ended: at most this many, this many bytes in all, none larger than the last
RECENT = (4096, 32 << 20, 1 << 20)


def check_links(backend: str, links: object) -> bool:
    """``Session(backend=..., links=...)``: whether chains go out linked (see
    :mod:`pilotfish.backends.base`); checked when the backend is made."""
    if not isinstance(links, bool):
        raise InvalidTask(
            f"backend={backend!r}: links={links!r} is invalid: give True (a task whose inputs "
            "still run is sent at once, linked to them) or False (sent once they are done)"
        )
    return links


class _Waiting:
    __slots__ = ("deps", "inputs", "m")

    def __init__(self, m: RunAttempt) -> None:
        self.m = m
        self.deps = list(m.deps)
        self.inputs = {aid for _, aid in m.links}


class LinkTable:
    """Linked attempts by attempt id, and who waits for which input attempt."""

    def __init__(self, recent: tuple[int, int, int] = RECENT) -> None:
        self.waiting: dict[int, _Waiting] = {}
        self._for: dict[int, list[int]] = {}  # input attempt id -> attempts waiting for it
        self._recent: OrderedDict[int, bytes] = OrderedDict()  # attempt id -> its value
        self._recent_bytes = 0
        self._bounds = recent

    def __len__(self) -> int:
        return len(self.waiting)

    def __contains__(self, attempt: object) -> bool:
        return attempt in self.waiting

    def take(self, m: RunAttempt, in_flight: Callable[[int], bool]) -> RunAttempt | str | None:
        """Take linked attempt ``m``: None if it waits here for its inputs; ``m`` with
        every value in place (links cleared) if they all succeeded here already; else why
        it cannot be linked (an input is neither in flight nor a recent success here).
        ``in_flight(aid)``: attempt ``aid`` is queued, held or running here."""
        recent = self._recent
        for _, aid in m.links:
            if aid not in recent and aid not in self.waiting and not in_flight(aid):
                return f"its input attempt {aid} was not in flight at the master"
        w = _Waiting(m)
        for i, aid in m.links:
            if aid in recent:
                w.deps[i] = recent[aid]
                w.inputs.discard(aid)
        if not w.inputs:
            return m._replace(deps=tuple(w.deps), links=())
        self.waiting[m.attempt] = w
        for aid in w.inputs:
            self._for.setdefault(aid, []).append(m.attempt)
        return None

    def succeeded(self, attempt: int, data: bytes) -> list[RunAttempt]:
        """Input ``attempt`` succeeded with ``data`` (its pickled value): the attempts that
        now have every value, ready to queue (links cleared)."""
        self._remember(attempt, data)
        ready: list[RunAttempt] = []
        for aid in self._for.pop(attempt, ()):
            w = self.waiting.get(aid)
            if w is None:
                continue
            for i, src in w.m.links:
                if src == attempt:
                    w.deps[i] = data
            w.inputs.discard(attempt)
            if not w.inputs:
                del self.waiting[aid]
                ready.append(w.m._replace(deps=tuple(w.deps), links=()))
        return ready

    def _remember(self, attempt: int, data: bytes) -> None:
        count, total, largest = self._bounds
        if len(data) > largest:
            return
        recent = self._recent
        recent[attempt] = data
        self._recent_bytes += len(data)
        while len(recent) > count or self._recent_bytes > total:
            self._recent_bytes -= len(recent.popitem(last=False)[1])

    def ended(self, attempt: int, why: str) -> list[tuple[int, str]]:
        """Input ``attempt`` ended without a value: ``(attempt id, reason)`` of every
        attempt unlinked by it, directly or through another unlinked one."""
        out: list[tuple[int, str]] = []
        stack = [(attempt, why)]
        while stack:
            src, reason = stack.pop()
            for aid in self._for.pop(src, ()):
                w = self.waiting.pop(aid, None)
                if w is None:
                    continue
                self._forget_inputs(aid, w)
                said = f"its input attempt {src} {reason}"
                out.append((aid, said))
                stack.append((aid, "was not run (its own input did not succeed)"))
        return out

    def cancel(self, attempt: int) -> bool:
        """The session withdrew waiting ``attempt``; True if it was waiting here."""
        w = self.waiting.pop(attempt, None)
        if w is None:
            return False
        self._forget_inputs(attempt, w)
        return True

    def _forget_inputs(self, attempt: int, w: _Waiting) -> None:
        for src in w.inputs:
            others = self._for.get(src)
            if others is not None and attempt in others:
                others.remove(attempt)
                if not others:
                    del self._for[src]

    def problems(self, in_flight: Callable[[int], bool]) -> list[str]:
        """Broken invariants (for ``validate()``): every waiting attempt waits for inputs
        in flight here, and is filed under each of them."""
        out = []
        for aid, w in self.waiting.items():
            if not w.inputs:
                out.append(f"linked attempt {aid} waits for nothing")
            for src in w.inputs:
                if src not in self.waiting and not in_flight(src):
                    out.append(f"linked attempt {aid} waits for {src}, which is not in flight")
                if aid not in self._for.get(src, ()):
                    out.append(f"linked attempt {aid} is not filed under its input {src}")
        return out
