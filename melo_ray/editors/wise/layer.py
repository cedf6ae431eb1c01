"""WISE's layer: one FFN value matrix (mlp.down_proj) with side memories beside it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from melo_ray.editors.layers import EditLayer, linear_shape


class WiseLayer(EditLayer):
    """Rows routed to memory i use that memory's copy of the weight instead of the main one.

    Memory ids count the closed memories (`closed`, merged or set-aside shards) first, then the open
    shard (`side`, the one being trained). In training (`trace` set) every row uses `side` and the
    main and side outputs are kept for the activation loss."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError("WISE wraps an nn.Linear layer (a Llama-family mlp.down_proj)")
        self.in_features, self.out_features = linear_shape(base_layer)
        weight = base_layer.weight
        self.side = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("closed", torch.zeros(0, self.out_features, self.in_features, dtype=weight.dtype,
                                                   device=weight.device))
        self.memory_ids: torch.Tensor | None = None  # (B,) per row: memory id, -1 the main weight
        self.trace: dict[str, torch.Tensor] | None = None

    def memory(self, i: int) -> torch.Tensor:
        return self.closed[i] if i < len(self.closed) else self.side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.trace is not None:
            side = F.linear(x, self.side.to(x.dtype))
            self.trace["main"], self.trace["side"] = out, side
            return side
        ids = self.memory_ids
        if ids is None or not bool((ids >= 0).any()):
            return out
        ids = ids.to(x.device)
        out = out.clone()
        for i in ids[ids >= 0].unique().tolist():
            rows = ids == i
            out[rows] = F.linear(x[rows], self.memory(int(i)).to(x.dtype))
        return out
