"""Train the scope verifier on the *train* relation families of a leave-relations-out split, and set its
threshold and relation weight on the split's *calibration* families, so the file's threshold was placed on
relations the verifier never learned (issue 35). Test families stay unseen for `benchmarks/scope_validation.py`.

The verifier is the shipped architecture (scope.py: the MLP over the five views, the tuned relation view
added with its weight); only its pairs differ from `scope_training`: those of `scope_pairs`, which add the
hand-written Wikidata templates (the same subject with another property in the same wording, inverse and
directional properties, namesakes) to the training splits' records.

The threshold is the lowest logit that meets every negative kind's false-accept target on the calibration
pairs (`cross_scope_training.calibrate`); the relation weight is the one that then accepts the most
calibration rewordings. Both go into the file's metadata with the split that placed them.

    OMP_NUM_THREADS=2 python -m melo_ray.editors.melo.scope.training.split_training --out runs/verifier_split1.safetensors \
        --seed 1 --exclude-sources wiki_recent --keys-cache runs/split-keys.npz
    # leave-one-dataset-out: never a zsRE record, in training or calibration
    OMP_NUM_THREADS=1 python -m melo_ray.editors.melo.scope.training.split_training --out runs/verifier_lodo_zsre.safetensors \
        --dataset-out zsre --keys-cache runs/lodo-zsre-keys.npz
    # a file to ship: the test families trained on too, calibrated on the calibration families
    OMP_NUM_THREADS=1 python -m melo_ray.editors.melo.scope.training.split_training --out runs/verifier_ship.safetensors \
        --ship --seed 1 --exclude-sources wiki_recent --keys-cache runs/ship-keys.npz
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from melo_ray.editors.melo.scope.training.cross_encoder_training import calibrate, capped
from melo_ray.editors.melo.scope.encoder import SentenceEncoderKeys
from melo_ray.editors.melo.scope.keys import ScopedSentenceKeys
from melo_ray.editors.melo.scope.relation import RelationEncoder
from melo_ray.editors.melo.scope.verifier import ScopeVerifier
from melo_ray.editors.melo.scope.views import pair_features
from melo_ray.editors.melo.scope.training.pairs import (POSITIVE_KINDS, SOURCES, DataPaths, Pair, Split, all_pairs,
                                                        leave_dataset_out, leave_relations_out, ship_split)
from melo_ray.editors.melo.scope.training.verifier_training import DEFAULT_VIEWS, HIDDEN, cached_embed, embed, fit, with_relation_view

log = logging.getLogger(__name__)
DATA = Path(__file__).resolve().parents[5].parent / "shared" / "data"
# scope_pairs' kinds as scope_training's relation-view tuning reads them
TRAINING_KIND = {"reword": "rephrase", "alias": "alias", "subject_other_relation": "subject", "inverse": "subject",
                 "relation_other_subject": "other_subject", "namesake": "other_subject"}


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every scope trainer takes to name its split and its calibration pairs."""
    parser.add_argument("--seed", type=int, default=1, help="the split's seed (which relation families are held out)")
    parser.add_argument("--exclude-sources", default="wiki_recent", help="sources never trained or calibrated on")
    held_out = parser.add_mutually_exclusive_group()  # --ship trains on every source but --exclude-sources
    held_out.add_argument("--dataset-out", default=None, choices=SOURCES,
                          help="leave this source out instead (leave-one-dataset-out): train on every family of the "
                               "other sources but their calibration families, calibrate on those (--exclude-sources "
                               "is then not used)")
    held_out.add_argument("--ship", action="store_true",
                          help="a file to ship: train on the test families too (every family but the calibration "
                               "ones), calibrate on those; its held-out figures are the plain split's")
    parser.add_argument("--calibration-cap", type=int, default=800, help="calibration pairs per (source, kind)")


def split_from_arguments(args: argparse.Namespace) -> tuple[Split, list[Pair]]:
    """The split `add_split_arguments` named, over every pair of the public training splits, and its
    calibration pairs capped per (source, kind)."""
    pairs = all_pairs(DataPaths.under(DATA))
    excluded = tuple(s for s in args.exclude_sources.split(",") if s)
    if args.ship:
        split = ship_split(pairs, args.seed, excluded)
    elif args.dataset_out:
        split = leave_dataset_out(pairs, args.dataset_out, args.seed)
    else:
        split = leave_relations_out(pairs, args.seed, excluded)
    return split, capped(list(split.calibration), args.calibration_cap, args.seed)


