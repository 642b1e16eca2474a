"""``pilotfish.settled(tasks, at_least=None)``: take inputs whatever became of them.

An analysis over an ensemble should run on the members that succeeded while the others
fail, as Dask's ``wait``/``as_completed`` let a client do by hand and Snakemake's or
Nextflow's "ignore" error strategies do for a workflow. As an argument of ``submit``,
``settled(tasks)`` makes the call wait until every listed task has *finished*, however it
ended, and pass a list, in the same order, of their values and, for each one that failed
or was cancelled, a :class:`pilotfish.Failure`. ``at_least`` (a count, or a fraction of
the list) fails the call with DEPENDENCY_FAILED, without running it, when fewer
succeeded. A task listed in ``settled`` and also passed directly is a plain input (its
failure fails the call).

The rule lives in the workflow core (``core.workflow.Settled``); here the marker, its
pickle (a list whose items are the listed tasks, each replaced by its value or failure on
the worker) and what the session tells the core.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..core.workflow import Settled as CoreSettled
from ..errors import Category, Failure, FailureRecord, InvalidTask
from .keyed import Keyed

if TYPE_CHECKING:
    from .task import Task

__all__ = ["Member", "SettledFound", "SettledTasks", "failure_of", "settled"]


@dataclasses.dataclass(frozen=True, slots=True)
class SettledTasks:
    """The marker ``settled()`` returns; pickled as the list of its tasks' outcomes."""

    tasks: tuple[Task, ...]
    at_least: int | float | None = None

    def need(self) -> int:
        """How many of the tasks must succeed."""
        n, want = len(self.tasks), self.at_least
        if want is None:
            return 0
        if isinstance(want, float):
            return math.ceil(want * n - 1e-9)
        return want

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (tuple(Member(t) for t in self.tasks),))

    def __repr__(self) -> str:
        more = "" if self.at_least is None else f", at_least={self.at_least!r}"
        return f"pilotfish.settled([{len(self.tasks)} tasks]{more})"


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    """A task inside a settled list, while it is pickled (its index as a persistent id,
    not a plain input: its failure does not fail the call)."""

    task: Task


def settled(tasks: Iterable[Task], at_least: int | float | None = None) -> SettledTasks:
    """Take ``tasks`` as inputs once they have all finished, whatever their outcome: the
    call gets a list, in the same order, of their values and :class:`pilotfish.Failure`
    objects. ``at_least``: how many must have succeeded (an int from 0 to
    ``len(tasks)``, or a fraction in (0, 1]); fewer, and the call fails with
    ``DependencyFailed`` without running.

    >>> members = [s.submit(simulate, seed) for seed in range(40)]
    >>> summary = s.submit(analyse, pilotfish.settled(members, at_least=0.9))
    """
    if isinstance(tasks, Keyed) or not isinstance(tasks, Iterable):
        raise InvalidTask(
            f"settled() takes a list of tasks, got {tasks!r}; write pilotfish.settled([task, ...])"
        )
    listed = tuple(tasks)
    for i, t in enumerate(listed):
        if not isinstance(t, Keyed):
            raise InvalidTask(
                f"settled(): item {i} is {t!r}, not a task of this session; list only the "
                "Tasks that submit() or executable() returned"
            )
    n = len(listed)
    if at_least is not None:
        if isinstance(at_least, bool) or not isinstance(at_least, int | float):
            raise InvalidTask(
                f"settled(at_least={at_least!r}) is invalid: give a count (an int) or a "
                "fraction (a float in (0, 1])"
            )
        if isinstance(at_least, int) and not 0 <= at_least <= n:
            raise InvalidTask(
                f"settled(at_least={at_least}) is invalid for {n} tasks: give a count "
                f"from 0 to {n}, or a fraction such as 0.9"
            )
        if isinstance(at_least, float) and not (0.0 < at_least <= 1.0):
            raise InvalidTask(
                f"settled(at_least={at_least}) is invalid: a fraction must be in (0, 1]; "
                "for a count give an int"
            )
    return SettledTasks(listed, at_least)


class SettledFound:
    """What pickling one call found: the settled groups (dependency indices, need) and
    the dependencies that also appear as plain inputs."""

    __slots__ = ("groups", "plain")

    def __init__(self) -> None:
        self.groups: list[tuple[tuple[int, ...], int]] = []
        self.plain: set[int] = set()

    def for_core(self, deps: Sequence[Task]) -> CoreSettled | None:
        """The core's view (task ids), or None if the call takes nothing settled."""
        if not self.groups:
            return None
        listed = {i for members, _need in self.groups for i in members}
        return CoreSettled(
            frozenset(deps[i]._tid for i in listed - self.plain),
            tuple((tuple(deps[i]._tid for i in members), need) for members, need in self.groups),
        )


def failure_of(task: Task, f: FailureRecord | None) -> Failure:
    """What a settled call gets for ``task``, which failed (``f``) or was cancelled."""
    if f is None:
        return Failure(task.key, task.name, Category.CANCELLED, "cancelled")
    return Failure(task.key, task.name, f.category, f.one_line())
