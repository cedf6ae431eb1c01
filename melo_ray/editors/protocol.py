"""The one protocol every editor follows, so the eval harness, the bulk-edit job, the server and the
CLI treat MELO, ELDER, GRACE, sequential LoRA (and any editor a user adds) alike.

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
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from melo_ray.backbones import Backbone, load_backbone, weights_checksum
from melo_ray.config import EditorConfig, load_config
from melo_ray.inference import (generate_texts, next_token_logits, target_token_argmax, target_token_hits,
                                target_token_nlls)
from melo_ray.records import EditRecord, RecordError, parse_records
from melo_ray.snapshots import SnapshotError, write_snapshot
from melo_ray.training import EditBatch, build_batch, length_error

log = logging.getLogger(__name__)


class StaleStateError(RuntimeError):
    """State is not the one the caller expects (a restarted actor, a repeated or reordered call)."""


@dataclass(frozen=True)
class Routing:
    """Per prompt of one batch: the edit that applies (-1: none, the exact base model), the distance
    behind that decision (nan: not known), and what the editor's routed pass needs (e.g. ELDER's
    query keys); `payload` is None when every row runs on the base model."""

    ids: np.ndarray
    distances: np.ndarray
    payload: Any = None
    edit_ids: tuple[str | None, ...] | None = None  # the edit behind each routed row, where the editor can tell

    @classmethod
    def base(cls, rows: int) -> "Routing":
        return cls(np.full(rows, -1, np.int64), np.full(rows, np.nan))

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: list[int] | np.ndarray) -> "Routing":
        """The routing of some rows, in the given order (a payload is row-aligned, like ids)."""
        rows = np.asarray(rows, dtype=np.int64)
        payload = None if self.payload is None else np.asarray(self.payload)[rows]
        edit_ids = None if self.edit_ids is None else tuple(self.edit_ids[i] for i in rows)
        return Routing(self.ids[rows], self.distances[rows], payload, edit_ids)

    @classmethod
    def concat(cls, parts: list["Routing"]) -> "Routing":
        """Rows of several routings as one batch (rows without a payload get zeros where others have one)."""
        if not parts:
            return cls.base(0)
        with_payload = [p.payload for p in parts if p.payload is not None]
        payload = None
        if with_payload:
            width = np.asarray(with_payload[0]).shape[1:]
            payload = np.concatenate([np.asarray(p.payload) if p.payload is not None
                                      else np.zeros((len(p), *width), np.float32) for p in parts])
        edit_ids = None
        if any(p.edit_ids is not None for p in parts):
            edit_ids = tuple(i for p in parts for i in (p.edit_ids if p.edit_ids is not None else (None,) * len(p)))
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.distances for p in parts]), payload,
                   edit_ids)


@dataclass(frozen=True)
class Generation:
    prompt: str
    output: str
    block: int | None  # the block / entry used, None for the base model
    distance: float | None  # distance to the nearest cluster centre, None when not known


@dataclass(frozen=True)
class IndexUpdate:
    """What indexing one trained batch did (typed message: writer actor -> driver)."""

    clusters: int = 0
    members: int = 0
    conflicts: int = 0
    forgotten: tuple[str, ...] = ()  # ids of edits this batch pushed out of their clusters
    forgotten_total: int = 0


@dataclass(frozen=True)
class TrainedBatch:
    """One trained batch (typed message: trainer actor -> writer actor and driver).

    From `train_batch` it is committed in the editor (`block` set, no `weights`); from
    `train_detached` it carries the block's `weights` for a writer to commit (`block` None). For an
    editor with an index, `keys`/`targets`/`ids`/`prompts` are what the index and edit log add; an
    editor without one has already applied everything and reports its counters in `update`."""

    version: int
    edits: int
    steps: int
    final_loss: float
    learned: float
    seconds: float
    block: int | None = None
    ids: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    update: IndexUpdate | None = None
    prompts: tuple[str, ...] = ()  # the edits' prompts (for the writer's edit log)
    weights: Mapping[str, torch.Tensor] | None = None  # detached trained block(s), for the writer to commit
    # Each edit's block counted from `block`, when the batch trained a block per edit; empty: all use `block`.
    member_blocks: tuple[int, ...] = ()
    # More keys for the same edits (their `train_rephrases`): row i belongs to the edit at position
    # `extra_key_edits[i]` of `ids`, and routes to that edit's block.
    extra_keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    extra_key_edits: tuple[int, ...] = ()

    @property
    def block_count(self) -> int:
        """Blocks this batch adds to a bank."""
        return max(self.member_blocks) + 1 if self.member_blocks else 1

    def edit_blocks(self) -> tuple[int | None, ...]:
        """Each edit's block (None where the batch has no block)."""
        if self.block is None:
            return (None,) * len(self.ids)
        return tuple(self.block + offset for offset in (self.member_blocks or (0,) * len(self.ids)))


@dataclass(frozen=True)
class EditEntry:
    """One applied edit, as `melo-ray edits list` shows it."""

    id: str
    prompt: str
    target: str
    version: int  # the snapshot version that added it
    block: int | None = None  # MELO: its LoRA block


