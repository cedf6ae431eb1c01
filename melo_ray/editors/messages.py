"""Typed messages between the processes of an edit job (trainer actor -> writer actor -> driver):
what a trained batch carries and what indexing it did, and the error a process raises when it is
handed state it does not expect. Plain dataclasses (numpy arrays, torch tensors), so they cross Ray."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch


class StaleStateError(RuntimeError):
    """State is not the one the caller expects (a restarted actor, a repeated or reordered call)."""


@dataclass(frozen=True)
class IndexUpdate:
    """What indexing one trained batch did (typed message: writer actor -> driver)."""

    clusters: int = 0
    members: int = 0
    conflicts: int = 0
    forgotten: tuple[str, ...] = ()  # ids of edits this batch pushed out of their clusters
    forgotten_total: int = 0


@dataclass(frozen=True)
class TrainedBatch:
    """One trained batch (typed message: trainer actor -> writer actor and driver).

    From `train_batch` it is committed in the editor (`block` set, no `weights`); from
    `train_detached` it carries the block's `weights` for a writer to commit (`block` None). For an
    editor with an index, `keys`/`targets`/`ids`/`prompts` are what the index and edit log add; an
    editor without one has already applied everything and reports its counters in `update`."""

    version: int
    edits: int
    steps: int
    final_loss: float
    learned: float
    seconds: float
    block: int | None = None
    ids: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    update: IndexUpdate | None = None
    prompts: tuple[str, ...] = ()  # the edits' prompts (for the writer's edit log)
    weights: Mapping[str, torch.Tensor] | None = None  # detached trained block(s), for the writer to commit
    # Each edit's block counted from `block`, when the batch trained a block per edit; empty: all use `block`.
    member_blocks: tuple[int, ...] = ()
    # More keys for the same edits (their `train_rephrases`): row i belongs to the edit at position
    # `extra_key_edits[i]` of `ids`, and routes to that edit's block.
    extra_keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    extra_key_edits: tuple[int, ...] = ()

    @property
    def block_count(self) -> int:
        """Blocks this batch adds to a bank."""
        return max(self.member_blocks) + 1 if self.member_blocks else 1

    def edit_blocks(self) -> tuple[int | None, ...]:
        """Each edit's block (None where the batch has no block)."""
        if self.block is None:
            return (None,) * len(self.ids)
        return tuple(self.block + offset for offset in (self.member_blocks or (0,) * len(self.ids)))
