"""Train the scope verifier (scope.py) on public *training* splits only, and write it as safetensors.

Pairs (prompt, other prompt, same question?):
- positives: each record's prompt with its rephrasing (CounterFact train `rephrase_prompt`, zsRE train
  `rephrase`), and each prompt with itself;
- same subject, other relation (negatives): the record's subject put into another record's relation
  template ("{} was born in"), skipping templates of the same relation (linked through rephrasings)
  or sharing a content word with the record's own; with a KnowEdit file, the records'
  Relation_Specificity prompts of a fixed first part (`--knowedit-train`); its other part is never
  seen, so it can be evaluated;
- same relation, other subject (negatives): CounterFact's `locality_prompt` (and, with
  `--other-subject-negatives`, each record's own template with another record's subject);
- unrelated (negatives): another record's prompt.

    python -m melo_ray.editors.melo.scope_training --out melo_ray/editors/melo/scope_verifier.safetensors
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from melo_ray.data import RelationGroups, convert, relation_template
from melo_ray.editors.melo.scope import ScopeVerifier, focus, pair_features

log = logging.getLogger(__name__)
DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
DEFAULT_VIEWS = ("prompt", "focus", "masked", "words")  # the shipped verifier's

Pair = tuple[str, str, int, str]  # (a, b, label, kind)


def _fact_pairs(facts: list[tuple[str, str, str | None, str | None]], rng: random.Random,
                negatives: int, other_subject: bool = False) -> list[Pair]:
    """facts: (prompt, subject, rephrase, neighbour) -> positives and synthesised negatives."""
    relations = RelationGroups()
    templates = []
    for prompt, subject, rephrase, _ in facts:
        t = relation_template(prompt, subject)
        relations.find(t) if t else None
        relations.link(t, relation_template(focus(rephrase), subject) if rephrase else None)
        templates.append(t)
    pool = sorted({t for t in templates if t})
    pairs: list[Pair] = []
    for (prompt, subject, rephrase, neighbour), own in zip(facts, templates):
        pairs.append((prompt, prompt, 1, "identity"))
        if rephrase:
            pairs.append((prompt, rephrase, 1, "rephrase"))
        if neighbour:
            pairs.append((prompt, neighbour, 0, "neighbour"))
        other_prompt = rng.choice(facts)[0]
        if other_prompt != prompt:
            pairs.append((prompt, other_prompt, 0, "unrelated"))
        if own is None:
            continue
        if other_subject:  # opt-in: drawing it changes the random negatives after it
            someone_else = rng.choice(facts)[1]
            if someone_else and someone_else.casefold() != subject.casefold():
                pairs.append((prompt, own.format(someone_else), 0, "other_subject"))
        for _ in range(negatives):
            other = rng.choice(pool)
            if relations.differ(own, other):
                pairs.append((prompt, other.format(subject), 0, "subject"))
    return pairs


def training_pairs(counterfact: Path, zsre: Path, knowedit: Path | None, *, counterfact_limit: int,
                   knowedit_train: int, seed: int = 0, other_subject: bool = False) -> list[Pair]:
    rng = random.Random(seed)
    cf = json.loads(counterfact.read_text())[:counterfact_limit]
    pairs = _fact_pairs([(r["prompt"], r["subject"], r.get("rephrase_prompt"), r.get("locality_prompt"))
                         for r in cf], rng, negatives=2, other_subject=other_subject)
    zs = json.loads(zsre.read_text())
    pairs += _fact_pairs([(r["src"], r["subject"], r.get("rephrase"), None) for r in zs], rng, negatives=3,
                         other_subject=other_subject)
    if knowedit is not None and knowedit_train > 0:
        for record in convert("knowedit", knowedit).records[:knowedit_train]:
            pairs.append((record.prompt, record.prompt, 1, "identity"))
            pairs += [(record.prompt, p.prompt, 0, "subject") for p in record.probes("subject")]
            pairs += [(record.prompt, a, 1, "alias") for a in record.alias_rephrases]
    return pairs


def embed(texts: list[str], views: tuple[str, ...]) -> tuple[np.ndarray, list[int]]:
    """Keys of `texts` as `ScopedSentenceKeys` computes them, and each view's width."""
    from melo_ray.editors.melo.keys import ScopedSentenceKeys

    keys = ScopedSentenceKeys(list(views))
    return keys.keys(texts), keys.view_dims


