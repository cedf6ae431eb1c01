"""The job's two stateful actors. Plain classes here; the job wraps them with ray.remote options.

The trainer holds the backbone and the LoRA bank and trains one block per edit batch. The index
actor is the single writer of the neuron index. Both check that a call continues from the state the
driver expects, so a restarted (blank) actor is noticed instead of silently training on nothing.
"""
from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from melo_ray.config import load_config
from melo_ray.editors.melo import MeloEditor, index_batch, index_files, load_index_files
from melo_ray.records import EditRecord


class StaleActorError(RuntimeError):
    """An actor's state is not the one the driver expects (it was restarted, or a call repeated)."""


class TrainerActor:
    def __init__(self, config: Mapping[str, Any], device: str | None = None, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.editor = MeloEditor(load_config(dict(config)), device=device)
        self.editor.index = None  # type: ignore[assignment]  # the index actor owns the index

    def info(self) -> dict[str, Any]:
        return {
            "version": self.editor.version,
            "base_checksum": self.editor.base_checksum,
            "key_dim": self.editor.key_function.dim,
            "device": str(self.editor.backbone.device),
            "pid": os.getpid(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        }

    def reset(self) -> int:
        """Back to the base model: no blocks, version 0."""
        for layer in self.editor.layers.values():
            layer.load_bank(layer.lora_bank_A[:0], layer.lora_bank_B[:0])
        self.editor.version = 0
        self.editor.edits_applied = 0
        return self.editor.version

    def restore(self, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> int:
        self.editor.restore_files(manifest, files, f"snapshot v{manifest.get('version')}", with_index=False)
        self.editor.index = None  # type: ignore[assignment]
        return self.editor.version

    def train(self, records: list[dict[str, Any]], expected_version: int) -> dict[str, Any]:
        """Train and commit one block; returns the batch's keys and what the index needs."""
        if self.editor.version != expected_version:
            raise StaleActorError(f"trainer holds version {self.editor.version}, the job expects {expected_version}")
        kept, keys, block, stats = self.editor.train_batch([EditRecord(**r) for r in records])
        return {
            "keys": keys.astype(np.float32),
            "targets": [r.target for r in kept],
            "ids": [r.id for r in kept],
            "block": block,
            "version": self.editor.version,
            "edits": len(kept),
            "steps": stats.steps,
            "loss": stats.final_loss,
            "learned": stats.learned,
            "seconds": stats.seconds,
        }

    def adapter_files(self) -> dict[str, bytes]:
        return self.editor.adapter_files()

    def stats(self) -> dict[str, int]:
        return {
            "edits": self.editor.edits_applied,
            "blocks": self.editor.router.num_blocks,
            "extra_parameters": self.editor.router.extra_parameters(),
        }


class IndexActor:
    def __init__(self, config: Mapping[str, Any], dim: int) -> None:
        self.config = load_config(dict(config))
        self.dim = dim
        self.reset()

    def reset(self) -> int:
        cfg = self.config.index
        from melo_ray.index import NeuronIndex

        self.index = NeuronIndex(
            self.dim, cfg.distance, cfg.r_init, hnsw_m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction,
            ef_search=cfg.hnsw_ef_search, candidates=cfg.candidates,
        )
        self.blocks_indexed = 0
        return self.blocks_indexed

    def restore(self, files: Mapping[str, bytes], blocks: int) -> int:
        self.index = load_index_files(files, self.dim)
        self.blocks_indexed = blocks
        return self.blocks_indexed

    def add_batch(self, trained: Mapping[str, Any]) -> dict[str, Any]:
        """Index one trained batch; blocks must arrive in order, each once."""
        block = int(trained["block"])
        if block != self.blocks_indexed:
            raise StaleActorError(f"index has {self.blocks_indexed} blocks indexed, got block {block}")
        forgotten = index_batch(self.index, np.asarray(trained["keys"]), list(trained["targets"]), list(trained["ids"]), block)
        self.blocks_indexed += 1
        return {"forgotten": forgotten, **self.stats()}

    def files(self) -> dict[str, bytes]:
        return index_files(self.index)

    def stats(self) -> dict[str, int]:
        return {
            "clusters": self.index.num_alive,
            "members": self.index.num_members,
            "conflicts": self.index.conflicts,
            "forgotten": self.index.forgotten,
        }

    def search(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.index.search(np.asarray(keys, dtype=np.float32))
        return result.block_ids, result.distances
