"""The job's two stateful actors. Plain classes here; the job wraps them with ray.remote options.

The trainer holds the backbone and the editor's trained state; it trains one batch per call. An
editor whose index can live apart (its `index_type`, e.g. MELO's neuron index) gets an index actor,
the index's single writer; for any other editor the trainer holds all of its state. Both check that
a call continues from the state the driver expects, so a restarted (blank) actor is noticed instead
of silently training on nothing. Everything that crosses between them is a typed message.
"""
from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from melo_ray.config import load_config
from melo_ray.editors.protocol import EditIndex, IndexUpdate, StaleStateError, TrainedBatch
from melo_ray.editors.registry import build_editor, editor_class
from melo_ray.records import EditRecord


@dataclass(frozen=True)
class TrainerInfo:
    editor: str
    version: int
    base_checksum: str
    key_dim: int
    has_index: bool  # the editor's index runs in an index actor
    labels: tuple[str, ...] | None  # a classification backbone's labels: the only targets it can learn
    device: str
    pid: int
    peak_rss_bytes: int


class TrainerActor:
    def __init__(self, config: Mapping[str, Any], device: str | None = None, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.config = load_config(dict(config))
        self.editor = build_editor(self.config.editor, self.config, device=device)
        self.editor.detach_index()  # an index, if the editor has one, is the index actor's

    def info(self) -> TrainerInfo:
        labels = self.editor.backbone.labels
        return TrainerInfo(
            editor=self.editor.name, version=self.editor.version, base_checksum=self.editor.base_checksum,
            key_dim=self.editor.key_dim(), has_index=self.editor.index_type is not None,
            labels=tuple(labels) if labels is not None else None, device=str(self.editor.backbone.device),
            pid=os.getpid(), peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB
        )

    def reset(self) -> int:
        """Back to the base model: no edits, version 0."""
        self.editor.reset()
        return self.editor.version

    def restore(self, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> int:
        self.editor.restore_files(manifest, files, f"snapshot v{manifest.get('version')}")
        return self.editor.version

    def train(self, records: list[EditRecord], expected_version: int) -> TrainedBatch:
        """Train and commit one batch; returns what the index (and the driver) needs."""
        if self.editor.version != expected_version:
            raise StaleStateError(f"trainer holds version {self.editor.version}, the job expects {expected_version}")
        return self.editor.apply_batch(list(records))

    def files(self) -> dict[str, bytes]:
        """This actor's part of a snapshot: the editor's trained state and edit log (not the index)."""
        return self.editor.trainer_files()

    def stats(self) -> dict[str, int]:
        return self.editor.stats()


class IndexActor:
    """The single writer of an editor's index (MELO: the neuron index over prompt keys)."""

    def __init__(self, config: Mapping[str, Any], dim: int) -> None:
        self.config = load_config(dict(config))
        index_type = editor_class(self.config.editor).index_type
        if index_type is None:
            raise ValueError(f"editor '{self.config.editor}' has no separate index")
        self.index_type: type[EditIndex] = index_type
        self.dim = dim
        self.reset()

    def reset(self) -> int:
        self.index = self.index_type.create(self.config, self.dim)
        return 0

    def restore(self, files: Mapping[str, bytes], where: str) -> None:
        self.index = self.index_type.from_files(self.config, self.dim, files, where)

    def add_batch(self, trained: TrainedBatch) -> IndexUpdate:
        """Index one trained batch; batches must arrive in stream order, each once."""
        return self.index.add(trained)

    def files(self) -> dict[str, bytes]:
        return self.index.files()

    def stats(self) -> dict[str, int]:
        return self.index.stats()

    def search(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.asarray(keys, dtype=np.float32))
