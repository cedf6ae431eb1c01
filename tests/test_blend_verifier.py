"""The blend scope head: a pair MLP and a similarity ensemble of one split in one file, their logits
standardised and added in a weight placed on calibration pairs; refused when the two read different views."""
from __future__ import annotations

import numpy as np
import pytest

from melo_ray.editors.melo.scope.training.blend_training import blended, choose_blend
from melo_ray.editors.melo.scope.training.pairs import Pair
from melo_ray.editors.melo.scope.verifier import BLEND, PAIR_MLP, SIMILARITY_ENSEMBLE, Blend, ScopeVerifier
from melo_ray.editors.melo.scope.views import WORDS_DIM, names

VIEWS, DIMS = ["prompt", "names"], [8, WORDS_DIM]
META = {"views": ",".join(VIEWS), "view_dims": ",".join(map(str, DIMS))}


def _pair_mlp(rng: np.random.Generator, **meta: str) -> ScopeVerifier:
    features, hidden = sum(2 * d + 1 for d in DIMS), 6
    weights = {"w1": rng.normal(size=(features, hidden)), "b1": rng.normal(size=hidden),
               "w2": rng.normal(size=hidden), "b2": rng.normal(size=1)}
    return ScopeVerifier({k: v.astype(np.float32) for k, v in weights.items()}, {**META, **meta})


def _similarity(rng: np.random.Generator, **meta: str) -> ScopeVerifier:
    members, features, hidden = 3, 4, 5
    shapes = {"s.w1": (members, features, hidden), "s.b1": (members, hidden), "s.w2": (members, hidden, hidden),
              "s.b2": (members, hidden), "s.w3": (members, hidden), "s.b3": (members,)}
    tensors = {k: rng.normal(size=shape).astype(np.float32) for k, shape in shapes.items()}
    return ScopeVerifier(tensors, {**META, "head": SIMILARITY_ENSEMBLE, **meta})


def _keys(rng: np.random.Generator, n: int, name: str = "Anna Berg") -> np.ndarray:
    return np.stack([np.concatenate([rng.normal(size=DIMS[0]), names(f"Who is the mother of {name}?")])
                     for _ in range(n)]).astype(np.float32)


def test_a_blend_adds_the_standardised_logits_and_survives_the_file():
    rng = np.random.default_rng(0)
    pair, similarity = _pair_mlp(rng), _similarity(rng)
    blend = Blend(0.25, (1.0, 2.0, -3.0, 0.5))
    verifier = blended(pair, similarity, blend)
    a, b = _keys(rng, 7), _keys(rng, 7)
    standard = 0.75 * (pair.logits(a, b) - 1.0) / 2.0 + 0.25 * (similarity.logits(a, b) + 3.0) / 0.5
    by_hand = (0.75 * 1.0 + 0.25 * -3.0) + (0.75 * 2.0 + 0.25 * 0.5) * standard  # back in log-odds units
    np.testing.assert_allclose(verifier.logits(a, b), by_hand, rtol=1e-6)
    again = ScopeVerifier.from_bytes(verifier.with_calibration(0.5, "test").to_bytes())
    assert again.head == BLEND and again.calibrated_threshold == 0.5
    np.testing.assert_allclose(again.logits(a, b), by_hand, rtol=1e-6)
    # the end weights are each head's own logit, so the namesake bar's ln(k) means the same for any weight
    scale = (1.0, 2.0, -3.0, 0.5)
    np.testing.assert_allclose(blended(pair, similarity, Blend(0.0, scale)).logits(a, b), pair.logits(a, b), rtol=1e-6)
    np.testing.assert_allclose(blended(pair, similarity, Blend(1.0, scale)).logits(a, b), similarity.logits(a, b),
                               rtol=1e-6, atol=1e-9)


def test_a_head_weighted_zero_cannot_turn_the_sum_into_nan():
    scale = (0.0, 1.0, 0.0, 1.0)
    refused, plain = np.array([-np.inf, 2.0]), np.array([1.0, 1.0])
    assert np.array_equal(Blend(0.0, scale).combine(plain, refused), plain)
    assert np.array_equal(Blend(1.0, scale).combine(refused, plain), plain)
    assert np.isneginf(Blend(0.5, scale).combine(refused, plain)[0])


