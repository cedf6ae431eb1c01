"""GRACE baseline (Hartvigsen et al.): a codebook of (key, value, epsilon) at one layer.

The key is the layer's input at the last prompt token. An input whose key lies within an entry's
epsilon gets that layer's output replaced by the entry's value, from the last prompt token on
(and at every generated token); every other input passes unchanged. Edits go one at a time:
far from every entry -> new entry (value trained so the target follows); same label within range
-> epsilon grows to cover the key; another label within range -> both radii split to d/2.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from melo_ray.backbones import Backbone, load_backbone
from melo_ray.config import EditorConfig, TrainConfig, load_config
from melo_ray.editors.base import EditResult, Editor, as_records
from melo_ray.index import normalise_label
from melo_ray.keys import HiddenStateKeys
from melo_ray.lora import get_parent, linear_shape
from melo_ray.records import EditRecord
from melo_ray.training import IGNORE, EditBatch, build_batch, train_block

STAGING_ENTRY = -2


class GraceLayer(nn.Module):
    """Wraps one linear layer; rows routed to a codebook entry get their output replaced."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        weight = base_layer.weight
        self.register_buffer("keys", torch.zeros(0, self.in_features, dtype=weight.dtype))
        self.register_buffer("values", torch.zeros(0, self.out_features, dtype=weight.dtype))
        self.register_buffer("eps", torch.zeros(0, dtype=torch.float64))
        self.labels: list[str] = []
        self.staging_value: nn.Parameter | None = None
        self.entry_ids: torch.Tensor | None = None  # per row: entry, -1 none, -2 staging
        self.replace_from: torch.Tensor | None = None  # per row: first replaced position; None = last

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        ids = self.entry_ids
        if ids is None or not bool((ids != -1).any()):
            return out
        staging = self.staging_value if self.staging_value is not None else torch.zeros(self.out_features)
        stored = self.values[ids.clamp(min=0)] if len(self.values) else torch.zeros(len(ids), self.out_features)
        values = torch.where((ids == STAGING_ENTRY)[:, None], staging[None, :], stored)  # (B, out)
        positions = torch.arange(x.shape[1], device=x.device)[None, :]
        start = self.replace_from if self.replace_from is not None else torch.full_like(ids, x.shape[1] - 1)
        if x.shape[1] == 1:  # a generation step: the new token is past the prompt
            start = torch.zeros_like(ids)
        mask = (positions >= start[:, None]) & (ids != -1)[:, None]
        return torch.where(mask[..., None], values[:, None, :].to(out.dtype), out)


