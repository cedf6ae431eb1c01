"""AlphaEdit (Fang et al., ICLR 2025): MEMIT-style locate-then-edit, projected onto the null space of
preserved knowledge.

Per batch: (1) for each edit, find the hidden state at the last block of the edited band that makes
the target likely (Adam on an added vector at the fact token, clamped and weight-decayed), (2) for
each edited block in turn, write the remaining residual into its mlp.down_proj by the closed form
  delta = R K^T P (P (K K^T + C) + l2 I)^-1,
where K are the edits' keys (down_proj inputs at the fact token), C the sum of keys of all earlier
edits and P the projection onto the null space of the preserved keys' second moment (so preserved
inputs see no change, to first order). The fact token is the last token of the record's subject when
the prompt names it, else the last prompt token. Every prompt runs on the edited weights: there is
no routing; the weight change can only be switched off whole (the base model, routing -1).

Differences from the reference, for a CPU budget: no random-prefix context templates and no KL term
on "{subject} is a" prompts (both only regularise the target search).
"""
from __future__ import annotations

import json
import logging
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from melo_ray.backbones import Backbone
from melo_ray.config import EditorConfig
from melo_ray.editors.alphaedit.config import AlphaEditConfig
from melo_ray.editors.alphaedit.layer import DeltaLayer, mlp_down_name
from melo_ray.editors.layers import get_parent
from melo_ray.editors.messages import IndexUpdate, TrainedBatch
from melo_ray.editors.protocol import Editor
from melo_ray.editors.routing import Routing
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError
from melo_ray.training import EditBatch, _CachedPrefix, build_batch

log = logging.getLogger(__name__)
DELTAS = "deltas.safetensors"


class _Stop(Exception):
    """Raised from a hook once everything a pass needs is captured."""


