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
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from torch import nn

from melo_ray.backbones import Backbone
from melo_ray.config import EditorConfig
from melo_ray.editors.elder.config import ElderConfig
from melo_ray.editors.elder.layer import ElderLinear
from melo_ray.editors.layers import get_parent
from melo_ray.editors.melo.scope.keys import build_key_function, prompt_and_paraphrase_keys
from melo_ray.editors.messages import IndexUpdate, TrainedBatch
from melo_ray.editors.protocol import Editor
from melo_ray.editors.routing import Routing
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError
from melo_ray.training import EditBatch, build_batch, in_formats, train_block, training_formats


class ElderEditor(Editor):
    name = "elder"

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None, device: str | None = None) -> None:
        super().__init__(config, backbone, device)
        self.cfg: ElderConfig = config.section("elder")
        self.key_function = build_key_function(self.backbone, config.section("index"))
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.layers: dict[str, ElderLinear] = {}
        # its own layers, else the LoRA layers of the config (an error naming lora.target_modules if none)
        for name in self.cfg.target_modules or config.section("lora").target_modules:
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
        self._codes_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._initial = [p.detach().clone() for p in self.trainable()]  # for reset_state

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

    def _nearest_codes(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per key: the stored edit whose allocation code is nearest (-1: none stored) and the Hamming distance."""
        if len(self.edit_keys) == 0:
            return np.full(len(keys), -1, np.int64), np.full(len(keys), np.inf)
        stored = self._stored_codes()
        query = self.codes(keys).astype(np.int32)
        # Hamming distance = bits that differ; one matrix product instead of a loop over pairs
        differ = query.sum(1)[:, None] + stored.sum(1)[None, :] - 2 * query @ stored.T
        return differ.argmin(axis=1), differ.min(axis=1).astype(np.float64)

    def route(self, prompts: list[str]) -> Routing:
        """0 where the mixture is used, -1 where the input is deferred to the base model; Hamming
        distance to the nearest stored code, whose edit is the one behind the row. The routing
        carries the keys the mixture is fed."""
        keys = self.key_function.keys(prompts)
        nearest, distance = self._nearest_codes(keys)
        ids = np.where(distance <= self.cfg.defer_threshold, 0, -1).astype(np.int64)
        edit_ids = tuple(self.edit_records[n].id if i >= 0 else None for i, n in zip(ids.tolist(), nearest.tolist()))
        return Routing(ids, distance, edit_ids, keys=keys)

    def routed(self, routing: Routing, batch: EditBatch | None = None) -> AbstractContextManager:
        if routing.keys is None or not bool((routing.ids >= 0).any()):
            return self._routing(None, None)  # every row on the exact base model
        device = self.backbone.device
        active = torch.as_tensor(np.nonzero(routing.ids >= 0)[0], dtype=torch.long, device=device)
        return self._routing(torch.as_tensor(routing.keys, dtype=torch.float32, device=device), active)

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

    def train_batch(self, records: list[EditRecord]) -> TrainedBatch:
        """Experts, routers, allocations and stored codes in one step (ELDER has no separate index)."""
        new_records = records
        # training paraphrases: router-only rows (below) that teach each wording its fact's allocation
        new_keys, paraphrase_keys, paraphrase_owners = prompt_and_paraphrase_keys(
            self.key_function, new_records, self.config.train.train_rephrases)
        rng_state, known_facts = self.rng.bit_generator.state, set(self.allocations)
        replayed = self._replay_sample()
        batch_records = new_records + [self.edit_records[i] for i in replayed]
        keys = np.concatenate([new_keys, self.edit_keys[replayed]]) if replayed else new_keys
        allocations = {r.id: self._allocate(r.id) for r in batch_records}
        assigned = torch.as_tensor(np.stack([allocations[r.id] for r in batch_records]))  # (rows, layers, k)
        device = self.backbone.device
        query = torch.as_tensor(keys, dtype=torch.float32, device=device)
        formats = training_formats(self.backbone, self.config.train.formats)  # each format's rows: the record's key
        model_query = query.repeat(len(formats), 1)
        rows = torch.arange(len(batch_records) * len(formats), device=device)
        batch = build_batch(self.backbone, in_formats(self.backbone, batch_records, formats), self.config.train.append_eos,
                            rendered=True)
        layers = list(self.layers.values())

        extra_query, extra_assigned = self._guide_rows(replayed, keys, assigned, device)
        if paraphrase_owners:
            extra_query = torch.cat([extra_query, torch.as_tensor(paraphrase_keys, dtype=torch.float32, device=device)])
            extra_assigned = torch.cat([extra_assigned, torch.as_tensor(
                np.stack([allocations[new_records[i].id] for i in paraphrase_owners]), dtype=torch.long, device=device)])

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
                active=lambda: self._routing(model_query, rows), extra_loss=guided,
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
        return TrainedBatch(
            version=self.version, edits=len(new_records), steps=stats.steps, final_loss=stats.final_loss,
            learned=stats.learned, seconds=stats.seconds,
            update=IndexUpdate(clusters=len(self.allocations), members=len(self.edit_keys)),
        )

    def state_stats(self) -> dict[str, int]:
        return {
            "facts": len(self.allocations),
            "stored_codes": len(self.edit_keys),
            "extra_parameters": sum(p.numel() for p in self.trainable()),
        }

    # -- snapshots ---------------------------------------------------------------------------------
    def state_files(self) -> dict[str, bytes]:
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

    def restore_state(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str) -> Callable[[], None]:
        """Experts, routers and stored codes of a verified snapshot; all checks before the swap."""
        try:
            tensors = safetensors.torch.load(files["experts.safetensors"])
            arrays = safetensors.numpy.load(files["codes.safetensors"])
            meta = json.loads(files["codes.json"])
            records = [EditRecord(**{**r, "rephrases": tuple(r["rephrases"])}) for r in meta["edit_records"]]
            allocations = {f: a for f, a in zip(meta["facts"], arrays["allocations"], strict=True)}
            edit_keys = arrays["edit_keys"].astype(np.float32)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
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
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = meta["rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{where}: ELDER random state is malformed ({exc})") from exc

        def swap() -> None:
            with torch.no_grad():
                for name, layer in self.layers.items():
                    layer.experts_A.copy_(tensors[f"{name}.experts_A"])
                    layer.experts_B.copy_(tensors[f"{name}.experts_B"])
                    layer.router.weight.copy_(tensors[f"{name}.router.weight"])
                    layer.router.bias.copy_(tensors[f"{name}.router.bias"])
            self.edit_keys, self.edit_records, self.allocations = edit_keys, records, allocations
            self.rng = rng
            self._codes_cache = None

        return swap

    def revert_state(self, ids: set[str]) -> Callable[[], None]:
        """The facts' allocations and stored codes go, so their inputs defer to the base model."""
        keep = [i for i, r in enumerate(self.edit_records) if r.id not in ids]

        def change() -> None:
            self.edit_keys = self.edit_keys[keep]
            self.edit_records = [self.edit_records[i] for i in keep]
            for fact in ids:
                self.allocations.pop(fact, None)
            self._codes_cache = None

        return change

    def reset_state(self) -> None:
        with torch.no_grad():
            for p, initial in zip(self.trainable(), self._initial):
                p.copy_(initial)
        self.rng = np.random.default_rng(self.cfg.seed)
        self.edit_keys = np.zeros((0, self.key_function.dim), np.float32)
        self.edit_records, self.allocations, self._codes_cache = [], {}, None
