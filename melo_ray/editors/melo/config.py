"""MELO's config sections: `lora` (the block bank) and `index` (keys and the neuron index)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from melo_ray.config_base import StrictConfig


class LoraConfig(StrictConfig):
    target_modules: list[str] = Field(
        ..., min_length=1, description="Full module names of the linear layers that get LoRA banks."
    )
    block_rank: int = Field(4, ge=1, description="Partial rank p of one block (one edit batch, or one edit).")
    alpha: float = Field(8.0, gt=0, description="Scale is alpha / block_rank, as in LoRA.")
    max_blocks: int = Field(100_000, ge=1, description="Cap on blocks per layer; exceeding it is an error.")
    block_per_edit: bool = Field(
        False, description="Train one block per edit instead of one per batch (the batch's blocks still train "
        "together, in one forward). A block that holds one fact carries it to rewordings far better than one "
        "that must tell ten apart; the bank grows by a block per edit, so pair it with a small block_rank.",
    )
    prefix_augment: int = Field(
        0, ge=0, description="Extra training copies of each edit behind a short random prefix the backbone "
        "wrote itself (WISE's augmentation), so rewordings after unrelated text still get the target.",
    )

    # what a snapshot's adapters must match; the rest only shapes training
    BANK_FIELDS: ClassVar[tuple[str, ...]] = ("target_modules", "block_rank", "alpha", "max_blocks")


class IndexConfig(StrictConfig):
    key_function: Literal["last_token", "mean", "sentence_encoder"] = Field(
        "last_token",
        description="last_token / mean: hidden state of `key_module` at the prompt's last real token "
        "or averaged over its tokens; sentence_encoder: all-MiniLM-L6-v2 embedding.",
    )
    key_module: str | None = Field(
        None, description="Module whose output is the key (last_token / mean); must precede every LoRA layer."
    )
    metric: Literal["l2", "cosine"] | None = Field(
        None, description="Distance between keys; default l2 for hidden states, cosine for the encoder."
    )
    r_init: float = Field(1.0, ge=0, description="Radius of a new cluster (R_init in the paper).")
    # Measured on real 576-d hidden-state keys (docs/results.md): M 32 / ef 128 finds the exact nearest
    # centre for 99.4% of queries at 10k keys in 0.2 ms; at 100k keys ef 256 is needed for >= 0.99.
    hnsw_m: int = Field(32, ge=4, description="hnswlib M: graph degree.")
    hnsw_ef_construction: int = Field(200, ge=8, description="hnswlib ef at build time.")
    hnsw_ef_search: int = Field(128, ge=8, description="hnswlib ef at query time.")
    candidates: int = Field(8, ge=1, description="Nearest centres fetched from HNSW and re-checked exactly.")
    scope_verifier: str | None = Field(
        None,
        description="Scope test (scope.py): 'builtin' or a path to a verifier file. Keys then carry the "
        "verifier's views; a query inside a cluster gets a block only if the verifier calls it the same "
        "question as a member, and conflicts forget only members it calls the same question. None: off.",
    )
    scope_threshold: float | None = Field(
        None, description="Verifier logit at or above which two prompts count as the same question. None: the "
        "threshold calibrated into the verifier file (on relations it never learned); a verifier file without "
        "one needs it set here.",
    )
    scope_conflict_threshold: float | None = Field(
        None, description="Verifier logit at or above which an earlier edit with another target is superseded "
        "(forgotten) by a new one; None: only the same prompt supersedes, and reworded edits of one question "
        "each keep their member (a query gets the best-scoring one).",
    )

    scope_latest_of_question: bool = Field(
        True, description="A rewording (no member is the very prompt) goes to the latest edit among the members that "
        "pass the scope test and that it calls the same question as the best-scoring one: a question edited again "
        "in other words answers its newest target. False: the best-scoring member, whichever edit it is.",
    )
    scope_prefer_same_names: bool = Field(
        True, description="With a scope test whose verifier has a names view: among the members that pass, those "
        "naming what the query names most closely (trigram cosine) rank first, and a rewording moves on to a later "
        "edit of its question only if that edit names exactly the same. Keeps 'Ferrari F40' from the edit of "
        "'Ferrari FXX' in a large bank. False: the verifier's score alone. A snapshot keeps the rule it was written with.",
    )
    scope_namesake_bar: float = Field(
        1.0, ge=0.0, description="With a scope test whose verifier has a names view: the threshold rises by this "
        "much times ln(k), k the members in reach that name what the query names most closely (names trigram "
        "cosine >= 0.5): one subject's edits, not its near-namesakes. A subject edited many times gives a question "
        "about it that no edit asks many chances to pass by mistake; 1.0 keeps that chance near one member's (a "
        "logistic tail). 0: one flat threshold. A snapshot keeps the bar and the rule it was written with.",
    )
    scope_focus_reach: bool = Field(
        True, description="With a scope test whose verifier has a focus view: a cluster also holds a query whose "
        "focus (its last sentence) lies within the cluster's radius, so a rewording behind a long unrelated prefix "
        "still reaches its edit's members; the scope test decides as before. Costs a second encoder pass only for "
        "prompts of more than one sentence. A snapshot keeps the rule it was written with.",
    )
    scope_cluster_per_edit: bool = Field(
        True, description="With a scope test: every edit's key starts its own cluster of radius r_init, also when the "
        "nearest cluster has its target, so each edit's rewordings are judged around its own key. False: a key "
        "joins a nearby cluster of its target (the paper's rule; a joined edit's rewordings may fall outside that "
        "cluster). Ignored without a scope test. A snapshot keeps the rule it was written with.",
    )

    @model_validator(mode="after")
    def _check_key(self) -> "IndexConfig":
        if self.key_function != "sentence_encoder" and not self.key_module:
            raise ValueError(f"key_function '{self.key_function}' needs `key_module`")
        if self.scope_verifier is not None and self.key_function != "sentence_encoder":
            raise ValueError("scope_verifier works on sentence_encoder keys only")
        return self

    @property
    def distance(self) -> str:
        if self.metric:
            return self.metric
        return "cosine" if self.key_function == "sentence_encoder" else "l2"
