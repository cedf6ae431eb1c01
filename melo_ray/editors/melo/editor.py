"""MELO: neuron-indexed dynamic LoRA (Yu et al., AAAI 2024).

One edit batch trains one new LoRA block (or one per edit, `lora.block_per_edit`); the neuron index maps the batch's prompt keys to that
block. At inference each prompt's key picks its block (or none: the exact base model).
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from melo_ray.backbones import Backbone
from melo_ray.config import EditorConfig
from melo_ray.editors.melo.bank import bank_files, check_bank_shape, read_bank
from melo_ray.editors.melo.block_index import BlockIndex, snapshot_key_dim, snapshot_verifier
from melo_ray.editors.melo.scope.keys import (
    KeyFunction, ScopedSentenceKeys, build_key_function, prompt_and_paraphrase_keys, scoped_keys_for,
)
from melo_ray.editors.melo.layer import BlockRouter, inject_dynamic_lora
from melo_ray.editors.melo.writer import MeloWriter, check_bank_config
from melo_ray.editors.messages import TrainedBatch
from melo_ray.editors.protocol import Editor
from melo_ray.editors.routing import Routing
from melo_ray.editors.single_writer import LayerShape, WriterLayout
from melo_ray.inference import generate_texts
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError
from melo_ray.training import EditBatch, IndependentRows, build_batch, in_formats, train_block, training_formats

log = logging.getLogger(__name__)
PREFIX_OPENINGS = ("The", "I think", "In the", "It was", "A new", "We", "This is", "There are", "When", "My",
                   "One day", "After the", "Today", "He said", "She", "They", "Many people", "Some", "If you", "On")


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
    index_type = BlockIndex
    writer_type = MeloWriter
    index: BlockIndex | None

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        super().__init__(config, backbone, device)
        self.key_function = build_key_function(self.backbone, config.section("index"))
        self._config_key_function = self.key_function  # a restored snapshot may bring its own views
        self.layers = inject_dynamic_lora(self.backbone.model, config.section("lora"))
        self._check_key_precedes_lora()
        self.router = BlockRouter(self.layers)
        self.index = BlockIndex.create(config, self.key_function.dim)
        self._prefix_cache: list[str] | None = None

    def key_dim(self) -> int:
        return self.key_function.dim

    def writer_layout(self) -> WriterLayout:
        return WriterLayout(self.key_dim(), {name: LayerShape(layer.in_features, layer.out_features)
                                             for name, layer in self.layers.items()})

    def _check_key_precedes_lora(self) -> None:
        key = self.config.section("index").key_module
        if self.config.section("index").key_function == "sentence_encoder" or not key:
            return
        order = {name: i for i, (name, _) in enumerate(self.backbone.model.named_modules())}
        for name in self.layers:
            if name.startswith(key + ".") or order.get(name, -1) < order.get(key, -1):
                raise ValueError(
                    f"index.key_module '{key}' must run before every LoRA layer, but '{name}' does not follow it"
                )

    # -- editing -----------------------------------------------------------------------------------
    def train_batch(self, records: list[EditRecord]) -> TrainedBatch:
        """The in-process half of an edit: keys of the batch's prompts and its block(s) committed to this
        editor's bank; the index is not touched (`edit()` adds the keys). On any failure nothing of
        this batch stays behind."""
        trained = self.train_detached(records, self.version)
        block = self.router.append_blocks(trained.weights)
        self.version += 1
        self.edits_applied += trained.edits
        return dataclasses.replace(trained, block=block, weights=None)

    def train_detached(self, records: list[EditRecord], position: int) -> TrainedBatch:
        """Train the block of the batch at stream `position` without touching this editor's state: a
        batch trains a fresh block seeded by its position alone, so a pool of trainers can train
        consecutive batches at once and the writer (MeloWriter) commits them in order."""
        batch_records = _latest_per_prompt(records)
        if not batch_records:
            raise ValueError("edit batch is empty")
        # train_rephrases: more keys (members) of their edit, not only more training rows
        keys, extra_keys, extra_key_edits = prompt_and_paraphrase_keys(
            self.key_function, batch_records, self.config.train.train_rephrases)
        rows, edit_of_row = self._training_rows(batch_records, position)
        formats = training_formats(self.backbone, self.config.train.formats)
        trained_on = in_formats(self.backbone, rows, formats)
        per_edit = self.config.section("lora").block_per_edit
        # each training row trains its own edit's block (per-edit blocks) or the batch's one block
        slots = edit_of_row * len(formats) if per_edit else [0] * len(trained_on)
        batch = build_batch(self.backbone, trained_on, self.config.train.append_eos, rendered=True)
        params = self.router.start_block(seed=self.config.train.seed + position,
                                         slots=len(batch_records) if per_edit else 1)
        try:
            stats = train_block(
                self.backbone, batch, params, self.config.train, trained_modules=list(self.layers),
                active=lambda: self.router.staging(slots),
                # a block per edit: each edit's rows train only its block, so a learned edit can retire
                independent=IndependentRows(slots, lambda rows: self.router.staging([slots[r] for r in rows]))
                if per_edit else None,
                segments=[len(rows)] * len(formats),  # each format's rows at their own width
            )
            weights = self.router.staging_weights()
        finally:
            self.router.discard_block()  # the block leaves as weights; nothing stays behind here
        return TrainedBatch(
            version=position + 1, edits=len(batch_records), steps=stats.steps, final_loss=stats.final_loss,
            learned=stats.learned, seconds=stats.seconds,
            ids=tuple(r.id for r in batch_records), targets=tuple(r.target for r in batch_records),
            prompts=tuple(r.prompt for r in batch_records), keys=keys.astype(np.float32), weights=weights,
            member_blocks=tuple(range(len(batch_records))) if per_edit else (),
            extra_keys=extra_keys.astype(np.float32), extra_key_edits=tuple(extra_key_edits),
        )

    def _training_rows(self, records: list[EditRecord], position: int) -> tuple[list[EditRecord], list[int]]:
        """The batch's rows: each edit's prompt, its train_rephrases, and prefixed copies (lora.prefix_augment),
        with the position in `records` of the edit each row teaches."""
        cfg = self.config.section("lora")
        rows = list(records)
        edit_of_row = list(range(len(records)))
        if self.config.train.train_rephrases:
            for i, r in enumerate(records):
                rows += [EditRecord(prompt=p, target=r.target, id=r.id) for p in r.train_rephrases]
                edit_of_row += [i] * len(r.train_rephrases)
        if cfg.prefix_augment:
            prefixes = self._prefixes()
            rng = random.Random(self.config.train.seed + position)
            for i, r in enumerate(records):
                rows += [EditRecord(prompt=f"{rng.choice(prefixes)} {r.prompt}", target=r.target, id=r.id)
                         for _ in range(cfg.prefix_augment)]
                edit_of_row += [i] * cfg.prefix_augment
        return rows, edit_of_row

    def _prefixes(self) -> list[str]:
        """Short sentences the backbone writes itself from neutral openings (greedy, so deterministic)."""
        if self._prefix_cache is None:
            texts = generate_texts(self.backbone, list(PREFIX_OPENINGS), 10)
            self._prefix_cache = [
                " ".join(f"{start} {text}".split()).split(". ")[0].rstrip(".") + "."
                for start, text in zip(PREFIX_OPENINGS, texts)
            ]
        return self._prefix_cache

    # -- inference ---------------------------------------------------------------------------------
    def route(self, prompts: list[str]) -> Routing:
        """Block id (-1 for none) and nearest-centre distance for each prompt."""
        if self.index is None:
            raise RuntimeError("this editor's index lives in another process (detach_index)")
        return Routing.from_search(self.index.search(self._routing_keys(prompts)))

    def _routing_keys(self, prompts: list[str]) -> np.ndarray:
        """Keys for routing. With the scope test, the views it reads beyond the first are computed only
        for prompts that some cluster holds: most traffic touches no edit and pays one encoder pass."""
        keys_of = self.key_function
        if not isinstance(keys_of, ScopedSentenceKeys) or self.index is None or self.index.index.scope is None:
            return keys_of.keys(prompts)
        first = keys_of.routing_keys(prompts)
        keys = np.zeros((len(prompts), keys_of.dim), np.float32)
        keys[:, : first.shape[1]] = first
        known: dict[str, np.ndarray] = {}
        scope = self.index.index.scope
        if scope.focus_reach:  # the focus view decides reach too, so every prompt needs it first
            known["focus"] = keys_of.focus_keys(prompts, first)
            start = scope.reach_starts[1]
            keys[:, start : start + first.shape[1]] = known["focus"]
        reach = np.nonzero(self.index.index.within_reach(keys))[0]
        if len(reach):
            keys[reach] = keys_of.complete([prompts[i] for i in reach], first[reach],
                                           {view: k[reach] for view, k in known.items()})
        return keys

    def routed(self, routing: Routing, batch: EditBatch | None = None) -> AbstractContextManager:
        return self.router.route(np.asarray(routing.ids, dtype=np.int64))

    # -- state -----------------------------------------------------------------------------------
    def state_stats(self) -> dict[str, int]:
        return {"blocks": self.router.num_blocks, "extra_parameters": self.router.extra_parameters()}

    def state_files(self) -> dict[str, bytes]:
        return bank_files({name: (layer.lora_bank_A, layer.lora_bank_B) for name, layer in self.layers.items()})

    def key_dim_for(self, files: Mapping[str, bytes], where: str) -> int:
        return snapshot_key_dim(files, where, self.key_dim())

    def _key_function_for(self, files: Mapping[str, bytes], where: str) -> KeyFunction:
        """The key function for a snapshot's index: this one, unless the snapshot's verifier reads other
        views (or another relation adapter) than it does."""
        verifier = snapshot_verifier(files, where)
        keys_of = self.key_function
        if verifier is None or not isinstance(keys_of, ScopedSentenceKeys) or keys_of.reads(verifier):
            return keys_of
        try:
            return scoped_keys_for(verifier, keys_of.encoder)
        except ValueError as exc:
            raise SnapshotError(f"{where}: its scope verifier's views cannot be computed ({exc})") from exc

    def restore_state(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        check_bank_config(self.config, manifest, where)
        key_function = self._key_function_for(files, where)
        banks = read_bank(files, list(self.layers), where)
        for name, layer in self.layers.items():
            check_bank_shape(*banks[name], layer.lora_bank_A, layer.lora_bank_B, f"{where}: bank for '{name}'",
                             error=SnapshotError)

        def swap() -> None:
            for name, layer in self.layers.items():
                layer.load_bank(*banks[name])
            self.key_function = key_function

        return swap

    # -- lifecycle -------------------------------------------------------------------------------
    def revert_state(self, ids: set[str]) -> Callable[[], None]:
        """The edits' members leave the index; a cluster with no members dies. Blocks stay in the
        bank (a batch's block may serve its other edits) until compact()."""
        if self.index is None:
            raise RuntimeError("revert needs the editor's index (restore a whole snapshot in this process)")
        index = self.index.index
        return lambda: index.remove_members(ids)

    def compact(self) -> list[int]:
        """Drop blocks no live member uses and renumber the rest; outputs stay exactly the same.
        Returns the dropped block numbers (old numbering)."""
        if self.index is None:
            raise RuntimeError("compaction needs the editor's index")
        live = sorted(self.index.index.live_blocks())
        dropped = sorted(set(range(self.router.num_blocks)) - set(live))
        if not dropped:
            return []
        mapping = {old: new for new, old in enumerate(live)}
        rows = torch.as_tensor(live, dtype=torch.long)
        for layer in self.layers.values():
            layer.load_bank(layer.lora_bank_A[rows], layer.lora_bank_B[rows])
        self.index.index.renumber_blocks(mapping)
        self.index.blocks_indexed = len(live)
        self.edit_log = {i: dataclasses.replace(e, block=mapping.get(e.block) if e.block is not None else None)
                         for i, e in self.edit_log.items()}
        return dropped

    def reset_state(self) -> None:
        for layer in self.layers.values():
            layer.load_bank(layer.lora_bank_A[:0], layer.lora_bank_B[:0])
        self.key_function = self._config_key_function
