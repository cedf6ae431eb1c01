"""Metrics on hand-made outputs."""
from __future__ import annotations

import math

import pytest

from melo_ray import metrics


def test_success_rate_uses_prefix_match_after_normalisation():
    outputs = ["Lamiinae is the family", "  Paris\n", "Rome", "The answer is Oslo"]
    targets = ["Lamiinae", "Paris", "Roma", "Oslo"]
    assert metrics.success_rate(outputs, targets) == 0.5


def test_locality_is_exact_equality():
    assert metrics.locality(["a", "b", "c"], ["a", "b ", "c"]) == pytest.approx(2 / 3)


def test_token_f1_matches_hand_computation():
    assert metrics.token_f1("the Eiffel Tower", "Eiffel tower!") == 1.0
    # prediction "red blue green" vs gold "blue yellow": overlap 1, p = 1/3, r = 1/2 -> f1 = 0.4
    assert metrics.token_f1("red blue green", "blue yellow") == pytest.approx(0.4)
    assert metrics.token_f1("", "x") == 0.0
    assert metrics.mean_token_f1(["2006 and more text", "1998"], ["2006", "2006"]) == 0.5


def test_perplexity_and_token_accuracy():
    assert metrics.perplexity([math.log(4.0)] * 3) == pytest.approx(4.0)
    assert metrics.token_accuracy([True, False, True, True]) == 0.75
    assert math.isnan(metrics.perplexity([]))


def test_accuracy_and_length_mismatch():
    assert metrics.accuracy(["a", "b"], ["a", "c"]) == 0.5
    with pytest.raises(ValueError, match="2 outputs for 1"):
        metrics.accuracy(["a", "b"], ["a"])
