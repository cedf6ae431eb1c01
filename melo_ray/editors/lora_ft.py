"""Sequential LoRA fine-tuning baseline: one ordinary PEFT LoRA, trained on each edit batch in turn.

There is no routing: every input goes through the adapter, so later batches overwrite earlier ones
and unrelated inputs drift. It shows what MELO's per-batch blocks and index buy.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext

import numpy as np
from pathlib import Path
from typing import Any

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from melo_ray.backbones import Backbone, load_backbone
from melo_ray.config import EditorConfig, load_config
from melo_ray.editors.base import EditResult, Editor, as_records
from melo_ray.records import EditRecord
from melo_ray.training import EditBatch, build_batch, train_block


class SequentialLoraEditor(Editor):
    name = "lora"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None) -> None:
        self.config = config
        self.backbone = backbone or load_backbone(config.backbone)
        peft_config = PeftLoraConfig(
            r=config.lora.block_rank, lora_alpha=config.lora.alpha, lora_dropout=0.0,
            target_modules=list(config.lora.target_modules),
        )
        inject_adapter_in_model(peft_config, self.backbone.model)
        self.params = [p for n, p in self.backbone.model.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        self.version = 0
        self.edits_applied = 0

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any] | EditorConfig) -> "SequentialLoraEditor":
        return cls(load_config(source))  # type: ignore[arg-type]

    def route(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """No routing: the one adapter (id 0) applies to every prompt."""
        return np.zeros(len(prompts), np.int64), np.full(len(prompts), np.nan)

    @contextmanager
    def routed(self, ids: np.ndarray, batch: EditBatch | None = None) -> Iterator[None]:
        if len(ids) and len(set(ids.tolist())) > 1:
            raise ValueError("sequential LoRA cannot mix adapter and base rows in one pass")
        enabled = not (len(ids) and int(ids[0]) == -1)
        layers = [m for m in self.backbone.model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(enabled)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def edit(self, records: Iterable[EditRecord | Mapping[str, Any]]) -> EditResult:
        batch_records = as_records(records)
        batch = build_batch(self.backbone, batch_records, self.config.train.append_eos)
        started = time.perf_counter()
        stats = train_block(
            self.backbone, batch, self.params, self.config.train,
            trained_modules=list(self.config.lora.target_modules), active=nullcontext,
        )
        self.version += 1
        self.edits_applied += len(batch_records)
        return EditResult(
            edits=len(batch_records), block=0, clusters=0, conflicts=0, forgotten=(), steps=stats.steps,
            final_loss=stats.final_loss, learned=stats.learned, seconds=time.perf_counter() - started,
        )

    def stats(self) -> dict[str, int]:
        return {"edits": self.edits_applied, "extra_parameters": sum(p.numel() for p in self.params)}
