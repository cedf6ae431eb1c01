"""MELO: neuron-indexed dynamic LoRA (Yu et al., AAAI 2024).

One edit batch trains one new LoRA block; the neuron index maps the batch's prompt keys to that
block. At inference each prompt's key picks its block (or none: the exact base model).
"""
from __future__ import annotations

import json
import logging
import tempfile
from contextlib import AbstractContextManager
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from melo_ray.backbones import Backbone, load_backbone, weights_checksum
from melo_ray.config import EditorConfig, load_config
from melo_ray.editors.base import EditResult, Editor, as_records
from melo_ray.index import NeuronIndex
from melo_ray.inference import next_token_logits
from melo_ray.keys import build_key_function
from melo_ray.lora import BlockRouter, inject_dynamic_lora
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError, read_manifest, read_snapshot, write_snapshot
from melo_ray.training import EditBatch, build_batch, train_block

log = logging.getLogger(__name__)


def _latest_per_prompt(records: list[EditRecord]) -> list[EditRecord]:
    """Within one batch a prompt edited twice keeps only its latest target."""
    latest: dict[str, int] = {}
    for i, record in enumerate(records):
        latest[record.prompt] = i
    kept = sorted(latest.values())
    if len(kept) < len(records):
        log.info("batch: %d records superseded by a later record with the same prompt", len(records) - len(kept))
    return [records[i] for i in kept]


