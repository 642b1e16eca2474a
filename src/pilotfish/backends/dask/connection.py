"""The Dask backend's connection to a Dask scheduler, and what it installs there.

:class:`Connection` owns the ``distributed.Client`` (one it made from ``address``,
closed at the end, or the user's own ``client=``, left open), this session's names on
the cluster (its token, its event topic, its plugins), the start fence
(:mod:`.fence`, a scheduler plugin registered anew after each reconnect) and the
worker plugins (:mod:`.worker`). It never starts or stops a cluster.

A scheduler reachable over plain TCP from other machines is warned about at start
(:func:`warn_if_open`): TLS credentials come from ``security=``, or from the cluster
:func:`pilotfish.cluster.slurm` made for that address.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import distributed

from . import fence as _fence
from .worker import ClientSysPath, EndAttemptsOnClose, Preload, Reservations, WorkerJob

__all__ = ["Connection", "warn_if_open"]

log = logging.getLogger("pilotfish.dask")

OUR_CANCEL = "pilotfish"  # the reason pilotfish gives Dask when it cancels a future


def warn_if_open(address: str) -> None:
    """A plain-TCP scheduler reachable from other machines runs whatever anyone who
    reaches it submits, as the user who started the workers: say so, and how to fix it."""
    scheme, _, rest = address.rpartition("://")
    if (scheme or "tcp") != "tcp":
        return  # tls://, inproc://, ucx:// ...
    host = rest.rsplit(":", 1)[0].strip("[]") if ":" in rest else rest
    if host in ("localhost", "::1") or host.startswith("127."):
        return
    log.warning(
        "pilotfish: the Dask scheduler at %s speaks plain TCP without credentials: anyone "
        "who can reach that port can submit tasks that run as you on its workers. Use TLS: "
        "start the cluster with security=distributed.Security.temporary() (or certificates "
        "of your own) and pass Session(backend='dask', address=..., security=...); "
        "pilotfish.cluster.slurm() does this by default. Or bind the scheduler to "
        "127.0.0.1 on a machine only you use.",
        address,
    )


_BY_VALUE = threading.Lock()


@contextlib.contextmanager
def _pickled_by_value(module: ModuleType) -> Iterator[None]:
    """Pickle ``module``'s objects by value (cloudpickle) for the duration."""
    import cloudpickle

    with _BY_VALUE:
        known = module.__name__ in cloudpickle.list_registry_pickle_by_value()
        if not known:
            cloudpickle.register_pickle_by_value(module)
        try:
            yield
        finally:
            if not known:
                cloudpickle.unregister_pickle_by_value(module)