def test_the_names_gate_still_refuses_another_subject():
    rng = np.random.default_rng(1)
    verifier = blended(_pair_mlp(rng, names_gate="0.2"), _similarity(rng, names_gate="0.2"),
                       Blend(0.5, (0.0, 1.0, 0.0, 1.0)))
    logits = verifier.logits(_keys(rng, 1), np.concatenate([_keys(rng, 1), _keys(rng, 1, "Tomasz Wiśniewski")]))
    assert np.isfinite(logits[0]) and np.isneginf(logits[1])


def test_the_weight_is_the_one_keeping_the_most_calibration_rewordings():
    """Two heads on the same calibration pairs: one ranks rewordings above every negative, the other is noise.
    The blend's weight must follow the first, whichever slot it is in."""
    rng = np.random.default_rng(2)
    kinds = ["reword"] * 200 + ["subject_other_relation"] * 200 + ["relation_other_subject"] * 200
    calibration = [Pair("p", "q", int(k == "reword"), k, "templates", ("f",)) for k in kinds]
    good = np.where(np.array(kinds) == "reword", 5.0, 0.0) + rng.normal(scale=0.5, size=len(kinds))
    noise = rng.normal(size=len(kinds))
    blend, bar, table = choose_blend(good, noise, calibration)
    assert len(table) == 9 and table[0]["calibration_rewordings"] > 0.9 > table[-1]["calibration_rewordings"]
    best = max(row["calibration_rewordings"] for row in table)
    assert blend.weight == 0.0  # the first weight keeping the most (ties: the smaller weight)
    assert next(r for r in table if r["weight"] == blend.weight)["calibration_rewordings"] == best
    blend, _, table = choose_blend(noise, good, calibration)
    assert blend.weight > 0.5 and table[-1]["calibration_rewordings"] > 0.9 > table[0]["calibration_rewordings"]
    # pairs the names gate refuses score -inf in every row and take no part in the bar
    negatives = np.array(kinds) != "reword"
    _, _, refused_table = choose_blend(good, noise, calibration, refused=negatives)
    assert all(row["bar"] < -1e300 and row["calibration_rewordings"] == 1.0 for row in refused_table)


def test_heads_that_read_different_views_or_bad_metadata_are_refused():
    rng = np.random.default_rng(3)
    pair, similarity = _pair_mlp(rng), _similarity(rng)
    with pytest.raises(ValueError, match="different views or relation adapters"):
        blended(pair, _similarity(rng, names_gate="0.2"), Blend(0.5, (0.0, 1.0, 0.0, 1.0)))
    with pytest.raises(ValueError, match=f"needs a {PAIR_MLP} file and a {SIMILARITY_ENSEMBLE} file"):
        blended(similarity, pair, Blend(0.5, (0.0, 1.0, 0.0, 1.0)))
    with pytest.raises(ValueError, match="positive deviations"):
        Blend(0.5, (0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="weight in \\[0, 1\\]"):
        Blend(1.5, (0.0, 1.0, 0.0, 1.0))
    tensors = blended(pair, similarity, Blend(0.5, (0.0, 1.0, 0.0, 1.0))).tensors
    with pytest.raises(ValueError, match="'blend_scale' in its metadata"):
        ScopeVerifier(tensors, {**META, "head": BLEND, "blend_weight": "0.5"})
    with pytest.raises(ValueError, match="blend_weight 'half' is not a number"):
        ScopeVerifier(tensors, {**META, "head": BLEND, "blend_weight": "half", "blend_scale": "0,1,0,1"})
    with pytest.raises(ValueError, match="blend_scale '0,1,x,1' is not four numbers"):
        ScopeVerifier(tensors, {**META, "head": BLEND, "blend_weight": "0.5", "blend_scale": "0,1,x,1"})
    with pytest.raises(ValueError, match="four finite scale values"):
        ScopeVerifier(tensors, {**META, "head": BLEND, "blend_weight": "0.5", "blend_scale": "0,1,1"})
    with pytest.raises(ValueError, match=r"pair MLP's tensors \['w2'\] are missing"):
        ScopeVerifier({k: v for k, v in tensors.items() if k != "w2"}, {**META, "head": BLEND, **Blend(0.5, (0.0, 1.0, 0.0, 1.0)).meta()})
    with pytest.raises(ValueError, match="similarity ensemble needs exactly the tensors"):
        ScopeVerifier({k: v for k, v in tensors.items() if k != "s.b3"},
                      {**META, "head": BLEND, **Blend(0.5, (0.0, 1.0, 0.0, 1.0)).meta()})
