"""The parts of an editor that one process can own as their single writer, without a model: its index
(`EditIndex`: keys in, routing decisions out) and, for an editor whose batches train independently,
its whole state (`BatchWriter`), built from the shapes in a `WriterLayout`."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from melo_ray.config import EditorConfig
from melo_ray.editors.messages import IndexUpdate, TrainedBatch
from melo_ray.editors.routing import SearchResult


@dataclass(frozen=True)
class LayerShape:
    """One edited linear layer: (in_features, out_features)."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class WriterLayout:
    """What a BatchWriter needs to know without a model (`Editor.writer_layout`): the shape of every
    edited layer, by module name, and the size of the keys its index holds."""

    key_dim: int
    layers: Mapping[str, LayerShape] = field(default_factory=dict)


class EditIndex(ABC):
    """An editor's index, kept apart from its trained weights so one process (the job's index
    actor) can be its single writer. It holds no model: keys in, routing decisions out."""

    @classmethod
    @abstractmethod
    def create(cls, config: EditorConfig, dim: int) -> "EditIndex":
        """An empty index for keys of `dim` dimensions."""

    @classmethod
    @abstractmethod
    def from_files(cls, config: EditorConfig, dim: int, files: Mapping[str, bytes], where: str) -> "EditIndex":
        """Restore from verified snapshot files (raises SnapshotError if they do not fit)."""

    @abstractmethod
    def add(self, trained: TrainedBatch) -> IndexUpdate:
        """Index one trained batch; batches must arrive in stream order, each once."""

    @abstractmethod
    def search(self, keys: np.ndarray) -> SearchResult:
        """Per key: the block that applies (-1: none), the distance behind it and the edit it serves."""

    @abstractmethod
    def files(self) -> dict[str, bytes]:
        """This index's part of a snapshot."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters for summaries (clusters, members, ...)."""


class BatchWriter(ABC):
    """The single writer of an editor whose batches train independently (MELO: each batch trains a
    fresh block). Trainers, as many as the job runs, train batches at once (`Editor.train_detached`);
    the writer commits them in stream order into the editor's whole state (trained weights, index,
    edit log) and writes its snapshot files. It holds no model; `layout` (`Editor.writer_layout`)
    tells it the shapes it needs."""

    version: int

    @classmethod
    @abstractmethod
    def create(cls, config: EditorConfig, layout: WriterLayout) -> "BatchWriter":
        """The state of an editor with no edits."""

    @classmethod
    @abstractmethod
    def from_files(cls, config: EditorConfig, layout: WriterLayout, manifest: Mapping[str, Any],
                   files: Mapping[str, bytes], where: str) -> "BatchWriter":
        """Restore from a verified snapshot (raises SnapshotError if it does not fit)."""

    @abstractmethod
    def commit(self, trained: TrainedBatch) -> IndexUpdate:
        """Commit the next batch of the stream (whole, or nothing on error)."""

    @abstractmethod
    def files(self) -> dict[str, bytes]:
        """The snapshot files of everything committed so far."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """The same counters the editor's own `stats()` reports."""
