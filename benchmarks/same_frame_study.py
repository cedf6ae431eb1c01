"""The wiki_recent template family's hard case: one subject asked two relations in the same wording
("The doctoral student of X is" / "The academic degree of X is"), against rewordings in that wording
that swap a label for a synonym a user would write ("The mother tongue of X is" / "The native language
of X is"). Scores both with a scope verifier, then tries a *slot-contrast* rule: when the two masked
prompts share their frame (token-level SequenceMatcher ratio >= F) and the differing spans both hold
content words, refuse the pair if MiniLM's cosine of the two spans is below C.

Subjects are invented names; labels are the catalog's person properties (wikidata_relations.py) and
30 hand-written synonym pairs below: none comes from an editing benchmark.

    OMP_NUM_THREADS=1 python benchmarks/same_frame_study.py [--verifier builtin] [--threshold 34.94]
"""
from __future__ import annotations

import argparse
import difflib
import random

import numpy as np
import torch

from melo_ray.editors.melo.scope.encoder import SentenceEncoderKeys
from melo_ray.editors.melo.scope.keys import scoped_keys_for
from melo_ray.editors.melo.scope.training.wikidata_relations import PROPERTIES
from melo_ray.editors.melo.scope.verifier import load_verifier
from melo_ray.editors.melo.scope.views import masked
from melo_ray.text import content_words

PEOPLE = ["Ingrida Amantova", "Karl Wendt", "Maria Oyelowo", "Tomasz Brzeski", "Aiko Tanabe", "Rafael Ortiz",
          "Leona Marsh", "Pieter de Vries"]
SYNONYMS = [("mother tongue", "native language"), ("place of birth", "birthplace"), ("date of birth", "birth date"),
            ("spouse", "husband"), ("spouse", "wife"), ("occupation", "profession"), ("occupation", "job"),
            ("employer", "company"), ("country of citizenship", "nationality"), ("place of death", "death place"),
            ("sibling", "brother"), ("child", "son"), ("father", "dad"), ("mother", "mom"), ("alma mater", "university"),
            ("field of work", "area of work"), ("native language", "first language"), ("award received", "prize won"),
            ("religion", "faith"), ("sport", "sports discipline"), ("genre", "style"), ("residence", "home"),
            ("doctoral advisor", "PhD advisor"), ("position held", "office held"),
            ("member of political party", "political party"), ("educated at", "school"),
            ("cause of death", "reason of death"), ("notable work", "famous work"), ("instrument", "musical instrument"),
            ("given name", "first name")]


def diff_spans(a: str, b: str) -> tuple[float, str, str]:
    ta, tb = (masked(x).lower().replace("?", " ?").split() for x in (a, b))
    matcher = difflib.SequenceMatcher(a=ta, b=tb, autojunk=False)
    da, db = [], []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op != "equal":
            da, db = da + ta[i1:i2], db + tb[j1:j2]
    return matcher.ratio(), " ".join(da), " ".join(db)


def refused(pairs: list[tuple[str, str]], encoder: SentenceEncoderKeys, frame: float, cosine: float) -> np.ndarray:
    info = [diff_spans(a, b) for a, b in pairs]
    spans = sorted({s for _, da, db in info for s in (da, db) if s})
    vectors = encoder.keys(spans)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    at = {s: i for i, s in enumerate(spans)}
    return np.array([ratio >= frame and bool(content_words(da)) and bool(content_words(db))
                     and float(vectors[at[da]] @ vectors[at[db]]) < cosine for ratio, da, db in info])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verifier", default="builtin")
    parser.add_argument("--threshold", type=float, default=None, help="default: the file's own")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    labels = [p for p in PROPERTIES if p.subject == "person" and not p.label.endswith((" by", " of", " with", " at", " in", " on"))]
    negatives = []
    for subject in PEOPLE:
        for _ in range(40):
            a, b = rng.sample(labels, 2)
            if a.family != b.family:
                negatives.append((f"The {a.label} of {subject} is", f"The {b.label} of {subject} is"))
    rewordings = [(f"The {a} of {s} is", f"The {b} of {s} is") for s in PEOPLE for a, b in SYNONYMS]
    verifier = load_verifier(args.verifier)
    threshold = args.threshold if args.threshold is not None else verifier.calibrated_threshold
    keys_of = scoped_keys_for(verifier, SentenceEncoderKeys())

    def accepted(pairs):
        texts = sorted({t for ab in pairs for t in ab})
        row = {t: i for i, t in enumerate(texts)}
        keys = keys_of.keys(texts)
        return verifier.logits(keys[[row[a] for a, _ in pairs]], keys[[row[b] for _, b in pairs]]) >= threshold

    neg, pos = accepted(negatives), accepted(rewordings)
    print(f"{len(negatives)} same-wording pairs of two relations, {len(rewordings)} same-wording synonym rewordings; "
          f"threshold {threshold:g}\n")
    print("| rule | other relation, same wording: accepted | synonym rewordings: accepted |")
    print("|---|---|---|")
    print(f"| the verifier alone | {neg.mean():.4f} | {pos.mean():.3f} |")
    for frame in (0.5, 0.7):
        for cosine in (0.4, 0.5, 0.6):
            rn, rp = refused(negatives, keys_of.encoder, frame, cosine), refused(rewordings, keys_of.encoder, frame, cosine)
            print(f"| + slot contrast, frame >= {frame}, span cosine < {cosine} | {(neg & ~rn).mean():.4f} | {(pos & ~rp).mean():.3f} |")


if __name__ == "__main__":
    main()
