"""The RADICAL-Pilot raptor backend (``Session(backend="radical")``).

Needs the optional dependency: ``pip install 'pilotfish[radical]'`` (radical.pilot 1.103.2).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RadicalBackend"]


def __getattr__(name: str) -> Any:
    if name == "RadicalBackend":
        from .backend import RadicalBackend

        return RadicalBackend
    raise AttributeError(name)
