"""Task functions for benchmarks/bench.py.

They live in a small importable module (not in ``__main__``) so that the worker
processes of every runtime import them by name: pilotfish workers inherit the
client's ``sys.path``, ProcessPoolExecutor workers are forked, Dask workers are
spawned with the parent's ``sys.path``.
"""

import os


def noop():
    return None


def inc(x):
    return x + 1


def getpid():
    return os.getpid()
