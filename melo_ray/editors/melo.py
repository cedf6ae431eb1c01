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
from melo_ray.snapshots import SnapshotError, read_snapshot, write_snapshot
from melo_ray.training import EditBatch, TrainStats, build_batch, train_block

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

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        self.config = config
        self.backbone = backbone or load_backbone(config.backbone)
        if device is not None:
            self.backbone.model.to(device)
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
        batch_records, keys, block, stats = self.train_batch(records)
        forgotten = index_batch(self.index, keys, [r.target for r in batch_records], [r.id for r in batch_records], block)
        return EditResult(
            edits=len(batch_records), block=block, clusters=self.index.num_alive,
            conflicts=self.index.conflicts, forgotten=tuple(forgotten), steps=stats.steps,
            final_loss=stats.final_loss, learned=stats.learned, seconds=stats.seconds,
        )

    def train_batch(self, records: Iterable[EditRecord | Mapping[str, Any]]) -> tuple[list[EditRecord], np.ndarray, int, TrainStats]:
        """The trainer's half of an edit: keys of the batch's prompts and one committed block.

        The index is not touched (the pipeline's index actor owns it). On any failure nothing of
        this batch stays behind."""
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
        self.version += 1
        self.edits_applied += len(batch_records)
        return batch_records, keys, block, stats

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

    def adapter_files(self) -> dict[str, bytes]:
        adapters = {}
        for name, layer in self.layers.items():
            adapters[f"{name}.lora_bank_A"] = layer.lora_bank_A.detach().cpu().contiguous()
            adapters[f"{name}.lora_bank_B"] = layer.lora_bank_B.detach().cpu().contiguous()
        return {"adapters.safetensors": safetensors.torch.save(adapters)}

    def snapshot_meta(self, stats: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "editor": self.name,
            "version": self.version,
            "config": self.config.model_dump(mode="json"),
            "base_checksum": self.base_checksum,
            "stats": dict(stats if stats is not None else self.stats()),
            **extra,
        }

    def snapshot_files(self) -> dict[str, bytes]:
        return {**self.adapter_files(), **index_files(self.index)}

    def save(self, folder: str | Path, **extra: Any) -> dict[str, Any]:
        """Write a verified snapshot (safetensors + JSON + hnswlib graph) atomically to `folder`.

        `extra` entries (JSON-serialisable) are kept in the manifest, e.g. a job's progress."""
        return write_snapshot(folder, self.snapshot_files(), self.snapshot_meta(**extra))

    def publish(self, store: Any, **extra: Any) -> dict[str, Any]:
        """Publish this editor's state as version `self.version` of a SnapshotStore."""
        return store.publish(self.version, self.snapshot_files(), self.snapshot_meta(**extra))

    @classmethod
    def load(cls, folder: str | Path, backbone: Backbone | None = None) -> "MeloEditor":
        """Rebuild an editor from a snapshot folder, or a store root (its latest version), local or URI.

        The backbone must hash to the snapshot's base checksum."""
        from melo_ray.store import read_any_snapshot

        manifest, files, where = read_any_snapshot(folder)
        return cls.from_files(manifest, files, where, backbone)

    @classmethod
    def from_files(cls, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str = "snapshot",
                   backbone: Backbone | None = None) -> "MeloEditor":
        if manifest.get("editor") != cls.name:
            raise SnapshotError(f"{where}: snapshot is for editor '{manifest.get('editor')}', not '{cls.name}'")
        editor = cls(load_config(manifest["config"]), backbone)
        editor.restore_files(manifest, files, where)
        return editor

    def restore(self, folder: str | Path) -> None:
        """Replace this editor's blocks and index with a snapshot's (same backbone and config)."""
        manifest, files = read_snapshot(folder)
        self.restore_files(manifest, files, str(folder))

    def restore_files(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str = "snapshot",
                      *, with_index: bool = True) -> None:
        """Restore from already verified snapshot contents (see snapshots.read_snapshot)."""
        if manifest.get("base_checksum") != self.base_checksum:
            raise SnapshotError(f"{where}: snapshot was made on other base weights (checksum differs)")
        if manifest.get("config", {}).get("lora") != self.config.lora.model_dump(mode="json"):
            raise SnapshotError(f"{where}: snapshot's lora config differs from this editor's")
        adapters = safetensors.torch.load(files["adapters.safetensors"])
        index = load_index_files(files, self.key_function.dim, where) if with_index else self.index
        banks = {}
        for name in self.layers:
            try:
                banks[name] = (adapters[f"{name}.lora_bank_A"], adapters[f"{name}.lora_bank_B"])
            except KeyError as exc:
                raise SnapshotError(f"{where}: adapters have no bank for '{name}'") from exc
        for name, layer in self.layers.items():  # all checks passed: swap in
            layer.load_bank(*banks[name])
        self.index = index
        self.version = int(manifest["version"])
        self.edits_applied = int(manifest["stats"]["edits"])


def index_batch(index: NeuronIndex, keys: np.ndarray, targets: list[str], ids: list[str], block: int) -> list[str]:
    """The index's half of an edit: add each key in order; returns the ids of forgotten edits."""
    forgotten: list[str] = []
    for key, target, edit_id in zip(keys, targets, ids, strict=True):
        event = index.add(key, target, block, edit_id)
        forgotten.extend(event.forgotten)
    return forgotten


def index_files(index: NeuronIndex) -> dict[str, bytes]:
    """The snapshot files of an index: arrays (safetensors), metadata (JSON), hnswlib graph."""
    arrays, index_meta = index.state()
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "index.hnsw"
        index.save_graph(graph)
        graph_bytes = graph.read_bytes()
    return {
        "index.safetensors": safetensors.numpy.save(arrays),
        "index.json": json.dumps(index_meta, sort_keys=True).encode(),
        "index.hnsw": graph_bytes,
    }


def load_index_files(files: Mapping[str, bytes], dim: int, where: str = "snapshot") -> NeuronIndex:
    arrays = safetensors.numpy.load(files["index.safetensors"])
    index_meta = json.loads(files["index.json"])
    if int(index_meta["dim"]) != dim:
        raise SnapshotError(f"{where}: index keys have {index_meta['dim']} dims, the key function {dim}")
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "index.hnsw"
        graph.write_bytes(files["index.hnsw"])
        return NeuronIndex.from_state(arrays, index_meta, graph)
