"""The similarity-ensemble scope verifier: k small MLPs over each view's cosine (never the views' vectors),
read from and written to safetensors, with the names gate; and its trainer on separable features."""
from __future__ import annotations

import numpy as np
import pytest

from melo_ray.editors.melo.scope.training.similarity_training import fit_ensemble
from melo_ray.editors.melo.scope.verifier import SIMILARITY_ENSEMBLE, ScopeVerifier, SimilarityEnsemble
from melo_ray.editors.melo.scope.views import WORDS_DIM, names, similarity_features

VIEWS, DIMS = ["prompt", "names"], [8, WORDS_DIM]


def _tensors(rng: np.random.Generator, members: int = 3, features: int = 4, hidden: int = 5) -> dict[str, np.ndarray]:
    shapes = {"s.w1": (members, features, hidden), "s.b1": (members, hidden), "s.w2": (members, hidden, hidden),
              "s.b2": (members, hidden), "s.w3": (members, hidden), "s.b3": (members,)}
    return {k: rng.normal(size=shape).astype(np.float32) for k, shape in shapes.items()}


def _verifier(tensors: dict[str, np.ndarray], **meta: str) -> ScopeVerifier:
    return ScopeVerifier(tensors, {"views": ",".join(VIEWS), "view_dims": ",".join(map(str, DIMS)),
                                   "head": SIMILARITY_ENSEMBLE, **meta})


def _key(rng: np.random.Generator, name: str) -> np.ndarray:
    return np.concatenate([rng.normal(size=DIMS[0]), names(f"Who is the mother of {name}?")]).astype(np.float32)


def test_logits_are_the_members_mean_and_survive_the_file():
    rng = np.random.default_rng(0)
    tensors = _tensors(rng)
    verifier = _verifier(tensors)
    a = np.stack([_key(rng, "Anna Berg") for _ in range(6)])
    b = np.stack([_key(rng, "Anna Berg") for _ in range(6)])
    features = similarity_features(a, b, VIEWS, DIMS)
    assert features.shape == (6, 4)  # two cosines, both-named, one-named
    by_hand = []
    for k in range(3):
        hidden = np.maximum(features @ tensors["s.w1"][k] + tensors["s.b1"][k], 0)
        hidden = np.maximum(hidden @ tensors["s.w2"][k] + tensors["s.b2"][k], 0)
        by_hand.append(hidden @ tensors["s.w3"][k] + tensors["s.b3"][k])
    np.testing.assert_allclose(verifier.logits(a, b), np.mean(by_hand, axis=0), rtol=1e-5, atol=1e-5)
    again = ScopeVerifier.from_bytes(verifier.to_bytes())
    assert again.head == SIMILARITY_ENSEMBLE and again.ensemble.members == 3
    np.testing.assert_allclose(again.logits(a, b), verifier.logits(a, b))
    # one query against many members broadcasts
    np.testing.assert_allclose(verifier.logits(a[:1], b), verifier.logits(np.repeat(a[:1], 6, 0), b))


def test_the_names_gate_refuses_other_subjects_whatever_the_ensemble_says():
    rng = np.random.default_rng(1)
    tensors = _tensors(rng)
    tensors["s.b3"][:] = 100.0  # an ensemble that accepts everything
    verifier = _verifier(tensors, names_gate="0.2")
    query = _key(rng, "Anna Berg")
    logits = verifier.logits(query, np.stack([_key(rng, "Anna Berg"), _key(rng, "Tomasz Wiśniewski")]))
    assert np.isfinite(logits[0]) and logits[0] > 50
    assert np.isneginf(logits[1])


def test_malformed_files_are_refused_with_the_reason():
    rng = np.random.default_rng(2)
    tensors = _tensors(rng)
    with pytest.raises(ValueError, match="do not fit 4 features"):
        _verifier({**tensors, "s.w1": tensors["s.w1"][:, :3]})
    with pytest.raises(ValueError, match="exactly the tensors"):
        _verifier({k: v for k, v in tensors.items() if k != "s.b2"})
    with pytest.raises(ValueError, match="relation_weight does not apply"):
        _verifier(tensors, relation_weight="40")
    with pytest.raises(ValueError, match="unknown head"):
        ScopeVerifier(tensors, {"views": "prompt,names", "view_dims": f"8,{WORDS_DIM}", "head": "oracle"})
    with pytest.raises(ValueError, match="only the pair MLP"):
        _verifier(tensors).with_relation_weight(10.0)
    with pytest.raises(ValueError, match="cannot gain one"):
        _verifier(tensors).with_relation_view({}, "{}", 8)
    with pytest.raises(ValueError, match="one epoch"):
        fit_ensemble(np.zeros((4, 4), np.float32), np.zeros(4, np.float32), members=1, hidden=4, epochs=0, seed=0)


def test_the_trainer_learns_a_separable_similarity():
    rng = np.random.default_rng(3)
    positives = rng.uniform(0.6, 1.0, size=(300, 4))
    negatives = rng.uniform(0.0, 0.5, size=(300, 4))
    features = np.concatenate([positives, negatives]).astype(np.float32)
    labels = np.array([1] * 300 + [0] * 300, np.float32)
    tensors = fit_ensemble(features, labels, members=2, hidden=8, epochs=15, seed=0)
    ensemble = SimilarityEnsemble(tensors, n_features=4)
    logits = ensemble.logits(features)
    assert logits[:300].min() > logits[300:].max()
