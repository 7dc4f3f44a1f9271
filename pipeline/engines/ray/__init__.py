"""The Ray engine (run.engine: ray). Importing this package imports Ray; nothing else in pipeline does."""
from __future__ import annotations

from .driver import run_ray

__all__ = ["run_ray"]
