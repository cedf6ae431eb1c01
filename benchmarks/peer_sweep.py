"""Development sweep for a peer editor (issue 36) on zsRE TRAINING records only: per settings JSON, edit the
first N records (or records A to B, given as A:B) in batches, then print one JSON line: rel (generation starts with the target), tok
(teacher-forced token accuracy), gen (first rephrasing), loc_nq (20 NQ-open dev questions whose 8-token
greedy output is unchanged), seconds and the editor's stats.

    python benchmarks/peer_sweep.py <editor> <N | A:B> <batch> '<settings JSON>' ...   (needs runs/peers/zsre-train.parquet)
"""
import sys, time, json
from melo_ray.config import load_config
from melo_ray.backbones import load_backbone
from melo_ray.editors.registry import build_editor
from melo_ray.editors.layers import remove_edit_layers
from melo_ray.records import read_edit_records
from melo_ray import metrics
name, span, bs = sys.argv[1], sys.argv[2], int(sys.argv[3])
lo, hi = (int(x) for x in span.split(":")) if ":" in span else (0, int(span))
n = hi - lo
base = load_config("configs/smollm2-135m.yaml").model_dump()
bb = load_backbone(load_config(base).backbone)
recs = read_edit_records("runs/peers/zsre-train.parquet")[lo:hi]
nq = [json.loads(l)["question"] for l in open("../shared/data/nq-open/NQ-open.dev.jsonl")][:20]
for spec in sys.argv[4:]:
    cfg = dict(base); cfg[name] = {**base.get(name, {}), **json.loads(spec)} if name in base else json.loads(spec)
    ed = build_editor(name, load_config(cfg), bb)
    before = [g.output for g in ed.generate(nq, 8, base=True)]
    t = time.time()
    for s in range(0, n, bs):
        ed.edit(recs[s:s+bs])
    sec = time.time() - t
    outs = [g.output for g in ed.generate([r.prompt for r in recs], 12)]
    gen = [g.output for g in ed.generate([r.rephrases[0] for r in recs], 12)]
    hits = [h for row in ed.target_token_hits(recs) for h in row]
    after = [g.output for g in ed.generate(nq, 8)]
    print(json.dumps({"spec": spec, "rel": metrics.success_rate(outs, [r.target for r in recs]),
          "tok": sum(hits)/len(hits), "gen": metrics.success_rate(gen, [r.target for r in recs]),
          "loc_nq": sum(a == b for a, b in zip(before, after))/len(nq), "sec": round(sec, 1), "stats": ed.stats()}), flush=True)
    remove_edit_layers(bb.model)