class RevertError(KeyError):
    """A revert names edits the editor does not hold (nothing is changed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "revert failed"


EDIT_LOG = "edits.json"


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
    def search(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per key: the edit that applies (-1: none) and the distance behind it."""

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
    def create(cls, config: EditorConfig, layout: Mapping[str, Any]) -> "BatchWriter":
        """The state of an editor with no edits."""

    @classmethod
    @abstractmethod
    def from_files(cls, config: EditorConfig, layout: Mapping[str, Any], manifest: Mapping[str, Any],
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


def edit_log_files(entries: Iterable[EditEntry]) -> dict[str, bytes]:
    """The snapshot file of an edit log (oldest first)."""
    return {EDIT_LOG: json.dumps({"edits": [vars(e) for e in entries]}, sort_keys=True, ensure_ascii=False).encode()}


def log_batch(edit_log: dict[str, EditEntry], trained: TrainedBatch, records: Iterable[EditRecord] | None = None) -> None:
    """Enter a committed batch's edits in an edit log (an id edited again moves to the end)."""
    blocks = dict(zip(trained.ids, trained.edit_blocks(), strict=True))
    rows = ([(r.id, r.prompt, r.target) for r in records if r.id in blocks] if records is not None
            else list(zip(trained.ids, trained.prompts, trained.targets, strict=True)))
    for edit_id, prompt, target in rows:
        edit_log.pop(edit_id, None)
        edit_log[edit_id] = EditEntry(edit_id, prompt, target, trained.version, blocks[edit_id])


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
        block, distance = int(routing.ids[0]), float(routing.distances[0])
        fires = block >= 0
        return {
            "prompt": prompt, "fires": fires, "block": block if fires else None,
            "edit_id": self.edit_behind(prompt, routing) if fires else None,
            "distance": distance if np.isfinite(distance) else None,
            "decision": "routed to an edit" if fires else "outside every edit's scope: the base model answers",
        }

    def edit_behind(self, prompt: str, routing: Routing) -> str | None:
        """The id of the edit that makes `routing` fire for this one prompt (None: not known)."""
        return None

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

    def writer_layout(self) -> dict[str, Any]:
        """What this editor's BatchWriter needs to know without a model (shapes, key size)."""
        return {}

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
            results += [
                Generation(p, o, int(i) if i >= 0 else None, float(d) if np.isfinite(d) else None)
                for p, o, i, d in zip(chunk, outputs, routing.ids, routing.distances)
            ]
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
        return {
            "editor": self.name,
            "version": self.version,
            "config": self.config.model_dump(mode="json"),
            "base_checksum": self.base_checksum,
            "stats": dict(stats if stats is not None else self.stats()),
            **extra,
        }

    def save(self, folder: str | Path, **extra: Any) -> dict[str, Any]:
        """Write a verified snapshot atomically to `folder`; `extra` (JSON) goes into the manifest."""
        return write_snapshot(folder, self.snapshot_files(), self.snapshot_meta(**extra))

    def publish(self, store: Any, **extra: Any) -> dict[str, Any]:
        """Publish this editor's state as version `self.version` of a SnapshotStore."""
        return store.publish(self.version, self.snapshot_files(), self.snapshot_meta(**extra))

    @classmethod
    def load(cls, source: str | Path, backbone: Backbone | None = None) -> "Editor":
        """Rebuild an editor from a snapshot folder, or a store root (its latest version), local or URI.

        The backbone must hash to the snapshot's base checksum."""
        from melo_ray.store import read_any_snapshot

        manifest, files, where = read_any_snapshot(source)
        return cls.from_files(manifest, files, where, backbone)

    @classmethod
    def from_files(cls, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str = "snapshot",
                   backbone: Backbone | None = None) -> "Editor":
        if manifest.get("editor") != cls.name:
            raise SnapshotError(f"{where}: snapshot is for editor '{manifest.get('editor')}', not '{cls.name}'")
        try:
            config = load_config(manifest["config"])
        except (KeyError, ValueError) as exc:
            raise SnapshotError(f"{where}: manifest config is unusable: {exc}") from exc
        editor = cls(config, backbone)
        editor.restore_files(manifest, files, where)
        return editor

    def restore(self, source: str | Path) -> None:
        """Replace this editor's state with a snapshot folder's or a store's latest (same backbone)."""
        from melo_ray.store import read_any_snapshot

        manifest, files, where = read_any_snapshot(source)
        self.restore_files(manifest, files, where)

    def restore_files(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str = "snapshot") -> None:
        """Replace this editor's state (and index, unless detached) with a verified snapshot's.

        All checks run before any change: a snapshot that does not fit leaves the editor as it was."""
        if manifest.get("editor") != self.name:
            raise SnapshotError(f"{where}: snapshot is for editor '{manifest.get('editor')}', not '{self.name}'")
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


def read_edit_log(files: Mapping[str, bytes], where: str) -> dict[str, EditEntry]:
    """The edit log of a snapshot (empty for snapshots written before it existed)."""
    if EDIT_LOG not in files:
        return {}
    try:
        entries = [EditEntry(**e) for e in json.loads(files[EDIT_LOG])["edits"]]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SnapshotError(f"{where}: {EDIT_LOG} is malformed ({exc})") from exc
    return {e.id: e for e in entries}
