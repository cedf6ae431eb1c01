"""ELDER: mixture-of-LoRA with a learned router, guided loss and deferral (Li et al.).

Each target linear gets N LoRA experts and a router (linear + softmax) fed the input's query vector
(the configured key function's key of the prompt, computed before any mixture layer), so every token
of an input uses one allocation; the top-k experts are mixed by their scores in one batched einsum.
Each edit (fact) gets a random top-k allocation per layer, distinct between facts while the space
allows, and a guided loss teaches the routers those allocations. At inference an input whose
allocation code (its top-k choices across layers, as bits) is farther in Hamming distance than the
threshold from every stored edit's code runs on the exact base model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from torch import nn
from torch.nn import functional as F

from melo_ray.backbones import Backbone, load_backbone, weights_checksum
from melo_ray.config import EditorConfig, load_config
from melo_ray.editors.base import EditResult, Editor, as_records
from melo_ray.inference import next_token_logits
from melo_ray.keys import build_key_function
from melo_ray.lora import get_parent, linear_shape
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError, write_snapshot
from melo_ray.training import EditBatch, build_batch, train_block


class ElderLinear(nn.Module):
    """A linear layer plus N routed LoRA experts; rows without a query (or deferred) are exactly W0·x."""

    def __init__(self, base_layer: nn.Module, query_dim: int, num_experts: int, rank: int, alpha: float,
                 top_k: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.top_k = top_k
        self.scale = alpha / rank
        weight = next(base_layer.parameters())
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.empty(num_experts, rank, self.in_features).uniform_(-bound, bound, generator=generator)
        self.experts_A = nn.Parameter(a.to(weight))
        self.experts_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank).to(weight))
        self.router = nn.Linear(query_dim, num_experts).to(weight)
        nn.init.normal_(self.router.weight, std=0.02, generator=generator)
        nn.init.zeros_(self.router.bias)
        # Per-row routing for the current forward, set by ElderEditor: query vectors and which rows
        # use the mixture. None: the whole batch runs on the base layer.
        self.query: torch.Tensor | None = None
        self.active_rows: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        # Keys can be large (hidden states): normalise them so the softmax starts soft and trainable.
        return torch.softmax(self.router(F.layer_norm(query, query.shape[-1:])), dim=-1)

    def mixture_weights(self, query: torch.Tensor) -> torch.Tensor:
        """(rows, N): the top-k scores in place, zero elsewhere."""
        scores = self.scores(query)
        top = scores.topk(self.top_k, dim=-1)
        return torch.zeros_like(scores).scatter(-1, top.indices, top.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.query is None or self.active_rows is None:
            return out
        rows = self.active_rows
        if rows.numel() == 0:
            return out
        if x.shape[0] != self.query.shape[0]:
            raise RuntimeError(f"routing has {self.query.shape[0]} rows but the input has {x.shape[0]}")
        weights = self.mixture_weights(self.query[rows])  # (r, N)
        xs = x[rows]
        flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])  # (r, tokens, in)
        hidden = torch.einsum("rti,npi->rtnp", flat, self.experts_A) * weights[:, None, :, None]
        delta = torch.einsum("rtnp,nop->rto", hidden, self.experts_B) * self.scale
        return out.index_add(0, rows, delta.reshape(*xs.shape[:-1], self.out_features).to(out.dtype))


class ElderEditor(Editor):
    name = "elder"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        self.config = config
        self.cfg = config.elder
        self.backbone = backbone or load_backbone(config.backbone)
        if device is not None:
            self.backbone.model.to(device)
        self.base_checksum = weights_checksum(self.backbone.model)
        self.key_function = build_key_function(self.backbone, config.index)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.layers: dict[str, ElderLinear] = {}
        for name in self.cfg.target_modules or config.lora.target_modules:
            parent, child = get_parent(self.backbone.model, name)
            layer = ElderLinear(getattr(parent, child), self.key_function.dim, self.cfg.num_experts, self.cfg.rank,
                                self.cfg.alpha, self.cfg.top_k, generator)
            layer.requires_grad_(False)  # trainable only while a batch trains
            setattr(parent, child, layer)
            self.layers[name] = layer
        self.rng = np.random.default_rng(self.cfg.seed)
        self.edit_keys = np.zeros((0, self.key_function.dim), np.float32)  # one per edited prompt
        self.edit_records: list[EditRecord] = []  # kept for deferral codes (their keys) and replay
        self.allocations: dict[str, np.ndarray] = {}  # fact id -> (layers, top_k) expert ids
        self.version = 0
        self.edits_applied = 0
        self._codes_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._routed_keys: np.ndarray | None = None  # set by route(), read by the routed() that follows

    @classmethod
    def from_config(cls, source: Any) -> "ElderEditor":
        return cls(load_config(source))

    # -- routing -----------------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.experts_A, layer.experts_B, *layer.router.parameters())]

    @contextmanager
    def _routing(self, queries: torch.Tensor | None, active: torch.Tensor | None) -> Iterator[None]:
        for layer in self.layers.values():
            layer.query, layer.active_rows = queries, active
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.query, layer.active_rows = None, None

    @torch.no_grad()
    def codes(self, keys: np.ndarray) -> np.ndarray:
        """Allocation codes: (n, layers * N) bits, the top-k experts each router picks."""
        query = torch.as_tensor(keys, dtype=torch.float32, device=self.backbone.device)
        bits = []
        for layer in self.layers.values():
            top = layer.scores(query).topk(layer.top_k, dim=-1).indices
            bits.append(torch.zeros(len(keys), layer.router.out_features, dtype=torch.bool,
                                    device=query.device).scatter(-1, top, True))
        return torch.cat(bits, dim=1).cpu().numpy() if bits else np.zeros((len(keys), 0), bool)

    def allocation_bits(self, fact_ids: list[str]) -> np.ndarray:
        """The codes the facts were assigned, (n, layers * N) bits as codes() returns them."""
        n = self.cfg.num_experts
        bits = np.zeros((len(fact_ids), len(self.layers) * n), bool)
        for row, fact in enumerate(fact_ids):
            for layer, experts in enumerate(self.allocations[fact]):
                bits[row, layer * n + experts] = True
        return bits

    def _stored_codes(self) -> np.ndarray:
        """Codes of every edited prompt under the current routers; they only change when a batch trains."""
        cached = self._codes_cache
        if cached is None or cached[0] != (self.version, len(self.edit_keys)):
            cached = ((self.version, len(self.edit_keys)), self.codes(self.edit_keys).astype(np.int32))
            self._codes_cache = cached
        return cached[1]

    def _nearest_code_distance(self, keys: np.ndarray) -> np.ndarray:
        if len(self.edit_keys) == 0:
            return np.full(len(keys), np.inf)
        stored = self._stored_codes()
        query = self.codes(keys).astype(np.int32)
        # Hamming distance = bits that differ; one matrix product instead of a loop over pairs
        differ = query.sum(1)[:, None] + stored.sum(1)[None, :] - 2 * query @ stored.T
        return differ.min(axis=1).astype(np.float64)

    def route(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """0 where the mixture is used, -1 where the input is deferred to the base model; Hamming distance."""
        if not prompts:
            return np.zeros(0, np.int64), np.zeros(0)
        keys = self.key_function.keys(prompts)
        distance = self._nearest_code_distance(keys)
        ids = np.where(distance <= self.cfg.defer_threshold, 0, -1).astype(np.int64)
        self._routed_keys = keys  # routed() follows route() (see Editor._ids)
        return ids, distance

    def routed(self, ids: np.ndarray, batch: EditBatch | None = None) -> AbstractContextManager:
        keys = self._routed_keys
        if keys is None or len(keys) != len(ids):
            raise RuntimeError("routed() needs the keys of the route() call it follows")
        device = self.backbone.device
        active = torch.as_tensor(np.nonzero(np.asarray(ids) >= 0)[0], dtype=torch.long, device=device)
        return self._routing(torch.as_tensor(keys, dtype=torch.float32, device=device), active)

    def _ids(self, prompts: list[str], base: bool) -> tuple[np.ndarray, np.ndarray]:
        if base or not prompts:
            self._routed_keys = np.zeros((len(prompts), self.key_function.dim), np.float32)
            return np.full(len(prompts), -1, np.int64), np.full(len(prompts), np.nan)
        return self.route(prompts)

    def next_token_logits(self, prompts: list[str], *, base: bool = False) -> torch.Tensor:
        """Logits after each prompt's last real token, routed (or deferred) as generate() would."""
        with self.routed(self._ids(prompts, base)[0]):
            return next_token_logits(self.backbone, prompts)

    # -- editing -----------------------------------------------------------------------------------
    def _allocate(self, fact: str) -> np.ndarray:
        """A random top-k allocation per layer, distinct from other facts' while the space allows."""
        if fact in self.allocations:
            return self.allocations[fact]
        taken = {a.tobytes() for a in self.allocations.values()}
        n, k, layers = self.cfg.num_experts, self.cfg.top_k, len(self.layers)
        space = math.comb(n, k) ** layers
        for _ in range(64 if len(taken) < space else 1):
            choice = np.sort(np.stack([self.rng.choice(n, k, replace=False) for _ in range(layers)]), axis=1)
            if choice.tobytes() not in taken:
                break
        self.allocations[fact] = choice.astype(np.int64)
        return self.allocations[fact]

    def _replay_sample(self) -> list[int]:
        n = len(self.edit_records)
        if not self.cfg.replay or n == 0:
            return []
        return sorted(self.rng.choice(n, min(n, self.cfg.replay), replace=False).tolist())

    def _guide_rows(self, replayed: list[int], keys: np.ndarray, assigned: torch.Tensor,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Router-only rows for the guided loss (no model forward): earlier edits' keys (guide_stored)
        and noisy copies of every guided key (guide_noise), each with its fact's allocation."""
        rows, allocations = [keys], [assigned.numpy()]
        if self.cfg.guide_stored:
            skip = set(replayed)
            held = [i for i in range(len(self.edit_records)) if i not in skip]
            if held:
                rows.append(self.edit_keys[held])
                allocations.append(np.stack([self.allocations[self.edit_records[i].id] for i in held]))
        clean = np.concatenate(rows).astype(np.float32)
        assigned_all = np.concatenate(allocations)
        extra_rows, extra_assigned = clean[len(keys):], assigned_all[len(keys):]
        if self.cfg.guide_noise > 0:
            # Rephrasings sit near their prompt's key: teach the routers the same allocation in a
            # neighbourhood of each key (noise norm = guide_noise x key norm), seeded for exact resumes.
            gen = np.random.default_rng([self.cfg.seed, self.version])
            copies = np.repeat(clean, self.cfg.guide_copies, axis=0)
            noise = gen.standard_normal(copies.shape).astype(np.float32)
            noise *= (self.cfg.guide_noise * np.linalg.norm(copies, axis=1, keepdims=True)
                      / np.linalg.norm(noise, axis=1, keepdims=True).clip(1e-12))
            extra_rows = np.concatenate([extra_rows, copies + noise])
            extra_assigned = np.concatenate([extra_assigned, np.repeat(assigned_all, self.cfg.guide_copies, axis=0)])
        return (torch.as_tensor(extra_rows, dtype=torch.float32, device=device),
                torch.as_tensor(extra_assigned, dtype=torch.long, device=device))

    def edit(self, records: Iterable[EditRecord | Mapping[str, Any]]) -> EditResult:
        new_records = as_records(records)
        if not new_records:
            raise ValueError("edit batch is empty")
        new_keys = self.key_function.keys([r.prompt for r in new_records])
        if not np.all(np.isfinite(new_keys)):
            raise ValueError("edit batch: a prompt produced a non-finite key")
        rng_state, known_facts = self.rng.bit_generator.state, set(self.allocations)
        replayed = self._replay_sample()
        batch_records = new_records + [self.edit_records[i] for i in replayed]
        keys = np.concatenate([new_keys, self.edit_keys[replayed]]) if replayed else new_keys
        allocations = {r.id: self._allocate(r.id) for r in batch_records}
        assigned = torch.as_tensor(np.stack([allocations[r.id] for r in batch_records]))  # (rows, layers, k)
        device = self.backbone.device
        query = torch.as_tensor(keys, dtype=torch.float32, device=device)
        rows = torch.arange(len(batch_records), device=device)
        batch = build_batch(self.backbone, batch_records, self.config.train.append_eos)
        layers = list(self.layers.values())

        extra_query, extra_assigned = self._guide_rows(replayed, keys, assigned, device)

        def guided() -> tuple[torch.Tensor, bool]:
            loss = query.new_zeros(())
            met = True
            for i, layer in enumerate(layers):
                scores = layer.scores(query)
                chosen = assigned[:, i, :].to(device)
                loss = loss - torch.log(scores.gather(1, chosen).clamp_min(1e-9)).sum(1).mean()
                top = scores.topk(layer.top_k, dim=-1).indices.sort(dim=1).values
                met = met and bool((top == chosen).all())
                if len(extra_query):
                    extra = layer.scores(extra_query).gather(1, extra_assigned[:, i, :])
                    loss = loss - torch.log(extra.clamp_min(1e-9)).sum(1).mean()
            return self.cfg.guided_lambda * loss, met

        train_cfg = self.config.train.model_copy(update={
            k: v for k, v in (("lr", self.cfg.lr), ("num_iter", self.cfg.num_iter)) if v is not None})
        backup = [p.detach().clone() for p in self.trainable()]
        try:
            for p in self.trainable():
                p.requires_grad_(True)
            stats = train_block(
                self.backbone, batch, self.trainable(), train_cfg, trained_modules=list(self.layers),
                active=lambda: self._routing(query, rows), extra_loss=guided,
            )
        except BaseException:
            with torch.no_grad():  # all or nothing: put every expert, router and allocation back
                for p, saved in zip(self.trainable(), backup):
                    p.copy_(saved)
            for fact in set(self.allocations) - known_facts:
                del self.allocations[fact]
            self.rng.bit_generator.state = rng_state
            raise
        finally:
            for p in self.trainable():
                p.requires_grad_(False)
        self.edit_keys = np.concatenate([self.edit_keys, new_keys.astype(np.float32)])
        self.edit_records += new_records
        self.version += 1
        self.edits_applied += len(new_records)
        return EditResult(
            edits=len(new_records), block=None, clusters=len(self.allocations), conflicts=0, forgotten=(),
            steps=stats.steps, final_loss=stats.final_loss, learned=stats.learned, seconds=stats.seconds,
        )

    def stats(self) -> dict[str, int]:
        return {
            "edits": self.edits_applied,
            "facts": len(self.allocations),
            "stored_codes": len(self.edit_keys),
            "extra_parameters": sum(p.numel() for p in self.trainable()),
        }

    # -- snapshots ---------------------------------------------------------------------------------
    def snapshot_files(self) -> dict[str, bytes]:
        """Experts and routers (safetensors), stored keys and allocations (safetensors), records (JSON)."""
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.experts_A"] = layer.experts_A.detach().cpu().contiguous()
            tensors[f"{name}.experts_B"] = layer.experts_B.detach().cpu().contiguous()
            tensors[f"{name}.router.weight"] = layer.router.weight.detach().cpu().contiguous()
            tensors[f"{name}.router.bias"] = layer.router.bias.detach().cpu().contiguous()
        facts = sorted(self.allocations)
        arrays = {
            "edit_keys": self.edit_keys,
            "allocations": (np.stack([self.allocations[f] for f in facts]) if facts
                            else np.zeros((0, len(self.layers), self.cfg.top_k), np.int64)),
        }
        return {
            "experts.safetensors": safetensors.torch.save(tensors),
            "codes.safetensors": safetensors.numpy.save(arrays),
            "codes.json": json.dumps({"edit_records": [r.to_dict() for r in self.edit_records], "facts": facts,
                                      "rng": self.rng.bit_generator.state}, sort_keys=True).encode(),
        }

    def snapshot_meta(self, stats: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        return {"editor": self.name, "version": self.version, "config": self.config.model_dump(mode="json"),
                "base_checksum": self.base_checksum, "stats": dict(stats if stats is not None else self.stats()),
                **extra}

    def save(self, folder: str | Path, **extra: Any) -> dict[str, Any]:
        return write_snapshot(folder, self.snapshot_files(), self.snapshot_meta(**extra))

    def publish(self, store: Any, **extra: Any) -> dict[str, Any]:
        """Publish this editor's state as version `self.version` of a SnapshotStore."""
        return store.publish(self.version, self.snapshot_files(), self.snapshot_meta(**extra))

    @classmethod
    def load(cls, folder: str | Path, backbone: Backbone | None = None) -> "ElderEditor":
        """Rebuild an editor from a snapshot folder, or a store root (its latest version), local or URI."""
        from melo_ray.store import read_any_snapshot

        manifest, files, where = read_any_snapshot(folder)
        return cls.from_files(manifest, files, where, backbone)

    @classmethod
    def from_files(cls, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str = "snapshot",
                   backbone: Backbone | None = None) -> "ElderEditor":
        if manifest.get("editor") != cls.name:
            raise SnapshotError(f"{where}: snapshot is for editor '{manifest.get('editor')}', not '{cls.name}'")
        editor = cls(load_config(manifest["config"]), backbone)
        editor.restore_files(manifest, files, where)
        return editor

    def restore_files(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str = "snapshot") -> None:
        """Replace experts, routers and stored codes with a verified snapshot's; all checks before any change."""
        if manifest.get("editor") != self.name:
            raise SnapshotError(f"{where}: snapshot is for editor '{manifest.get('editor')}', not '{self.name}'")
        if manifest.get("base_checksum") != self.base_checksum:
            raise SnapshotError(f"{where}: snapshot was made on other base weights (checksum differs)")
        try:
            tensors = safetensors.torch.load(files["experts.safetensors"])
            arrays = safetensors.numpy.load(files["codes.safetensors"])
            meta = json.loads(files["codes.json"])
            records = [EditRecord(**{**r, "rephrases": tuple(r["rephrases"])}) for r in meta["edit_records"]]
            allocations = {f: a for f, a in zip(meta["facts"], arrays["allocations"], strict=True)}
            edit_keys = arrays["edit_keys"].astype(np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{where}: ELDER snapshot files are incomplete or malformed ({exc})") from exc
        if edit_keys.shape != (len(records), self.key_function.dim):
            raise SnapshotError(f"{where}: {edit_keys.shape} stored keys for {len(records)} records of "
                                f"{self.key_function.dim} dims")
        for name, layer in self.layers.items():
            for part, param in (("experts_A", layer.experts_A), ("experts_B", layer.experts_B),
                                ("router.weight", layer.router.weight), ("router.bias", layer.router.bias)):
                saved = tensors.get(f"{name}.{part}")
                if saved is None or saved.shape != param.shape:
                    raise SnapshotError(f"{where}: experts for '{name}' missing or of the wrong shape")
        with torch.no_grad():  # all checks passed: swap in
            for name, layer in self.layers.items():
                layer.experts_A.copy_(tensors[f"{name}.experts_A"])
                layer.experts_B.copy_(tensors[f"{name}.experts_B"])
                layer.router.weight.copy_(tensors[f"{name}.router.weight"])
                layer.router.bias.copy_(tensors[f"{name}.router.bias"])
        self.edit_keys = edit_keys
        self.edit_records = records
        self.allocations = allocations
        self.rng.bit_generator.state = meta["rng"]
        self.version = int(manifest["version"])
        self.edits_applied = int(manifest["stats"]["edits"])
        self._codes_cache = None
