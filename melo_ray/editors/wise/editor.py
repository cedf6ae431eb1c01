"""WISE (Wang et al., NeurIPS 2024): a side memory for one FFN value matrix, with a router.

The side memory starts as a copy of one mlp.down_proj weight W. Edits train it by SGD under a
random gradient mask (knowledge sharding: each shard of `save_freq` edits trains its own random
`mask_ratio` of the entries), each entry kept within `norm_constraint` of W. Beside the target loss,
a margin loss on the activation score
  s(x) = mean over tokens of || act(W_side a(x)) - act(W a(x)) ||
pushes edited inputs above `beta`, out-of-scope texts below `alpha` and every edited score `gamma`
above every out-of-scope one. A full shard is set aside; every `merge_freq` edits the set-aside
shards are merged by Ties into one memory (WISE-Retrieve keeps each merged memory and its lowest
edit score). At inference a prompt's score is taken against every memory on its prompt tokens; it
reads the memory with the highest score among those where the score reaches `act_ratio` times that
memory's lowest edit score, else the main weight (the exact base model).

Differences from the reference: the routing decision is made per prompt (the reference decides for
a whole batch at each forward), the edits' own scores are taken on their prompts, as routing sees
them, and edits train a batch at a time without the random-prefix augmentation.
"""
from __future__ import annotations

import json
import math
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
from melo_ray.editors.memoir.editor import read_texts
from melo_ray.editors.memoir.layer import prompt_layer_inputs
from melo_ray.editors.messages import IndexUpdate, TrainedBatch
from melo_ray.editors.protocol import Editor
from melo_ray.editors.routing import Routing
from melo_ray.editors.wise.config import WiseConfig
from melo_ray.editors.wise.layer import WiseLayer
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError
from melo_ray.training import IGNORE, EditBatch, _CachedPrefix, _learned_fraction, build_batch

STATE = "wise.safetensors"
META = "wise.json"


def positive_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (0 when none): the reference's hinge reduction."""
    positive = values[values > 0]
    return positive.mean() if positive.numel() else values.new_zeros(())


def ties_merge(base: torch.Tensor, weights: list[torch.Tensor], density: float) -> torch.Tensor:
    """Ties merging of task vectors w - base: keep each one's top `density` by magnitude, elect a sign per
    entry by their sum, and average the kept entries that agree with it."""
    vectors = []
    for weight in weights:
        vector = (weight - base).float()
        keep = max(1, int(round(density * vector.numel())))
        cut = vector.abs().flatten().kthvalue(vector.numel() - keep + 1).values
        vectors.append(torch.where(vector.abs() >= cut, vector, torch.zeros_like(vector)))
    stacked = torch.stack(vectors)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (base.float() + merged).to(base.dtype)


