"""Task functions that publish the chain of processes running them (imported by workers).

On RADICAL-Pilot a call runs in a process of its own, forked by a per-task process,
forked by the raptor worker: a test kills one link of that chain and checks that the
one above notices.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil


def chain_once(path: str, value: int, seconds: float = 120.0) -> int:
    """First attempt: writes ``{"call": pid, "fork": parent, "worker": grandparent}`` to
    ``path`` (atomically) and sleeps for ``seconds``; later attempts return ``value``."""
    p = Path(path)
    if p.exists():
        return value
    me = psutil.Process()
    up = me.parents()
    chain = {"call": me.pid, "fork": up[0].pid, "worker": up[1].pid}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(chain))
    os.replace(tmp, p)
    time.sleep(seconds)
    return value