class MeloEditor(Editor):
    """A backbone with a dynamic LoRA bank and a neuron index."""

    name = "melo"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None) -> None:
        self.config = config
        self.backbone = backbone or load_backbone(config.backbone)
        self.base_checksum = weights_checksum(self.backbone.model)
        self.key_function = build_key_function(self.backbone, config.index)
        self.layers = inject_dynamic_lora(self.backbone.model, config.lora)
        self._check_key_precedes_lora()
        self.router = BlockRouter(self.layers)
        self.index = self._new_index(self.key_function.dim)
        self.version = 0
        self.edits_applied = 0

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any] | EditorConfig) -> "MeloEditor":
        return cls(load_config(source))  # type: ignore[arg-type]

    def _new_index(self, dim: int) -> NeuronIndex:
        cfg = self.config.index
        return NeuronIndex(
            dim, cfg.distance, cfg.r_init, hnsw_m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction,
            ef_search=cfg.hnsw_ef_search, candidates=cfg.candidates,
        )

    def _check_key_precedes_lora(self) -> None:
        key = self.config.index.key_module
        if self.config.index.key_function == "sentence_encoder" or not key:
            return
        order = {name: i for i, (name, _) in enumerate(self.backbone.model.named_modules())}
        for name in self.layers:
            if name.startswith(key + ".") or order.get(name, -1) < order.get(key, -1):
                raise ValueError(
                    f"index.key_module '{key}' must run before every LoRA layer, but '{name}' does not follow it"
                )

    # -- editing -----------------------------------------------------------------------------------
    def edit(self, records: Iterable[EditRecord | Mapping[str, Any]]) -> EditResult:
        """Train one new block on this batch and index its keys; all or nothing."""
        batch_records = _latest_per_prompt(as_records(records))
        if not batch_records:
            raise ValueError("edit batch is empty")
        keys = self.key_function.keys([r.prompt for r in batch_records])
        if not np.all(np.isfinite(keys)):
            raise ValueError("edit batch: a prompt produced a non-finite key")
        batch = build_batch(self.backbone, batch_records, self.config.train.append_eos)
        params = self.router.start_block(seed=self.config.train.seed + self.version)
        try:
            stats = train_block(
                self.backbone, batch, params, self.config.train, trained_modules=list(self.layers),
                active=lambda: self.router.staging(len(batch_records), self.backbone.device),
            )
            block = self.router.commit_block()
        except BaseException:
            self.router.discard_block()  # nothing of this batch stays behind
            raise
        forgotten: list[str] = []
        for key, record in zip(keys, batch_records):
            event = self.index.add(key, record.target, block, record.id)
            forgotten.extend(event.forgotten)
        self.version += 1
        self.edits_applied += len(batch_records)
        return EditResult(
            edits=len(batch_records), block=block, clusters=self.index.num_alive,
            conflicts=self.index.conflicts, forgotten=tuple(forgotten), steps=stats.steps,
            final_loss=stats.final_loss, learned=stats.learned, seconds=stats.seconds,
        )

    # -- inference ---------------------------------------------------------------------------------
    def route(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Block id (-1 for none) and nearest-centre distance for each prompt."""
        if not prompts:
            return np.zeros(0, np.int64), np.zeros(0)
        result = self.index.search(self.key_function.keys(prompts))
        return result.block_ids, result.distances

    def routed(self, ids: np.ndarray, batch: EditBatch | None = None) -> AbstractContextManager:
        return self.router.route(torch.as_tensor(ids, dtype=torch.long))

    def next_token_logits(self, prompts: list[str], *, base: bool = False) -> torch.Tensor:
        """Logits after each prompt's last real token, routed as generate() would route them."""
        with self.routed(self._ids(prompts, base)[0]):
            return next_token_logits(self.backbone, prompts)

    # -- state -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {
            "edits": self.edits_applied,
            "blocks": self.router.num_blocks,
            "clusters": self.index.num_alive,
            "members": self.index.num_members,
            "conflicts": self.index.conflicts,
            "forgotten": self.index.forgotten,
            "extra_parameters": self.router.extra_parameters(),
        }

    def save(self, folder: str | Path, **extra: Any) -> dict[str, Any]:
        """Write a verified snapshot (safetensors + JSON + hnswlib graph) atomically to `folder`.

        `extra` entries (JSON-serialisable) are kept in the manifest, e.g. a job's progress."""
        adapters = {}
        for name, layer in self.layers.items():
            adapters[f"{name}.lora_bank_A"] = layer.lora_bank_A.contiguous()
            adapters[f"{name}.lora_bank_B"] = layer.lora_bank_B.contiguous()
        arrays, index_meta = self.index.state()
        with tempfile.TemporaryDirectory() as tmp:
            graph = Path(tmp) / "index.hnsw"
            self.index.save_graph(graph)
            graph_bytes = graph.read_bytes()
        files = {
            "adapters.safetensors": safetensors.torch.save(adapters),
            "index.safetensors": safetensors.numpy.save(arrays),
            "index.json": json.dumps(index_meta, sort_keys=True).encode(),
            "index.hnsw": graph_bytes,
        }
        meta = {
            "editor": self.name,
            "version": self.version,
            "config": self.config.model_dump(mode="json"),
            "base_checksum": self.base_checksum,
            "stats": self.stats(),
            **extra,
        }
        return write_snapshot(folder, files, meta)

    @classmethod
    def load(cls, folder: str | Path, backbone: Backbone | None = None) -> "MeloEditor":
        """Rebuild an editor from a snapshot; the backbone must hash to the snapshot's base checksum."""
        manifest = read_manifest(folder)  # restore() reads and verifies the files once
        if manifest.get("editor") != cls.name:
            raise SnapshotError(f"{folder}: snapshot is for editor '{manifest.get('editor')}', not '{cls.name}'")
        editor = cls(load_config(manifest["config"]), backbone)
        editor.restore(folder)
        return editor

    def restore(self, folder: str | Path) -> None:
        """Replace this editor's blocks and index with a snapshot's (same backbone and config)."""
        manifest, files = read_snapshot(folder)
        if manifest.get("base_checksum") != self.base_checksum:
            raise SnapshotError(f"{folder}: snapshot was made on other base weights (checksum differs)")
        if manifest.get("config", {}).get("lora") != self.config.lora.model_dump(mode="json"):
            raise SnapshotError(f"{folder}: snapshot's lora config differs from this editor's")
        adapters = safetensors.torch.load(files["adapters.safetensors"])
        arrays = safetensors.numpy.load(files["index.safetensors"])
        index_meta = json.loads(files["index.json"])
        if int(index_meta["dim"]) != self.key_function.dim:
            raise SnapshotError(f"{folder}: index keys have {index_meta['dim']} dims, the key function {self.key_function.dim}")
        with tempfile.TemporaryDirectory() as tmp:
            graph = Path(tmp) / "index.hnsw"
            graph.write_bytes(files["index.hnsw"])
            index = NeuronIndex.from_state(arrays, index_meta, graph)
        banks = {}
        for name in self.layers:
            try:
                banks[name] = (adapters[f"{name}.lora_bank_A"], adapters[f"{name}.lora_bank_B"])
            except KeyError as exc:
                raise SnapshotError(f"{folder}: adapters have no bank for '{name}'") from exc
        for name, layer in self.layers.items():  # all checks passed: swap in
            layer.load_bank(*banks[name])
        self.index = index
        self.version = int(manifest["version"])
        self.edits_applied = int(manifest["stats"]["edits"])
