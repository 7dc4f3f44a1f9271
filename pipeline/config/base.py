"""The base of every config section: closed (unknown keys are errors), validated on assignment."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # allow_inf_nan=False: an infinite backoff or rate is never meant, and one silently hung a run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)
