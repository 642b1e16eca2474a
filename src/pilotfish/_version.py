"""The version of pilotfish (one place: the package, the workers' pre-flight check)."""

__version__ = "0.1.0"
