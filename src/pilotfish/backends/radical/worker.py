"""pilotfish's raptor worker (runs inside the pilot; loaded by path by RADICAL-Pilot).

RADICAL-Pilot loads this file with ``ru.load_class(path, "PilotfishWorker")``, so it
uses absolute imports only. It is RP's ``DefaultWorker`` with four additions:

* pre-flight (:func:`pilotfish.preflight.worker_checks`) runs before the worker takes
  any task; the result goes to the master with the worker's pid in ``pilotfish_hello``;
* before running a task it *claims* it from the master with a synchronous request, so
  the master knows which worker holds which task (RP's shared queue does not say), and
  a task the master already advanced (cancelled, failed with a lost worker) is dropped;
* the processes RP forks per task die with the worker (``PR_SET_PDEATHSIG``), and a
  program's process group is reported to the master, which kills it if the worker dies;
* ``pilotfish_run(blob)`` is the one function every task calls: it runs a pickled
  :class:`~pilotfish._wire.RunAttempt` through :func:`pilotfish.backends.execute.run_attempt`
  (which never raises) and returns the pickled ``Result``, base64-encoded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import sys
import threading
from typing import Any

import radical.utils as ru
from radical.pilot.raptor import DefaultWorker

_CFG_VAR = "PILOTFISH_RP_CFG"


def _cfg() -> dict[str, Any]:
    return json.loads(base64.b64decode(os.environ.get(_CFG_VAR) or "e30="))  # type: ignore[no-any-return]


def _client_path(cfg: dict[str, Any]) -> None:
    paths = [p for p in cfg.get("sys_path", []) if isinstance(p, str)]
    sys.path[:] = paths + [p for p in sys.path if p not in paths]


class PilotfishWorker(DefaultWorker):  # type: ignore[misc]
    def __init__(self, raptor_id: str) -> None:
        cfg = _cfg()
        _client_path(cfg)
        from pilotfish import _wire
        from pilotfish.preflight import worker_checks

        self._pf_cfg = cfg
        self._pf_host = _wire.host_name()
        try:
            checks = worker_checks(cfg.get("versions") or {}, cfg.get("rundir") or ".")
            self._pf_problems = [c.message() for c in checks if not c.ok]
        except Exception as e:  # pragma: no cover - defensive
            self._pf_problems = [f"pre-flight could not run: {type(e).__name__}: {e}"]
        self._pf_lock = threading.Lock()
        self._pf_client: Any = None
        self._pf_said_hello = False
        super().__init__(raptor_id)
        self._pf_hello()

    # -- talking to the master (its task service, request/reply) ---------------
    def _pf_request(self, cmd: str, *args: Any) -> Any:
        with self._pf_lock:
            if self._pf_client is None:
                self._pf_client = ru.zmq.Client(url=self._ts_addr)
            return self._pf_client.request(cmd, *args)

    def _pf_hello(self) -> None:
        if self._pf_said_hello:
            return
        self._pf_request(
            "pilotfish_hello", self._uid, os.getpid(), self._pf_host, list(self._pf_problems)
        )
        self._pf_said_hello = True

    def _request_cb(self, tasks: Any) -> None:
        for task in ru.as_list(tasks):
            try:
                self._pf_hello()
                ok = self._pf_request("pilotfish_claim", self._uid, task["uid"])
            except Exception:
                self._log.exception("pilotfish: claim failed for %s", task["uid"])
                ok = True  # let RP run it; the master's record decides about its result
            if ok:
                super()._request_cb([task])
            else:
                self._log.info("pilotfish: master withdrew %s", task["uid"])

    def _dispatch(self, task: Any, env: Any) -> None:  # runs in a forked child
        from pilotfish.backends.local.worker import die_with_parent

        die_with_parent()
        os.environ["PILOTFISH_RP_TS"] = str(self._ts_addr)
        os.environ["PILOTFISH_RP_TASK"] = str(task["uid"])
        super()._dispatch(task, env)

    # -- the function every pilotfish task calls --------------------------------
    def pilotfish_run(self, blob: str) -> str:
        from pilotfish.backends.execute import run_attempt
        from pilotfish.backends.local.worker import die_with_parent

        die_with_parent()  # we are RP's per-task grandchild: die with its parent
        cfg = self._pf_cfg
        cwd = cfg.get("cwd")
        if cwd:
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        m = pickle.loads(base64.b64decode(blob))
        uid = os.environ.get("PILOTFISH_RP_TASK", "")

        def on_group(pgid: int) -> None:
            try:
                c = ru.zmq.Client(url=os.environ["PILOTFISH_RP_TS"])
                c.request("pilotfish_group", uid, pgid)
                c.close()
            except Exception:
                pass

        res = run_attempt(
            m,
            worker=self._uid,
            host=self._pf_host,
            rundir=cfg.get("rundir") or ".",
            on_group=on_group,
        )
        return base64.b64encode(pickle.dumps(res, 5)).decode("ascii")
