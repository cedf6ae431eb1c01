"""MEMOIR's layer: one FFN output projection plus a residual memory read through per-row sparse masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from melo_ray.backbones import Backbone
from melo_ray.editors.layers import EditLayer, linear_shape


class MemoirLayer(EditLayer):
    """output = W0 a + W_m (mask ⊙ a); a row whose mask is all zero runs the base layer alone."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError("MEMOIR wraps an nn.Linear layer (a Llama-family mlp.down_proj)")
        self.in_features, self.out_features = linear_shape(base_layer)
        weight = base_layer.weight
        self.memory = nn.Parameter(torch.zeros(self.out_features, self.in_features, dtype=weight.dtype,
                                               device=weight.device), requires_grad=False)
        self.masks: torch.Tensor | None = None  # (B, in) 0/1 per row; None: the base layer for every row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        masks = self.masks
        if masks is None or not bool(masks.any()):
            return out
        masks = masks.to(x.device, x.dtype).view(masks.shape[0], *([1] * (x.dim() - 2)), masks.shape[1])
        return out + F.linear(x * masks, self.memory.to(x.dtype))


class _Stop(Exception):
    """Raised once the layer input is captured: nothing above it is needed."""


@torch.no_grad()
def prompt_layer_inputs(backbone: Backbone, module: nn.Module, prompts: list[str],
                        batch_size: int = 32) -> list[torch.Tensor]:
    """Per prompt (read through the prompt template, as routing keys are), the input of `module` at each
    of its tokens: (tokens, in) float32 on the host. The forward stops at the module."""
    rows: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [backbone.template_prompt(p) for p in prompts[start : start + batch_size]]
        inputs = {k: v.to(backbone.device) for k, v in
                  backbone.tokenize(chunk, return_tensors="pt", padding=True).items()}
        seen: list[torch.Tensor] = []

        def hook(_m: nn.Module, args: tuple) -> None:
            seen.append(args[0].detach())
            raise _Stop

        handle = module.register_forward_pre_hook(hook)
        try:
            backbone.model(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        mask = inputs["attention_mask"].bool()
        rows += [seen[0][i][mask[i]].float().cpu() for i in range(len(chunk))]
    return rows
