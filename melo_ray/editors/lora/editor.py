"""Sequential LoRA fine-tuning baseline: one ordinary PEFT LoRA, trained on each edit batch in turn.

There is no routing: every input goes through the adapter, so later batches overwrite earlier ones
and unrelated inputs drift. It shows what MELO's per-batch blocks and index buy.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import safetensors.torch
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from melo_ray.backbones import Backbone
from melo_ray.config import EditorConfig
from melo_ray.editors.messages import IndexUpdate, TrainedBatch
from melo_ray.editors.protocol import Editor
from melo_ray.editors.routing import Routing
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError
from melo_ray.training import EditBatch, build_batch, train_block


class SequentialLoraEditor(Editor):
    name = "lora"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        super().__init__(config, backbone, device)
        lora = config.section("lora")
        peft_config = PeftLoraConfig(r=lora.block_rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                     target_modules=list(lora.target_modules))
        inject_adapter_in_model(peft_config, self.backbone.model)
        self.params = [p for n, p in self.backbone.model.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        self._initial = self._adapter_state()

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(self.backbone.model).items()}

    def route(self, prompts: list[str]) -> Routing:
        """No routing: the one adapter (id 0) applies to every prompt."""
        return Routing(np.zeros(len(prompts), np.int64), np.full(len(prompts), np.nan))

    @contextmanager
    def routed(self, routing: Routing, batch: EditBatch | None = None) -> Iterator[None]:
        ids = routing.ids
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

    def train_batch(self, records: list[EditRecord]) -> TrainedBatch:
        batch = build_batch(self.backbone, records, self.config.train.append_eos)
        started = time.perf_counter()
        before = self._adapter_state()
        try:
            stats = train_block(
                self.backbone, batch, self.params, self.config.train,
                trained_modules=list(self.config.section("lora").target_modules), active=nullcontext,
            )
        except BaseException:
            set_peft_model_state_dict(self.backbone.model, before)  # all or nothing
            raise
        self.version += 1
        self.edits_applied += len(records)
        return TrainedBatch(
            version=self.version, edits=len(records), steps=stats.steps, final_loss=stats.final_loss,
            learned=stats.learned, seconds=time.perf_counter() - started, block=0, update=IndexUpdate(),
        )

    def state_stats(self) -> dict[str, int]:
        return {"extra_parameters": sum(p.numel() for p in self.params)}

    def state_files(self) -> dict[str, bytes]:
        return {"adapter.safetensors": safetensors.torch.save(self._adapter_state())}

    def restore_state(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        try:
            state = safetensors.torch.load(files["adapter.safetensors"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{where}: adapter missing or unreadable ({exc})") from exc
        expected = {k: v.shape for k, v in self._initial.items()}
        if {k: v.shape for k, v in state.items()} != expected:
            raise SnapshotError(f"{where}: adapter tensors do not fit this editor's LoRA config")
        return lambda: self._load(state)

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self.backbone.model, state)
        if getattr(result, "unexpected_keys", None):
            raise SnapshotError(f"adapter keys not in the model: {result.unexpected_keys[:3]}")

    def reset_state(self) -> None:
        self._load(self._initial)
