"""WISE's config section (`wise`)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from melo_ray.config_base import StrictConfig

# Out-of-scope inputs for the routing margin: NQ-open efficientqa dev questions, which the evaluation's NQ
# locality set (NQ-open.dev.jsonl) does not contain.
DEFAULT_NEGATIVE_TEXT = str(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "nq-open"
                            / "NQ-open.efficientqa.dev.1.1.jsonl")


class WiseConfig(StrictConfig):
    layer: int | None = Field(
        None, description="Decoder block whose mlp.down_proj value matrix is copied into the side memory. None: "
        "the reference's LLaMA choice (block 27 of 32) at the same relative depth (SmolLM2-135M: 25 of 30).",
    )
    lr: float = Field(1.0, gt=0, description="SGD learning rate of the side memory (the reference's edit_lr).")
    num_iter: int = Field(70, ge=1, description="SGD steps per batch (the reference's n_iter).")
    mask_ratio: float = Field(0.2, gt=0, le=1, description="Share of side-memory entries one shard's random "
                              "gradient mask lets train.")
    norm_constraint: float = Field(1.0, gt=0, description="Each side entry stays within this of the main weight.")
    alpha: float = Field(5.0, ge=0, description="Margin: out-of-scope activation scores are pushed below it.")
    beta: float = Field(20.0, ge=0, description="Margin: edited prompts' activation scores are pushed above it.")
    gamma: float = Field(10.0, ge=0, description="Margin between every edited and every out-of-scope score.")
    act_ratio: float = Field(0.88, gt=0, description="A memory fires when a prompt's score reaches this times the "
                             "lowest score of the edits it holds.")
    save_freq: int = Field(500, ge=1, description="Edits per knowledge shard (one random mask each); a full shard "
                           "is set aside and the next starts from the main weight.")
    merge_freq: int = Field(1000, ge=1, description="Every this many edits the set-aside shards are merged (Ties) "
                            "into one memory (WISE-Retrieve keeps each merged memory).")
    density: float = Field(0.53, gt=0, le=1, description="Ties merge: share of each shard's change kept, by magnitude.")
    negatives: int = Field(1, ge=1, description="Out-of-scope texts trained beside each edit of a batch (the "
                           "reference trains each edit with one).")
    negative_text: str = Field(DEFAULT_NEGATIVE_TEXT, description="JSONL ('question' or 'text' per line) the "
                               "out-of-scope texts are drawn from, in order.")
    seed: int = Field(0, description="Seed of the shards' gradient masks.")
