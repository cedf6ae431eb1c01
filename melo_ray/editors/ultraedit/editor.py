"""UltraEdit: training-free, closed-form lifelong editing with lifelong normalisation.

Per batch, forward and backward passes of the edits (prompt + target, `forward_batch` edits at a time,
the loss the mean cross-entropy over that chunk's target tokens) give, at every position that predicts
a target token (the prompt's last token included) and at each edited mlp.down_proj, the layer's input k
and the gradient g of the loss with respect to its output. Running statistics of the concatenated
[k, g] over every edit so far (the "lifelong normaliser") standardise them to k_hat, g_hat; each row's
desired value shift is v = -lr * ||k_hat||^2 * g_hat, and the weight change solves the ridge problem
  delta^T = (K^T K + ridge I)^-1 K^T V
with the raw keys K of this batch only (no earlier keys, no preserved keys). Nothing is trained. As in
the reference (XiaojieGu/UltraEdit, editor/ultraedit.py), layers of one shape share one normaliser.
With `iters` > 1 (our extension; the reference takes one step) each batch takes that many steps, each
on the weights the previous left, with one normaliser per step. Every prompt runs on the changed
weights; there is no routing and no single-edit revert.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import safetensors.torch
import torch
import torch.nn.functional as F

from melo_ray.backbones import Backbone
from melo_ray.config import EditorConfig
from melo_ray.editors.alphaedit.editor import WeightDeltaEditor
from melo_ray.editors.messages import TrainedBatch
from melo_ray.editors.ultraedit.config import UltraEditConfig
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError
from melo_ray.training import IGNORE, build_batch

NORMALISERS = "normalisers.safetensors"


def mistral_band(depth: int) -> list[int]:
    """The two blocks below the last (the reference's Mistral-7B choice, blocks 29-30 of 32)."""
    return [max(depth - 3, 0), max(depth - 2, 0)]


class RunningMoments:
    """Running mean and variance of feature rows over every batch seen (Chan et al.'s merge)."""

    def __init__(self, width: int) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros(width, dtype=torch.float64)
        self.m2 = torch.zeros(width, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        n = rows.shape[0]
        batch_mean = rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        total = self.count + n
        shift = batch_mean - self.mean
        self.mean = self.mean + shift * n / total
        self.m2 = self.m2 + batch_m2 + shift**2 * self.count * n / total
        self.count = total

    def normalise(self, rows: torch.Tensor, eps: float) -> torch.Tensor:
        std = (self.m2 / (self.count - 1).clamp(min=1)).sqrt()  # the sample deviation, as the reference
        return ((rows.double() - self.mean) / (std + eps)).float()

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.count": self.count.reshape(1), f"{prefix}.mean": self.mean, f"{prefix}.m2": self.m2}


class UltraEditEditor(WeightDeltaEditor):
    name = "ultraedit"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        self.cfg: UltraEditConfig = config.section("ultraedit")
        super().__init__(config, backbone, device, self.cfg.layers, mistral_band)
        self.shapes = {name: f"{l.in_features}x{l.out_features}" for name, l in self.layers.items()}
        self.normalisers = self._fresh_normalisers()

    def _fresh_normalisers(self) -> list[dict[str, RunningMoments]]:
        """Per closed-form step of a batch: one running normaliser per layer shape."""
        widths = {self.shapes[n]: l.in_features + l.out_features for n, l in self.layers.items()}
        return [{shape: RunningMoments(width) for shape, width in widths.items()} for _ in range(self.cfg.iters)]

    @contextmanager
    def _traced(self, predicting: torch.Tensor) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        """Capture each edited layer's input at the predicting positions and a zero probe added to its
        output, whose gradient is the loss's gradient with respect to that output."""
        traces: dict[str, dict[str, torch.Tensor]] = {}
        handles = []
        for name, layer in self.layers.items():
            def hook(_m, args, output, name=name):
                probe = torch.zeros_like(output, requires_grad=True)
                traces[name] = {"keys": args[0][predicting].detach().float(), "probe": probe}
                return output + probe
            handles.append(layer.register_forward_hook(hook))
        try:
            yield traces
        finally:
            for handle in handles:
                handle.remove()

    def _features(self, records: list[EditRecord]) -> tuple[dict[str, torch.Tensor], float, float, int]:
        """One forward and backward pass of a chunk of edits on the current weights: per layer, the
        rows [k, g] at the positions that predict a target token; the chunk's summed token loss, how many
        of its target tokens are already the argmax, and its number of target tokens."""
        batch = build_batch(self.backbone, records, append_eos=False)
        labels = batch.labels[:, 1:]
        predicting = torch.zeros_like(batch.labels, dtype=torch.bool)
        predicting[:, :-1] = labels != IGNORE  # position t predicts token t+1
        with self._traced(predicting) as traces:
            logits = self.backbone.model(**batch.inputs, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE)  # mean over the chunk's tokens
            loss.backward()
        counted = labels != IGNORE
        learned = float((logits.argmax(-1) == labels)[counted].float().sum())
        features = {name: torch.cat([t["keys"], t["probe"].grad[predicting].float()], dim=1).cpu()
                    for name, t in traces.items()}
        tokens = int(counted.sum())
        return features, float(loss.detach()) * tokens, learned, tokens

    def _step(self, records: list[EditRecord],
              normalisers: dict[str, RunningMoments]) -> tuple[dict[str, torch.Tensor], float, float]:
        """One closed-form step on the current weights: the edits' keys and gradients (chunk by chunk),
        the normaliser's update with all of them, and each layer's weight change from one solve."""
        chunks, loss_sum, learned_sum, tokens = [], 0.0, 0.0, 0
        for start in range(0, len(records), self.cfg.forward_batch):
            features, chunk_loss, chunk_learned, chunk_tokens = self._features(records[start : start + self.cfg.forward_batch])
            chunks.append(features)
            loss_sum, learned_sum, tokens = loss_sum + chunk_loss, learned_sum + chunk_learned, tokens + chunk_tokens
        features = {name: torch.cat([c[name] for c in chunks]) for name in self.layers}
        for name, rows in features.items():
            normalisers[self.shapes[name]].update(rows)
        deltas: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            normalised = normalisers[self.shapes[name]].normalise(features[name], self.cfg.eps)
            if self.cfg.clip is not None:  # our safeguard (off in the reference): bound outlier rows' value shifts
                normalised = normalised.clamp(-self.cfg.clip, self.cfg.clip)
            keys_hat, grads_hat = normalised.split([layer.in_features, layer.out_features], dim=1)
            values = -self.cfg.lr * (keys_hat * keys_hat).sum(1, keepdim=True) * grads_hat  # (rows, out)
            keys = features[name][:, : layer.in_features]
            lhs = keys.T @ keys + self.cfg.ridge * torch.eye(layer.in_features)
            deltas[name] = torch.linalg.solve(lhs, keys.T @ values).T.contiguous()  # (out, in)
        return deltas, loss_sum / max(tokens, 1), learned_sum / max(tokens, 1)

    def train_batch(self, records: list[EditRecord]) -> TrainedBatch:
        started = time.perf_counter()
        saved = {n: l.delta.clone() for n, l in self.layers.items()}
        total = {n: torch.zeros_like(l.delta) for n, l in self.layers.items()}
        try:
            for normalisers in self.normalisers:
                deltas, loss, learned = self._step(records, normalisers)
                for name, change in deltas.items():  # the next step sees this one's change
                    self.layers[name].delta += change.to(self.layers[name].delta)
                    total[name] += change.to(total[name])
        finally:
            for name, layer in self.layers.items():  # commit() adds the batch's change back, counted once
                layer.delta = saved[name]
        return self.commit(records, total, len(self.normalisers), loss, learned, started)

    # -- state beside the weight changes -----------------------------------------------------------
    @staticmethod
    def _prefix(step: int, shape: str) -> str:
        return shape if step == 0 else f"step{step}.{shape}"  # step 0 keeps the one-step layout

    def method_files(self) -> dict[str, bytes]:
        tensors: dict[str, torch.Tensor] = {}
        for step, normalisers in enumerate(self.normalisers):
            for shape, moments in normalisers.items():
                tensors.update(moments.tensors(self._prefix(step, shape)))
        return {NORMALISERS: safetensors.torch.save(tensors)}

    def restore_method(self, files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        try:
            tensors = safetensors.torch.load(files[NORMALISERS])
            fresh = self._fresh_normalisers()
            for step, normalisers in enumerate(fresh):
                for shape, moments in normalisers.items():
                    prefix = self._prefix(step, shape)
                    count, mean, m2 = (tensors[f"{prefix}.{k}"] for k in ("count", "mean", "m2"))
                    if mean.shape != moments.mean.shape or m2.shape != moments.m2.shape:
                        raise ValueError(f"normaliser {prefix} has width {mean.shape[0]}")
                    moments.count, moments.mean, moments.m2 = count.reshape(()).double(), mean.double(), m2.double()
        except (KeyError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{where}: UltraEdit normalisers missing or malformed ({exc})") from exc

        def swap() -> None:
            self.normalisers = fresh

        return swap

    def reset_method(self) -> None:
        self.normalisers = self._fresh_normalisers()
