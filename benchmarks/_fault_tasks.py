"""Task functions for benchmarks/bench_faults.py.

Module-level functions in an importable module, so pilotfish workers (which
inherit the client's ``sys.path``) import them by name.
"""

import os
import time


def sleep_once(pidfile: str, marker: str, seconds: float) -> int:
    """First attempt: create ``marker``, publish this worker's pid in ``pidfile``, sleep.

    A retry finds the marker and returns at once. The marker is created *before*
    the pid is published, so a worker killed after the client saw the pid always
    leaves the marker behind (the retry never sleeps). Returns the pid that ran it.
    """
    pid = os.getpid()
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(pid))
        tmp = f"{pidfile}.{pid}.tmp"
        with open(tmp, "w") as f:
            f.write(str(pid))
        os.replace(tmp, pidfile)  # atomic: the client never reads half a pid
        time.sleep(seconds)
    return pid


def square_sleep(x: int, delay: float = 0.001) -> int:
    time.sleep(delay)
    return x * x


def ident(x: int) -> int:
    return x