def as_training_pairs(pairs: list[Pair]) -> list[tuple[str, str, int, str, str]]:
    """scope_training's tuples, each prompt also paired with itself (an identical prompt must pass)."""
    out = [(p.a, p.b, p.label, TRAINING_KIND[p.kind], p.source) for p in pairs if p.kind in TRAINING_KIND]
    out += [(a, a, 1, "identity", "identity") for a in sorted({p.a for p in pairs})]
    return out


def calibrated_weight(verifier: ScopeVerifier, firsts: np.ndarray, seconds: np.ndarray, pairs: list[Pair],
                      weights: list[float]) -> tuple[ScopeVerifier, float, dict[str, float]]:
    """The relation weight whose calibrated threshold accepts the most calibration rewordings."""
    positives = np.array([p.kind in POSITIVE_KINDS for p in pairs])
    best = None
    for weight in weights:
        candidate = verifier.with_relation_weight(weight)
        logits = candidate.logits(firsts, seconds)
        threshold, report = calibrate(logits, pairs)
        accepted = float((logits[positives] >= threshold).mean())
        log.info("relation weight %g: calibrated threshold %.3f, calibration rewordings accepted %.4f (%s)",
                 weight, threshold, accepted, json.dumps({k: round(v, 4) for k, v in report.items()}))
        if best is None or accepted > best[0]:
            best = (accepted, candidate, threshold, {**report, "relation_weight": weight,
                                                     "calibration_rewordings_accepted": accepted})
    return best[1], best[2], best[3]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    add_split_arguments(parser)
    parser.add_argument("--views", default=",".join(DEFAULT_VIEWS))
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--relation-epochs", type=int, default=3, help="0: no relation view")
    parser.add_argument("--relation-weights", default="0,10,20,40")
    parser.add_argument("--names-gate", type=float, default=0.2, help="negative: no gate")
    parser.add_argument("--keys-cache", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO)
    split, calibration = split_from_arguments(args)
    train = as_training_pairs(list(split.train))
    log.info("%s: %d training pairs, %d calibration pairs", split.name, len(train), len(calibration))
    views = tuple(v for v in args.views.split(",") if v)
    encoder = SentenceEncoderKeys()
    key_function = ScopedSentenceKeys(list(views), encoder)
    texts = sorted({t for a, b, *_ in train for t in (a, b)} | {t for p in calibration for t in (p.a, p.b)})
    row = {t: i for i, t in enumerate(texts)}
    keys, dims = cached_embed(texts, key_function, args.keys_cache) if args.keys_cache else embed(texts, key_function)
    firsts, seconds = keys[[row[a] for a, *_ in train]], keys[[row[b] for _, b, *_ in train]]
    labels = np.array([label for _, _, label, *_ in train], np.float32)
    weights = fit(pair_features(firsts, seconds, dims), labels, args.hidden, args.epochs, args.seed)
    meta = {"views": ",".join(views), "view_dims": ",".join(map(str, dims)), "hidden": str(args.hidden),
            "trained_on": f"{split.name}: {split.trained_families}",
            "pairs": str(len(train))}
    if args.names_gate >= 0:
        meta["names_gate"] = str(args.names_gate)
    verifier = ScopeVerifier(weights, meta)
    cal_firsts = keys[[row[p.a] for p in calibration]]
    cal_seconds = keys[[row[p.b] for p in calibration]]
    if args.relation_epochs > 0:
        tuning = argparse.Namespace(relation_epochs=args.relation_epochs, seed=args.seed)
        verifier = with_relation_view(verifier, train, set(), encoder, tuning)
        relation = RelationEncoder.of(verifier, encoder)
        cal_texts = sorted({t for p in calibration for t in (p.a, p.b)})
        at = {t: i for i, t in enumerate(cal_texts)}
        views_of = relation.keys(cal_texts)
        cal_firsts = np.concatenate([cal_firsts, views_of[[at[p.a] for p in calibration]]], axis=1)
        cal_seconds = np.concatenate([cal_seconds, views_of[[at[p.b] for p in calibration]]], axis=1)
        weights_tried = [float(w) for w in args.relation_weights.split(",")]
    else:
        weights_tried = [0.0]
    verifier, threshold, report = calibrated_weight(verifier, cal_firsts, cal_seconds, calibration, weights_tried)
    verifier = verifier.with_calibration(threshold, f"{split.name}: calibration families, false-accept targets")
    args.out.write_bytes(verifier.to_bytes())
    log.info("scope verifier written to %s: threshold %.3f, %s", args.out, threshold, json.dumps(report))


if __name__ == "__main__":
    random.seed(0)
    main()
