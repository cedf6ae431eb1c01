"""Blend a pair-MLP verifier and a similarity-ensemble verifier of one split into one `blend` head, with its
weight and threshold placed on the split's *calibration* families (issue 35).

The two heads fail differently on relations they never saw: the pair MLP learns where the relations it
was trained on sit in MiniLM's space, the ensemble only how alike two wordings are (docs/scope_validation.md).
Each logit is standardised by its mean and deviation on the calibration pairs, the two are added in the
weight that keeps the most calibration rewordings at its own bar, and that bar (`THRESHOLD_KINDS` held
to their false-accept targets) is stored in the file. Test families are never read.

Both files must read the same views with the same relation adapter: `similarity_training --relation-from`
the pair-MLP file gives that.

    OMP_NUM_THREADS=1 python -m melo_ray.editors.melo.scope.training.blend_training \\
        --pair runs/verifier_split1.safetensors --similarity runs/verifier_similarity_split1.safetensors \\
        --seed 1 --keys-cache runs/scope-validation-keys.npz --out runs/verifier_blend_split1.safetensors
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from melo_ray.editors.melo.scope.encoder import SentenceEncoderKeys
from melo_ray.editors.melo.scope.keys import scoped_keys_for
from melo_ray.editors.melo.scope.training.cross_encoder_training import THRESHOLD_KINDS, calibrate
from melo_ray.editors.melo.scope.training.pairs import Pair
from melo_ray.editors.melo.scope.training.split_training import add_split_arguments, split_from_arguments
from melo_ray.editors.melo.scope.training.verifier_training import cached_embed
from melo_ray.editors.melo.scope.verifier import (BLEND, PAIR_MLP, SIMILARITY_ENSEMBLE, Blend, ScopeVerifier,
                                                  load_verifier)
from melo_ray.editors.melo.scope.views import RELATION_META_KEY

log = logging.getLogger(__name__)

WEIGHTS = tuple(np.round(np.arange(0.0, 1.0001, 0.125), 3))
SHARED_META = ("views", "view_dims", "names_gate", RELATION_META_KEY)


def check_compatible(pair: ScopeVerifier, similarity: ScopeVerifier) -> None:
    """Both heads must be the right kind and read the same views with the same relation adapter."""
    if pair.head != PAIR_MLP or similarity.head != SIMILARITY_ENSEMBLE:
        raise ValueError(f"blend: needs a {PAIR_MLP} file and a {SIMILARITY_ENSEMBLE} file "
                         f"(got {pair.head} and {similarity.head})")
    differing = [k for k in SHARED_META if pair.meta.get(k) != similarity.meta.get(k)]
    if differing or pair.relation_tensors.keys() != similarity.relation_tensors.keys() or not all(
            np.array_equal(pair.relation_tensors[k], similarity.relation_tensors[k]) for k in pair.relation_tensors):
        raise ValueError(f"blend: the two files read different views or relation adapters ({differing or 'adapter tensors'}); "
                         "train the ensemble with --relation-from the pair-MLP file")


def blended(pair: ScopeVerifier, similarity: ScopeVerifier, blend: Blend, **meta: str) -> ScopeVerifier:
    """One verifier holding both heads' weights, reading the views and relation adapter they share."""
    check_compatible(pair, similarity)
    kept = {k: pair.meta[k] for k in (*SHARED_META, "relation_weight") if k in pair.meta}
    weights = {**pair.tensors, **similarity.ensemble.tensors}
    return ScopeVerifier(weights, {**kept, **meta, **blend.meta(), "head": BLEND})


def gated(blend: Blend, pair_logits: np.ndarray, similarity_logits: np.ndarray, refused: np.ndarray) -> np.ndarray:
    """The blend's logits with the names gate's refusals at -inf, as the written file scores them."""
    return np.where(refused, -np.inf, blend.combine(pair_logits, similarity_logits))


def choose_blend(pair_logits: np.ndarray, similarity_logits: np.ndarray, calibration: list[Pair],
                 refused: np.ndarray | None = None,
                 weights: tuple[float, ...] = WEIGHTS) -> tuple[Blend, float, list[dict[str, float]]]:
    """The weight keeping the most calibration rewordings at its own calibrated bar (ties: the smaller
    weight), its blend and bar, and every weight's figures. `refused`: the pairs the names gate refuses
    whatever the heads say; they are left out of the scales and score -inf, as in the shipped file."""
    refused = np.zeros(len(calibration), bool) if refused is None else np.asarray(refused, bool)
    finite = np.isfinite(pair_logits) & np.isfinite(similarity_logits) & ~refused
    if not finite.any():
        raise ValueError("blend: no calibration pair with finite logits from both heads")
    scale = (float(pair_logits[finite].mean()), float(pair_logits[finite].std()),
             float(similarity_logits[finite].mean()), float(similarity_logits[finite].std()))
    rewordings = np.array([p.kind == "reword" for p in calibration])
    table, best = [], None
    for weight in weights:
        blend = Blend(weight, scale)
        logits = gated(blend, pair_logits, similarity_logits, refused)
        bar, _ = calibrate(logits, calibration, THRESHOLD_KINDS)
        kept = float((logits[rewordings] >= bar).mean()) if rewordings.any() else 0.0
        table.append({"weight": float(weight), "bar": bar, "calibration_rewordings": kept})
        if best is None or kept > best[2]:
            best = (blend, bar, kept)
    return best[0], best[1], table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pair", required=True, help="pair-MLP verifier file trained on this split's train families")
    parser.add_argument("--similarity", required=True, help="similarity-ensemble file of the same split and adapter")
    add_split_arguments(parser)
    parser.add_argument("--keys-cache", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    split, calibration = split_from_arguments(args)
    pair, similarity = load_verifier(args.pair), load_verifier(args.similarity)
    check_compatible(pair, similarity)  # before scoring: keys are made for the pair file's views
    texts = sorted({t for p in calibration for t in (p.a, p.b)})
    row = {t: i for i, t in enumerate(texts)}
    key_function = scoped_keys_for(pair, SentenceEncoderKeys())
    keys = cached_embed(texts, key_function, args.keys_cache)[0] if args.keys_cache else key_function.keys(texts)
    firsts, seconds = keys[[row[p.a] for p in calibration]], keys[[row[p.b] for p in calibration]]
    # both files carry the same names gate: the pairs it refuses (-inf) are refused by the blend too, so
    # the weight is chosen on what the written file will accept
    pair_logits, similarity_logits = pair.logits(firsts, seconds), similarity.logits(firsts, seconds)
    refused = np.isneginf(pair_logits)
    blend, _, table = choose_blend(pair_logits, similarity_logits, calibration, refused)
    verifier = blended(pair, similarity, blend, trained_on=f"{split.name}: {split.trained_families}",
                       pair_from=str(args.pair), similarity_from=str(args.similarity))
    threshold, report = calibrate(gated(blend, pair_logits, similarity_logits, refused), calibration, THRESHOLD_KINDS)
    verifier = verifier.with_calibration(threshold, f"{split.name}: calibration families, the blend weight keeping "
                                                    f"the most rewordings and the lowest bar holding "
                                                    f"{' and '.join(THRESHOLD_KINDS)} to their false-accept targets")
    args.out.write_bytes(verifier.to_bytes())
    log.info("weights on calibration: %s", json.dumps(table))
    log.info("blend verifier written to %s: weight %.3f, threshold %.3f, %s", args.out, blend.weight, threshold,
             json.dumps(report))


if __name__ == "__main__":
    main()