class GraceEditor(Editor):
    name = "grace"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None) -> None:
        if not config.grace.layer:
            raise ValueError("grace.layer: the GRACE editor needs the module whose output it replaces")
        self.config = config
        self.backbone = backbone or load_backbone(config.backbone)
        if self.backbone.task != "causal_lm":
            raise ValueError("the GRACE baseline is implemented for causal language models only")
        parent, child = get_parent(self.backbone.model, config.grace.layer)
        self.layer = GraceLayer(getattr(parent, child))
        setattr(parent, child, self.layer)
        self.keys = HiddenStateKeys(self.backbone, config.grace.layer, "last", capture="input")
        self.train_config = TrainConfig(
            **{**config.train.model_dump(), "num_iter": config.grace.num_iter, "lr": config.grace.lr}
        )
        self.version = 0
        self.edits_applied = 0
        self.splits = 0

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any] | EditorConfig) -> "GraceEditor":
        return cls(load_config(source))  # type: ignore[arg-type]

    @contextmanager
    def _replace(self, entry_ids: torch.Tensor, replace_from: torch.Tensor | None = None) -> Iterator[None]:
        self.layer.entry_ids, self.layer.replace_from = entry_ids, replace_from
        try:
            yield
        finally:
            self.layer.entry_ids, self.layer.replace_from = None, None

    def routed(self, ids: np.ndarray, batch: EditBatch | None = None) -> AbstractContextManager:
        starts = None
        if batch is not None:  # teacher-forced: replace from each prompt's last token on
            starts = torch.tensor([int((row != IGNORE).nonzero().min()) - 1 for row in batch.labels])
        return self._replace(torch.as_tensor(ids, dtype=torch.long), starts)

    def route(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Entry per prompt (-1: none) by the nearest key within its epsilon, and that distance."""
        if not len(self.layer.keys) or not prompts:
            return np.full(len(prompts), -1, np.int64), np.full(len(prompts), np.nan)
        keys = torch.from_numpy(self.keys.keys(prompts)).to(self.layer.keys.dtype)
        dist = torch.cdist(keys.double(), self.layer.keys.double())
        nearest = dist.argmin(1)
        nearest_d = dist[torch.arange(len(prompts)), nearest]
        inside = nearest_d <= self.layer.eps[nearest]
        return torch.where(inside, nearest, -1).numpy(), nearest_d.numpy()

    def edit(self, records: Iterable[EditRecord | Mapping[str, Any]]) -> EditResult:
        """GRACE edits one record at a time; the batch only groups them."""
        batch = as_records(records)
        started = time.perf_counter()
        steps, loss, learned = 0, float("nan"), 1.0
        for record in batch:
            s, loss, learned = self._edit_one(record)
            steps += s
        self.version += 1
        self.edits_applied += len(batch)
        return EditResult(
            edits=len(batch), block=-1, clusters=len(self.layer.labels), conflicts=self.splits, forgotten=(),
            steps=steps, final_loss=loss, learned=learned, seconds=time.perf_counter() - started,
        )

    def _edit_one(self, record: EditRecord) -> tuple[int, float, float]:
        key = torch.from_numpy(self.keys.keys([record.prompt])[0]).to(self.layer.keys.dtype)
        label = normalise_label(record.target)
        eps_init = self.config.grace.eps_init
        if len(self.layer.keys):
            dist = torch.linalg.vector_norm(self.layer.keys.double() - key.double(), dim=1)
            j = int(dist.argmin())
            d = float(dist[j])
            if d <= eps_init + float(self.layer.eps[j]):
                if self.layer.labels[j] == label:
                    self.layer.eps[j] = max(float(self.layer.eps[j]), d)  # expand to cover the key
                    return 0, 0.0, 1.0
                self.splits += 1
                self.layer.eps[j] = d / 2.0
                return self._add_entry(record, key, label, d / 2.0)
        return self._add_entry(record, key, label, eps_init)

    def _add_entry(self, record: EditRecord, key: torch.Tensor, label: str, eps: float) -> tuple[int, float, float]:
        batch = build_batch(self.backbone, [record], self.config.train.append_eos)
        first_target = int((batch.labels[0] != IGNORE).nonzero().min())
        start = torch.tensor([first_target - 1])  # the last prompt token predicts the first target token
        value = nn.Parameter(torch.zeros(self.layer.out_features, dtype=self.layer.values.dtype))
        self.layer.staging_value = value
        try:
            stats = train_block(
                self.backbone, batch, [value], self.train_config, trained_modules=[self.config.grace.layer or ""],
                active=lambda: self._replace(torch.tensor([STAGING_ENTRY]), start),
            )
        finally:
            self.layer.staging_value = None
        self.layer.keys = torch.cat([self.layer.keys, key[None]])
        self.layer.values = torch.cat([self.layer.values, value.detach()[None]])
        self.layer.eps = torch.cat([self.layer.eps, torch.tensor([eps], dtype=torch.float64)])
        self.layer.labels.append(label)
        return stats.steps, stats.final_loss, stats.learned

    def stats(self) -> dict[str, int]:
        return {
            "edits": self.edits_applied,
            "entries": len(self.layer.labels),
            "splits": self.splits,
            "extra_parameters": self.layer.keys.numel() + self.layer.values.numel() + self.layer.eps.numel(),
        }
