"""AlphaEdit's target search on 5 zsRE training records (issue 36): the search's final loss and share of
target tokens it gets right, then teacher-forced token accuracy and greedy answers after the edit.

    python benchmarks/alphaedit_target_search.py '<alphaedit settings JSON>'   (needs runs/peers/zsre-train.parquet)
"""
import sys, json, time
from melo_ray.config import load_config
from melo_ray.editors.registry import build_editor
from melo_ray.records import read_edit_records
base = load_config("configs/smollm2-135m.yaml").model_dump()
recs = read_edit_records("runs/peers/zsre-train.parquet")[:5]
spec = json.loads(sys.argv[1])
ed = build_editor("alphaedit", load_config({**base, "alphaedit": {"covariance_samples": 100, **spec}}))
t = time.time(); ed.projections = ed._build_projections(); print("proj", time.time() - t, flush=True)
t = time.time(); r = ed.edit(recs); print("edit", time.time() - t, "zloss", r.final_loss, "zlearned", r.learned, "steps", r.steps, flush=True)
hits = ed.target_token_hits(recs); print("tok", [sum(h)/len(h) for h in hits], flush=True)
print([ (g.output, x.target) for g, x in zip(ed.generate([x.prompt for x in recs], 8), recs)], flush=True)
