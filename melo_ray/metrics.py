"""Editing metrics on model outputs: pure functions, unit-tested on hand-made outputs.

reliability / generality: the greedy output starts with the target (normalised); locality: the
post-edit output is identical to the base model's; token F1 as in the MELO zsRE metric; perplexity
from per-token negative log-likelihoods; accuracy for classification.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

from melo_ray.text import normalise_label

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)


def starts_with_target(output: str, target: str) -> bool:
    """Edit success for one output: it begins with the target text."""
    return normalise_label(output).startswith(normalise_label(target))


def success_rate(outputs: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of outputs that start with their target (reliability, or generality on rephrasings)."""
    _same_length(outputs, targets)
    if not outputs:
        return float("nan")
    return sum(starts_with_target(o, t) for o, t in zip(outputs, targets)) / len(outputs)


def locality(edited: Sequence[str], base: Sequence[str]) -> float:
    """Fraction of outputs left exactly as the unedited model gave them."""
    _same_length(edited, base)
    if not edited:
        return float("nan")
    return sum(e == b for e, b in zip(edited, base)) / len(edited)


def _answer_tokens(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return text.split()


def token_f1(prediction: str, target: str) -> float:
    """SQuAD-style token F1 between a prediction and a target (lower case, no punctuation or articles)."""
    pred, gold = _answer_tokens(prediction), _answer_tokens(target)
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def mean_token_f1(predictions: Sequence[str], targets: Sequence[str], *, first_words: bool = True) -> float:
    """Mean token F1; with first_words, each prediction is cut to the target's word count first,
    so a correct answer followed by more text is not penalised."""
    _same_length(predictions, targets)
    if not predictions:
        return float("nan")
    scores = []
    for p, t in zip(predictions, targets):
        if first_words:
            p = " ".join(p.split()[: max(len(t.split()), 1)])
        scores.append(token_f1(p, t))
    return sum(scores) / len(scores)


def perplexity(token_nlls: Sequence[float]) -> float:
    """exp(mean negative log-likelihood) over all tokens pooled."""
    if not token_nlls:
        return float("nan")
    return math.exp(sum(token_nlls) / len(token_nlls))


def token_accuracy(correct: Sequence[bool]) -> float:
    """Teacher-forced token accuracy: fraction of target tokens that were the argmax."""
    if not correct:
        return float("nan")
    return sum(bool(c) for c in correct) / len(correct)


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    _same_length(predictions, labels)
    if not predictions:
        return float("nan")
    return sum(p == t for p, t in zip(predictions, labels)) / len(predictions)


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} outputs for {len(b)} references")
