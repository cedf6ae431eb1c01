"""Every kind of locality, measured apart, on KnowEdit wiki_recent with the embedded model.

Converts the wiki_recent file (edits whose locality prompts ask other relations of the edited subject),
runs the lifelong-editing protocol (melo_ray.evaluation) for each editor on its first N edits and prints
the conversion counts (one JSON line), one JSON line per editor and the results table:
  locality_nq          unrelated NQ-open questions (and the records' own "nq" probes) left unchanged
  locality_neighbours  the same relation of another subject (CounterFact; none in wiki_recent)
  locality_subject     another relation of the edited subject ("The place of birth of X is" after
                       editing "The gender of X is"); ppl_subject(_base) on those probes' true answers
  generality_alias     the edited fact asked with an alias of the subject
  portability          questions whose answer follows from the edited fact

    OMP_NUM_THREADS=1 python benchmarks/locality_kinds.py --n 50 --editors melo
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from melo_ray.backbones import load_backbone
from melo_ray.config import load_config
from melo_ray.data import convert
from melo_ray.editors.registry import build_editor
from melo_ray.evaluation import EvalPlan, evaluate, results_table, write_results

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
WIKI_RECENT = DATA / "knowedit" / "benchmark_wiki_recent_recent_train.json"
NQ = DATA / "nq-open" / "NQ-open.dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m.yaml")
    parser.add_argument("--data", type=Path, default=WIKI_RECENT, help="a KnowEdit fact file")
    parser.add_argument("--n", type=int, default=50, help="edits (the file's first N records)")
    parser.add_argument("--editors", default="melo", help="comma-separated editor names")
    parser.add_argument("--batch-size", type=int, default=None, help="edits per batch (default: the config's)")
    parser.add_argument("--n-locality", type=int, default=100, help="NQ-open questions")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json/.md and curves.png here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    converted = convert("knowedit", args.data)
    print(json.dumps({"data": str(args.data), **converted.counts(),
                      "subject_probes": sum(len(r.probes("subject")) for r in converted.records),
                      "alias_rephrasings": sum(len(r.alias_rephrases) for r in converted.records),
                      "portability_probes": sum(len(r.portability) for r in converted.records)}))
    records = converted.records[: args.n]
    nq = [json.loads(line)["question"] for line in NQ.read_text().splitlines() if line.strip()][: args.n_locality]
    config = load_config(args.config)
    plan = EvalPlan(batch_size=args.batch_size or config.train.batch_size, max_new_tokens=config.generate.max_new_tokens)
    rows = []
    for name in [n.strip() for n in args.editors.split(",") if n.strip()]:
        editor = build_editor(name, config, load_backbone(config.backbone))
        row = evaluate(editor, records, nq, plan, progress=False)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "stats")}, default=float))
    if args.out:
        write_results(rows, args.out, {"config": str(args.config), "data": str(args.data), "n_edits": len(records),
                                       "batch_size": plan.batch_size, "n_locality": len(nq)})
    print(results_table(rows), end="")


if __name__ == "__main__":
    main()
