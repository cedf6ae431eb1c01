"""The one protocol every editor follows (`Editor`), so the eval harness, the bulk-edit job, the server
and the CLI treat MELO, ELDER, GRACE, sequential LoRA (and any editor a user adds) alike.

Beside it, one concept a module: `routing.py` (what routing decides), `messages.py` (what crosses
processes: TrainedBatch, IndexUpdate), `edit_log.py` (the applied edits), `single_writer.py` (the
index and batch-writer interfaces a separate process can own), `loading.py` (editors from snapshots).

An editor
- trains a batch of edits (`train_batch`), returning a typed `TrainedBatch`;
- may keep an index that a separate process can own (`index_type`): the job runs it in the index
  actor, the single writer; `edit()` = train + index in one process;
- decides, per prompt, which edit applies (`route` returns a `Routing`) and switches that on for one
  forward pass (`routed(routing)`): the routing object carries everything the pass needs, so there is
  no hidden order between the two calls;
- owns its snapshots: a subclass lists its state files and restores them; save, publish, load and
  the checks on load are written once, here.
"""
from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from melo_ray.backbones import Backbone, load_backbone
from melo_ray.config import EditorConfig, load_config
from melo_ray.editors.edit_log import EditEntry, edit_log_files, log_batch, read_edit_log
from melo_ray.editors.layers import weights_checksum
from melo_ray.editors.messages import IndexUpdate, TrainedBatch
from melo_ray.editors.routing import Routing
from melo_ray.editors.single_writer import BatchWriter, EditIndex, WriterLayout
from melo_ray.inference import (generate_texts, next_token_logits, target_token_argmax, target_token_hits,
                                target_token_nlls)
from melo_ray.records import EditRecord, RecordError, parse_records
from melo_ray.snapshots import SnapshotError, SnapshotMeta, check_editor, write_snapshot
from melo_ray.training import EditBatch, build_batch, length_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    prompt: str
    output: str
    block: int | None  # the block / entry used, None for the base model
    distance: float | None  # distance to the nearest cluster centre, None when not known
    edit_id: str | None = None  # the edit that fired, where the editor can tell


