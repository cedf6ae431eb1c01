"""For one scope verifier file, on one part of the leave-relations-out split (seed 1, wiki_recent out of
train and calibration): per negative kind, the bar that meets that kind's false-accept target alone, and
the share of rewordings (zsRE-style questions, CounterFact-style cloze) still accepted there; then every
kind's acceptance at a few thresholds, and the highest-scoring negatives of each kind. Shows which kind
of negative binds a calibrated threshold, and what it costs in rewordings.

    OMP_NUM_THREADS=1 python benchmarks/scope_bars.py --verifier builtin --part calibration
    OMP_NUM_THREADS=1 python benchmarks/scope_bars.py --verifier runs/verifier_split1.safetensors --part calibration
    OMP_NUM_THREADS=1 python benchmarks/scope_bars.py --verifier runs/verifier_lodo_zsre.safetensors --dataset-out zsre \
        --part test --keys-cache runs/lodo-zsre-test-keys.npz
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from melo_ray.editors.melo.scope.encoder import SentenceEncoderKeys
from melo_ray.editors.melo.scope.keys import scoped_keys_for
from melo_ray.editors.melo.scope.training.cross_encoder_training import FALSE_ACCEPT_TARGETS, capped
from melo_ray.editors.melo.scope.training.pairs import SOURCES, DataPaths, all_pairs, leave_dataset_out, leave_relations_out
from melo_ray.editors.melo.scope.training.verifier_training import cached_embed
from melo_ray.editors.melo.scope.verifier import load_verifier

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verifier", default="builtin")
    parser.add_argument("--part", choices=["calibration", "test"], default="calibration")
    parser.add_argument("--thresholds", default="34.94,29.18,20,10")
    parser.add_argument("--keys-cache", type=Path, default=ROOT / "runs/scope-validation-keys.npz")
    parser.add_argument("--dataset-out", default=None, choices=SOURCES,
                        help="use the leave-one-dataset-out split of this source instead (its test part: every "
                             "pair of the source; calibration: the other sources' calibration families)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    every_pair = all_pairs(DataPaths.under(ROOT.parent / "shared" / "data"))
    split = (leave_dataset_out(every_pair, args.dataset_out, 1) if args.dataset_out
             else leave_relations_out(every_pair, 1, ("wiki_recent",)))
    pairs = capped(list(getattr(split, args.part)), 800 if args.part == "calibration" else 1000, 1)
    verifier = load_verifier(args.verifier)
    keys_of = scoped_keys_for(verifier, SentenceEncoderKeys())
    texts = sorted({t for p in pairs for t in (p.a, p.b)})
    row = {t: i for i, t in enumerate(texts)}
    keys, _ = cached_embed(texts, keys_of, args.keys_cache)
    logits = verifier.logits(keys[[row[p.a] for p in pairs]], keys[[row[p.b] for p in pairs]])
    kinds = np.array([p.kind for p in pairs])
    questions = (kinds == "reword") & np.array([p.style == "question" for p in pairs])
    cloze = (kinds == "reword") & ~questions
    print(f"{args.verifier} on the {args.part} part of {split.name}; the file's threshold: {verifier.calibrated_threshold}\n")
    print("| negative kind | pairs | bar meeting its target alone | rewordings accepted there: questions / cloze |")
    print("|---|---|---|---|")
    for kind, target in FALSE_ACCEPT_TARGETS.items():
        scores = np.sort(logits[kinds == kind])[::-1]
        allowed = int(np.floor(target * len(scores)))
        bar = float(np.nextafter(scores[allowed], np.inf)) if allowed < len(scores) else -np.inf
        print(f"| {kind} (<= {target}) | {len(scores)} | {bar:.2f} | "
              f"{np.mean(logits[questions] >= bar):.3f} / {np.mean(logits[cloze] >= bar):.3f} |")
    print("\n| threshold | " + " | ".join(sorted(set(kinds))) + " | rewordings: questions / cloze |")
    print("|---|" + "---|" * (len(set(kinds)) + 1))
    for threshold in (float(t) for t in args.thresholds.split(",")):
        accepted = logits >= threshold
        print(f"| {threshold:g} | " + " | ".join(f"{accepted[kinds == k].mean():.4f}" for k in sorted(set(kinds)))
              + f" | {accepted[questions].mean():.3f} / {accepted[cloze].mean():.3f} |")
    print()
    for kind in FALSE_ACCEPT_TARGETS:
        for i in [i for i in np.argsort(-logits) if kinds[i] == kind][:3]:
            print(f"{kind}: {logits[i]:.1f}  {pairs[i].a!r} / {pairs[i].b!r}")


if __name__ == "__main__":
    main()