class Connection:
    """The client, and this session's fence, topics and plugins on the scheduler.

    ``put``: where Dask's messages go (the backend's stimulus queue): ``("fence", msg)``
    for the session's topic, ``("cluster", msg)`` for workers joining and leaving.
    ``token``: this session's id on the cluster; ``lock``: the backend's lock (it guards
    the fence's names, read by the submitter)."""

    def __init__(
        self,
        address: str,
        client: Any,
        security: Any,
        timeout: float,
        ship_sys_path: bool,
        token: str,
        lock: threading.Lock,
        put: Callable[[tuple[Any, ...]], None],
    ) -> None:
        self.address = address
        self.client: Any = client
        self.own_client = client is None
        self.security = security
        self.timeout = timeout
        self.ship_sys_path = ship_sys_path
        self.preload: tuple[str, ...] = ()  # modules every worker imports as it joins
        self._lock = lock
        self._put = put
        #: this session's id on the cluster: in its Dask keys, topic and plugin names
        self.token = token
        self.topic = f"pilotfish-{self.token}"
        self._plugin_name = f"pilotfish-syspath-{self.token}"
        self._job_plugin = f"pilotfish-jobs-{self.token}"
        self._end_plugin = f"pilotfish-end-on-close-{self.token}"
        self._reserve_plugin = f"pilotfish-reservations-{self.token}"
        self.sched_pid = 0
        #: a worker running attempts that the scheduler has not heard from for this long
        #: is removed as unreachable (the fence's watch; None: Dask's own worker TTL)
        self.unreachable_after: float | None = None
        #: s between the fence's pulses to this client (None: no pulse)
        self.pulse_every: float | None = None
        self._prev_all_handler: Callable[[Any], Any] | None = None
        self._fence_n = 0  # start fences registered so far (one per (re)connection)
        self.fence_op = ""  # the scheduler handler a task asks before running user code
        self.drain_op = ""  # the fence's handler that drains a place
        self._fence_close = ""
        self._fence_sched = ""  # the id of the scheduler it is registered on
        self.same_scheduler = False  # the last fence went to the scheduler before it
        #: the scheduler's time of the newest event heard on the session's topic; the
        #: connection it came on; the spans of scheduler time whose events did not reach
        #: this client (the link broke); the times of those handed over from the log
        self.heard_until = 0.0
        self._comm: Any = None
        self._gaps: list[tuple[float, float]] = []
        self._replayed: set[float] = set()
        self._topic_lock = threading.Lock()  # its own: the loop thread takes it per event

    # ------------------------------------------------------------------ lifecycle
    def connect(self) -> str:
        """Connect (unless given a client) and learn the scheduler's address and pid;
        returns '' or why it could not connect."""
        warn_if_open(self.address or str(getattr(self.client.scheduler, "address", "")))
        if self.client is None:
            sec = self.security
            if sec is None:  # a cluster made by pilotfish.cluster.slurm: its credentials
                from ... import cluster as _cluster

                sec = getattr(_cluster.cluster_for(self.address), "security", None)
            try:
                self.client = distributed.Client(  # type: ignore[no-untyped-call]
                    self.address, timeout=self.timeout, set_as_default=False, security=sec
                )
            except Exception as e:
                # the half-made Client closes itself when collected, taking a lock that
                # all of Dask's loop runners share: collected later, inside the making of
                # another Client (by the user, or a test), it deadlocks. Collect it now.
                e.__traceback__ = None
                gc.collect()
                return (
                    f"cannot connect to the Dask scheduler at {self.address}: "
                    f"{type(e).__name__}: {e}"
                )
        self.address = str(self.client.scheduler.address)
        with contextlib.suppress(Exception):
            self.sched_pid = int(self.client.run_on_scheduler(os.getpid))
        return ""

    def close(self, futs: list[Any], timeout: float) -> None:
        """The session is closing: cancel ``futs``, remove what we installed, close the
        client if it is ours."""
        c = self.client
        if c is None:
            return
        if c.status == "running":
            if futs:
                with contextlib.suppress(Exception):
                    c.cancel(futs, reason=OUR_CANCEL, msg="pilotfish session closed")
            self.remove_fence()
            self._unsubscribe()
            if self.ship_sys_path:
                with contextlib.suppress(Exception):
                    c.unregister_worker_plugin(self._plugin_name)
            for name in (self._job_plugin, self._end_plugin, self._reserve_plugin):
                with contextlib.suppress(Exception):
                    c.unregister_worker_plugin(name)
        del futs
        if self.own_client:
            with contextlib.suppress(Exception):
                c.close(timeout=min(timeout, 5.0))

    @property
    def running(self) -> bool:
        return self.client is not None and self.client.status == "running"

    def refresh_scheduler_pid(self) -> None:
        with contextlib.suppress(Exception):
            self.sched_pid = int(self.client.run_on_scheduler(os.getpid))

    def cancel(self, futs: list[Any]) -> None:
        """Cancel Dask futures pilotfish no longer wants (None: not handed to Dask yet)."""
        c = self.client
        futs = [f for f in futs if f is not None]
        if futs and c is not None and c.status in ("running", "connecting"):
            with contextlib.suppress(Exception):
                c.cancel(futs, reason=OUR_CANCEL, msg="withdrawn by pilotfish")

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid, asked of every worker now ({} if not connected)."""
        if not self.running:
            return {}
        with contextlib.suppress(Exception):
            return dict(self.client.run(os.getpid, on_error="ignore"))
        return {}

    # ------------------------------------------------------------------ topics
    def subscribe(self) -> None:
        c = self.client
        c.subscribe_topic(self.topic, self._on_topic)
        prev = c._event_handlers.get("all")  # chain to the user's own handler, if any
        if prev is not None and getattr(prev, "_pilotfish", None) != self.token:
            self._prev_all_handler = prev

        def on_all(ev: Any) -> Any:
            msg = ev[1] if isinstance(ev, tuple | list) and len(ev) == 2 else None
            if isinstance(msg, dict) and msg.get("action") in ("remove-worker", "add-worker"):
                self._put(("cluster", msg))
            if self._prev_all_handler is not None:
                return self._prev_all_handler(ev)
            return None

        on_all._pilotfish = self.token  # type: ignore[attr-defined]
        c.subscribe_topic("all", on_all)

    def _on_topic(self, ev: Any) -> None:
        """An event on the session's topic, (scheduler time, message): to the event thread,
        unless :meth:`missed_events` handed it over already. The first event on a new
        connection to the scheduler marks a gap: what was published between the last
        one heard and this one did not reach this client."""
        when = float(ev[0])
        with self._topic_lock:
            if when in self._replayed:
                return
            comm = getattr(self.client, "scheduler_comm", None)
            if comm is not self._comm:
                if self._comm is not None:
                    self._gaps.append((self.heard_until, when))
                self._comm = comm
            self.heard_until = max(self.heard_until, when)
        self._put(("fence", ev[1]))

    def missed_events(self) -> tuple[list[Any], bool]:
        """After a reconnect: the messages the scheduler published on the session's topic
        that did not reach this client (grants, refusals, small results), from the
        scheduler's log of that topic, oldest first; and whether that log still reaches
        back to the last event heard before the link broke (False: older ones were
        dropped; see :mod:`.fence`)."""
        with self._topic_lock:
            gaps = self._gaps or [(self.heard_until, float("inf"))]
            self._gaps = []
        try:
            logged = [(float(t), m) for t, m in self.client.get_events(self.topic)]
        except Exception as e:
            log.warning("pilotfish: could not read the session's events on the scheduler: %s", e)
            return [], False
        missed = [(t, m) for t, m in logged if any(lo < t < hi for lo, hi in gaps)]
        whole = not logged or logged[0][0] <= gaps[0][0] or gaps[0][0] == 0.0
        with self._topic_lock:
            self._replayed = {t for t, _m in missed}
        return [m for _t, m in missed], whole

    def _unsubscribe(self) -> None:
        c = self.client
        with contextlib.suppress(Exception):
            c.unsubscribe_topic(self.topic)
        with contextlib.suppress(Exception):
            if self._prev_all_handler is not None:
                c.subscribe_topic("all", self._prev_all_handler)
            else:
                c.unsubscribe_topic("all")

    # ------------------------------------------------------------------ the start fence
    def install_fence(self) -> str:
        """Register a fresh start fence on the scheduler, replacing ours if it is still
        there (a task handed to Dask before a reconnect then asks a handler that is gone,
        and is refused). Returns '' or why it could not be installed."""
        sid = ""
        with contextlib.suppress(Exception):
            sid = str(self.client.scheduler_info(n_workers=0).get("id", ""))
        #: reconnected to the scheduler we had (the link broke, not the scheduler)?
        self.same_scheduler = bool(sid) and sid == self._fence_sched
        if sid != self._fence_sched:  # another scheduler: ours went with the old one
            self._fence_close = ""
        self.remove_fence()
        self._fence_sched = sid
        self._fence_n += 1
        plugin = _fence.StartFence(
            self.token,
            self._fence_n,
            self.topic,
            unreachable_after=self.unreachable_after,
            pulse_every=self.pulse_every,
        )
        errors = []
        # by value first: the scheduler need not have pilotfish installed
        for how in ("by value", "by reference"):
            try:
                by_value = how == "by value"
                with _pickled_by_value(_fence) if by_value else contextlib.nullcontext():
                    self.client.register_plugin(plugin, name=plugin.name)
            except Exception as e:
                errors.append(f"{how}: {type(e).__name__}: {e}")
                continue
            with self._lock:
                self.fence_op, self._fence_close = plugin.op, plugin.close_op
                self.drain_op = plugin.drain_op
            try:  # workers on the scheduler's host then start without a round trip
                self.client.register_plugin(Reservations(plugin.op), name=self._reserve_plugin)
            except Exception as e:  # each start then asks the fence
                log.info("pilotfish: start reservations are off on this cluster: %s", e)
            return ""
        return (
            "pilotfish could not install its start fence (a Dask scheduler plugin that lets "
            f"each attempt's user code start once) on the Dask scheduler at {self.address} ("
            + "; ".join(errors)
            + "). The scheduler must accept pickled plugins (distributed.scheduler.pickle: "
            "true, Dask's default) and run the client's Python version, or have pilotfish "
            "installed"
        )

    def remove_fence(self) -> None:
        op, self._fence_close = self._fence_close, ""
        c = self.client
        if op and c is not None:
            with contextlib.suppress(Exception):
                c.sync(getattr(c.scheduler, op), callback_timeout=5)

    def tell_fence(self, drains: list[tuple[str, tuple[str, str, str]]]) -> None:
        """Call the fence's drain handler ``op`` for each ``(op, (kind, name, why))``."""
        c = self.client
        for op, (kind, name, why) in drains:
            if not op or c is None:
                continue  # no fence yet: it is told when one is installed
            try:
                c.sync(
                    getattr(c.scheduler, op), kind=kind, place=name, why=why, callback_timeout=30
                )
            except Exception as e:  # its starts are not refused; the workflow still
                # refunds the evidence, and a reconnect tells the new fence again
                log.warning(
                    "pilotfish: could not drain Dask %s %s on the scheduler: %s", kind, name, e
                )

    # ------------------------------------------------------------------ worker plugins
    def ship_plugins(self) -> None:
        """The client's ``sys.path`` (if ``ship_sys_path``) and the worker-job report."""
        c = self.client
        if self.ship_sys_path:
            try:
                c.register_plugin(ClientSysPath(sys.path), name=self._plugin_name)
            except Exception as e:  # tasks then fail with ENVIRONMENT, naming what is missing
                log.warning(
                    "pilotfish: could not install the sys.path plugin on Dask workers: %s", e
                )
        if self.preload:
            try:
                c.register_plugin(Preload(self.preload), name=f"pilotfish-preload-{self.token}")
            except Exception as e:  # the first tasks then import them themselves
                log.warning("pilotfish: could not install the preload plugin: %s", e)
        try:
            c.register_plugin(WorkerJob(self.topic), name=self._job_plugin)
        except Exception as e:  # losses then name the worker, not its batch job
            log.info("pilotfish: could not install the worker-job plugin on Dask workers: %s", e)
        try:
            c.register_plugin(EndAttemptsOnClose(), name=self._end_plugin)
        except Exception as e:  # a closing worker's attempts then run on to their end
            log.warning(
                "pilotfish: could not install the end-on-close plugin on Dask workers (%s): "
                "an attempt of a worker that closes may run on beside its retry",
                e,
            )
