"""The cross-encoder scope model on a tiny random BERT built from a config (no weights download): its
file round-trips (weights, threshold, version; no pickle), training moves it, calibration meets the
false-accept targets it is given."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from melo_ray.editors.melo.scope.cross_encoder import CrossEncoder, CrossScopeModel, tokenizer_folder
from melo_ray.editors.melo.scope.training.cross_encoder_training import FALSE_ACCEPT_TARGETS, calibrate, train
from melo_ray.editors.melo.scope.training.pairs import Pair


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_folder())


def tiny_model(tokenizer, threshold: float = 0.0) -> CrossScopeModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return CrossScopeModel(CrossEncoder(BertModel(config, add_pooling_layer=False)), tokenizer, threshold)


def toy_pairs() -> list[Pair]:
    """Rewordings of "born" questions against "died" questions about the same person."""
    names = ["Ada Lind", "Ivo Brandt", "Mila Novak", "Otto Kees", "Rosa Hale", "Emil Voss"]
    pairs = []
    for name in names:
        pairs.append(Pair(f"Where was {name} born?", f"{name} was born in", 1, "reword", "templates", ("P19",)))
        pairs.append(Pair(f"Where was {name} born?", f"{name} died in", 0, "subject_other_relation", "templates",
                          ("P19", "P20")))
    return pairs


def test_file_round_trips_weights_threshold_and_version(tokenizer) -> None:
    model = tiny_model(tokenizer, threshold=1.25)
    firsts, seconds = ["Where was Ada Lind born?"], ["Ada Lind died in"]
    data = model.to_bytes()
    assert b"pickle" not in data[:200]
    again = CrossScopeModel.from_bytes(data, tokenizer)
    assert again.threshold == 1.25 and again.meta["version"] == "1"
    np.testing.assert_allclose(again.logits(firsts, seconds), model.logits(firsts, seconds), atol=1e-6)
    with pytest.raises(ValueError, match="version"):
        CrossScopeModel.from_bytes(data.replace(b'"version":"1"', b'"version":"9"'), tokenizer)


def test_training_separates_rewordings_from_other_relations(tokenizer) -> None:
    model = tiny_model(tokenizer)
    pairs = toy_pairs()
    before = model.logits([p.a for p in pairs], [p.b for p in pairs])
    labels = np.array([p.label for p in pairs], bool)
    train(model, pairs + [Pair(p.a, p.b, p.label, "namesake" if not p.label else "reword", p.source, p.families)
                          for p in pairs], steps=40, batch_size=8, lr=3e-3, seed=0, warmup=5)
    after = model.logits([p.a for p in pairs], [p.b for p in pairs])
    assert after[labels].min() > after[~labels].max()  # every rewording above every other-relation pair
    assert (after[labels].mean() - after[~labels].mean()) > (before[labels].mean() - before[~labels].mean())


def test_calibration_meets_each_false_accept_target() -> None:
    rng = np.random.default_rng(0)
    kinds = ["subject_other_relation"] * 1000 + ["inverse"] * 300 + ["reword"] * 500
    pairs = [Pair("a", "b", int(k == "reword"), k, "templates", ("P1",)) for k in kinds]
    logits = np.concatenate([rng.normal(-2, 1, 1000), rng.normal(-1, 1, 300), rng.normal(3, 1, 500)])
    threshold, report = calibrate(logits, pairs)
    assert report["calibration_subject_other_relation_accepted"] <= FALSE_ACCEPT_TARGETS["subject_other_relation"]
    assert report["calibration_inverse_accepted"] <= FALSE_ACCEPT_TARGETS["inverse"]
    # the lowest such bar: a little lower and some kind breaks its target
    kinds_arr = np.array(kinds)
    lower = threshold - 1e-3
    assert any((logits[kinds_arr == k] >= lower).mean() > FALSE_ACCEPT_TARGETS[k]
               for k in ("subject_other_relation", "inverse"))
    assert report["calibration_reword_accepted"] > 0.5
