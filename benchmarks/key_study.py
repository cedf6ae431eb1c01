"""How well each key function separates rephrasings from other facts and unrelated questions.

For the first N records of zsRE and CounterFact on the embedded model, prints per key function the
fraction of rephrasings whose nearest edited prompt is their own, and distance quantiles for
rephrasing -> own prompt, locality prompt -> nearest prompt and NQ question -> nearest prompt.

    python benchmarks/key_study.py --n 100
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from melo_ray.backbones import load_backbone
from melo_ray.config import load_config
from melo_ray.data import convert
from melo_ray.editors.melo.scope.index import distances
from melo_ray.editors.melo.scope.keys import build_key_function

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m.yaml")
    args = parser.parse_args()
    base = load_config(args.config)
    backbone = load_backbone(base.backbone)
    sets = {
        "zsre": convert("zsre", DATA / "zsre-mend-eval-subsets/zsre_mend_eval_portability_gpt4.json", limit=args.n).records,
        "counterfact": convert("counterfact", DATA / "counterfact-mend-splits/counterfact-edit.json", limit=args.n).records,
    }
    nq = [json.loads(x)["question"] for x in (DATA / "nq-open/NQ-open.dev.jsonl").read_text().splitlines()[: args.n]]
    for key_function in ("sentence_encoder", "last_token", "mean"):
        data = base.model_dump()
        data["index"].update(key_function=key_function, metric=None)
        cfg = load_config(data).index
        keys = build_key_function(backbone, cfg)
        for name, records in sets.items():
            prompts = keys.keys([r.prompt for r in records])
            rephrased = keys.keys([r.rephrases[0] for r in records])
            locality = keys.keys([r.locality_prompt for r in records])
            to_own = distances(cfg.distance, rephrased, prompts)
            own = np.diag(to_own)
            loc = distances(cfg.distance, locality, prompts).min(1)
            unrelated = distances(cfg.distance, keys.keys(nq), prompts).min(1)
            print(json.dumps({
                "key_function": key_function, "data": name, "metric": cfg.distance,
                "rephrase_nearest_is_own": float((to_own.argmin(1) == np.arange(len(records))).mean()),
                "own_p50": float(np.median(own)), "own_p90": float(np.quantile(own, 0.9)),
                "locality_p10": float(np.quantile(loc, 0.1)), "locality_p50": float(np.median(loc)),
                "nq_p1": float(np.quantile(unrelated, 0.01)), "nq_p10": float(np.quantile(unrelated, 0.1)),
            }), flush=True)


if __name__ == "__main__":
    main()
