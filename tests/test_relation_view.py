"""The relation view: a LoRA-tuned MiniLM of the prompt's focus, carried in the verifier's file
(melo_ray/editors/melo/scope/relation.py), and keys that follow the verifier a snapshot was written with."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from melo_ray.editors.loading import restore_editor
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.editors.melo.scope.encoder import SentenceEncoderKeys
from melo_ray.editors.melo.scope.keys import scoped_keys_for
from melo_ray.editors.melo.scope.relation import AdapterSettings, RelationEncoder, adapter_tensors, train_adapter, with_adapter
from melo_ray.editors.melo.scope.verifier import BUILTIN_VERIFIER, ScopeVerifier
from melo_ray.editors.melo.scope.views import RELATION_META_KEY, RELATION_TENSOR_PREFIX, relation_text
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoderKeys:
    return SentenceEncoderKeys()


def _fresh_adapter(encoder: SentenceEncoderKeys) -> dict[str, np.ndarray]:
    return adapter_tensors(with_adapter(copy.deepcopy(encoder.model), AdapterSettings()))


def _plain_verifier() -> ScopeVerifier:
    """The shipped verifier without any relation view (its MLP reads the other views alone)."""
    shipped = ScopeVerifier.load(BUILTIN_VERIFIER)
    views, dims = shipped.view_names, shipped.view_dims
    if "relation" in views:
        views, dims = views[:-1], dims[:-1]
    meta = {k: v for k, v in shipped.meta.items() if not k.startswith("relation")}
    meta.update(views=",".join(views), view_dims=",".join(map(str, dims)))
    return ScopeVerifier({"w1": shipped.w1, "b1": shipped.b1, "w2": shipped.w2, "b2": np.array([shipped.b2])}, meta)


def _with_relation(plain: ScopeVerifier, tensors: dict[str, np.ndarray], weight: float) -> ScopeVerifier:
    return plain.with_relation_view(tensors, AdapterSettings().to_meta(), 384, weight)


def test_a_fresh_adapter_is_the_stock_focus_view_and_training_pulls_wordings_together(encoder):
    prompts = ["I grew up by the sea. Who is the mother of Anna Berg?", "Who is the father of Anna Berg?"]
    fresh = RelationEncoder(_fresh_adapter(encoder), AdapterSettings(), encoder)
    np.testing.assert_allclose(fresh.keys(prompts), encoder.keys([relation_text(p) for p in prompts]), atol=1e-5)
    assert relation_text("Where is Iglo? It is located in") == "Where is Iglo? It is located in"
    assert relation_text(prompts[0]) == "Who is the mother of Anna Berg?"

    names = ("Anna Berg", "Tomas Lind", "Mara Holt", "Ivo Sand")
    examples = [(f"Who is the mother of {name}?", [f"The mother of {name} is who?"], [f"Who is the father of {name}?"],
                 [f"Who is the mother of {names[i - 1]}?"]) for i, name in enumerate(names)]

    def margin(relation: RelationEncoder) -> float:
        a = relation.keys([p for p, *_ in examples])
        same = relation.keys([s[0] for _, s, *_ in examples])
        apart = relation.keys([o[0] for _, _, o, _ in examples])
        return float(np.mean((a * same).sum(1) - (a * apart).sum(1)))

    tensors = train_adapter(examples, AdapterSettings(), epochs=6, seed=0, batch_size=2, base=encoder)
    trained = RelationEncoder(tensors, AdapterSettings(), encoder)
    assert margin(trained) > margin(fresh) + 0.05
    assert all(name.startswith(RELATION_TENSOR_PREFIX) for name in tensors)


def test_a_verifier_carries_its_relation_adapter_and_the_keys_follow_it(encoder):
    tensors = _fresh_adapter(encoder)
    verifier = _with_relation(_plain_verifier(), tensors, weight=4.0)
    again = ScopeVerifier.from_bytes(verifier.to_bytes())
    assert again.relation_weight == 4.0 and again.relation_tensors.keys() == tensors.keys()
    keys_of = scoped_keys_for(again, encoder)
    prompts = ["Who is the mother of Anna Berg?", "The mother of Anna Berg is who?", "Who is the father of Anna Berg?"]
    keys = keys_of.keys(prompts)
    assert keys.shape == (3, again.key_dim) and keys_of.reads(again)
    # the relation term: the logit moves by the weight times the relation views' cosine, nothing else
    plain = _plain_verifier()
    width = plain.key_dim
    cosine = (keys[0, width:] * keys[1:, width:]).sum(1)
    np.testing.assert_allclose(again.logits(keys[:1], keys[1:]),
                               plain.logits(keys[:1, :width], keys[1:, :width]) + 4.0 * cosine, rtol=1e-5, atol=1e-5)
    other = {k: v + 0.01 for k, v in tensors.items()}
    assert not keys_of.reads(_with_relation(plain, other, 4.0)) and not keys_of.reads(plain)


def test_a_verifier_without_its_adapter_or_with_the_view_misplaced_is_refused():
    plain = _plain_verifier()
    weights = {"w1": plain.w1, "b1": plain.b1, "w2": plain.w2, "b2": np.array([plain.b2])}
    with pytest.raises(ValueError, match="relation view needs its adapter"):
        ScopeVerifier(weights, {**plain.meta, "views": plain.meta["views"] + ",relation",
                                "view_dims": plain.meta["view_dims"] + ",384"})
    malformed = ScopeVerifier({**weights, "relation.x": np.zeros(1, np.float32)},
                              {**plain.meta, "views": plain.meta["views"] + ",relation",
                               "view_dims": plain.meta["view_dims"] + ",384", RELATION_META_KEY: "not json"})
    with pytest.raises(ValueError, match="relation_lora settings are malformed"):
        scoped_keys_for(malformed, SentenceEncoderKeys())
    views = plain.view_names
    with pytest.raises(ValueError, match="must come last"):
        ScopeVerifier({**weights, "relation.x": np.zeros(1, np.float32)},
                      {**plain.meta, "views": ",".join(["prompt", "relation", *views[1:]]),
                       "view_dims": ",".join(map(str, [384, 384, *plain.view_dims[1:]])), RELATION_META_KEY: "{}"})


def test_a_snapshot_written_with_another_verifier_opens_and_routes_as_it_was_written(encoder, tmp_path):
    plain_path, tuned_path = tmp_path / "plain.safetensors", tmp_path / "tuned.safetensors"
    plain_path.write_bytes(_plain_verifier().to_bytes())
    tuned_path.write_bytes(_with_relation(_plain_verifier(), _fresh_adapter(encoder), weight=1.0).to_bytes())

    def editor(verifier_path) -> MeloEditor:
        return MeloEditor(tiny_config(index={"key_function": "sentence_encoder", "key_module": None,
                                             "scope_verifier": str(verifier_path), "scope_threshold": 1.0,
                                             "r_init": 0.35}, train={"num_iter": 20}))

    written = editor(plain_path)
    written.edit([{"prompt": "The mother tongue of Danielle Darrieux is", "target": "English"}])
    written.save(tmp_path / "snap")
    reader = editor(tuned_path)
    assert "relation" in reader.key_function.views
    restore_editor(reader, tmp_path / "snap")
    assert reader.key_function.views == written.key_function.views  # keyed the way the store was written
    prompts = ["The mother tongue of Danielle Darrieux is", "The native language of Danielle Darrieux is",
               "The place of birth of Danielle Darrieux is"]
    assert reader.route(prompts).ids.tolist() == written.route(prompts).ids.tolist()
    assert reader.route(prompts[:1]).ids.tolist() == [0]
    reader.reset()  # a new store is keyed by the config's verifier again
    assert "relation" in reader.key_function.views and reader.index.index.dim == reader.key_function.dim
