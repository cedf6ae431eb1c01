"""What every editor (MELO, and the baselines) offers, so harness, pipeline and server treat them alike.

An editor decides, per prompt, which of its edits applies (`route`) and how to switch that on for
one forward pass (`routed`); generation and teacher-forced scoring are written once, here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from melo_ray.backbones import Backbone
from melo_ray.config import EditorConfig
from melo_ray.inference import generate_texts, target_token_hits, target_token_nlls
from melo_ray.records import EditRecord, parse_records
from melo_ray.training import EditBatch, build_batch


@dataclass(frozen=True)
class Generation:
    prompt: str
    output: str
    block: int | None  # the block / entry used, None for the base model
    distance: float | None  # distance to the nearest cluster centre, None when not known


@dataclass(frozen=True)
class EditResult:
    edits: int
    block: int
    clusters: int
    conflicts: int
    forgotten: tuple[str, ...]
    steps: int
    final_loss: float
    learned: float
    seconds: float


def as_records(records: Iterable[EditRecord | Mapping[str, Any]]) -> list[EditRecord]:
    """Accept EditRecords or raw mappings; raw ones are validated (errors name row and field)."""
    items = list(records)
    return [
        r if isinstance(r, EditRecord) else parse_records([r], "edit batch", start=i)[0]
        for i, r in enumerate(items)
    ]


class Editor(ABC):
    name: str
    config: EditorConfig
    backbone: Backbone
    version: int

    @abstractmethod
    def edit(self, records: Iterable[EditRecord | Mapping[str, Any]]) -> EditResult:
        """Apply one batch of edits, whole or not at all."""

    @abstractmethod
    def route(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per prompt: the edit id that applies (-1: none) and the distance behind it (nan if none)."""

    @abstractmethod
    def routed(self, ids: np.ndarray, batch: EditBatch | None = None) -> AbstractContextManager:
        """Context in which the model's forward applies edit `ids[row]` to each row.

        `batch` is given for teacher-forced passes (prompt + target), so an editor that acts on
        positions (GRACE) knows where each prompt ends."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters for summaries and results: edits, extra_parameters, and editor-specific ones."""

    def _ids(self, prompts: list[str], base: bool) -> tuple[np.ndarray, np.ndarray]:
        if base or not prompts:
            return np.full(len(prompts), -1, np.int64), np.full(len(prompts), np.nan)
        return self.route(prompts)

    def generate(self, prompts: list[str], max_new_tokens: int | None = None, *, base: bool = False) -> list[Generation]:
        """Greedy outputs; each prompt gets the edit its route selects (base=True: none)."""
        max_new = max_new_tokens or self.config.generate.max_new_tokens
        step = self.config.generate.batch_size
        results: list[Generation] = []
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            ids, dists = self._ids(chunk, base)
            with self.routed(ids):
                outputs = generate_texts(self.backbone, chunk, max_new)
            results += [
                Generation(p, o, int(i) if i >= 0 else None, float(d) if np.isfinite(d) else None)
                for p, o, i, d in zip(chunk, outputs, ids, dists)
            ]
        return results

    def target_token_hits(self, records: list[EditRecord], *, base: bool = False) -> list[list[bool]]:
        """Teacher-forced: whether each target token is the argmax, each record routed by its prompt."""
        return self._teacher_forced(records, base, target_token_hits)

    def target_token_nlls(self, records: list[EditRecord], *, base: bool = False) -> list[list[float]]:
        """Teacher-forced negative log-likelihood of each target token (for perplexity)."""
        return self._teacher_forced(records, base, target_token_nlls)

    def _teacher_forced(self, records: list[EditRecord], base: bool, score: Callable[[Backbone, EditBatch], list]) -> list:
        rows: list = []
        step = self.config.generate.batch_size  # bounded memory: logits are (rows x tokens x vocab)
        for start in range(0, len(records), step):
            chunk = records[start : start + step]
            batch = build_batch(self.backbone, chunk, append_eos=False)
            with self.routed(self._ids([r.prompt for r in chunk], base)[0], batch):
                rows += score(self.backbone, batch)
        return rows
