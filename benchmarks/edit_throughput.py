"""Edit throughput on the embedded model: our trainer against the naive loop and GRACE, one run.

Variants (same zsRE edits, same batches, same process):
  melo            defaults: layers below the first LoRA layer run once per batch, logits only at
                  target positions, early stop, bfloat16 steps where the hardware has it natively
                  (train.compute_dtype auto), confirmed in float32
  melo-fp32       the same, every step in float32
  retire          the same, but an edit leaves the forward as soon as it is learned (train.retire_learned)
  block-per-batch the same, with one rank-8 block per batch of edits instead of one per edit
  no-early-stop   the same, always num_iter steps
  no-prefix-cache whole-model forward every step with full-vocabulary logits at every position
                  (the loss still reads only the target positions); early stop kept
  naive           whole-model forward and backward at full vocabulary every step, num_iter steps,
                  float32 (how the reference code trains)
  grace           the GRACE baseline, one edit at a time, on our trainer (cached prefix, target-only
                  logits, early stop): a stronger GRACE than the published one
  grace-reference GRACE as published: every edit trains its value for grace.num_iter steps with the
                  whole-model forward and backward in float32 (no prefix cache, no early stop)
  grace-reference-bf16  the same under bfloat16 autocast: what the published loop gains from the
                  precision alone, so the ratio to our trainer is not a precision artefact
Each line is JSON; a table with ratios to the naive loop and to GRACE follows. Reliability (greedy
output starts with the target) is measured after each variant so speed never hides a quality loss.

    python benchmarks/edit_throughput.py --n 100 --grace-n 20 --grace-ref-n 5
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from melo_ray.backbones import load_backbone
from melo_ray.editors.layers import remove_edit_layers
from melo_ray.config import EditorConfig, load_config, with_overrides
from melo_ray.data import convert
from melo_ray.editors.registry import build_editor
from melo_ray.metrics import success_rate

ROOT = Path(__file__).resolve().parent.parent
ZSRE = ROOT.parent / "shared" / "data" / "zsre-mend-eval-subsets" / "zsre_mend_eval_portability_gpt4.json"
VARIANTS = {  # config sections each variant overrides
    "melo": {},
    "melo-fp32": {"train": {"compute_dtype": "float32"}},
    "retire": {"train": {"retire_learned": True}},
    "block-per-batch": {"lora": {"block_per_edit": False, "block_rank": 8, "alpha": 16}},
    "no-early-stop": {"train": {"early_stop": False}},
    "no-prefix-cache": {"train": {"cache_frozen_prefix": False}},
    "naive": {"train": {"cache_frozen_prefix": False, "early_stop": False, "compute_dtype": "float32"}},
    "naive-bf16": {"train": {"cache_frozen_prefix": False, "early_stop": False, "compute_dtype": "bfloat16"}},
}


def measure(name: str, editor_kind: str, overrides: dict, config: EditorConfig, backbone, records, batch: int) -> dict:
    data = config.model_dump()
    for section, values in overrides.items():
        data[section].update(values)
    remove_edit_layers(backbone.model)
    editor = build_editor(editor_kind, load_config(data), backbone)
    started = time.perf_counter()
    steps = 0
    for start in range(0, len(records), batch):
        steps += editor.edit(records[start : start + batch]).steps
    seconds = time.perf_counter() - started
    outputs = [g.output for g in editor.generate([r.prompt for r in records])]
    row = {
        "variant": name, "edits": len(records), "batch": batch, "seconds": seconds, "steps": steps,
        "edits_per_min": len(records) / seconds * 60,
        "reliability": success_rate(outputs, [r.target for r in records]),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="edits per MELO variant")
    parser.add_argument("--grace-n", type=int, default=20, help="edits for GRACE (one at a time)")
    parser.add_argument("--grace-ref-n", type=int, default=5, help="edits for the published-style GRACE")
    parser.add_argument("--variants", default="melo,retire,block-per-batch,no-early-stop,no-prefix-cache,naive,grace,grace-reference")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m.yaml")
    parser.add_argument("--zsre", type=Path, default=ZSRE, help="zsRE records (MEND eval format)")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. backbone.device=cuda")
    args = parser.parse_args()
    config = with_overrides(load_config(args.config), args.set)
    backbone = load_backbone(config.backbone)
    print(json.dumps({"device": str(backbone.device), "threads": torch.get_num_threads(),
                      "gpu": torch.cuda.get_device_name() if backbone.device.type == "cuda" else None}), flush=True)
    records = convert("zsre", args.zsre, limit=max(args.n, args.grace_n, args.grace_ref_n)).records
    rows = []
    for name in args.variants.split(","):
        if name == "grace":
            rows.append(measure(name, "grace", {}, config, backbone, records[: args.grace_n], 1))
        elif name in ("grace-reference", "grace-reference-bf16"):
            loop = VARIANTS["naive" if name == "grace-reference" else "naive-bf16"]
            rows.append(measure(name, "grace", loop, config, backbone, records[: args.grace_ref_n], 1))
        else:
            rows.append(measure(name, "melo", VARIANTS[name], config, backbone, records[: args.n],
                                config.train.batch_size))
    by = {r["variant"]: r for r in rows}
    print("\n| variant | edits | edits/min | x naive | x GRACE (our trainer) | x GRACE (as published) | reliability |")
    print("|---|---|---|---|---|---|---|")

    def ratio(value: float, baseline: str) -> str:
        base = by.get(baseline, {}).get("edits_per_min")
        return f"{value / base:.1f}" if base else "-"

    for r in rows:
        v = r["edits_per_min"]
        print(f"| {r['variant']} | {r['edits']} | {v:.1f} | {ratio(v, 'naive')} | {ratio(v, 'grace')} | "
              f"{ratio(v, 'grace-reference')} | {r['reliability']:.2f} |")


if __name__ == "__main__":
    main()
