"""What every edit layer shares: it wraps one base linear layer and adds an editor's state beside it.

`EditLayer` marks such modules so that removal (one backbone reused by a fresh editor) and the
base-weights checksum (`weights_checksum`, which skips them) find them by type, never by class name.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


class EditLayer(nn.Module):
    """A module that wraps `base_layer` (the untouched linear) and adds an editor's parameters."""

    base_layer: nn.Module

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    @property
    def weight(self):
        """The frozen base weight; some models (T5) read it to pick a dtype."""
        return self.base_layer.weight


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, Conv1D):  # stores W as (in, out)
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"{type(layer).__name__} is not a linear layer")


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap_llama_down_proj(backbone, editor: str, block: int | None, make_layer) -> tuple[str, nn.Module]:
    """Wrap one Llama block's FFN output projection with `make_layer(base)`: block `block`, or by default
    the 27th of 32 scaled to this depth (the layer WISE and MEMOIR edit in LLaMA). Returns its name and
    the new layer."""
    spec = backbone.family
    if backbone.task != "causal_lm" or spec.model_type != "llama" or not spec.blocks:
        raise ValueError(f"the {editor.upper()} editor is implemented for Llama-family causal LMs")
    depth = len(backbone.model.get_submodule(spec.blocks))
    block = block if block is not None else round(depth * 27 / 32)
    if not 0 <= block < depth:
        raise ValueError(f"{editor}.layer: {block} is not a block of this {depth}-block model")
    name = f"{spec.blocks}.{block}.mlp.down_proj"
    parent, child = get_parent(backbone.model, name)
    layer = make_layer(getattr(parent, child))
    setattr(parent, child, layer)
    return name, layer


def remove_edit_layers(model: nn.Module) -> None:
    """Put back the plain layers that editors wrapped, so one loaded backbone can serve a fresh
    editor. PEFT layers are not ours to remove."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, EditLayer):
                setattr(module, name, child.base_layer)


def edit_layer_state_names(model: nn.Module) -> set[str]:
    """state_dict names owned by edit layers themselves (not by their wrapped base layer)."""
    owned: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, EditLayer):
            for name in module.state_dict():
                if not name.startswith("base_layer."):
                    owned.add(f"{prefix}.{name}" if prefix else name)
    return owned


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 over the base model's parameters and buffers, ignoring every editor's own state.

    Edit layers and PEFT adapters add state beside the base weights; names are normalised so the same
    weights hash the same before and after injection.
    """
    owned = edit_layer_state_names(model)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in owned or ".lora_" in name or name.startswith("lora_"):
            continue
        digest.update(name.replace(".base_layer", "").encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
