"""The Dask distributed backend (``Session(backend="dask")``): see :mod:`.backend`."""

from .backend import DaskBackend

__all__ = ["DaskBackend"]
