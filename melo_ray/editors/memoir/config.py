"""MEMOIR's config section (`memoir`)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from melo_ray.config_base import StrictConfig

# Irrelevant text read offline for the background features: NQ-open efficientqa dev questions, which the
# evaluation's NQ locality set (NQ-open.dev.jsonl) does not contain.
DEFAULT_BACKGROUND_TEXT = str(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "nq-open"
                              / "NQ-open.efficientqa.dev.1.1.jsonl")


class MemoirConfig(StrictConfig):
    layer: int | None = Field(
        None, description="Decoder block whose mlp.down_proj gets the residual memory. None: the reference's "
        "LLaMA-3-8B choice (block 27 of 32) at the same relative depth (SmolLM2-135M: 25 of 30).",
    )
    top_k: int | None = Field(
        None, ge=1, description="Memory columns each edit writes (the mask's size). None: the reference's share, "
        "4096 of LLaMA-3's 14336 FFN units (SmolLM2-135M: 439 of 1536).",
    )
    threshold: float = Field(
        0.4, ge=0, le=1, description="A prompt uses the memory when its mask shares at least this fraction of its "
        "columns with some stored edit's mask (the reference's irr_threshold for zsRE).",
    )
    lr: float = Field(1.0, gt=0, description="SGD learning rate of the memory (the reference's edit_lr).")
    num_iter: int = Field(30, ge=1, description="SGD steps per batch (the reference's n_iter).")
    background_text: str = Field(
        DEFAULT_BACKGROUND_TEXT, description="JSONL of irrelevant text ('question' or 'text' per line); the mean "
        "activation over it is subtracted before the top-k (the reference's mean_decentered prompt features).",
    )
    background_samples: int = Field(200, ge=1, description="Lines of background_text read.")
    seed: int = Field(0, description="Seed of the fixed permutation that hashes the top-k indices.")
