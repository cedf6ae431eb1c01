"""MELO's single writer: the LoRA bank, the neuron index and the edit log, without a model.

The bulk-edit job runs it in one actor. Any number of trainers train blocks at once
(`MeloEditor.train_detached`); the writer appends each block to the bank and its keys to the index
in stream order, and writes the same snapshot files an in-process MeloEditor writes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from melo_ray.config import EditorConfig
from melo_ray.editors.melo.bank import GrowingRows, bank_files, check_bank_shape, read_bank
from melo_ray.editors.melo.block_index import BlockIndex, snapshot_key_dim
from melo_ray.editors.melo.layer import BlockBankFull
from melo_ray.editors.edit_log import EditEntry, edit_log_files, log_batch, read_edit_log
from melo_ray.editors.messages import IndexUpdate, StaleStateError, TrainedBatch
from melo_ray.editors.single_writer import BatchWriter
from melo_ray.snapshots import SnapshotError


def check_bank_config(config: EditorConfig, manifest: Mapping[str, Any], where: str) -> None:
    """A snapshot's bank fits only the LoRA settings it was trained with."""
    lora, ours = manifest.get("config", {}).get("lora"), config.section("lora")
    fields = ours.BANK_FIELDS
    if not isinstance(lora, dict) or {k: lora.get(k) for k in fields} != ours.model_dump(mode="json", include=set(fields)):
        raise SnapshotError(f"{where}: snapshot's lora config differs from this editor's")


class MeloWriter(BatchWriter):
    def __init__(self, config: EditorConfig, layout: WriterLayout, index: BlockIndex,
                 banks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], edit_log: dict[str, EditEntry],
                 version: int, edits: int) -> None:
        self.config = config
        self.layout = layout
        self.index = index
        self.banks = {name: list(pair) for name, pair in banks.items()}
        self.grow = {name: (GrowingRows(), GrowingRows()) for name in banks}
        self.full_segments: list[bytes] = []  # serialised once: commits only append blocks
        self.edit_log = edit_log
        self.version = version
        self.edits = edits

    @staticmethod
    def _empty_banks(config: EditorConfig, layout: WriterLayout) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        rank, dtype = config.section("lora").block_rank, getattr(torch, config.backbone.dtype)  # blocks follow the base dtype
        return {name: (torch.zeros(0, rank, shape.in_features, dtype=dtype), torch.zeros(0, shape.out_features, rank, dtype=dtype))
                for name, shape in layout.layers.items()}

    @classmethod
    def create(cls, config: EditorConfig, layout: WriterLayout) -> "MeloWriter":
        return cls(config, layout, BlockIndex.create(config, layout.key_dim),
                   cls._empty_banks(config, layout), {}, 0, 0)

    @classmethod
    def from_files(cls, config: EditorConfig, layout: WriterLayout, manifest: Mapping[str, Any],
                   files: Mapping[str, bytes], where: str) -> "MeloWriter":
        check_bank_config(config, manifest, where)
        try:
            version, edits = int(manifest["version"]), int(manifest["stats"]["edits"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{where}: manifest lacks its version or edit count ({exc})") from exc
        empty = cls._empty_banks(config, layout)
        banks = read_bank(files, list(empty), where)
        for name, (a, b) in banks.items():
            check_bank_shape(a, b, *empty[name], f"{where}: bank for '{name}'", error=SnapshotError)
        index = BlockIndex.from_files(config, snapshot_key_dim(files, where, layout.key_dim), files, where)
        return cls(config, layout, index, banks, read_edit_log(files, where), version, edits)

    @property
    def num_blocks(self) -> int:
        return len(next(iter(self.banks.values()))[0]) if self.banks else 0

    def commit(self, trained: TrainedBatch) -> IndexUpdate:
        if trained.version != self.version + 1:
            raise StaleStateError(f"writer holds version {self.version}; batch for version {trained.version} "
                                  "arrived out of order or twice")
        if trained.weights is None:
            raise ValueError("a trained batch for the writer must carry its block's weights")
        missing = [f"{n}.{p}" for n in self.banks for p in "AB" if f"{n}.{p}" not in trained.weights]
        if missing:
            raise ValueError(f"trained block lacks weights for {missing}")
        count = trained.block_count
        for name, (a, b) in self.banks.items():  # every check before the first change: all or nothing
            check_bank_shape(trained.weights[f"{name}.A"], trained.weights[f"{name}.B"], a, b,
                             f"trained blocks for '{name}'", blocks=count)
        max_blocks = self.config.section("lora").max_blocks
        if self.num_blocks + count > max_blocks:
            raise BlockBankFull(f"lora.max_blocks={max_blocks} reached: raise it in the config")
        block = self.num_blocks
        committed = TrainedBatch(**{**vars(trained), "block": block, "weights": None})
        update = self.index.add(committed)  # checks the block number against the index first
        for name, (grow_a, grow_b) in self.grow.items():
            a, b = self.banks[name]
            self.banks[name] = [grow_a.append(a, trained.weights[f"{name}.A"]),
                                grow_b.append(b, trained.weights[f"{name}.B"])]
        log_batch(self.edit_log, committed)
        self.version = trained.version
        self.edits += trained.edits
        return update

    def files(self) -> dict[str, bytes]:
        return {**bank_files({n: (a, b) for n, (a, b) in self.banks.items()}, self.full_segments),
                **edit_log_files(self.edit_log.values()), **self.index.files()}

    def stats(self) -> dict[str, int]:
        extra = sum(a.numel() + b.numel() for a, b in self.banks.values())
        return {"edits": self.edits, "blocks": self.num_blocks, "extra_parameters": extra, **self.index.stats()}
