"""Train the similarity-ensemble scope verifier (`verifier.SIMILARITY_ENSEMBLE`) on the *train* relation
families of a split and calibrate its threshold on the split's *calibration* families (issue 35).

Its features are each view's cosine and two names flags (`views.similarity_features`), never the views'
vectors: a model over vectors learns where the relations it saw sit in MiniLM's space and keeps 5-8% of
rewordings of relations it never saw at its calibrated bar; one over cosines learns how alike two wordings
of one question are, which carries over (docs/scope_validation.md, "Fifth session").

The relation view's adapter comes from a verifier file tuned on the same split's train families
(`split_training`'s output for the same split): tuning it takes most of that run's half hour, and its file
names the pairs it saw. The threshold is the lowest logit holding both kinds a threshold can hold
(`THRESHOLD_KINDS`) to their false-accept targets on the calibration pairs.

    OMP_NUM_THREADS=1 python -m melo_ray.editors.melo.scope.training.similarity_training \\
        --relation-from runs/verifier_split1.safetensors --seed 1 --keys-cache runs/split-keys.npz \\
        --out runs/verifier_similarity_split1.safetensors
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
from melo_ray.editors.melo.scope.training.split_training import add_split_arguments, as_training_pairs, split_from_arguments
from melo_ray.editors.melo.scope.training.verifier_training import cached_embed, fit_binary
from melo_ray.editors.melo.scope.verifier import SIMILARITY_ENSEMBLE, SimilarityEnsemble, ScopeVerifier, load_verifier
from melo_ray.editors.melo.scope.views import RELATION_META_KEY, similarity_features

log = logging.getLogger(__name__)


def fit_ensemble(features: np.ndarray, labels: np.ndarray, members: int, hidden: int, epochs: int,
                 seed: int) -> dict[str, np.ndarray]:
    """`members` MLPs (two hidden layers of `hidden`), each from its own seed, as SimilarityEnsemble tensors."""
    if members < 1 or epochs < 1 or not len(features):
        raise ValueError("similarity ensemble: needs at least one member, one epoch and one training pair")
    x, y = torch.tensor(features, dtype=torch.float32), torch.tensor(labels, dtype=torch.float32)
    layers: list[list[np.ndarray]] = [[] for _ in SimilarityEnsemble.NAMES]
    for member in range(members):
        torch.manual_seed(seed + member)
        model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                                    torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
        loss = fit_binary(model, x, y, torch.optim.Adam(model.parameters(), lr=3e-3), epochs)
        log.info("member %d of %d: last batch loss %.4f", member + 1, members, loss)
        linear = [m for m in model if isinstance(m, torch.nn.Linear)]
        values = [linear[0].weight.T, linear[0].bias, linear[1].weight.T, linear[1].bias, linear[2].weight[0], linear[2].bias[0]]
        for slot, value in zip(layers, values):
            slot.append(value.detach().numpy().copy())
    return {name: np.stack(values).astype(np.float32) for name, values in zip(SimilarityEnsemble.NAMES, layers)}


def similarity_verifier(base: ScopeVerifier, tensors: dict[str, np.ndarray], **meta: str) -> ScopeVerifier:
    """A similarity-ensemble verifier reading `base`'s views, with its relation adapter and names gate."""
    kept = {k: base.meta[k] for k in ("views", "view_dims", "names_gate", RELATION_META_KEY) if k in base.meta}
    return ScopeVerifier({**tensors, **base.relation_tensors}, {**kept, **meta, "head": SIMILARITY_ENSEMBLE})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--relation-from", required=True,
                        help="verifier file whose views and relation adapter to read (tuned on this split's train families)")
    add_split_arguments(parser)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--keys-cache", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    split, calibration = split_from_arguments(args)
    train = as_training_pairs(list(split.train))
    log.info("%s: %d training pairs, %d calibration pairs", split.name, len(train), len(calibration))
    base = load_verifier(args.relation_from)
    texts = sorted({t for a, b, *_ in train for t in (a, b)} | {t for p in calibration for t in (p.a, p.b)})
    row = {t: i for i, t in enumerate(texts)}
    key_function = scoped_keys_for(base, SentenceEncoderKeys())
    keys, dims = cached_embed(texts, key_function, args.keys_cache) if args.keys_cache else (key_function.keys(texts), base.view_dims)

    def features(firsts: list[str], seconds: list[str]) -> np.ndarray:
        return similarity_features(keys[[row[t] for t in firsts]], keys[[row[t] for t in seconds]], base.view_names, dims)

    train_x = features([a for a, *_ in train], [b for _, b, *_ in train])
    labels = np.array([label for _, _, label, *_ in train], np.float32)
    tensors = fit_ensemble(train_x, labels, args.members, args.hidden, args.epochs, args.seed)
    verifier = similarity_verifier(base, tensors, members=str(args.members), hidden=str(args.hidden), pairs=str(len(train)),
                                   trained_on=f"{split.name}: {split.trained_families}", relation_from=str(args.relation_from))
    logits = verifier.logits(keys[[row[p.a] for p in calibration]], keys[[row[p.b] for p in calibration]])
    threshold, report = calibrate(logits, calibration, THRESHOLD_KINDS)
    verifier = verifier.with_calibration(threshold, f"{split.name}: calibration families, the lowest bar holding "
                                                    f"{' and '.join(THRESHOLD_KINDS)} to their false-accept targets")
    args.out.write_bytes(verifier.to_bytes())
    log.info("scope verifier written to %s: threshold %.3f, %s", args.out, threshold, json.dumps(report))


if __name__ == "__main__":
    main()
