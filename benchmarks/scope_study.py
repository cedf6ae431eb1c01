"""How well the scope verifier tells "the same question" from "the same subject, another relation",
on pairs from the *evaluation* sets (never trained on), at several thresholds.

Pairs per data set (all converted with melo_ray.data):
  zsRE eval subset      prompt ~ rephrasing (same question), prompt ~ synthetic same-subject probes
  CounterFact edit      prompt ~ rephrase_prompt, prompt ~ locality_prompt (same relation, other
                        subject), prompt ~ synthetic same-subject probes
  wiki_recent (held-out part, records >= --knowedit-train): prompt ~ Relation_Specificity probes,
                        prompt ~ subject-alias rephrasings
  NQ-open               each NQ question ~ its nearest edited prompt (unrelated)
Prints one JSON line per data set and threshold: the fraction of each kind the verifier accepts, and
the routing-view (MiniLM) distance quantiles of each kind.

    OMP_NUM_THREADS=1 python benchmarks/scope_study.py --n 1000 --thresholds 0,1,2.26
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from melo_ray.data import convert
from melo_ray.editors.melo.scope.keys import scoped_keys_for
from melo_ray.editors.melo.scope.verifier import BUILTIN_VERIFIER, ScopeVerifier
from melo_ray.editors.melo.scope.training.verifier_training import embed

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def pairs_of(records, kinds_of) -> list[tuple[str, str, str]]:
    return [(r.prompt, other, kind) for r in records for kind, other in kinds_of(r)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="records of zsRE and CounterFact")
    parser.add_argument("--verifier", type=Path, default=BUILTIN_VERIFIER)
    parser.add_argument("--thresholds", default="0,1,2.26")
    parser.add_argument("--knowedit-train", type=int, default=285, help="wiki_recent records the verifier saw")
    parser.add_argument("--n-nq", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    verifier = ScopeVerifier.load(args.verifier)
    zsre = convert("zsre", DATA / "zsre-mend-eval-subsets/zsre_mend_eval_portability_gpt4.json",
                   limit=args.n, subject_probes=2).records
    cf = convert("counterfact", DATA / "counterfact-mend-splits/counterfact-edit.json", limit=args.n,
                 subject_probes=2).records
    wr = convert("knowedit", DATA / "knowedit/benchmark_wiki_recent_recent_train.json").records[args.knowedit_train:]

    def kinds(r):
        yield from (("rephrase", p) for p in r.rephrases)
        yield from (("alias", p) for p in r.alias_rephrases)
        yield from ((p.kind, p.prompt) for p in r.locality if p.kind != "nq")

    sets = {"zsre": pairs_of(zsre, kinds), "counterfact": pairs_of(cf, kinds), "wiki_recent_heldout": pairs_of(wr, kinds)}
    nq = [json.loads(x)["question"] for x in (DATA / "nq-open/NQ-open.dev.jsonl").read_text().splitlines()[: args.n_nq]]
    texts = sorted({t for pairs in sets.values() for a, b, _ in pairs for t in (a, b)} | set(nq))
    row = {t: i for i, t in enumerate(texts)}
    keys, _ = embed(texts, scoped_keys_for(verifier))
    route = keys[:, : verifier.view_dims[0]]
    edited = np.array([row[r.prompt] for r in zsre + cf])
    nearest = edited[np.argmax(route[[row[q] for q in nq]] @ route[edited].T, axis=1)]
    sets["nq"] = [(texts[e], q, "unrelated") for e, q in zip(nearest, nq)]
    for name, pairs in sets.items():
        a = keys[[row[x] for x, _, _ in pairs]]
        b = keys[[row[y] for _, y, _ in pairs]]
        logits = verifier.logits(a, b)
        dist = 1.0 - (a[:, : verifier.view_dims[0]] * b[:, : verifier.view_dims[0]]).sum(1)
        kinds_here = np.array([k for _, _, k in pairs])
        for threshold in [float(t) for t in args.thresholds.split(",")]:
            out = {"data": name, "threshold": threshold}
            for kind in sorted(set(kinds_here)):
                m = kinds_here == kind
                out[f"{kind}_accepted"] = round(float((logits[m] >= threshold).mean()), 4)
                out[f"{kind}_n"] = int(m.sum())
                out[f"{kind}_route_distance_p10_p50_p90"] = [round(float(np.quantile(dist[m], q)), 3) for q in (0.1, 0.5, 0.9)]
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
