"""Bad-node draining: the rule, pure (events in, decisions out; no clock, no I/O).

At ensemble scale a broken node (a bad GPU, a full local disk, a missing module
on one image, memory that kills every process) fails whatever is sent to it.
Without a rule every member sent there loses a retry, and a thousand members
lose their budgets to one node. So: when attempts of ``tasks`` *different*
tasks fail on the same worker (or the same host) with a failure that says
"the place is to blame, maybe" (WORKER_LOST, ENVIRONMENT, TIMEOUT) within
``window`` seconds, that worker (host) is drained: no new attempts go there
(the backend retires or replaces it), and those attempts are not charged to
their tasks' retry budgets.

Evidence, counted so that one event is never taken for several::

    failure on (worker W, host H, pid P) of task K
        WORKER_LOST   one incident per dead worker process (W, P): a worker that dies
                      holding three attempts (Dask threads) is one piece of evidence
                      against W and H, not three. A worker that comes back after each
                      death under the same name gathers evidence (on Dask, an attempt's
                      worker is its nanny's address, which a restart keeps);
                      one used once (the local backend's w1, w2, ...) never drains by
                      deaths alone: its host does, on a cluster
        ENVIRONMENT,  one incident per (W, K): against W, and against H
        TIMEOUT
    W drained when >= tasks distinct tasks gave evidence against W within window
    H drained likewise, but only while another host that is not drained has been
    seen: the last host is never drained (one machine = the local backend)

Each place is drained once per session; a drained place gives no more evidence.
:class:`pilotfish.core.workflow.Workflow` feeds it and acts on its decisions.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from ..errors import Category

__all__ = ["DRAIN_CATEGORIES", "DrainDecision", "DrainPolicy", "DrainRule"]

#: failures that may be the place's fault rather than the task's
DRAIN_CATEGORIES = frozenset({Category.WORKER_LOST, Category.ENVIRONMENT, Category.TIMEOUT})


@dataclasses.dataclass(frozen=True, slots=True)
class DrainPolicy:
    """``tasks`` different tasks failing on one worker/host within ``window`` seconds
    drain it (``Session(drain_after=3)`` or ``drain_after=(3, 600.0)``)."""

    tasks: int = 3
    window: float = 600.0

    def __post_init__(self) -> None:
        if isinstance(self.tasks, bool) or not isinstance(self.tasks, int) or self.tasks < 2:
            raise ValueError(
                f"drain_after tasks={self.tasks!r} must be an int >= 2 (one task failing "
                "twice is the task's problem, not the node's)"
            )
        if not isinstance(self.window, int | float) or not self.window > 0:
            raise ValueError(f"drain_after window={self.window!r} must be seconds > 0")

    @classmethod
    def coerce(cls, value: object) -> DrainPolicy | None:
        """``None``/``False`` (off), ``True`` (defaults), an int (tasks), a pair
        (tasks, window) or a DrainPolicy."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, DrainPolicy):
            return value
        if isinstance(value, int):
            return cls(value)
        if isinstance(value, tuple | list) and len(value) == 2:
            return cls(value[0], float(value[1]))
        raise ValueError(
            f"drain_after={value!r}: give None (off), an int (different tasks), "
            "a pair (tasks, window seconds) or a pilotfish DrainPolicy"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class DrainDecision:
    """Drain ``name`` (a ``kind`` of ``"worker"`` or ``"host"``): ``keys`` are the tasks
    that showed it, ``attempts`` the attempt ids of the evidence (not charged)."""

    kind: str
    name: str
    host: str | None
    reason: str
    keys: tuple[str, ...]
    attempts: tuple[int, ...]
    time: float


@dataclasses.dataclass(slots=True)
class _Evidence:
    time: float
    key: str
    attempt: int
    category: Category
    worker: str | None


class DrainRule:
    """Feed it every failed attempt (:meth:`failed`) and every place seen
    (:meth:`seen`); it returns the places to drain. Pure and synchronous."""

    def __init__(self, policy: DrainPolicy) -> None:
        self.policy = policy
        self._places: dict[tuple[str, str], deque[_Evidence]] = {}
        self._dead: set[tuple[str, int | None]] = set()  # (worker, pid) already counted
        self.drained: dict[tuple[str, str], DrainDecision] = {}
        self._hosts: set[str] = set()

    def seen(self, host: str | None) -> None:
        if host:
            self._hosts.add(host)

    def is_drained(self, worker: str | None, host: str | None) -> bool:
        return (worker is not None and ("worker", worker) in self.drained) or (
            host is not None and ("host", host) in self.drained
        )

    def failed(
        self,
        *,
        key: str,
        attempt: int,
        category: Category,
        worker: str | None,
        host: str | None,
        pid: int | None,
        now: float,
    ) -> list[DrainDecision]:
        if category not in DRAIN_CATEGORIES:
            return []
        self.seen(host)
        if self.is_drained(worker, host):
            return []  # already drained: the evidence was counted
        ev = _Evidence(now, key, attempt, category, worker)
        places: list[tuple[str, str]] = []
        if category is Category.WORKER_LOST:
            incident = (worker or "?", pid)
            if incident in self._dead:
                return []
            self._dead.add(incident)
        if worker:
            places.append(("worker", worker))
        if host:
            places.append(("host", host))
        out: list[DrainDecision] = []
        for place in places:
            q = self._places.setdefault(place, deque())
            q.append(ev)
            while q and q[0].time < now - self.policy.window:
                q.popleft()
            keys = list(dict.fromkeys(e.key for e in q))
            if len(keys) < self.policy.tasks:
                continue
            if place[0] == "host":
                others = self._hosts - {place[1]} - {n for k, n in self.drained if k == "host"}
                if not others:
                    continue  # never drain the last host
            d = self._decide(place, list(q), keys, host, now)
            self.drained[place] = d
            del self._places[place]
            out.append(d)
        return out

    def problems(self) -> list[str]:
        """Its invariants, broken ones described (the workflow's ``validate`` reports them)."""
        out = []
        for place, d in self.drained.items():
            if (d.kind, d.name) != place:
                out.append(f"drain: {place} is filed with the decision for {(d.kind, d.name)}")
            if place in self._places:
                out.append(f"drain: {place[0]} {place[1]} is drained but still gathers evidence")
        for (kind, name), q in self._places.items():
            if kind == "worker" and len({e.key for e in q}) >= self.policy.tasks:
                out.append(f"drain: worker {name} has evidence of {self.policy.tasks} tasks")
        hosts = {n for k, n in self.drained if k == "host"}
        if hosts and not self._hosts - hosts:
            out.append(f"drain: every host seen is drained: {sorted(hosts)}")
        return out

    def _decide(
        self,
        place: tuple[str, str],
        evidence: list[_Evidence],
        keys: list[str],
        host: str | None,
        now: float,
    ) -> DrainDecision:
        kind, name = place
        cats = sorted({e.category.value for e in evidence})
        span = now - evidence[0].time
        reason = (
            f"{kind} {name} drained: {len(keys)} different tasks failed there "
            f"({', '.join(cats)}) within {span:.0f} s (drain_after: {self.policy.tasks} tasks "
            f"in {self.policy.window:.0f} s); those attempts are not charged to the tasks, "
            "and no new attempts go there"
        )
        return DrainDecision(
            kind,
            name,
            host if kind == "worker" else name,
            reason,
            tuple(keys),
            tuple(e.attempt for e in evidence),
            now,
        )
