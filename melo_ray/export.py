"""Export MELO blocks to the ecosystem: each block as a standard PEFT LoRA adapter, plus a routing file.

A block b holds, per target linear, A_b (p x in) and B_b (out x p) applied as (alpha/p)·B_b·A_b·x:
exactly a PEFT LoRA of rank p and lora_alpha alpha on the same modules, so
`peft.PeftModel.from_pretrained(base_model, DIR/block-00007)` gives our block-7 outputs. The routing
file lists, for every live edit, its key (as the index stores it), its cluster's radius and the
adapter it fires, so a multi-LoRA server can pick our adapters per request.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
from peft import LoraConfig as PeftLoraConfig

from melo_ray.editors.melo.editor import MeloEditor

TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "classification": "SEQ_CLS"}


def adapter_name(block: int) -> str:
    return f"block-{block:05d}"


def export_peft(editor: MeloEditor, out: str | Path, *, base_model: str | None = None) -> dict[str, Any]:
    """Write one PEFT adapter folder per block with live edits, and routing.json / routing.safetensors
    (rows of `keys` match routing.json "edits", rows of `centres` its "clusters")."""
    if not isinstance(editor, MeloEditor):
        raise NotImplementedError(f"the '{editor.name}' editor has no LoRA blocks to export (MELO has)")
    if editor.index is None:
        raise ValueError("export needs the editor's index (a snapshot restored in this process)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora = editor.config.section("lora")
    if any(type(layer.base_layer).__name__ == "Conv1D" for layer in editor.layers.values()):
        raise NotImplementedError("export of GPT-2 style Conv1D layers is not supported yet")
    index = editor.index.index
    members = [(key, block, edit_id, cluster_id)  # every live edit of the index
               for cluster_id, cluster in enumerate(index.clusters) if cluster.alive
               for key, block, edit_id in zip(cluster.member_keys, cluster.member_blocks, cluster.member_ids)]
    live_blocks = sorted({block for _, block, _, _ in members})
    peft_config = PeftLoraConfig(
        r=lora.block_rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.target_modules),
        task_type=TASK_TYPES[editor.backbone.task], base_model_name_or_path=base_model,
    )
    for block in live_blocks:
        folder = out / adapter_name(block)
        peft_config.save_pretrained(str(folder))
        tensors = {}
        for name, layer in editor.layers.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_bank_A[block].detach().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_bank_B[block].detach().cpu().contiguous()
        safetensors.torch.save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = editor.config.section("index")
    routing = {
        "key_function": cfg.key_function, "key_module": cfg.key_module, "metric": cfg.distance,
        "rule": ("every cluster whose radius holds the query's whole-prompt view offers its members; the member "
                 "the scope verifier (scope_verifier.safetensors) scores highest applies if its score reaches "
                 "scope_threshold; else the base model" if editor.index.index.scope is not None else
                 "nearest cluster centre; inside its radius, the adapter of the nearest member key; else the base model"),
        # the index's own: a store written with another verifier keeps the threshold it was written with
        "scope_threshold": index.scope.threshold if index.scope is not None else None,
        "scope_policy": index.scope.policy(index.cluster_per_edit).to_json() if index.scope is not None else None,
        "snapshot_version": editor.version,
        "edits": [{"id": edit_id, "adapter": adapter_name(block), "cluster": cluster_id, "key_row": row}
                  for row, (_, block, edit_id, cluster_id) in enumerate(members)],
        "clusters": [{"cluster": i, "radius": c.radius, "label": c.label} for i, c in enumerate(index.clusters) if c.alive],
    }
    (out / "routing.json").write_text(json.dumps(routing, indent=2, ensure_ascii=False))
    if index.scope is not None:
        (out / "scope_verifier.safetensors").write_bytes(index.scope.verifier.to_bytes())
    keys = np.stack([k for k, _, _, _ in members]).astype(np.float32) if members else np.zeros((0, index.dim), np.float32)
    alive = [c for c in index.clusters if c.alive]  # rows in the order of routing.json "clusters"
    centres = np.stack([c.centre for c in alive]).astype(np.float32) if alive else np.zeros((0, index.dim), np.float32)
    safetensors.numpy.save_file({"keys": keys, "centres": centres}, str(out / "routing.safetensors"))
    return {"adapters": [adapter_name(b) for b in live_blocks], "edits": len(members), "out": str(out)}