class WeightDeltaEditor(Editor):
    """An editor whose edits are dense changes of some linear layers' weights (AlphaEdit, UltraEdit).

    Every prompt runs on the changed weights (route: 0); routing -1 runs the exact base model. The
    weights change for every input at once, so single edits cannot be reverted."""

    def __init__(self, config: EditorConfig, backbone: Backbone | None, device: str | None,
                 layers: list[int] | None, default_layers: Callable[[int], list[int]]) -> None:
        super().__init__(config, backbone, device)
        spec = self.backbone.family
        if self.backbone.task != "causal_lm" or spec.model_type != "llama" or not spec.blocks:
            raise ValueError(f"the {self.name} editor is implemented for Llama-family causal LMs")
        depth = len(self.backbone.model.get_submodule(spec.blocks))
        self.block_ids = sorted(layers if layers is not None else default_layers(depth))
        if not self.block_ids or self.block_ids[0] < 0 or self.block_ids[-1] >= depth:
            raise ValueError(f"{self.name}.layers: {self.block_ids} is not a set of blocks of this {depth}-block model")
        self.names = [mlp_down_name(spec.blocks, i) for i in self.block_ids]
        self.layers: dict[str, DeltaLayer] = {}
        for name in self.names:
            parent, child = get_parent(self.backbone.model, name)
            layer = DeltaLayer(getattr(parent, child))
            setattr(parent, child, layer)
            self.layers[name] = layer

    # -- routing: all or nothing ------------------------------------------------------------------
    def route(self, prompts: list[str]) -> Routing:
        return Routing(np.zeros(len(prompts), np.int64), np.full(len(prompts), np.nan))

    @contextmanager
    def routed(self, routing: Routing, batch: EditBatch | None = None) -> Iterator[None]:
        rows = torch.as_tensor(np.asarray(routing.ids) >= 0)
        for layer in self.layers.values():
            layer.rows_on = rows
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.rows_on = None

    # -- what the method adds ----------------------------------------------------------------------
    @abstractmethod
    def method_files(self) -> dict[str, bytes]:
        """Snapshot files of the method's running state beside the weight changes."""

    @abstractmethod
    def restore_method(self, files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        """Check the method's files and return the swap that installs them."""

    @abstractmethod
    def reset_method(self) -> None:
        """The method's running state back to no edits."""

    def commit(self, records: list[EditRecord], deltas: dict[str, torch.Tensor], steps: int, loss: float,
               learned: float, started: float) -> TrainedBatch:
        """Add a batch's weight changes (all computed before any is applied) and count the batch."""
        for name, change in deltas.items():
            self.layers[name].delta += change.to(self.layers[name].delta)
        self.version += 1
        self.edits_applied += len(records)
        return TrainedBatch(version=self.version, edits=len(records), steps=steps, final_loss=loss, learned=learned,
                            seconds=time.perf_counter() - started, block=0, update=IndexUpdate())

    # -- snapshots ---------------------------------------------------------------------------------
    def state_stats(self) -> dict[str, int]:
        return {"extra_parameters": sum(layer.delta.numel() for layer in self.layers.values())}

    def state_files(self) -> dict[str, bytes]:
        deltas = {name: layer.delta.detach().cpu().contiguous() for name, layer in self.layers.items()}
        return {DELTAS: safetensors.torch.save(deltas), **self.method_files()}

    def restore_state(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        try:
            deltas = safetensors.torch.load(files[DELTAS])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{where}: {self.name} weight changes missing or unreadable ({exc})") from exc
        expected = {name: tuple(layer.delta.shape) for name, layer in self.layers.items()}
        if {k: tuple(v.shape) for k, v in deltas.items()} != expected:
            raise SnapshotError(f"{where}: {self.name} weight changes do not fit this editor's layers")
        method = self.restore_method(files, where)

        def swap() -> None:
            for name, layer in self.layers.items():
                layer.delta = deltas[name].to(layer.delta)
            method()

        return swap

    def reset_state(self) -> None:
        for layer in self.layers.values():
            layer.delta = torch.zeros_like(layer.delta)
        self.reset_method()


def alphaedit_band(depth: int) -> list[int]:
    """Blocks 4-8 of 32 (the paper's LLaMA3-8B band) at the same relative depth."""
    first, last = round(depth * 4 / 32), round(depth * 8 / 32)
    return list(range(first, max(last, first) + 1))


def fact_positions(backbone: Backbone, records: list[EditRecord]) -> torch.Tensor:
    """Per record: the position of its subject's last token in the prompt (as the model reads it), or
    of the prompt's last token when the prompt does not name the subject."""
    positions = []
    for record in records:
        text = backbone.format_prompt(record.prompt)
        encoded = backbone.tokenize(text, return_offsets_mapping=True)
        ids, offsets = encoded.input_ids, encoded.offset_mapping
        position = len(ids) - 1
        start = text.find(record.subject) if record.subject else -1
        if start >= 0:
            end = start + len(record.subject or "")
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            if inside:
                position = inside[-1]
        positions.append(position)
    return torch.tensor(positions)


class AlphaEditEditor(WeightDeltaEditor):
    name = "alphaedit"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        self.cfg: AlphaEditConfig = config.section("alphaedit")
        super().__init__(config, backbone, device, self.cfg.layers, alphaedit_band)
        if self.block_ids[-1] + 1 >= len(self.backbone.model.get_submodule(self.backbone.family.blocks)):
            raise ValueError("alphaedit.layers: the last edited block must have a block above it")
        # sum of k k^T of every edit so far, per layer (the paper's K_p K_p^T)
        self.key_moments = {n: torch.zeros(l.in_features, l.in_features) for n, l in self.layers.items()}
        self.projections: dict[str, torch.Tensor] | None = None  # built from the preserved text on first use

    # -- the preserved keys ------------------------------------------------------------------------
    def _preserved_texts(self) -> list[str]:
        texts = []
        with open(self.cfg.covariance_text, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    texts.append(str(row.get("question") or row.get("text") or ""))
                if len(texts) >= self.cfg.covariance_samples:
                    break
        if not texts:
            raise ValueError(f"alphaedit.covariance_text: {self.cfg.covariance_text} holds no text")
        return texts

    @torch.no_grad()
    def _build_projections(self) -> dict[str, torch.Tensor]:
        """P = U U^T over the eigenvectors of the preserved keys' second moment with eigenvalues below
        the threshold (the reference's SVD of the covariance, in the symmetric form)."""
        sums = {n: torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for n, l in self.layers.items()}
        count = 0
        texts = self._preserved_texts()
        for start in range(0, len(texts), 32):
            chunk = [self.backbone.format_prompt(t) for t in texts[start : start + 32]]
            inputs = self.backbone.tokenize(chunk, return_tensors="pt", padding=True)
            mask = inputs["attention_mask"].bool()
            keys = self._layer_inputs({k: v.to(self.backbone.device) for k, v in inputs.items()})
            for name, x in keys.items():
                rows = x[mask.to(x.device)].double().cpu()  # (tokens, in)
                sums[name] += rows.T @ rows
            count += int(mask.sum())
        projections = {}
        for name, total in sums.items():
            values, vectors = torch.linalg.eigh(total / count)
            small = vectors[:, values < self.cfg.nullspace_threshold]
            projections[name] = (small @ small.T).float()
            log.info("alphaedit %s: null space of %d of %d key dimensions", name, small.shape[1], total.shape[0])
        return projections

    def _layer_inputs(self, inputs: dict[str, torch.Tensor], names: list[str] | None = None,
                      block_output: int | None = None) -> dict[str, torch.Tensor]:
        """Inputs of the edited layers (and the output of block `block_output` under key 'block'), from
        one forward stopped as soon as all are seen."""
        wanted = list(names or self.names)
        seen: dict[str, torch.Tensor] = {}
        handles = []
        expected = len(wanted) + (block_output is not None)

        def capture(key: str, take_input: bool) -> Callable:
            def hook(_m, args, output):
                value = args[0] if take_input else output
                seen[key] = (value[0] if isinstance(value, tuple) else value).detach()
                if len(seen) == expected:
                    raise _Stop
            return hook

        for name in wanted:
            handles.append(self.layers[name].register_forward_hook(capture(name, True)))
        if block_output is not None:
            block = self.backbone.model.get_submodule(self.backbone.family.blocks)[block_output]
            handles.append(block.register_forward_hook(capture("block", False)))
        try:
            self.backbone.model(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def _keys_at(self, records: list[EditRecord], positions: torch.Tensor, names: list[str],
                 block_output: int | None = None) -> dict[str, torch.Tensor]:
        prompts = [self.backbone.format_prompt(r.prompt) for r in records]
        inputs = self.backbone.tokenize(prompts, return_tensors="pt", padding=True, padding_side="right")
        with torch.no_grad():
            seen = self._layer_inputs({k: v.to(self.backbone.device) for k, v in inputs.items()}, names, block_output)
        rows = torch.arange(len(records))
        return {k: v[rows, positions.to(v.device)].float().cpu() for k, v in seen.items()}

    # -- the target hidden states ------------------------------------------------------------------
    def _target_states(self, records: list[EditRecord], positions: torch.Tensor) -> tuple[torch.Tensor, int, float, float]:
        """Per edit, the output of the last edited block at its fact token that makes the target likely."""
        z_block = self.block_ids[-1]
        blocks_name = self.backbone.family.blocks
        batch = build_batch(self.backbone, records, append_eos=False)
        above = _CachedPrefix(self.backbone, [f"{blocks_name}.{z_block + 1}"], batch)
        rows = torch.arange(len(records))
        start = above.hidden[rows, positions].detach().float()  # (n, hidden)
        delta = torch.zeros_like(start, requires_grad=True)
        limit = self.cfg.clamp_norm_factor * start.norm(dim=1)
        optimiser = torch.optim.Adam([delta], lr=self.cfg.v_lr)
        block = self.backbone.model.get_submodule(blocks_name)[z_block + 1]

        def add_delta(_m, args):
            hidden = args[0].clone()
            hidden[rows, positions] = hidden[rows, positions] + delta.to(hidden.dtype)
            return (hidden, *args[1:])

        handle = block.register_forward_pre_hook(add_delta)
        steps, loss_value, learned = 0, float("nan"), 0.0
        row_of_target = above.rows
        try:
            for steps in range(1, self.cfg.v_num_grad_steps + 1):
                logits = above.logits().float()
                nll = F.cross_entropy(logits, above.targets, reduction="none")
                per_row = torch.zeros(len(records)).index_add(0, row_of_target, nll)
                per_row = per_row / torch.bincount(row_of_target, minlength=len(records)).clamp(min=1)
                decay = self.cfg.v_weight_decay * delta.norm(dim=1) / start.norm(dim=1).pow(2)
                loss = (per_row + decay).sum()
                loss_value = float(per_row.detach().mean())
                learned = float((logits.argmax(-1) == above.targets).float().mean())
                if float(per_row.detach().max()) < 5e-2:  # every edit's own search done, as per request in the reference
                    break
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():  # keep each change within its clamp
                    norms = delta.norm(dim=1)
                    scale = torch.where(norms > limit, limit / norms.clamp(min=1e-12), torch.ones_like(norms))
                    delta.mul_(scale[:, None])
        finally:
            handle.remove()
        return (start + delta).detach(), steps, loss_value, learned

    # -- editing ------------------------------------------------------------------------------------
    def train_batch(self, records: list[EditRecord]) -> TrainedBatch:
        started = time.perf_counter()
        if self.projections is None:
            self.projections = self._build_projections()
        positions = fact_positions(self.backbone, records)
        targets, steps, loss, learned = self._target_states(records, positions)
        z_block = self.block_ids[-1]
        deltas: dict[str, torch.Tensor] = {}
        saved = {n: l.delta.clone() for n, l in self.layers.items()}
        try:
            for i, name in enumerate(self.names):
                seen = self._keys_at(records, positions, [name], block_output=z_block)
                keys, current = seen[name], seen["block"]  # (n, in), (n, hidden)
                residual = (targets - current) / (len(self.names) - i)  # spread over the remaining layers
                projection = self.projections[name]
                lhs = projection @ (keys.T @ keys + self.key_moments[name]) + self.cfg.l2 * torch.eye(keys.shape[1])
                update = torch.linalg.solve(lhs, projection @ keys.T @ residual)  # (in, out)
                deltas[name] = update.T.contiguous()
                self.layers[name].delta += deltas[name].to(self.layers[name].delta)  # later layers see it
            final_keys = self._keys_at(records, positions, self.names)
        finally:
            for name, layer in self.layers.items():  # commit() adds the changes back, counted once
                layer.delta = saved[name]
        for name in self.names:
            self.key_moments[name] += final_keys[name].T @ final_keys[name]
        return self.commit(records, deltas, steps, loss, learned, started)

    # -- state beside the weight changes -----------------------------------------------------------
    def method_files(self) -> dict[str, bytes]:
        return {"key_moments.safetensors": safetensors.torch.save(
            {n: m.contiguous() for n, m in self.key_moments.items()})}

    def restore_method(self, files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        try:
            moments = safetensors.torch.load(files["key_moments.safetensors"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{where}: AlphaEdit key moments missing or unreadable ({exc})") from exc
        if {k: tuple(v.shape) for k, v in moments.items()} != {k: tuple(v.shape) for k, v in self.key_moments.items()}:
            raise SnapshotError(f"{where}: AlphaEdit key moments do not fit this editor's layers")

        def swap() -> None:
            self.key_moments = {k: v.float() for k, v in moments.items()}

        return swap

    def reset_method(self) -> None:
        self.key_moments = {n: torch.zeros_like(m) for n, m in self.key_moments.items()}
