"""AlphaEdit's config section (`alphaedit`)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from melo_ray.config_base import StrictConfig

# Preserved-knowledge text read offline: NQ-open questions from the efficientqa dev split, which the
# evaluation's locality set (NQ-open.dev.jsonl) does not contain.
DEFAULT_COVARIANCE_TEXT = str(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "nq-open"
                              / "NQ-open.efficientqa.dev.1.1.jsonl")


class AlphaEditConfig(StrictConfig):
    layers: list[int] | None = Field(
        None, description="Decoder blocks whose mlp.down_proj is edited. None: the paper's band for LLaMA3-8B "
        "(blocks 4-8 of 32, the early-mid MLPs where causal tracing puts factual recall), at the same relative "
        "depth (SmolLM2-135M: 4-8 of 30).",
    )
    v_num_grad_steps: int = Field(25, ge=1, description="Adam steps that find each edit's target hidden state.")
    v_lr: float = Field(0.1, gt=0, description="Learning rate of that search.")
    v_weight_decay: float = Field(0.5, ge=0, description="Weight of ||delta|| / ||h||^2 in the target search.")
    clamp_norm_factor: float = Field(0.75, gt=0, description="The hidden-state change is at most this times ||h||.")
    l2: float = Field(10.0, gt=0, description="Ridge term of the closed-form update (the paper's L2).")
    nullspace_threshold: float = Field(
        2e-2, gt=0, description="Eigenvalues of the preserved keys' second moment below this span the null space "
        "the update is projected onto.",
    )
    covariance_text: str = Field(
        DEFAULT_COVARIANCE_TEXT, description="JSONL of preserved text ('question' or 'text' per line) whose keys "
        "give the covariance; default: NQ-open efficientqa dev questions (../shared/data/nq-open), disjoint "
        "from the NQ locality questions the evaluation asks.",
    )
    covariance_samples: int = Field(1800, ge=1, description="Lines of covariance_text read.")
