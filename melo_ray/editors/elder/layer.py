"""ELDER's layer: a linear layer plus N LoRA experts mixed top-k by a router on the input's key."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from melo_ray.editors.layers import EditLayer, linear_shape


class ElderLinear(EditLayer):
    """A linear layer plus N routed LoRA experts; rows without a query (or deferred) are exactly W0·x."""

    def __init__(self, base_layer: nn.Module, query_dim: int, num_experts: int, rank: int, alpha: float,
                 top_k: int, generator: torch.Generator) -> None:
        super().__init__(base_layer)
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
