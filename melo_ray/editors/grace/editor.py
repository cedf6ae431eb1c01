"""GRACE baseline (Hartvigsen et al.): a codebook of (key, value, epsilon) at one layer.

The key is the layer's input at the last prompt token. An input whose key lies within an entry's
epsilon gets that layer's output replaced by the entry's value, from the last prompt token on
(and at every generated token); every other input passes unchanged. Edits go one at a time:
far from every entry -> new entry (value trained so the target follows); same label within range
-> epsilon grows to cover the key; another label within range -> both radii split to d/2.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import safetensors.torch
import torch
from torch import nn

from melo_ray.backbones import Backbone
from melo_ray.config import EditorConfig, TrainConfig
from melo_ray.editors.grace.config import GraceConfig
from melo_ray.editors.grace.layer import STAGING_ENTRY, GraceLayer
from melo_ray.editors.layers import get_parent
from melo_ray.editors.melo.scope.keys import HiddenStateKeys, prompt_and_paraphrase_keys
from melo_ray.editors.messages import IndexUpdate, TrainedBatch
from melo_ray.editors.protocol import Editor
from melo_ray.editors.routing import Routing
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError
from melo_ray.text import normalise_label
from melo_ray.training import IGNORE, EditBatch, build_batch, train_block


class GraceEditor(Editor):
    name = "grace"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        grace: GraceConfig = config.section("grace")
        if not grace.layer:
            raise ValueError("grace.layer: the GRACE editor needs the module whose output it replaces")
        super().__init__(config, backbone, device)
        self.grace = grace
        if self.backbone.task != "causal_lm":
            raise ValueError("the GRACE baseline is implemented for causal language models only")
        parent, child = get_parent(self.backbone.model, grace.layer)
        self.layer = GraceLayer(getattr(parent, child))
        setattr(parent, child, self.layer)
        self.keys = HiddenStateKeys(self.backbone, grace.layer, "last", capture="input")
        self.train_config = TrainConfig(**{**config.train.model_dump(), "num_iter": grace.num_iter, "lr": grace.lr})
        self.splits = 0
        self.entry_edits: list[list[str]] = []  # per codebook entry: the ids of the edits it holds

    @contextmanager
    def _replace(self, entry_ids: torch.Tensor, replace_from: torch.Tensor | None = None) -> Iterator[None]:
        self.layer.entry_ids, self.layer.replace_from = entry_ids, replace_from
        try:
            yield
        finally:
            self.layer.entry_ids, self.layer.replace_from = None, None

    def routed(self, routing: Routing, batch: EditBatch | None = None) -> AbstractContextManager:
        starts = None
        if batch is not None:  # teacher-forced: replace from each prompt's last token on
            starts = torch.tensor([int((row != IGNORE).nonzero().min()) - 1 for row in batch.labels])
        return self._replace(torch.as_tensor(routing.ids, dtype=torch.long), starts)

    def route(self, prompts: list[str]) -> Routing:
        """Entry per prompt (-1: none) by the nearest key within its epsilon, and that distance."""
        if not len(self.layer.keys):
            return Routing.base(len(prompts))
        keys = torch.from_numpy(self.keys.keys(prompts)).to(self.layer.keys.dtype)
        dist = torch.cdist(keys.double(), self.layer.keys.double())
        nearest = dist.argmin(1)
        nearest_d = dist[torch.arange(len(prompts)), nearest]
        inside = nearest_d <= self.layer.eps[nearest]
        entries = torch.where(inside, nearest, -1).numpy()
        # an entry several edits share (same label, merged) answers for the latest of them
        edit_ids = tuple(self.entry_edits[e][-1] if e >= 0 else None for e in entries.tolist())
        return Routing(entries, nearest_d.numpy(), edit_ids)

    def train_batch(self, records: list[EditRecord]) -> TrainedBatch:
        """GRACE edits one record at a time; the batch only groups them. All or nothing: a failure
        puts the codebook back as it was before the batch."""
        batch = records
        saved = (self.layer.keys, self.layer.values, self.layer.eps.clone(), list(self.layer.labels), self.splits,
                 [list(e) for e in self.entry_edits])
        started = time.perf_counter()
        steps, loss, learned = 0, float("nan"), 1.0
        try:
            for record in batch:
                s, loss, learned = self._edit_one(record)
                steps += s
        except BaseException:
            (self.layer.keys, self.layer.values, self.layer.eps, self.layer.labels, self.splits,
             self.entry_edits) = saved
            raise
        self.version += 1
        self.edits_applied += len(batch)
        return TrainedBatch(
            version=self.version, edits=len(batch), steps=steps, final_loss=loss, learned=learned,
            seconds=time.perf_counter() - started,
            update=IndexUpdate(clusters=len(self.layer.labels), members=len(self.layer.labels), conflicts=self.splits),
        )

    def _edit_one(self, record: EditRecord) -> tuple[int, float, float]:
        # keys are read at the layer's input, which the codebook does not change: one pass for all wordings
        prompt_key, paraphrase_keys, _ = prompt_and_paraphrase_keys(self.keys, [record], self.config.train.train_rephrases)
        key = torch.from_numpy(prompt_key[0]).to(self.layer.keys.dtype)
        label = normalise_label(record.target)
        entry, eps = self._place(key, label, record.id)
        steps, loss, learned = 0, 0.0, 1.0
        if entry is None:
            steps, loss, learned, value = self._train_value(record)
            entry = self._append_entry(key, value, eps, label, record.id)
        # more keys of the edit's value, placed by the same rules; nothing more is trained
        for paraphrase_key in torch.from_numpy(paraphrase_keys).to(self.layer.keys.dtype):
            joined, eps = self._place(paraphrase_key, label, record.id)
            if joined is None:
                self._append_entry(paraphrase_key, self.layer.values[entry].clone(), eps, label, record.id)
        return steps, loss, learned

    def _place(self, key: torch.Tensor, label: str, edit_id: str) -> tuple[int | None, float]:
        """GRACE's codebook rule for a new key: (the entry of the same label it expanded to cover it,
        its radius), or (None, the radius its own new entry gets) after splitting an entry of another
        label within reach."""
        eps_init = self.grace.eps_init
        if not len(self.layer.keys):
            return None, eps_init
        dist = torch.linalg.vector_norm(self.layer.keys.double() - key.double(), dim=1)
        j = int(dist.argmin())
        d = float(dist[j])
        if d > eps_init + float(self.layer.eps[j]):
            return None, eps_init
        if self.layer.labels[j] == label:
            self.layer.eps[j] = max(float(self.layer.eps[j]), d)  # expand to cover the key
            if edit_id not in self.entry_edits[j]:
                self.entry_edits[j].append(edit_id)
            return j, float(self.layer.eps[j])
        self.splits += 1
        self.layer.eps[j] = d / 2.0
        return None, d / 2.0

    def _train_value(self, record: EditRecord) -> tuple[int, float, float, torch.Tensor]:
        batch = build_batch(self.backbone, [record], self.config.train.append_eos)
        first_target = int((batch.labels[0] != IGNORE).nonzero().min())
        start = torch.tensor([first_target - 1])  # the last prompt token predicts the first target token
        value = nn.Parameter(self.layer.values.new_zeros(self.layer.out_features))
        self.layer.staging_value = value
        try:
            stats = train_block(
                self.backbone, batch, [value], self.train_config, trained_modules=[self.grace.layer or ""],
                active=lambda: self._replace(torch.tensor([STAGING_ENTRY]), start),
            )
        finally:
            self.layer.staging_value = None
        return stats.steps, stats.final_loss, stats.learned, value.detach()

    def _append_entry(self, key: torch.Tensor, value: torch.Tensor, eps: float, label: str, edit_id: str) -> int:
        self.layer.keys = torch.cat([self.layer.keys, key[None]])
        self.layer.values = torch.cat([self.layer.values, value[None]])
        self.layer.eps = torch.cat([self.layer.eps, torch.tensor([eps], dtype=torch.float64)])
        self.layer.labels.append(label)
        self.entry_edits.append([edit_id])
        return len(self.layer.labels) - 1

    def state_stats(self) -> dict[str, int]:
        return {
            "entries": len(self.layer.labels),
            "splits": self.splits,
            "extra_parameters": self.layer.keys.numel() + self.layer.values.numel() + self.layer.eps.numel(),
        }

    def state_files(self) -> dict[str, bytes]:
        """The codebook: keys, values, radii (safetensors) and labels (JSON)."""
        tensors = {"keys": self.layer.keys.cpu().contiguous(), "values": self.layer.values.cpu().contiguous(),
                   "eps": self.layer.eps.cpu().contiguous()}
        return {"codebook.safetensors": safetensors.torch.save(tensors),
                "codebook.json": json.dumps({"labels": self.layer.labels, "splits": self.splits,
                                             "entry_edits": self.entry_edits}).encode()}

    def restore_state(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        try:
            tensors = safetensors.torch.load(files["codebook.safetensors"])
            meta = json.loads(files["codebook.json"])
            keys, values, eps = tensors["keys"], tensors["values"], tensors["eps"]
            labels, splits = [str(x) for x in meta["labels"]], int(meta["splits"])
            entry_edits = [[str(i) for i in ids] for ids in meta.get("entry_edits", [[] for _ in labels])]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{where}: GRACE codebook files are incomplete or malformed ({exc})") from exc
        n = len(labels)
        if (keys.shape != (n, self.layer.in_features) or values.shape != (n, self.layer.out_features)
                or eps.shape != (n,) or len(entry_edits) != n):
            raise SnapshotError(f"{where}: GRACE codebook arrays do not fit {n} entries of this layer")

        def swap() -> None:
            self.layer.keys = keys.to(self.layer.keys)
            self.layer.values = values.to(self.layer.values)
            self.layer.eps = eps.to(torch.float64)
            self.layer.labels, self.splits, self.entry_edits = labels, splits, entry_edits

        return swap

    def revert_state(self, ids: set[str]) -> Callable[[], None]:
        """The edits' ids leave their entries; an entry that holds no edit any more is dropped."""
        kept_ids = [[i for i in entry if i not in ids] for entry in self.entry_edits]
        keep = [j for j, entry in enumerate(kept_ids) if entry]

        def change() -> None:
            rows = torch.as_tensor(keep, dtype=torch.long)
            self.layer.keys, self.layer.values = self.layer.keys[rows], self.layer.values[rows]
            self.layer.eps = self.layer.eps[rows]
            self.layer.labels = [self.layer.labels[j] for j in keep]
            self.entry_edits = [kept_ids[j] for j in keep]

        return change

    def reset_state(self) -> None:
        self.layer.keys, self.layer.values = self.layer.keys[:0], self.layer.values[:0]
        self.layer.eps, self.layer.labels, self.splits, self.entry_edits = self.layer.eps[:0], [], 0, []
