"""MEMOIR (Wang et al., NeurIPS 2025): a residual memory in one FFN layer, written through sparse,
sample-dependent masks and read only by prompts whose mask matches a stored one.

The memory W_m (zero at first) sits beside one mlp.down_proj: output = W0 a + W_m (mask ⊙ a).
An input's mask (TopHash) is computed once per prompt: the mean of the layer's input over the
prompt's tokens, less the mean over irrelevant background text, gives the top_k units of largest
magnitude; a fixed random permutation then maps those indices to the columns the mask opens. A batch
of edits trains W_m by SGD on the target tokens, each row through its own mask (so only its columns
move), and stores each edit's mask. At inference a prompt whose mask shares at least `threshold` of
its columns with some stored mask reads the memory through its own mask; every other prompt runs on
the exact base model. Single edits cannot be reverted: an edit's columns are shared with the edits whose
masks overlap its own, and dropping its stored mask leaves its prompt routed through theirs.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from melo_ray.backbones import Backbone
from melo_ray.config import EditorConfig
from melo_ray.editors.layers import wrap_llama_down_proj
from melo_ray.editors.memoir.config import MemoirConfig
from melo_ray.editors.memoir.layer import MemoirLayer, prompt_layer_inputs
from melo_ray.editors.messages import IndexUpdate, TrainedBatch
from melo_ray.editors.protocol import Editor
from melo_ray.editors.routing import Routing
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError
from melo_ray.training import EditBatch, _CachedPrefix, build_batch, _learned_fraction

STATE = "memoir.safetensors"
EDITS = "memoir.json"


def read_texts(path: str, limit: int) -> list[str]:
    """Up to `limit` texts of a JSONL file ('question' or 'text' per line)."""
    texts: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                texts.append(str(row.get("question") or row.get("text") or ""))
            if len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


class MemoirEditor(Editor):
    name = "memoir"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        super().__init__(config, backbone, device)
        self.cfg: MemoirConfig = config.section("memoir")
        self.layer_name, self.layer = wrap_llama_down_proj(self.backbone, "memoir", self.cfg.layer, MemoirLayer)
        width = self.layer.in_features
        self.top_k = min(self.cfg.top_k or round(width * 4096 / 14336), width)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.permutation = torch.randperm(width, generator=generator)
        self.background: torch.Tensor | None = None  # mean layer input over irrelevant text, made on first use
        self.masks = torch.zeros(0, width, dtype=torch.bool)  # one stored mask per edit
        self.mask_edits: list[str] = []

    # -- masks ---------------------------------------------------------------------------------------
    def _background(self) -> torch.Tensor:
        if self.background is None:
            texts = read_texts(self.cfg.background_text, self.cfg.background_samples)
            rows = prompt_layer_inputs(self.backbone, self.layer, texts)
            self.background = torch.cat(rows).mean(0)
        return self.background

    def prompt_masks(self, prompts: list[str]) -> torch.Tensor:
        """TopHash: per prompt, the permuted top-k units of its decentred mean layer input. (B, in) bool."""
        background = self._background()
        features = torch.stack([x.mean(0) - background for x in prompt_layer_inputs(self.backbone, self.layer, prompts)])
        top = features.abs().topk(self.top_k, dim=1).indices  # (B, k)
        masks = torch.zeros(len(prompts), features.shape[1], dtype=torch.bool)
        masks[torch.arange(len(prompts))[:, None], self.permutation[top]] = True
        return masks

    # -- routing -------------------------------------------------------------------------------------
    def route(self, prompts: list[str]) -> Routing:
        """Per prompt: the stored edit whose mask overlaps its own most, if that share reaches the threshold
        (distance = 1 - share); the routing's keys are the prompt's own mask."""
        if not len(self.masks):
            return Routing.base(len(prompts))
        masks = self.prompt_masks(prompts)
        shares = (masks.float() @ self.masks.float().T) / self.top_k  # (B, edits)
        best, nearest = shares.max(dim=1)
        fires = best >= self.cfg.threshold
        ids = torch.where(fires, nearest, -1).numpy()
        edit_ids = tuple(self.mask_edits[int(i)] if i >= 0 else None for i in ids)
        return Routing(ids, (1 - best).double().numpy(), edit_ids, keys=masks.numpy().astype(np.float32))

    @contextmanager
    def _masked(self, masks: torch.Tensor) -> Iterator[None]:
        self.layer.masks = masks
        try:
            yield
        finally:
            self.layer.masks = None

    def routed(self, routing: Routing, batch: EditBatch | None = None) -> AbstractContextManager:
        if routing.keys is None:
            return self._masked(torch.zeros(len(routing), self.layer.in_features))
        masks = torch.as_tensor(routing.keys, dtype=torch.float32)
        on = torch.as_tensor(np.asarray(routing.ids) >= 0, dtype=torch.float32)
        return self._masked(masks * on[:, None])

    # -- editing -------------------------------------------------------------------------------------
    def train_batch(self, records: list[EditRecord]) -> TrainedBatch:
        started = time.perf_counter()
        masks = self.prompt_masks([r.prompt for r in records])
        batch = build_batch(self.backbone, records, self.config.train.append_eos)
        forward = _CachedPrefix(self.backbone, [self.layer_name], batch)
        memory = self.layer.memory
        before = memory.detach().clone()
        optimiser = torch.optim.SGD([memory], lr=self.cfg.lr)
        steps, loss_value, learned = 0, float("nan"), 0.0
        memory.requires_grad_(True)
        try:
            with self._masked(masks.float()):
                for steps in range(self.cfg.num_iter + 1):
                    logits = forward.logits().float()
                    loss = F.cross_entropy(logits, forward.targets)
                    loss_value = float(loss.detach())
                    learned = _learned_fraction(logits, forward.targets, self.config.train.early_stop_margin)
                    if steps == self.cfg.num_iter or (self.config.train.early_stop and learned >= 1.0):
                        break
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
        except BaseException:
            with torch.no_grad():
                memory.copy_(before)  # all or nothing
            raise
        finally:
            memory.requires_grad_(False)
            memory.grad = None
        self.masks = torch.cat([self.masks, masks])
        self.mask_edits += [r.id for r in records]
        self.version += 1
        self.edits_applied += len(records)
        return TrainedBatch(version=self.version, edits=len(records), steps=steps, final_loss=loss_value,
                            learned=learned, seconds=time.perf_counter() - started,
                            update=IndexUpdate(clusters=len(self.mask_edits), members=len(self.mask_edits)))

    # -- snapshots -----------------------------------------------------------------------------------
    def state_stats(self) -> dict[str, int]:
        return {"extra_parameters": self.layer.memory.numel(), "stored_masks": len(self.mask_edits)}

    def state_files(self) -> dict[str, bytes]:
        tensors = {"memory": self.layer.memory.detach().cpu().contiguous(), "masks": self.masks.to(torch.uint8)}
        if self.background is not None:
            tensors["background"] = self.background.contiguous()
        return {STATE: safetensors.torch.save(tensors), EDITS: json.dumps({"mask_edits": self.mask_edits}).encode()}

    def restore_state(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        try:
            tensors = safetensors.torch.load(files[STATE])
            memory, masks = tensors["memory"], tensors["masks"].bool()
            background = tensors.get("background")
            mask_edits = [str(i) for i in json.loads(files[EDITS])["mask_edits"]]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{where}: MEMOIR memory files are incomplete or malformed ({exc})") from exc
        width = self.layer.in_features
        if (memory.shape != self.layer.memory.shape or masks.shape != (len(mask_edits), width)
                or (background is not None and background.shape != (width,))):
            raise SnapshotError(f"{where}: MEMOIR memory does not fit this editor's layer")

        def swap() -> None:
            with torch.no_grad():
                self.layer.memory.copy_(memory.to(self.layer.memory))
            self.masks, self.mask_edits = masks, mask_edits
            if background is not None:
                self.background = background.float()

        return swap

    def reset_state(self) -> None:
        with torch.no_grad():
            self.layer.memory.zero_()
        self.masks, self.mask_edits = self.masks[:0], []
