"""Backends: what runs the attempts. The protocol is in :mod:`.base`; this module
finds a backend by the name ``Session(backend=...)`` was given.

``local`` (the default: one master process and its workers on this machine),
``dask`` and ``radical`` (optional extras of those names), and ``fake``
(:mod:`.fake`: in-process, scripted faults, for tests; pass an instance).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import EnvironmentMismatch, InvalidTask

if TYPE_CHECKING:
    from .base import Backend

__all__ = ["BACKENDS", "backend_class", "backend_factory"]

#: backend name -> (module, class); optional ones are installed as the extra of that name
BACKENDS = {
    "local": ("pilotfish.backends.local.backend", "LocalBackend"),
    "dask": ("pilotfish.backends.dask.backend", "DaskBackend"),
    "radical": ("pilotfish.backends.radical.backend", "RadicalBackend"),
}


def backend_class(name: str) -> Any:
    """Import a backend by name; a missing optional dependency says how to install it."""
    module, cls = BACKENDS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        hint = f"pilotfish[{name}]"
        if hint in str(e):
            raise EnvironmentMismatch(str(e)) from e
        raise EnvironmentMismatch(
            f"backend={name!r} needs an optional dependency that cannot be imported ({e}); "
            f"install it with: pip install '{hint}'"
        ) from e


def backend_factory(backend: str | Backend, options: dict[str, Any]) -> Any:
    """What ``Session(backend=..., **options)`` asked for, checked before anything starts:
    a backend class to instantiate (a name), or the backend object itself (which takes no
    options: it is configured already)."""
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise InvalidTask(
                f"unknown backend {backend!r}; available: {', '.join(map(repr, BACKENDS))} "
                "(or pass a backend object)"
            )
        if backend != "local" and options.get("max_tasks_per_child") is not None:
            raise InvalidTask(
                f"Session(max_tasks_per_child=...) is for the local backend; on "
                f"backend={backend!r} the engine manages the worker processes (on Dask, "
                "recycle workers with the worker's --lifetime option)"
            )
        return backend_class(backend)
    if options:
        raise InvalidTask(
            f"backend options {sorted(options)} given with a backend object; "
            "configure the backend object instead"
        )
    return backend
