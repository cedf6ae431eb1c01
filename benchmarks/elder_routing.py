"""Why ELDER's generality is low: after T zsRE edits, how many rephrasings are deferred (their code is
not a stored code), how many get their own prompt's allocation code, and how often rephrasings and
edited prompts succeed (greedy output starts with the target). Prints one JSON line.

    melo-ray data convert --format zsre --in ../shared/data/zsre-mend-eval-subsets/zsre_mend_eval_portability_gpt4.json --out /tmp/zsre.parquet
    OMP_NUM_THREADS=1 python benchmarks/elder_routing.py 100 [/tmp/zsre.parquet] [--set elder.replay=50 ...]

`--set section.field=value` overrides one config field (the value is read as YAML), to compare levers.
"""
import argparse
import json
import time

import numpy as np
import pyarrow.parquet as pq
from melo_ray.config import load_config, with_overrides
from melo_ray.editors.registry import build_editor
from melo_ray.editors.protocol import as_records
from melo_ray.metrics import starts_with_target

parser = argparse.ArgumentParser()
parser.add_argument("T", type=int, nargs="?", default=100)
parser.add_argument("edits", nargs="?", default="/tmp/zsre.parquet")
parser.add_argument("--config", default="configs/smollm2-135m.yaml")
parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
parser.add_argument("--thresholds", default="", help="also measure at these deferral thresholds, e.g. 1,2")
parser.add_argument("--nq", default="../shared/data/nq-open/NQ-open.dev.jsonl", help="unrelated questions")
args = parser.parse_args()
T, EDITS = args.T, args.edits
ed = build_editor("elder", with_overrides(load_config(args.config), args.set))
recs = as_records(pq.read_table(EDITS).to_pylist()[:T])
t = time.perf_counter()
for s in range(0, T, 10):
    ed.edit(recs[s:s + 10])
edit_seconds = time.perf_counter() - t
print("edit seconds", round(edit_seconds, 1), flush=True)
reph = [(r, r.rephrases[0]) for r in recs if r.rephrases]
prompts = [p for _, p in reph]
routing = ed.route(prompts); ids, dist = routing.ids, routing.distances
codes = ed.codes(ed.key_function.keys(prompts)).astype(np.int32)
prompt_codes = ed.codes(ed.key_function.keys([r.prompt for r in recs])).astype(np.int32)
with_rephrasing = [i for i, r in enumerate(recs) if r.rephrases]
same_code = (codes == prompt_codes[with_rephrasing]).all(1)
# does each edited prompt still get the allocation it was assigned (router drift)?
on_assigned = (prompt_codes == ed.allocation_bits([r.id for r in recs])).all(1)
out_r = [g.output for g in ed.generate(prompts)]
ok_r = np.array([starts_with_target(o, r.target) for o, (r, _) in zip(out_r, reph)])
out_e = [g.output for g in ed.generate([r.prompt for r in recs])]
ok_e = np.array([starts_with_target(o, r.target) for o, r in zip(out_e, recs)])
# unrelated inputs: a deferred one runs on the exact base model, so this is an upper bound on locality
nq = [json.loads(line)["question"] for line in open(args.nq).read().splitlines()[:100] if line.strip()]
nq_ids = ed.route(nq).ids
res = {
    "T": T, "overrides": args.set, "edit_seconds": round(edit_seconds, 1), "rephrasings": len(reph),
    "rephrasing_deferred": float((ids < 0).mean()),
    "rephrasing_same_code_as_its_prompt": float(same_code.mean()),
    "generality": float(ok_r.mean()),
    "generality_when_same_code": float(ok_r[same_code].mean()) if same_code.any() else None,
    "reliability": float(ok_e.mean()),
    "reliability_first_half": float(ok_e[: T // 2].mean()), "reliability_last_batch": float(ok_e[-10:].mean()),
    "prompt_on_assigned_allocation": float(on_assigned.mean()),
    "prompt_on_assigned_first_half": float(on_assigned[: T // 2].mean()),
    "reliability_when_on_assigned": float(ok_e[on_assigned].mean()) if on_assigned.any() else None,
    "nq_deferred": float((nq_ids < 0).mean()),
    "mean_hamming_rephrasing": float(dist[np.isfinite(dist)].mean()),
}
# the same edited state at other deferral thresholds (inference only): rephrasings admitted vs NQ admitted
res["at_threshold"] = {}
for threshold in [int(t) for t in args.thresholds.split(",") if t.strip()]:
    ed.cfg = ed.cfg.model_copy(update={"defer_threshold": threshold})
    out_t = [g.output for g in ed.generate(prompts)]
    res["at_threshold"][threshold] = {
        "rephrasing_deferred": float((ed.route(prompts).ids < 0).mean()),
        "generality": float(np.mean([starts_with_target(o, r.target) for o, (r, _) in zip(out_t, reph)])),
        "nq_deferred": float((ed.route(nq).ids < 0).mean()),
    }
print(json.dumps(res))
