"""The job's stateful actors. Plain classes here; the job wraps them with ray.remote options.

A trainer holds the backbone. For an editor whose batches train independently (its `writer_type`,
e.g. MELO) trainers are stateless: a pool of them trains consecutive batches at once, and the writer
actor, the single writer, holds the editor's whole state and commits batches in stream order. For
any other editor (ELDER, GRACE, sequential LoRA: each batch edits shared state) one trainer holds
all of it and checks that each call continues from the state the driver expects, so a restarted
(blank) actor is noticed instead of silently training on nothing. Everything that crosses between
processes is a typed message.
"""
from __future__ import annotations

import dataclasses
import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from melo_ray.config import load_config
from melo_ray.editors.messages import IndexUpdate, StaleStateError, TrainedBatch
from melo_ray.editors.single_writer import BatchWriter, WriterLayout
from melo_ray.editors.registry import build_editor, editor_class
from melo_ray.records import EditRecord


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass(frozen=True)
class TrainerInfo:
    editor: str
    version: int
    base_checksum: str
    labels: tuple[str, ...] | None  # a classification backbone's labels: the only targets it can learn
    device: str
    pid: int
    peak_rss_bytes: int
    layout: WriterLayout | None = None  # what the writer needs (Editor.writer_layout); None: no writer
    node_id: str = ""  # the Ray node it runs on


class TrainerActor:
    def __init__(self, config: Mapping[str, Any], device: str | None = None, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.config = load_config(dict(config))
        self.editor = build_editor(self.config.editor, self.config, device=device)
        self.editor.detach_index()  # an index, if the editor has one, is the writer's

    def info(self) -> TrainerInfo:
        labels = self.editor.backbone.labels
        pooled = self.editor.writer_type is not None  # batches train independently: a writer commits them
        return TrainerInfo(
            editor=self.editor.name, version=self.editor.version, base_checksum=self.editor.base_checksum,
            labels=tuple(labels) if labels is not None else None,
            device=str(self.editor.backbone.device), pid=os.getpid(), peak_rss_bytes=_peak_rss_bytes(),
            layout=self.editor.writer_layout() if pooled else None, node_id=_node_id(),
        )

    # -- a pooled (stateless) trainer --------------------------------------------------------------
    def train_detached(self, records: list[EditRecord], position: int) -> TrainedBatch:
        """Train the batch at stream `position`; a pure function of its arguments, so Ray may retry
        it on a restarted actor."""
        return self.editor.train_detached(list(records), position)

    # -- the one trainer of an editor with shared state --------------------------------------------
    def reset(self) -> int:
        """Back to the base model: no edits, version 0."""
        self.editor.reset()
        return self.editor.version

    def restore(self, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> int:
        self.editor.restore_files(manifest, files, f"snapshot v{manifest.get('version')}")
        return self.editor.version

    def train(self, records: list[EditRecord], expected_version: int) -> TrainedBatch:
        """Train and commit one batch; returns what the driver needs."""
        if self.editor.version != expected_version:
            raise StaleStateError(f"trainer holds version {self.editor.version}, the job expects {expected_version}")
        return self.editor.apply_batch(list(records))

    def files(self) -> dict[str, bytes]:
        """This actor's part of a snapshot: the editor's trained state and edit log."""
        return self.editor.trainer_files()

    def stats(self) -> dict[str, int]:
        return self.editor.stats()


@dataclass(frozen=True)
class CommitResult:
    """What committing one batch did (typed message: writer -> driver)."""

    trained: TrainedBatch  # as the trainer reported it, without its weights and keys (they stay behind)
    update: IndexUpdate


class WriterActor:
    """The single writer of a pooled editor's state: bank, index and edit log (MELO: MeloWriter).

    It starts beside the trainers, before any of them has said what the bank looks like, so its start-up
    does not wait on theirs; the layout (`Editor.writer_layout`) comes with `reset` / `restore`. A
    restarted writer holds nothing until it is restored, and says so instead of committing."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = load_config(dict(config))
        writer_type = editor_class(self.config.editor).writer_type
        if writer_type is None:
            raise ValueError(f"editor '{self.config.editor}' trains in one process; it has no writer")
        self.writer_type: type[BatchWriter] = writer_type
        self._writer: BatchWriter | None = None

    @property
    def writer(self) -> BatchWriter:
        if self._writer is None:
            raise StaleStateError("the writer holds no state (it restarted); restore it from a snapshot")
        return self._writer

    def reset(self, layout: WriterLayout) -> int:
        self._writer = self.writer_type.create(self.config, layout)
        return 0

    def restore(self, layout: WriterLayout, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> int:
        self._writer = self.writer_type.from_files(self.config, layout, manifest, files,
                                                   f"snapshot v{manifest.get('version')}")
        return self._writer.version

    def commit(self, trained: TrainedBatch) -> CommitResult:
        """Commit one trained batch; batches must arrive in stream order, each once."""
        update = self.writer.commit(trained)
        return CommitResult(dataclasses.replace(trained, weights=None, keys=np.zeros((0, 0), np.float32)), update)

    def files(self) -> dict[str, bytes]:
        return self.writer.files()

    def stats(self) -> dict[str, int]:
        return self.writer.stats()

    def peak_rss_bytes(self) -> int:
        return _peak_rss_bytes()
