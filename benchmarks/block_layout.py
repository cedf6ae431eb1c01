"""How edits map to LoRA blocks: one block per batch against one per edit, and the block's rank.

Edits the first N records of zsRE or CounterFact in batches of train.batch_size, one variant after
another on one loaded backbone (same records, same process), and reports per variant: optimiser
steps, edits/min, reliability (greedy output starts with the target), generality on the rephrasings
(never trained on), the share of rephrasings routed to some block, generality among those, and the
bank's extra parameters. A variant is `name:section.key=value;section.key=value` (values are JSON).

    python benchmarks/block_layout.py --dataset zsre --n 100 \
        --variants "per-batch r8:lora.block_per_edit=false;lora.block_rank=8;lora.alpha=16" "per-edit r1:"
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from melo_ray.backbones import load_backbone
from melo_ray.config import load_config
from melo_ray.data import convert
from melo_ray.editors.layers import remove_edit_layers
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.evaluation import generality_split
from melo_ray.metrics import success_rate

from core_quality import SOURCES  # the same records as core_quality.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent


def parse_variant(text: str) -> tuple[str, dict[str, dict[str, object]]]:
    name, _, settings = text.partition(":")
    overrides: dict[str, dict[str, object]] = {}
    for item in filter(None, settings.split(";")):
        key, _, value = item.partition("=")
        section, _, field = key.strip().partition(".")
        overrides.setdefault(section, {})[field] = json.loads(value)
    return name, overrides


def measure(name: str, overrides: dict, config_path: Path, backbone, records) -> dict:
    data = load_config(config_path).model_dump()
    for section, values in overrides.items():
        data[section].update(values)
    config = load_config(data)
    remove_edit_layers(backbone.model)
    editor = MeloEditor(config, backbone)
    size, steps = config.train.batch_size, 0
    started = time.perf_counter()
    for start in range(0, len(records), size):
        steps += editor.edit(records[start : start + size]).steps
    seconds = time.perf_counter() - started
    reliability = success_rate([g.output for g in editor.generate([r.prompt for r in records])],
                               [r.target for r in records])
    row = {
        "variant": name, "edits": len(records), "steps": steps, "seconds": round(seconds, 1),
        "edits_per_min": round(len(records) / seconds * 60, 1), "reliability": reliability,
        **generality_split(editor, records),
        "extra_parameters": editor.stats()["extra_parameters"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(SOURCES), default="zsre")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m.yaml")
    parser.add_argument("--variants", nargs="+", default=[
        "per-batch r8:lora.block_per_edit=false;lora.block_rank=8;lora.alpha=16",
        "per-edit r8:lora.block_rank=8;lora.alpha=16",
        "per-edit r1 (default):",
    ])
    args = parser.parse_args()
    backbone = load_backbone(load_config(args.config).backbone)
    fmt, path = SOURCES[args.dataset]
    records = convert(fmt, path, limit=args.n).records
    rows = [measure(*parse_variant(v), args.config, backbone, records) for v in args.variants]
    print("\n| variant | steps | edits/min | reliability | generality | generality, not superseded | rephrasings routed "
          "| generality when routed | extra params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['steps']} | {r['edits_per_min']} | {r['reliability']:.2f} | {r['generality']:.2f} | "
              f"{r['generality_latest']:.2f} | "
              f"{r['rephrases_routed']:.2f} | {r['generality_when_routed']:.3f} | {r['extra_parameters']:,} |")


if __name__ == "__main__":
    main()
