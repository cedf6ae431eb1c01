"""Dynamic LoRA: a bank of partial-rank blocks per target linear, one block per edit batch (or, with
`lora.block_per_edit`, one per edit of the batch).

Each wrapped layer computes h = W0·x + (alpha/p)·B_b·A_b·x where b is the block chosen for that row
of the batch (block id -1: exactly W0·x). Committed blocks are buffers, never trained again; the
blocks being trained live in separate parameters ("staging", one or more slots trained together)
and reach the bank only as finished weights (`append_blocks`), so an edit batch that fails leaves
the bank untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from melo_ray.editors.layers import EditLayer, get_parent, linear_shape
from melo_ray.editors.melo.bank import GrowingRows, check_bank_shape
from melo_ray.editors.melo.config import LoraConfig

NO_BLOCK = -1


class BlockBankFull(RuntimeError):
    """The configured max_blocks would be exceeded."""


class DynamicLoraLinear(EditLayer):
    """Wraps one linear layer with a growing bank of LoRA blocks selected per batch row."""

    def __init__(self, base_layer: nn.Module, block_rank: int, alpha: float, max_blocks: int) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.block_rank = block_rank
        self.scale = alpha / block_rank
        self.max_blocks = max_blocks
        weight = next(base_layer.parameters())
        empty = dict(dtype=weight.dtype, device=weight.device)
        self.register_buffer("lora_bank_A", torch.zeros(0, block_rank, self.in_features, **empty))
        self.register_buffer("lora_bank_B", torch.zeros(0, self.out_features, block_rank, **empty))
        # The bank grows by doubling a spare buffer: one commit costs its own block, not the bank.
        self._grow_A, self._grow_B = GrowingRows(), GrowingRows()
        self.lora_staging_A: nn.Parameter | None = None
        self.lora_staging_B: nn.Parameter | None = None
        # The current forward's routing; set by BlockRouter, None means base only.
        self.plan: RoutePlan | None = None

    @property
    def num_blocks(self) -> int:
        return self.lora_bank_A.shape[0]

    def start_block(self, generator: torch.Generator, slots: int = 1) -> None:
        """Create fresh staging parameters for `slots` blocks trained together: A random (as PEFT's
        kaiming init, one slot after another from `generator`), B zero."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) bound
        a = torch.empty(slots, self.block_rank, self.in_features, dtype=self.lora_bank_A.dtype)
        for slot in range(slots):
            a[slot].uniform_(-bound, bound, generator=generator)
        device = self.lora_bank_A.device
        self.lora_staging_A = nn.Parameter(a.to(device))
        self.lora_staging_B = nn.Parameter(
            torch.zeros(slots, self.out_features, self.block_rank, dtype=a.dtype, device=device)
        )

    def append_blocks(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """Append n trained blocks (A: n x p x in, B: n x out x p) to the bank; returns the first one's id."""
        if self.num_blocks + a.shape[0] > self.max_blocks:
            raise BlockBankFull(f"max_blocks={self.max_blocks} reached; raise lora.max_blocks")
        check_bank_shape(a, b, self.lora_bank_A, self.lora_bank_B, "blocks for this layer")
        first = self.num_blocks
        self.lora_bank_A = self._grow_A.append(self.lora_bank_A, a)
        self.lora_bank_B = self._grow_B.append(self.lora_bank_B, b)
        return first

    def discard_block(self) -> None:
        self.lora_staging_A = None
        self.lora_staging_B = None

    def load_bank(self, bank_a: torch.Tensor, bank_b: torch.Tensor) -> None:
        check_bank_shape(bank_a, bank_b, self.lora_bank_A, self.lora_bank_B, "bank for this layer")
        self.lora_bank_A = bank_a.to(self.lora_bank_A)
        self.lora_bank_B = bank_b.to(self.lora_bank_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = self.plan
        if plan is None or plan.rows is None and not plan.staging:
            return out  # every row on the base model: exactly W0·x
        if plan.staging:
            return out + self.scale * self._staging_delta(x, plan.slots)
        if x.shape[0] != plan.batch_rows:
            raise RuntimeError(f"routing has {plan.batch_rows} rows but the input has {x.shape[0]}")
        a = self.lora_bank_A[plan.blocks]  # (rows, p, in)
        b = self.lora_bank_B[plan.blocks]  # (rows, out, p)
        xs = x[plan.rows]
        flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])  # (rows, tokens, in)
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        delta = (self.scale * delta).reshape(*xs.shape[:-1], self.out_features)
        # Rows without a block are not touched, so they stay bit-identical to the base layer.
        return out.index_add(0, plan.rows, delta.to(out.dtype))

    def _staging_delta(self, x: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        a, b = self.lora_staging_A, self.lora_staging_B
        if a is None or b is None:
            raise RuntimeError("routing asks for the staging block but none was started")
        if a.shape[0] == 1:  # one block for the whole batch: no gather
            return (x @ a[0].T) @ b[0].T
        if slots is None or slots.shape[0] != x.shape[0]:
            raise RuntimeError(f"{a.shape[0]} staging blocks need a slot for each of the {x.shape[0]} rows")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, tokens, in)
        delta = torch.bmm(torch.bmm(flat, a[slots].transpose(1, 2)), b[slots].transpose(1, 2))
        return delta.reshape(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class RoutePlan:
    """One forward's routing, decided on the host once per call (not per layer, not per decode step),
    so the layers never wait on the device to learn which rows have a block."""

    batch_rows: int
    staging: bool = False
    slots: torch.Tensor | None = None  # staging: each row's staging block (None: all use the first)
    rows: torch.Tensor | None = None  # rows with a block (on the bank's device); None: none has one
    blocks: torch.Tensor | None = None  # their block ids

    @classmethod
    def build(cls, block_ids: torch.Tensor | np.ndarray, device: torch.device) -> "RoutePlan":
        ids = torch.as_tensor(np.asarray(block_ids.cpu() if isinstance(block_ids, torch.Tensor) else block_ids),
                              dtype=torch.long)
        rows = torch.nonzero(ids >= 0).flatten()
        if rows.numel() == 0:
            return cls(len(ids))
        return cls(len(ids), rows=rows.to(device), blocks=ids[rows].to(device))


def inject_dynamic_lora(model: nn.Module, cfg: LoraConfig) -> dict[str, DynamicLoraLinear]:
    """Replace each target module by a DynamicLoraLinear wrapping it; returns them by name."""
    modules = dict(model.named_modules())
    layers: dict[str, DynamicLoraLinear] = {}
    for name in cfg.target_modules:
        if name not in modules:
            near = [n for n in modules if n.endswith(name.rsplit(".", 1)[-1])][:5]
            raise KeyError(f"lora.target_modules: no module named '{name}' (similar: {near})")
        target = modules[name]
        if isinstance(target, DynamicLoraLinear):
            layers[name] = target
            continue
        wrapped = DynamicLoraLinear(target, cfg.block_rank, cfg.alpha, cfg.max_blocks)
        parent, child = get_parent(model, name)
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return layers


class BlockRouter:
    """Sets which block each batch row uses, on every dynamic LoRA layer, for one forward or generate."""

    def __init__(self, layers: dict[str, DynamicLoraLinear]) -> None:
        self.layers = layers
        # The plans of the last routing, by its block ids: a decode loop routes the same rows step after
        # step, so its plans (host-side nonzero, copies to the device) are built when rows join or leave.
        self._last_plans: tuple[bytes, dict[torch.device, RoutePlan]] | None = None

    @contextmanager
    def route(self, block_ids: torch.Tensor | np.ndarray | None) -> Iterator[None]:
        if block_ids is None:
            with self._planned(None):
                yield
            return
        ids = np.ascontiguousarray(block_ids.cpu() if isinstance(block_ids, torch.Tensor) else block_ids, np.int64)
        key = ids.tobytes()
        if self._last_plans is None or self._last_plans[0] != key:
            self._last_plans = (key, {})
        plans = self._last_plans[1]

        def plan_for(device: torch.device) -> RoutePlan:
            if device not in plans:
                plans[device] = RoutePlan.build(ids, device)
            return plans[device]

        with self._planned(plan_for):
            yield

    @contextmanager
    def staging(self, slots: list[int]) -> Iterator[None]:
        """Route every row to the staging blocks: row i to staging block `slots[i]`."""
        ids = torch.tensor(slots, dtype=torch.long)
        with self._planned(lambda device: RoutePlan(len(slots), staging=True, slots=ids.to(device))):
            yield

    @contextmanager
    def _planned(self, plan_for: Callable[[torch.device], RoutePlan] | None) -> Iterator[None]:
        """Give every layer the plan for its bank's device (one plan per device) for one forward."""
        plans: dict[torch.device, RoutePlan] = {}
        for layer in self.layers.values():
            device = layer.lora_bank_A.device
            if plan_for is not None and device not in plans:
                plans[device] = plan_for(device)
            layer.plan = plans.get(device)
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.plan = None

    @property
    def num_blocks(self) -> int:
        counts = {layer.num_blocks for layer in self.layers.values()}
        if len(counts) != 1:
            raise RuntimeError(f"LoRA layers disagree on the number of blocks: {counts}")
        return counts.pop()

    def start_block(self, seed: int, slots: int = 1) -> list[nn.Parameter]:
        """Fresh staging parameters for `slots` blocks on every layer; returns them for the optimiser."""
        generator = torch.Generator().manual_seed(seed)
        params: list[nn.Parameter] = []
        for layer in self.layers.values():
            layer.start_block(generator, slots)
            params += [layer.lora_staging_A, layer.lora_staging_B]  # type: ignore[list-item]
        return params

    def discard_block(self) -> None:
        for layer in self.layers.values():
            layer.discard_block()

    def staging_weights(self) -> dict[str, torch.Tensor]:
        """The trained staging blocks of every layer, detached: `{layer}.A` (n x p x in), `{layer}.B` (n x out x p)."""
        weights = {}
        for name, layer in self.layers.items():
            if layer.lora_staging_A is None or layer.lora_staging_B is None:
                raise RuntimeError("no staging block to take")
            weights[f"{name}.A"] = layer.lora_staging_A.detach().cpu().clone()
            weights[f"{name}.B"] = layer.lora_staging_B.detach().cpu().clone()
        return weights

    def append_blocks(self, weights: Mapping[str, torch.Tensor]) -> int:
        """Append trained blocks (as `staging_weights` gives them) to every layer's bank, all or none;
        returns the first one's id."""
        missing = [n for n in self.layers for part in "AB" if f"{n}.{part}" not in weights]
        if missing:
            raise ValueError(f"trained block lacks weights for {missing}")
        counts = {weights[f"{n}.{part}"].shape[0] for n in self.layers for part in "AB"}
        if len(counts) != 1:
            raise ValueError(f"trained layers disagree on the number of blocks: {counts}")
        cap = min(layer.max_blocks for layer in self.layers.values())
        if self.num_blocks + counts.pop() > cap:
            raise BlockBankFull(f"lora.max_blocks={cap} reached: raise it in the config or start a new bank")
        for name, layer in self.layers.items():  # shapes first: a misfit must not leave some layers grown
            check_bank_shape(weights[f"{name}.A"], weights[f"{name}.B"], layer.lora_bank_A, layer.lora_bank_B,
                             f"trained block for '{name}'")
        ids = {layer.append_blocks(weights[f"{name}.A"], weights[f"{name}.B"]) for name, layer in self.layers.items()}
        return ids.pop()

    def extra_parameters(self) -> int:
        return sum(layer.lora_bank_A.numel() + layer.lora_bank_B.numel() for layer in self.layers.values())