class RevertError(KeyError):
    """A revert names edits the editor does not hold (nothing is changed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "revert failed"


@dataclass(frozen=True)
class EditResult:
    edits: int
    block: int | None
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
    """A backbone plus one editing method's state. Subclasses implement the abstract methods."""

    name: ClassVar[str]
    index_type: ClassVar[type[EditIndex] | None] = None  # set when the index can live in another process
    writer_type: ClassVar[type[BatchWriter] | None] = None  # set when batches train independently (a trainer pool)

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        self.config = config
        self.backbone = backbone or load_backbone(config.backbone)
        if device is not None:
            self.backbone.model.to(device)
        self.base_checksum = weights_checksum(self.backbone.model)
        self.version = 0
        self.edits_applied = 0
        self.index: EditIndex | None = None
        self.edit_log: dict[str, EditEntry] = {}  # every applied edit by id, oldest first

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any] | EditorConfig) -> "Editor":
        return cls(load_config(source))  # type: ignore[arg-type]

    # -- what a method implements ----------------------------------------------------------------
    @abstractmethod
    def train_batch(self, records: list[EditRecord]) -> TrainedBatch:
        """Train and commit one batch (all or nothing); the index, if any, is not touched."""

    @abstractmethod
    def route(self, prompts: list[str]) -> Routing:
        """Which edit applies to each prompt (the index decides where there is one)."""

    @abstractmethod
    def routed(self, routing: Routing, batch: EditBatch | None = None) -> AbstractContextManager:
        """Context in which the model's forward applies `routing` row by row.

        `batch` is given for teacher-forced passes (prompt + target), so an editor that acts on
        positions (GRACE) knows where each prompt ends."""

    @abstractmethod
    def state_files(self) -> dict[str, bytes]:
        """The snapshot files of this editor's trained state (not its index)."""

    @abstractmethod
    def restore_state(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        """Check verified snapshot files against this editor and return the swap that installs them.

        Every check happens before the swap is returned, so a bad snapshot changes nothing."""

    @abstractmethod
    def reset_state(self) -> None:
        """Back to no edits (the index is reset by the caller)."""

    def stats(self) -> dict[str, int]:
        """Counters for summaries and results: edits, extra_parameters, and method-specific ones."""
        index = self.index.stats() if self.index is not None else {}
        return {"edits": self.edits_applied, **self.state_stats(), **index}

    def state_stats(self) -> dict[str, int]:
        return {}

    def revert_state(self, ids: set[str]) -> Callable[[], None]:
        """Check that these edits can be taken out and return the change that does it (no change
        before it is called). Editors that cannot take single edits out say so."""
        raise NotImplementedError(f"the '{self.name}' editor cannot revert single edits")

    def explain(self, prompt: str) -> dict[str, Any]:
        """Which edit would fire for `prompt`, the distance behind the decision, and the decision."""
        routing = self.routing([prompt])
        block, distance, edit_id = routing.row(0)
        fires = block is not None
        scope = routing.decisions[0]
        return {
            "prompt": prompt, "fires": fires, "block": block, "edit_id": edit_id, "distance": distance,
            "decision": "routed to an edit" if fires else "outside every edit's scope: the base model answers",
            "scope": scope.to_json() if scope is not None else None,
        }

    # -- editing, written once -------------------------------------------------------------------
    def key_dim(self) -> int:
        """Dimension of the keys train_batch hands to the index (0: no separate index)."""
        return 0

    def key_dim_for(self, files: Mapping[str, bytes], where: str) -> int:
        """Dimension of the keys a snapshot's index holds, which restore_state makes this editor's."""
        return self.key_dim()

    def apply_batch(self, records: list[EditRecord]) -> TrainedBatch:
        """train_batch, and the applied edits entered in the edit log (what the job's trainer calls)."""
        trained = self.train_batch(records)
        if not trained.ids:  # an editor that does not say which records it kept applied them all
            trained = dataclasses.replace(trained, ids=tuple(r.id for r in records))
        log_batch(self.edit_log, trained, records)
        return trained

    def train_detached(self, records: list[EditRecord], position: int) -> TrainedBatch:
        """Train the batch at stream `position` without changing this editor (weights in the result),
        for the job's trainer pool; only editors with a `writer_type` can."""
        raise NotImplementedError(f"the '{self.name}' editor's batches edit shared state; it trains in one process")

    def writer_layout(self) -> WriterLayout | None:
        """What this editor's BatchWriter needs to know without a model (None: it has no writer)."""
        return None

    def revert(self, ids: Iterable[str]) -> list[str]:
        """Take these edits out (every other edit and unrelated prompt answers as before); the version
        moves on. An id the editor does not hold is an error that names it, and nothing changes."""
        wanted = list(dict.fromkeys(ids))
        missing = [i for i in wanted if i not in self.edit_log]
        if missing:
            raise RevertError(f"no edit with id {missing[:10]} in this {self.name} editor (version {self.version})")
        change = self.revert_state(set(wanted))
        change()
        for edit_id in wanted:
            del self.edit_log[edit_id]
        self.version += 1
        self.edits_applied -= len(wanted)
        return wanted

    def edit(self, records: Iterable[EditRecord | Mapping[str, Any]]) -> EditResult:
        """Apply one batch of edits, whole or not at all (training, then the index)."""
        batch = as_records(records)
        if not batch:
            raise ValueError("edit batch is empty")
        for row, record in enumerate(batch):
            if problem := length_error(record, self.config.train.max_text_chars):
                raise RecordError("edit batch", row, *problem)
        trained = self.apply_batch(batch)
        update = self.index.add(trained) if self.index is not None else (trained.update or IndexUpdate())
        return EditResult(
            edits=trained.edits, block=trained.block, clusters=update.clusters, conflicts=update.conflicts,
            forgotten=update.forgotten, steps=trained.steps, final_loss=trained.final_loss,
            learned=trained.learned, seconds=trained.seconds,
        )

    def reset(self) -> None:
        """Back to the base model: no edits, version 0, an empty index."""
        self.reset_state()
        if self.index_type is not None and self.index is not None:
            self.index = self.index_type.create(self.config, self.key_dim())
        self.version = 0
        self.edits_applied = 0
        self.edit_log = {}

    def detach_index(self) -> None:
        """Drop the in-process index: another process (the job's writer actor) owns it."""
        self.index = None

    # -- inference, written once -----------------------------------------------------------------
    def routing(self, prompts: list[str], *, base: bool = False) -> Routing:
        if base or not prompts:
            return Routing.base(len(prompts))
        return self.route(prompts)

    def generate(self, prompts: list[str], max_new_tokens: int | None = None, *, base: bool = False) -> list[Generation]:
        """Greedy outputs; each prompt gets the edit its route selects (base=True: none)."""
        max_new = max_new_tokens or self.config.generate.max_new_tokens
        step = self.config.generate.batch_size
        results: list[Generation] = []
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            routing = self.routing(chunk, base=base)
            with self.routed(routing):
                outputs = generate_texts(self.backbone, chunk, max_new)
            results += [Generation(p, o, *routing.row(i)) for i, (p, o) in enumerate(zip(chunk, outputs))]
        return results

    def next_token_logits(self, prompts: list[str], *, base: bool = False) -> torch.Tensor:
        """Logits after each prompt's last real token, routed as generate() would route them."""
        with self.routed(self.routing(prompts, base=base)):
            return next_token_logits(self.backbone, prompts)

    def target_token_hits(self, records: list[EditRecord], *, base: bool = False) -> list[list[bool]]:
        """Teacher-forced: whether each target token is the argmax, each record routed by its prompt."""
        return self._teacher_forced(records, base, target_token_hits)

    def target_token_argmax(self, records: list[EditRecord], *, base: bool = False) -> list[list[int]]:
        """Teacher-forced: the argmax token at each target position (locality compares them with the base's)."""
        return self._teacher_forced(records, base, target_token_argmax)

    def target_token_nlls(self, records: list[EditRecord], *, base: bool = False) -> list[list[float]]:
        """Teacher-forced negative log-likelihood of each target token (for perplexity)."""
        return self._teacher_forced(records, base, target_token_nlls)

    def _teacher_forced(self, records: list[EditRecord], base: bool, score: Callable[[Backbone, EditBatch], list]) -> list:
        rows: list = []
        step = self.config.generate.batch_size  # bounded memory: logits are (rows x tokens x vocab)
        for start in range(0, len(records), step):
            chunk = records[start : start + step]
            batch = build_batch(self.backbone, chunk, append_eos=False)
            with self.routed(self.routing([r.prompt for r in chunk], base=base), batch):
                rows += score(self.backbone, batch)
        return rows

    # -- snapshots, written once -----------------------------------------------------------------
    def log_files(self) -> dict[str, bytes]:
        return edit_log_files(self.edit_log.values())

    def trainer_files(self) -> dict[str, bytes]:
        """What the trainer process holds: trained state and the edit log (not the index)."""
        return {**self.state_files(), **self.log_files()}

    def snapshot_files(self) -> dict[str, bytes]:
        index = self.index.files() if self.index is not None else {}
        return {**self.trainer_files(), **index}

    def snapshot_meta(self, stats: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        return SnapshotMeta(self.name, self.version, self.config.model_dump(mode="json"), self.base_checksum,
                            stats if stats is not None else self.stats(), extra).as_json()

    def save(self, folder: str | Path, **extra: Any) -> dict[str, Any]:
        """Write a verified snapshot atomically to `folder`; `extra` (JSON) goes into the manifest."""
        return write_snapshot(folder, self.snapshot_files(), self.snapshot_meta(**extra))

    def publish(self, store: Any, **extra: Any) -> dict[str, Any]:
        """Publish this editor's state as version `self.version` of a SnapshotStore."""
        return store.publish(self.version, self.snapshot_files(), self.snapshot_meta(**extra))

    @classmethod
    def from_files(cls, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str = "snapshot",
                   backbone: Backbone | None = None) -> "Editor":
        check_editor(manifest.get("editor"), cls.name, where)
        try:
            config = load_config(manifest["config"])
        except (KeyError, ValueError) as exc:
            raise SnapshotError(f"{where}: manifest config is unusable: {exc}") from exc
        editor = cls(config, backbone)
        editor.restore_files(manifest, files, where)
        return editor

    def restore_files(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str = "snapshot") -> None:
        """Replace this editor's state (and index, unless detached) with a verified snapshot's.

        All checks run before any change: a snapshot that does not fit leaves the editor as it was."""
        check_editor(manifest.get("editor"), self.name, where)
        if manifest.get("base_checksum") != self.base_checksum:
            raise SnapshotError(f"{where}: snapshot was made on other base weights (checksum differs)")
        try:
            version, edits = int(manifest["version"]), int(manifest["stats"]["edits"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{where}: manifest lacks its version or edit count ({exc})") from exc
        log = read_edit_log(files, where)
        swap = self.restore_state(manifest, files, where)
        index = None
        if self.index is not None and self.index_type is not None:
            index = self.index_type.from_files(self.config, self.key_dim_for(files, where), files, where)
        swap()
        if index is not None:
            self.index = index
        self.version, self.edits_applied = version, edits
        self.edit_log = log
