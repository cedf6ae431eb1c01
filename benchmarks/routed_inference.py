"""Routed generation against the base model alone, at batch 1 / 8 / 32, with a real snapshot.

Routed = key function + index search + per-row LoRA gather inside generate(); base = the same
model and prompts with routing off. Half the prompts are edited ones (they take a block), half are
NQ-open questions (they stay on the base model). Prints one JSON line per batch size and a table.

    melo-ray edit --config configs/smollm2-135m.yaml --edits zsre.parquet --out runs/zsre-1000 --quiet
    python benchmarks/routed_inference.py --snapshot runs/zsre-1000

`--rephrasings` asks each edit's first rephrasing instead of its prompt (CounterFact's sit behind an
unrelated sentence, so with `index.scope_focus_reach` each pays a second, short encoder pass), and
`--focus-reach-off` adds a routed column with that rule switched off in place (the blocks and the
index do not depend on it), so both costs come from one run. A routed row that answers its edit stops
at end-of-sequence sooner than the base model does, so whole-generation ratios mix in output length;
"routing alone" times `route()` (keys, reach, scope test) on the same batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from melo_ray.editors.loading import load_editor
from melo_ray.records import read_edit_records

ROOT = Path(__file__).resolve().parent.parent
NQ = ROOT.parent / "shared" / "data" / "nq-open" / "NQ-open.dev.jsonl"


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--edits", type=Path, default=None, help="edit file the snapshot came from (prompts)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rephrasings", action="store_true", help="ask each edit's first rephrasing, not its prompt")
    parser.add_argument("--focus-reach-off", action="store_true",
                        help="also time routing with index.scope_focus_reach switched off")
    args = parser.parse_args()
    editor = load_editor(args.snapshot)
    records = read_edit_records(args.edits) if args.edits else []
    edited = ([r.rephrases[0] for r in records if r.rephrases] if args.rephrasings
              else [r.prompt for r in records])
    if not edited:  # the members' edit ids are not prompts; fall back to the zsRE prompts in shared data
        from melo_ray.data import convert

        edited = [r.prompt for r in convert(
            "zsre", ROOT.parent / "shared/data/zsre-mend-eval-subsets/zsre_mend_eval_portability_gpt4.json", limit=64).records]
    questions = [json.loads(x)["question"] for x in NQ.read_text().splitlines()[:64]]
    rows = []
    for size in [int(b) for b in args.batches.split(",")]:
        prompts = [p for pair in zip(edited, questions) for p in pair][:size]
        editor.generate(prompts, args.max_new_tokens)  # warm-up
        routed = _timed(lambda: editor.generate(prompts, args.max_new_tokens), args.repeats)
        base = _timed(lambda: editor.generate(prompts, args.max_new_tokens, base=True), args.repeats)
        # routing alone (keys, reach, scope test): a routed row that answers its target stops at
        # end-of-sequence sooner than the base model, so whole-generation times mix in output length
        route = _timed(lambda: editor.route(prompts), args.repeats)
        row = {"batch": size, "routed_s": routed, "base_s": base, "ratio": routed / base, "route_s": route,
               "blocks": editor.stats()["blocks"], "edits": editor.stats()["edits"]}
        scope = editor.index.index.scope if editor.index is not None else None
        if args.focus_reach_off and scope is not None and scope.focus_reach:
            scope.focus_reach = False
            try:
                row["routed_prompt_reach_s"] = _timed(lambda: editor.generate(prompts, args.max_new_tokens),
                                                      args.repeats)
                row["route_prompt_reach_s"] = _timed(lambda: editor.route(prompts), args.repeats)
            finally:
                scope.focus_reach = True
            row["ratio_prompt_reach"] = row["routed_prompt_reach_s"] / base
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| batch | base s | routed s | routed / base | routing alone ms | routed s, whole-prompt reach "
          "| routed / base | routing alone ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        off = (f"{r['routed_prompt_reach_s']:.3f} | {r['ratio_prompt_reach']:.3f} | {1000 * r['route_prompt_reach_s']:.1f}"
               if "ratio_prompt_reach" in r else "– | – | –")
        print(f"| {r['batch']} | {r['base_s']:.3f} | {r['routed_s']:.3f} | {r['ratio']:.3f} | "
              f"{1000 * r['route_s']:.1f} | {off} |")


if __name__ == "__main__":
    main()
