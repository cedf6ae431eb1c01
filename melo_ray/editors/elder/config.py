"""ELDER's config section (`elder`)."""
from __future__ import annotations

from pydantic import Field, model_validator

from melo_ray.config_base import StrictConfig


class ElderConfig(StrictConfig):
    """ELDER: mixture-of-LoRA experts with a router per layer, guided loss and deferral."""

    target_modules: list[str] | None = Field(
        None, description="Linear layers that get experts; default: lora.target_modules."
    )
    num_experts: int = Field(4, ge=2, description="LoRA experts per layer (N).")
    rank: int = Field(8, ge=1, description="Rank of each expert.")
    alpha: float = Field(16.0, gt=0, description="Scale alpha / rank, as in LoRA.")
    top_k: int = Field(2, ge=1, description="Experts mixed per input and layer.")
    guided_lambda: float = Field(1.0, ge=0, description="Weight of the guided (router) loss.")
    defer_threshold: int = Field(
        0, ge=0, description="Largest Hamming distance (bits) to a stored edit's allocation code that "
        "still uses the mixture; farther inputs run on the base model.",
    )
    lr: float | None = Field(None, gt=0, description="Adam learning rate; default train.lr.")
    num_iter: int | None = Field(None, ge=1, description="Steps per batch; default train.num_iter.")
    replay: int = Field(
        0, ge=0, description="Earlier edits replayed with each batch (0: the method as published). Shared "
        "experts forget earlier edits without it; see docs/results.md.",
    )
    guide_stored: bool = Field(
        False, description="Also keep every earlier edit's key on its allocation in the guided loss (router "
        "only, no model forward). Off: the method as published, where routers drift from older facts.",
    )
    guide_noise: float = Field(
        0.0, ge=0, description="Also teach each guided key's allocation at noisy copies of it (noise norm = "
        "this x the key's norm), so rephrasings near a prompt's key share its code. 0: off (as published).",
    )
    guide_copies: int = Field(4, ge=1, description="Noisy copies per guided key when guide_noise > 0.")
    seed: int = Field(0, description="Seed for expert initialisation and allocations.")

    @model_validator(mode="after")
    def _check_k(self) -> "ElderConfig":
        if self.top_k > self.num_experts:
            raise ValueError("top_k must not exceed num_experts")
        return self