def fit(features: np.ndarray, labels: np.ndarray, hidden: int, epochs: int, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    x, y = torch.tensor(features), torch.tensor(labels, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 256):
            rows = order[start : start + 256]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[rows]).squeeze(1), y[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    first, last = model[0], model[2]
    return {"w1": first.weight.detach().numpy().T.copy(), "b1": first.bias.detach().numpy().copy(),
            "w2": last.weight.detach().numpy()[0].copy(), "b2": last.bias.detach().numpy().copy()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--counterfact", type=Path, default=DATA / "counterfact-mend-splits/counterfact-train.json")
    parser.add_argument("--zsre", type=Path, default=DATA / "zsre-mend-train-1k/zsre_mend_train-1k.json")
    parser.add_argument("--knowedit", type=Path, default=DATA / "knowedit/benchmark_wiki_recent_recent_train.json")
    parser.add_argument("--knowedit-train", type=int, default=285,
                        help="records of the KnowEdit file used for training (its first N); 0: none")
    parser.add_argument("--counterfact-limit", type=int, default=4000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--views", default=",".join(DEFAULT_VIEWS), help="comma-separated, starting with prompt")
    parser.add_argument("--other-subject-negatives", action="store_true",
                        help="also each record's own template about another record's subject (measured: not better)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    pairs = training_pairs(args.counterfact, args.zsre, args.knowedit, counterfact_limit=args.counterfact_limit,
                           knowedit_train=args.knowedit_train, seed=args.seed,
                           other_subject=args.other_subject_negatives)
    views = tuple(v for v in args.views.split(",") if v)
    texts = sorted({t for a, b, _, _ in pairs for t in (a, b)})
    row = {t: i for i, t in enumerate(texts)}
    keys, dims = embed(texts, views)
    # a fifth of the prompts (all their pairs) held out to report and to suggest a threshold
    prompts = sorted({a for a, _, _, _ in pairs})
    random.Random(args.seed).shuffle(prompts)
    held = set(prompts[: len(prompts) // 5])
    feats = pair_features(keys[[row[a] for a, _, _, _ in pairs]], keys[[row[b] for _, b, _, _ in pairs]], dims)
    labels = np.array([label for _, _, label, _ in pairs], np.float32)
    train = np.array([a not in held for a, _, _, _ in pairs])
    weights = fit(feats[train], labels[train], args.hidden, args.epochs, args.seed)
    meta = {"views": ",".join(views), "view_dims": ",".join(map(str, dims)), "hidden": str(args.hidden),
            "trained_on": f"{args.counterfact.name}[:{args.counterfact_limit}], {args.zsre.name}, "
                          f"{args.knowedit.name}[:{args.knowedit_train}]", "pairs": str(int(train.sum()))}
    verifier = ScopeVerifier(weights, meta)
    logits = verifier.logits(keys[[row[a] for a, _, _, _ in pairs]], keys[[row[b] for _, b, _, _ in pairs]])
    kinds = np.array([k for _, _, _, k in pairs])
    negatives = (~train) & (kinds == "subject")
    threshold = float(np.quantile(logits[negatives], 0.995))
    report = {"pairs": len(pairs), "held_out_prompts": len(held), "threshold_995": threshold}
    for kind in sorted(set(kinds)):
        rows = (~train) & (kinds == kind)
        if rows.any():
            report[f"held_out_{kind}_accepted"] = float((logits[rows] >= threshold).mean())
    args.out.write_bytes(verifier.to_bytes())
    log.info("scope verifier written to %s: %s", args.out, json.dumps(report))


if __name__ == "__main__":
    main()
