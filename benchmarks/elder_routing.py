"""Why ELDER's generality is low: after T zsRE edits, how many rephrasings are deferred (their code is
not a stored code), how many get their own prompt's allocation code, and how often rephrasings and
edited prompts succeed (greedy output starts with the target). Prints one JSON line.

    melo-ray data convert --format zsre --in ../shared/data/zsre-mend-eval-subsets/zsre_mend_eval_portability_gpt4.json --out /tmp/zsre.parquet
    OMP_NUM_THREADS=1 python benchmarks/elder_routing.py 100 [/tmp/zsre.parquet]
"""
import json
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from melo_ray.config import load_config
from melo_ray.editors import build_editor
from melo_ray.editors.base import as_records
from melo_ray.metrics import starts_with_target

T = int(sys.argv[1]) if len(sys.argv) > 1 else 100
EDITS = sys.argv[2] if len(sys.argv) > 2 else "/tmp/zsre.parquet"
ed = build_editor("elder", load_config("configs/smollm2-135m.yaml"))
recs = as_records(pq.read_table(EDITS).to_pylist()[:T])
t = time.perf_counter()
for s in range(0, T, 10):
    ed.edit(recs[s:s + 10])
print("edit seconds", round(time.perf_counter() - t, 1), flush=True)
reph = [(r, r.rephrases[0]) for r in recs if r.rephrases]
prompts = [p for _, p in reph]
ids, dist = ed.route(prompts)
keys = ed.key_function.keys(prompts)
codes = ed.codes(keys).astype(np.int32)
own = ed.codes(ed.key_function.keys([r.prompt for r, _ in reph])).astype(np.int32)
same_code = (codes == own).all(1)
out_r = [g.output for g in ed.generate(prompts)]
ok_r = np.array([starts_with_target(o, r.target) for o, (r, _) in zip(out_r, reph)])
out_e = [g.output for g in ed.generate([r.prompt for r in recs])]
ok_e = np.array([starts_with_target(o, r.target) for o, r in zip(out_e, recs)])
res = {
    "T": T, "rephrasings": len(reph),
    "rephrasing_deferred": float((ids < 0).mean()),
    "rephrasing_same_code_as_its_prompt": float(same_code.mean()),
    "generality": float(ok_r.mean()),
    "generality_when_same_code": float(ok_r[same_code].mean()) if same_code.any() else None,
    "reliability": float(ok_e.mean()),
    "reliability_first_half": float(ok_e[: T // 2].mean()), "reliability_last_batch": float(ok_e[-10:].mean()),
    "mean_hamming_rephrasing": float(dist[np.isfinite(dist)].mean()),
}
print(json.dumps(res))
