"""The job's two stateful actors. Plain classes here; the job wraps them with ray.remote options.

The trainer holds the backbone and the LoRA bank and trains one block per edit batch. The index
actor is the single writer of the neuron index. ELDER has no separate index: its stored codes are
computed by the routers it trains, so its trainer holds (and is the single writer of) all its state. Both check that a call continues from the state the
driver expects, so a restarted (blank) actor is noticed instead of silently training on nothing.
"""
from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from melo_ray.backbones import remove_edit_layers
from melo_ray.config import load_config
from melo_ray.editors import SNAPSHOT_EDITORS
from melo_ray.editors.elder import ElderEditor
from melo_ray.editors.melo import MeloEditor, index_batch, index_files, load_index_files
from melo_ray.records import EditRecord


class StaleActorError(RuntimeError):
    """An actor's state is not the one the driver expects (it was restarted, or a call repeated)."""


PIPELINE_EDITORS = SNAPSHOT_EDITORS


class TrainerActor:
    def __init__(self, config: Mapping[str, Any], device: str | None = None, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.config = load_config(dict(config))
        if self.config.editor not in PIPELINE_EDITORS:
            raise ValueError(f"editor '{self.config.editor}': the pipeline runs {', '.join(PIPELINE_EDITORS)}")
        self.editor: MeloEditor | ElderEditor
        if self.config.editor == "melo":
            self.editor = MeloEditor(self.config, device=device)
            self.editor.index = None  # type: ignore[assignment]  # the index actor owns the index
        else:
            self.editor = ElderEditor(self.config, device=device)

    def info(self) -> dict[str, Any]:
        return {
            "editor": self.editor.name,
            "version": self.editor.version,
            "base_checksum": self.editor.base_checksum,
            "key_dim": self.editor.key_function.dim,
            "device": str(self.editor.backbone.device),
            "pid": os.getpid(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        }

    def reset(self) -> int:
        """Back to the base model: no blocks (or fresh experts), version 0."""
        if isinstance(self.editor, ElderEditor):
            backbone = self.editor.backbone
            remove_edit_layers(backbone.model)
            self.editor = ElderEditor(self.config, backbone)
            return self.editor.version
        for layer in self.editor.layers.values():
            layer.load_bank(layer.lora_bank_A[:0], layer.lora_bank_B[:0])
        self.editor.version = 0
        self.editor.edits_applied = 0
        return self.editor.version

    def restore(self, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> int:
        where = f"snapshot v{manifest.get('version')}"
        if isinstance(self.editor, ElderEditor):
            self.editor.restore_files(manifest, files, where)
            return self.editor.version
        self.editor.restore_files(manifest, files, where, with_index=False)
        self.editor.index = None  # type: ignore[assignment]
        return self.editor.version

    def train(self, records: list[dict[str, Any]], expected_version: int) -> dict[str, Any]:
        """Train and commit one batch; returns the batch's keys and what the index needs."""
        if self.editor.version != expected_version:
            raise StaleActorError(f"trainer holds version {self.editor.version}, the job expects {expected_version}")
        batch = [EditRecord(**r) for r in records]
        if isinstance(self.editor, ElderEditor):
            result = self.editor.edit(batch)  # experts, routers and stored codes in one step
            return {
                "keys": np.zeros((0, self.editor.key_function.dim), np.float32), "targets": [], "ids": [],
                "block": None, "version": self.editor.version, "edits": result.edits, "steps": result.steps,
                "loss": result.final_loss, "learned": result.learned, "seconds": result.seconds,
                "counters": self.editor.stats(),  # stands in for the index's counters, no second call
            }
        kept, keys, block, stats = self.editor.train_batch(batch)
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

    def files(self) -> dict[str, bytes]:
        """This actor's part of a snapshot: MELO's adapters, or all of ELDER's state."""
        if isinstance(self.editor, ElderEditor):
            return self.editor.snapshot_files()
        return self.editor.adapter_files()

    def stats(self) -> dict[str, int]:
        if isinstance(self.editor, ElderEditor):
            return self.editor.stats()
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
