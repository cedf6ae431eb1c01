"""Do edits hold through the chat template, and what does it cost? (issue 34)

Applies the first N edits of a stream with one config (optionally overridden), timing the `edit()`
calls only, then asks the edited prompts and their rephrasings two ways from the same trained state:
raw (the config's prompt template) and as a user turn of the backbone's chat template (what
`/v1/chat/completions` renders, default system prompt included). NQ questions through chat measure
that unrelated chats keep the base model's answers. One JSON line per run.

    OMP_NUM_THREADS=1 python benchmarks/chat_formats.py --edits runs/zsre.parquet --n 1000 \
        [--set 'train.formats=[raw]'] --label today
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from melo_ray import metrics
from melo_ray.backbones import load_backbone
from melo_ray.config import load_config, with_overrides
from melo_ray.records import read_edit_records
from melo_ray.training import training_formats
from melo_ray.editors.registry import build_editor

NQ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open" / "NQ-open.dev.jsonl"


def _answers(editor, prompts: list[str], view: str, max_new: int, *, base: bool = False) -> list[str]:
    editor.backbone.prompt_view = view
    try:
        return [g.output for g in editor.generate(prompts, max_new, base=base)]
    finally:
        editor.backbone.prompt_view = "raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--edits", required=True)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--n-nq", type=int, default=100)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--label", default="")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    config = with_overrides(load_config(args.config), args.set)
    records = read_edit_records(args.edits)[: args.n]
    editor = build_editor(config.editor, config, load_backbone(config.backbone))
    nq = [json.loads(line)["question"] for line in NQ.read_text().splitlines()[: args.n_nq]]
    nq_base = _answers(editor, nq, "chat", args.max_new_tokens, base=True)

    seconds, step = 0.0, config.train.batch_size
    for start in range(0, len(records), step):
        began = time.perf_counter()
        editor.edit(records[start : start + step])
        seconds += time.perf_counter() - began

    prompts, targets = [r.prompt for r in records], [r.target for r in records]
    rephrased = [(p, r.target) for r in records for p in r.rephrases[:1]]
    row: dict = {"label": args.label, "overrides": args.set, "edits": len(records),
                 "formats": training_formats(editor.backbone, config.train.formats), "edits_per_min": round(60 * len(records) / seconds, 1)}
    for view in ("raw", "chat"):
        row[f"reliability_{view}"] = metrics.success_rate(_answers(editor, prompts, view, args.max_new_tokens), targets)
        row[f"generality_{view}"] = metrics.success_rate(
            _answers(editor, [p for p, _ in rephrased], view, args.max_new_tokens), [t for _, t in rephrased])
    row["locality_nq_chat"] = metrics.locality(_answers(editor, nq, "chat", args.max_new_tokens), nq_base)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
