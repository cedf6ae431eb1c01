"""A linear layer plus a dense weight change, switched on or off per batch row.

AlphaEdit and UltraEdit change FFN weights in place in their papers; here the change lives beside
the frozen weight (output = W x + delta x), so the base weights, their checksum and the unedited
model (routing -1) stay exactly as loaded."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from melo_ray.editors.layers import EditLayer, linear_shape


class DeltaLayer(EditLayer):
    """Wraps one nn.Linear; `delta` (out, in) is added to its weight for the rows that `rows_on` allows."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError("weight-delta editors wrap nn.Linear layers (Llama-family MLPs)")
        self.in_features, self.out_features = linear_shape(base_layer)
        weight = base_layer.weight
        self.register_buffer("delta", torch.zeros(self.out_features, self.in_features, dtype=weight.dtype,
                                                  device=weight.device))
        self.rows_on: torch.Tensor | None = None  # (B,) bool; None: the change applies to every row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        rows = self.rows_on
        if rows is not None and not bool(rows.any()):
            return out
        change = F.linear(x, self.delta.to(x.dtype))
        if rows is not None:
            change = change * rows.to(change.device, change.dtype).view(-1, *([1] * (change.dim() - 1)))
        return out + change


def mlp_down_name(blocks: str, index: int) -> str:
    """The FFN output projection of block `index` of a Llama-family model."""
    return f"{blocks}.{index}.mlp.down_proj"
