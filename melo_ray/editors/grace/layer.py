"""GRACE's layer: wraps one linear layer; rows routed to a codebook entry get their output replaced."""
from __future__ import annotations

import torch
from torch import nn

from melo_ray.editors.layers import EditLayer, linear_shape

STAGING_ENTRY = -2


class GraceLayer(EditLayer):
    """Wraps one linear layer; rows routed to a codebook entry get their output replaced."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_shape(base_layer)
        weight = base_layer.weight
        self.register_buffer("keys", torch.zeros(0, self.in_features, dtype=weight.dtype))  # searched on the host
        self.register_buffer("values", torch.zeros(0, self.out_features, dtype=weight.dtype, device=weight.device))
        self.register_buffer("eps", torch.zeros(0, dtype=torch.float64))
        self.labels: list[str] = []
        self.staging_value: nn.Parameter | None = None
        self.entry_ids: torch.Tensor | None = None  # per row: entry, -1 none, -2 staging
        self.replace_from: torch.Tensor | None = None  # per row: first replaced position; None = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        ids = self.entry_ids
        if ids is None or not bool((ids != -1).any()):
            return out
        ids = ids.to(out.device)  # routing runs on the host; the values live beside the weights
        staging = self.staging_value if self.staging_value is not None else out.new_zeros(self.out_features)
        stored = self.values[ids.clamp(min=0)] if len(self.values) else out.new_zeros(len(ids), self.out_features)
        values = torch.where((ids == STAGING_ENTRY)[:, None], staging[None, :], stored)  # (B, out)
        positions = torch.arange(x.shape[1], device=x.device)[None, :]
        if self.replace_from is not None:
            start = self.replace_from.to(out.device)
        else:
            start = torch.full_like(ids, x.shape[1] - 1)
        if x.shape[1] == 1:  # a generation step: the new token is past the prompt
            start = torch.zeros_like(ids)
        mask = (positions >= start[:, None]) & (ids != -1)[:, None]
        return torch.where(mask[..., None], values[:, None, :].to(out.dtype), out)
