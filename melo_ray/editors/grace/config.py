"""GRACE's config section (`grace`)."""
from __future__ import annotations

from pydantic import Field

from melo_ray.config_base import StrictConfig


class GraceConfig(StrictConfig):
    layer: str | None = Field(
        None, description="Module whose output GRACE replaces; its input at the last prompt token is the key."
    )
    eps_init: float = Field(1.0, ge=0, description="Initial radius of a codebook entry (L2 on layer inputs).")
    num_iter: int = Field(100, ge=1, description="Optimiser steps to train one entry's value.")
    lr: float = Field(0.1, gt=0, description="Adam learning rate for the value.")
