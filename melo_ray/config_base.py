"""What every config section shares: strict, frozen pydantic models, and the error they raise."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration file or object that cannot be used, with the field that is wrong."""


class StrictConfig(BaseModel):
    """A config section: unknown fields are errors, values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