class WiseEditor(Editor):
    name = "wise"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        super().__init__(config, backbone, device)
        self.cfg: WiseConfig = config.section("wise")
        self.layer_name, self.layer = wrap_llama_down_proj(self.backbone, "wise", self.cfg.layer, WiseLayer)
        self.act = F.silu  # Llama's FFN activation, as the reference's score applies it
        self.closed_min: list[float] = []  # lowest edit score of each closed memory
        self.merged = 0  # closed memories that are merges; the rest are set-aside shards awaiting one
        self.shards = 0  # shards started so far (seeds their masks)
        self.open_edits = 0
        self.open_min = math.inf
        self.open_mask = self._shard_mask()
        self.negatives_used = 0

    @property
    def main(self) -> torch.Tensor:
        return self.layer.base_layer.weight

    def _shard_mask(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.shards)
        return torch.rand(self.main.shape, generator=generator) < self.cfg.mask_ratio

    # -- the activation score and routing -----------------------------------------------------------
    def _scores(self, inputs: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """Per prompt: mean over its tokens of ||act(W_side a) - act(W a)||."""
        main, side = self.main.float().cpu(), weight.float().cpu()
        return torch.stack([(self.act(x @ side.T) - self.act(x @ main.T)).norm(dim=1).mean() for x in inputs])

    def _memories(self) -> list[tuple[torch.Tensor, float]]:
        """(weight, firing threshold) of every memory that holds edits, in memory-id order."""
        found = [(self.layer.closed[i], self.cfg.act_ratio * m) for i, m in enumerate(self.closed_min)]
        if self.open_edits:
            found.append((self.layer.side.detach(), self.cfg.act_ratio * self.open_min))
        return found

    def route(self, prompts: list[str]) -> Routing:
        memories = self._memories()
        if not memories:
            return Routing.base(len(prompts))
        inputs = prompt_layer_inputs(self.backbone, self.layer, prompts)
        scores = torch.stack([self._scores(inputs, w) for w, _ in memories], dim=1)  # (B, memories)
        thresholds = torch.tensor([t for _, t in memories])
        passing = torch.where(scores >= thresholds, scores, torch.full_like(scores, -math.inf))
        best, chosen = passing.max(dim=1)
        ids = torch.where(torch.isfinite(best), chosen, -1).numpy()
        return Routing(ids, scores.max(dim=1).values.double().numpy())

    @contextmanager
    def _using(self, ids: torch.Tensor) -> Iterator[None]:
        self.layer.memory_ids = ids
        try:
            yield
        finally:
            self.layer.memory_ids = None

    def routed(self, routing: Routing, batch: EditBatch | None = None) -> AbstractContextManager:
        return self._using(torch.as_tensor(np.asarray(routing.ids), dtype=torch.long))

    # -- editing --------------------------------------------------------------------------------------
    def _negatives(self, count: int) -> list[str]:
        pool = read_texts(self.cfg.negative_text, self.negatives_used + count)
        chosen = [pool[(self.negatives_used + i) % len(pool)] for i in range(count)]
        self.negatives_used += count
        return chosen

    def _activation_loss(self, trace: dict[str, torch.Tensor], real: torch.Tensor, edits: int) -> torch.Tensor:
        distance = (self.act(trace["side"].float()) - self.act(trace["main"].float())).norm(dim=-1)  # (B, T)
        per_row = (distance * real).sum(1) / real.sum(1).clamp(min=1)
        inside, outside = per_row[:edits], per_row[edits:]
        cfg = self.cfg
        return (positive_mean(outside[None, :] - inside[:, None] + cfg.gamma)
                + positive_mean(outside - cfg.alpha) + positive_mean(cfg.beta - inside))

    def train_batch(self, records: list[EditRecord]) -> TrainedBatch:
        started = time.perf_counter()
        negatives = [EditRecord(prompt=text, target=".") for text in self._negatives(self.cfg.negatives * len(records))]
        batch = build_batch(self.backbone, records + negatives, self.config.train.append_eos)
        batch.labels[len(records):] = IGNORE  # out-of-scope rows only enter the activation loss
        real = batch.inputs["attention_mask"].float()
        forward = _CachedPrefix(self.backbone, [self.layer_name], batch)
        side = self.layer.side
        before = side.detach().clone()
        optimiser = torch.optim.SGD([side], lr=self.cfg.lr, weight_decay=1e-5)
        low, high = self.main - self.cfg.norm_constraint, self.main + self.cfg.norm_constraint
        trace: dict[str, torch.Tensor] = {}
        steps, loss_value, learned = 0, float("nan"), 0.0
        side.requires_grad_(True)
        self.layer.trace = trace
        try:
            for steps in range(self.cfg.num_iter + 1):
                logits = forward.logits().float()
                target_loss = F.cross_entropy(logits, forward.targets)
                act_loss = self._activation_loss(trace, real, len(records))
                loss_value = float(target_loss.detach())
                learned = _learned_fraction(logits, forward.targets, self.config.train.early_stop_margin)
                done = self.config.train.early_stop and learned >= 1.0 and float(act_loss) == 0.0
                if done or steps == self.cfg.num_iter:
                    break
                optimiser.zero_grad(set_to_none=True)
                (target_loss + act_loss).backward()
                side.grad.mul_(self.open_mask.to(side.grad.device, side.grad.dtype))  # this shard's entries only
                optimiser.step()
                with torch.no_grad():
                    side.copy_(torch.maximum(torch.minimum(side, high), low))
        except BaseException:
            with torch.no_grad():
                side.copy_(before)  # all or nothing
            raise
        finally:
            self.layer.trace = None
            side.requires_grad_(False)
            side.grad = None
        inputs = prompt_layer_inputs(self.backbone, self.layer, [r.prompt for r in records])
        self.open_min = min(self.open_min, float(self._scores(inputs, side.detach()).min()))
        self.open_edits += len(records)
        self._close_shards()
        self.version += 1
        self.edits_applied += len(records)
        return TrainedBatch(version=self.version, edits=len(records), steps=steps, final_loss=loss_value,
                            learned=learned, seconds=time.perf_counter() - started,
                            update=IndexUpdate(clusters=len(self._memories()), members=self.edits_applied))

    def _close_shards(self) -> None:
        """A full shard is set aside; enough set-aside shards are merged into one memory."""
        if self.open_edits < self.cfg.save_freq:
            return
        with torch.no_grad():
            self.layer.closed = torch.cat([self.layer.closed, self.layer.side.detach()[None].clone()])
            self.closed_min.append(self.open_min)
            self.layer.side.copy_(self.main)
        self.open_edits, self.open_min = 0, math.inf
        self.shards += 1
        self.open_mask = self._shard_mask()
        waiting = len(self.closed_min) - self.merged
        if waiting >= max(1, self.cfg.merge_freq // self.cfg.save_freq):
            shards = list(self.layer.closed[self.merged:])
            merged = ties_merge(self.main.detach(), shards, self.cfg.density)
            self.layer.closed = torch.cat([self.layer.closed[: self.merged], merged[None]])
            self.closed_min = self.closed_min[: self.merged] + [min(self.closed_min[self.merged:])]
            self.merged += 1

    # -- snapshots ------------------------------------------------------------------------------------
    def state_stats(self) -> dict[str, int]:
        return {"extra_parameters": self.layer.side.numel() * (1 + len(self.closed_min)),
                "memories": len(self._memories()), "merged_memories": self.merged}

    def state_files(self) -> dict[str, bytes]:
        tensors = {"side": self.layer.side.detach().cpu().contiguous(), "closed": self.layer.closed.cpu().contiguous(),
                   "open_mask": self.open_mask.to(torch.uint8)}
        meta = {"closed_min": self.closed_min, "merged": self.merged, "shards": self.shards,
                "open_edits": self.open_edits, "open_min": None if math.isinf(self.open_min) else self.open_min,
                "negatives_used": self.negatives_used}
        return {STATE: safetensors.torch.save(tensors), META: json.dumps(meta).encode()}

    def restore_state(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        try:
            tensors = safetensors.torch.load(files[STATE])
            meta = json.loads(files[META])
            side, closed, mask = tensors["side"], tensors["closed"], tensors["open_mask"].bool()
            closed_min = [float(m) for m in meta["closed_min"]]
            merged, shards, open_edits = int(meta["merged"]), int(meta["shards"]), int(meta["open_edits"])
            open_min = math.inf if meta["open_min"] is None else float(meta["open_min"])
            negatives_used = int(meta["negatives_used"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{where}: WISE memory files are incomplete or malformed ({exc})") from exc
        shape = tuple(self.main.shape)
        if (tuple(side.shape) != shape or tuple(mask.shape) != shape or tuple(closed.shape) != (len(closed_min), *shape)
                or not 0 <= merged <= len(closed_min)):
            raise SnapshotError(f"{where}: WISE memories do not fit this editor's layer")

        def swap() -> None:
            with torch.no_grad():
                self.layer.side.copy_(side.to(self.layer.side))
            self.layer.closed = closed.to(self.layer.closed)
            self.open_mask, self.closed_min, self.merged, self.shards = mask, closed_min, merged, shards
            self.open_edits, self.open_min, self.negatives_used = open_edits, open_min, negatives_used

        return swap

    def reset_state(self) -> None:
        with torch.no_grad():
            self.layer.side.copy_(self.main)
        self.layer.closed = self.layer.closed[:0]
        self.closed_min, self.merged, self.shards, self.open_edits, self.open_min = [], 0, 0, 0, math.inf
        self.open_mask = self._shard_mask()
        self.negatives_used = 0
