"""The scope test: a learned verifier decides whether a query asks an edit's question or only
something about the same subject (melo_ray/editors/melo/scope/ and its use in the index)."""
from __future__ import annotations

import json

import numpy as np
import pytest


from melo_ray.editors.loading import load_editor
from melo_ray.editors.melo.block_index import BlockIndex
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.editors.melo.scope.index import NeuronIndex
from melo_ray.editors.melo.scope.verifier import BUILTIN_VERIFIER, ScopeVerifier
from melo_ray.editors.melo.scope.decision import ScopeTest
from melo_ray.editors.melo.scope.views import masked, names
from melo_ray.editors.melo.scope.policy import ScopePolicy
from melo_ray.snapshots import SnapshotError
from melo_ray.text import focus
from tests.conftest import tiny_config


def _before_the_policy(meta: dict) -> dict:
    """index.json as the writer before ScopePolicy wrote it: flat keys, a rule that was off left out."""
    meta = dict(meta)
    policy = meta.pop("scope_policy")
    meta.update(scope_threshold=policy["threshold"], scope_conflict_threshold=policy["conflict_threshold"],
                scope_latest_of_question=policy["latest_of_question"])
    for rule in ("prefer_same_names", "focus_reach", "cluster_per_edit"):
        if policy[rule]:
            meta[f"scope_{rule}"] = True
    if policy["namesake_bar"]:
        meta["scope_namesake_bar"] = policy["namesake_bar"]
        if policy["closest_namesakes"]:
            meta["scope_closest_namesakes"] = True
    return meta


def _files_before_the_policy(files: dict[str, bytes]) -> dict[str, bytes]:
    return {**files, "index.json": json.dumps(_before_the_policy(json.loads(files["index.json"]))).encode()}


def _toy_scope(conflict_threshold: float | None = 0.0) -> ScopeTest:
    """Two 2-d views; logit = cosine of the second view - 0.5: same question iff they point alike."""
    w1 = np.zeros((10, 1), np.float32)
    w1[9, 0] = 1.0  # the second view's cosine (features per view: a*b, |a-b|, cosine)
    verifier = ScopeVerifier({"w1": w1, "b1": np.zeros(1, np.float32), "w2": np.ones(1, np.float32),
                              "b2": np.array([-0.5], np.float32)}, {"views": "prompt,masked", "view_dims": "2,2"})
    return ScopeTest(verifier, 0.0, conflict_threshold)


def _key(route: tuple[float, float], relation: tuple[float, float]) -> np.ndarray:
    return np.array([*route, *relation], np.float32)


def test_builtin_verifier_is_safetensors_and_round_trips_without_pickle():
    data = BUILTIN_VERIFIER.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # a safetensors header: JSON
    assert set(header) >= {"w1", "b1", "w2", "b2", "__metadata__"}
    verifier = ScopeVerifier.from_bytes(data)
    assert verifier.view_names[0] == "prompt" and verifier.key_dim == sum(verifier.view_dims)
    again = ScopeVerifier.from_bytes(verifier.to_bytes())
    a, b = np.random.default_rng(0).normal(size=(2, 3, verifier.key_dim)).astype(np.float32)
    np.testing.assert_array_equal(verifier.logits(a, b), again.logits(a, b))
    with pytest.raises(ValueError):
        ScopeVerifier.from_bytes(b"\x00" * 4)


def test_focus_drops_unrelated_prefixes_and_masked_drops_names():
    assert focus("Lots of text here. It rained.\nEdwin of Northumbria follows the religion of") == \
        "Edwin of Northumbria follows the religion of"
    assert focus("What is the twin city of Wellington? It is") == "What is the twin city of Wellington? It is"
    assert masked("The gender of Ingrida Amantova is") == "The gender of X is"


def test_names_view_tells_subjects_apart_and_keeps_an_alias_close():
    other = names("What is the record label of Call the Doctor?") @ names("What is the record label of You See?")
    alias = names("Who is the mother of Emily I Jones?") @ names("Emily Jones was born to whom?")
    assert alias > 0.8 > 0.3 > other
    assert names("what is the capital") @ names("who wrote it") == 1.0  # no names on either side: slot 0


def test_names_gate_refuses_prompts_about_other_subjects_whatever_the_mlp_says():
    """A verifier that accepts every pair (logit 1) but carries a names gate: the same template about
    another subject never passes; an alias, and prompts naming no one, still do; the gate survives a
    file round trip, and a gate without a names view is refused."""
    dims = [2, 256]
    weights = {"w1": np.zeros((sum(2 * d + 1 for d in dims), 1), np.float32), "b1": np.zeros(1, np.float32),
               "w2": np.ones(1, np.float32), "b2": np.array([1.0], np.float32)}
    verifier = ScopeVerifier(weights, {"views": "prompt,names", "view_dims": "2,256", "names_gate": "0.2"})

    def key(prompt: str) -> np.ndarray:
        return np.concatenate([np.ones(2, np.float32), names(prompt)])

    edited = key("What body of water was Emily I Jones next to?")
    queries = np.stack([key("What body of water was Färingsö next to?"),
                        key("Emily Jones lived next to which body of water?"),
                        key("what is the body of water")])
    np.testing.assert_array_equal(verifier.logits(edited, queries), [-np.inf, 1.0, 1.0])
    again = ScopeVerifier.from_bytes(verifier.to_bytes())
    np.testing.assert_array_equal(again.logits(edited, queries), verifier.logits(edited, queries))
    assert ScopeTest(verifier, 0.0).logits(edited, edited[None])[0] == np.inf  # the same prompt always passes
    np.testing.assert_array_equal(verifier.with_names_gate(None).logits(edited, queries), [1.0, 1.0, 1.0])
    assert verifier.with_names_gate(0.2).names_gate == 0.2 and verifier.names_gate == 0.2  # a copy, not a change
    with pytest.raises(ValueError, match="names_gate"):
        ScopeVerifier({**weights, "w1": np.zeros((5 + 5, 1), np.float32)},
                      {"views": "prompt,masked", "view_dims": "2,2", "names_gate": "0.2"})


def test_conflict_the_scope_test_separates_keeps_both_radii_and_both_facts():
    index = NeuronIndex(4, "cosine", r_init=0.3, scope=_toy_scope())
    index.add(_key((1, 0), (1, 0)), "Paris", 0, "birthplace")
    event = index.add(_key((1, 0.05), (0, 1)), "female", 1, "gender")  # same subject, another relation
    assert event.kind == "separated" and event.forgotten == ()
    assert [c.radius for c in index.clusters] == [0.3, 0.3] and index.conflicts == 0 and index.forgotten == 0
    found = index.search(np.stack([_key((1, 0), (1, 0)), _key((1, 0.05), (0, 1)), _key((1, 0.02), (0.9, 0.1))]))
    assert found.block_ids.tolist() == [0, 1, 0]  # each fact and a rewording of the first
    assert index.search(_key((1, 0.02), (-1, 0))[None]).block_ids.tolist() == [-1]  # a third relation: base


def test_conflict_on_the_same_question_forgets_only_that_member():
    index = NeuronIndex(4, "cosine", r_init=0.3, scope=_toy_scope())
    index.add(_key((1, 0), (1, 0)), "Paris", 0, "old")
    index.add(_key((1, 0.05), (0, 1)), "female", 1, "gender")
    event = index.add(_key((1, 0.01), (1, 0.1)), "Rome", 2, "new")  # the first question, reworded, re-edited
    assert event.kind == "conflict" and event.forgotten == ("old",)
    assert index.search(np.stack([_key((1, 0), (1, 0)), _key((1, 0.05), (0, 1))])).block_ids.tolist() == [2, 1]


def test_by_default_only_the_same_prompt_supersedes_and_each_wording_keeps_its_target():
    index = NeuronIndex(4, "cosine", r_init=0.3, scope=_toy_scope(conflict_threshold=None))
    index.add(_key((1, 0), (1, 0)), "Paris", 0, "old")
    assert index.add(_key((1, 0.01), (1, 0.1)), "Rome", 1, "reworded").kind == "separated"
    assert index.search(np.stack([_key((1, 0), (1, 0)), _key((1, 0.01), (1, 0.1))])).block_ids.tolist() == [0, 1]
    event = index.add(_key((1, 0), (1, 0)), "Oslo", 2, "again")  # the same prompt edited again: latest wins
    assert event.kind == "conflict" and event.forgotten == ("old",)
    assert index.search(_key((1, 0), (1, 0))[None]).block_ids.tolist() == [2]


def test_scoped_index_snapshot_round_trips_exactly():
    config = tiny_config(index={"key_function": "sentence_encoder", "key_module": None,
                                "scope_verifier": "builtin", "scope_threshold": 0.5, "r_init": 0.4})
    verifier = ScopeVerifier.load(BUILTIN_VERIFIER)
    rng = np.random.default_rng(1)
    index = BlockIndex.create(config, verifier.key_dim)
    for block in range(3):
        from melo_ray.editors.messages import TrainedBatch

        keys = rng.normal(size=(4, verifier.key_dim)).astype(np.float32)
        index.add(TrainedBatch(version=block + 1, edits=4, steps=1, final_loss=0.0, learned=1.0, seconds=0.0,
                               block=block, ids=tuple(f"e{block}-{i}" for i in range(4)),
                               targets=("a", "b", "a", "c"), keys=keys))
    files = index.files()
    assert "scope.safetensors" in files
    restored = BlockIndex.from_files(config, verifier.key_dim, files, "test")
    assert restored.files() == files and restored.stats() == index.stats()
    queries = rng.normal(size=(16, verifier.key_dim)).astype(np.float32)
    a, b = index.search(queries), restored.search(queries)
    np.testing.assert_array_equal(a.block_ids, b.block_ids)
    np.testing.assert_array_equal(a.distances, b.distances)
    assert a.edit_ids == b.edit_ids
    plain = tiny_config(index={"key_function": "sentence_encoder", "key_module": None})
    with pytest.raises(SnapshotError):
        BlockIndex.from_files(plain, verifier.key_dim, files, "test")


@pytest.fixture(scope="module")
def scoped_editor() -> MeloEditor:
    # the shipped verifier at its previous threshold (34.94; the file's is now 39.86): the rewording below scores 39.0,
    # the same-subject questions 31.0 and 4.4 (with the relation view; without it, 1.06 and the
    # rewording was turned away at the shipped threshold of the time)
    config = tiny_config(index={"key_function": "sentence_encoder", "key_module": None,
                                "scope_verifier": "builtin", "scope_threshold": 34.94, "r_init": 0.35},
                         train={"num_iter": 80})
    editor = MeloEditor(config)
    editor.edit([{"id": "e0", "prompt": "The mother tongue of Danielle Darrieux is", "target": "English"}])
    return editor


def test_rewording_routes_to_the_block_and_same_subject_other_relation_runs_on_the_base_model(scoped_editor):
    prompts = ["The mother tongue of Danielle Darrieux is", "The native language of Danielle Darrieux is",
               "The place of birth of Danielle Darrieux is", "The name of the employer of Danielle Darrieux is"]
    routing = scoped_editor.route(prompts)
    assert routing.ids.tolist()[:2] == [0, 0]
    assert routing.ids.tolist()[2:] == [-1, -1]
    assert scoped_editor.generate(prompts[:1], 12)[0].output.strip().startswith("English")
    other = prompts[2:]
    np.testing.assert_array_equal(scoped_editor.next_token_logits(other).numpy(),
                                  scoped_editor.next_token_logits(other, base=True).numpy())


def test_explain_says_which_rule_decided_with_the_score_and_the_bar(scoped_editor):
    edited, reworded, other_relation = ("The mother tongue of Danielle Darrieux is",
                                        "The native language of Danielle Darrieux is",
                                        "The place of birth of Danielle Darrieux is")
    same = scoped_editor.explain(edited)["scope"]
    assert same["rule"] == "identical_prompt" and same["score"] == "inf" and same["edit_id"] == "e0"
    fired = scoped_editor.explain(reworded)
    assert fired["fires"] and fired["scope"]["rule"] == "scope_test"
    assert fired["scope"]["score"] >= fired["scope"]["bar"] == 34.94 and fired["scope"]["considered"] == 1
    refused = scoped_editor.explain(other_relation)
    assert not refused["fires"] and refused["scope"]["rule"] == "below_bar"
    assert refused["scope"]["edit_id"] == "e0" and refused["scope"]["score"] < refused["scope"]["bar"]
    far = scoped_editor.explain("How many moons does Mars have?")["scope"]
    assert far["rule"] == "out_of_reach" and far["edit_id"] is None and far["score"] is None
    json.dumps([same, fired, refused, far])  # what the server sends: no infinities, no numpy types


def test_routing_computes_the_scope_views_only_within_reach_and_routes_as_the_whole_keys_do(scoped_editor):
    prompts = ["The native language of Danielle Darrieux is", "The place of birth of Danielle Darrieux is",
               "Who wrote the novel Moby Dick?", "How many moons does Mars have?",
               "We walked home after the film. How many moons does Mars have?"]
    encoded = []
    encoder = scoped_editor.key_function.encoder
    original = encoder.keys
    encoder.keys = lambda texts: encoded.append(len(texts)) or original(texts)
    try:
        routing = scoped_editor.route(prompts)
    finally:
        encoder.keys = original
    whole = scoped_editor.index.search(scoped_editor.key_function.keys(prompts))
    assert routing.ids.tolist() == whole.block_ids.tolist() and routing.edit_ids == whole.edit_ids
    np.testing.assert_allclose(routing.distances, whole.distances, rtol=1e-6)
    # every prompt's first view; the focus view (reach) only of the one that is not its own focus; the
    # rest only of the prompts in reach, never of the unrelated questions
    assert encoded[:2] == [5, 1] and all(n <= 2 for n in encoded[2:])


def test_a_rewording_behind_an_unrelated_sentence_reaches_its_edit_by_its_focus(scoped_editor):
    prompt = ("I grew up near the sea and spent every summer sailing with my uncle. "
              "The native language of Danielle Darrieux is")
    scope = scoped_editor.index.index.scope
    assert scope.focus_reach  # the default
    assert scoped_editor.route([prompt]).ids.tolist() == [0]
    scope.focus_reach = False
    try:  # by the whole prompt, the rewording lies outside the edit's radius
        assert scoped_editor.route([prompt]).ids.tolist() == [-1]
    finally:
        scope.focus_reach = True


def test_focus_reach_offers_a_cluster_its_focus_view_lies_in_and_snapshots_keep_the_rule():
    w1 = np.zeros((10, 1), np.float32)
    w1[9, 0] = 1.0  # logit = cosine of the focus views - 0.5
    verifier = ScopeVerifier({"w1": w1, "b1": np.zeros(1, np.float32), "w2": np.ones(1, np.float32),
                              "b2": np.array([-0.5], np.float32)}, {"views": "prompt,focus", "view_dims": "2,2"})
    edit = np.array([1, 0, 1, 0], np.float32)
    behind_a_prefix = np.array([0, 1, 1, 0], np.float32)  # whole prompt far off, its last sentence the edit's
    elsewhere = np.array([0, 1, 0, 1], np.float32)
    routed = {}
    for focus_reach in (True, False):
        index = NeuronIndex(4, "cosine", 0.5, scope=ScopeTest(verifier, 0.0, focus_reach=focus_reach))
        index.add(edit, "Paris", 0, "e0")
        routed[focus_reach] = index.search(np.stack([edit, behind_a_prefix, elsewhere])).block_ids.tolist()
        arrays, meta = index.state()
        assert meta["scope_policy"]["focus_reach"] == focus_reach
        block_index = BlockIndex(index, 1)
        restored = BlockIndex.from_files(tiny_config(index={"key_function": "sentence_encoder", "key_module": None,
                                                            "scope_verifier": "builtin"}),
                                         4, block_index.files(), "test")
        assert restored.index.scope.focus_reach == focus_reach
    assert routed == {True: [0, 0, -1], False: [0, -1, -1]}


def test_scoped_editor_snapshot_round_trip(scoped_editor, tmp_path):
    scoped_editor.save(tmp_path / "snap")
    loaded = load_editor(tmp_path / "snap", backbone=scoped_editor.backbone)
    prompts = ["The native language of Danielle Darrieux is", "The place of birth of Danielle Darrieux is"]
    assert loaded.route(prompts).ids.tolist() == scoped_editor.route(prompts).ids.tolist()
    assert loaded.index.files() == scoped_editor.index.files()


def test_block_levers_add_train_rephrases_and_prefixed_copies_to_the_batch():
    from melo_ray.records import EditRecord

    config = tiny_config(lora={"prefix_augment": 2})
    editor = MeloEditor(config)
    record = EditRecord(prompt="Where does the apple live?", target="Oslo", train_rephrases=("Apple's home is",))
    rows, edit_of_row = editor._training_rows([record], 0)
    assert edit_of_row == [0, 0, 0, 0]
    assert [r.prompt for r in rows[:2]] == ["Where does the apple live?", "Apple's home is"]
    assert len(rows) == 4 and all(r.target == "Oslo" and r.prompt.endswith(record.prompt) for r in rows[2:])
    assert all(len(r.prompt) > len(record.prompt) + 1 for r in rows[2:])  # a real prefix before the prompt
    off = MeloEditor(tiny_config(train={"train_rephrases": False}), backbone=editor.backbone)
    assert [r.prompt for r in off._training_rows([record], 0)[0]] == [record.prompt]


def test_the_same_prompt_passes_the_scope_test_whatever_float_noise_its_keys_carry():
    # one prompt's keys differ by ~1e-7 between encoder batches; that must not demote its own edit
    scope = ScopeTest(ScopeVerifier.load(BUILTIN_VERIFIER), threshold=100.0)
    rng = np.random.default_rng(0)
    member = rng.normal(size=scope.key_dim).astype(np.float32)
    logits = scope.logits(member + np.float32(1e-7), np.stack([member, member + np.float32(1e-3)]))
    assert logits[0] == np.inf and np.isfinite(logits[1])


def test_a_rewording_of_a_question_edited_again_gets_its_latest_target():
    index = NeuronIndex(4, "cosine", r_init=0.3, scope=_toy_scope(conflict_threshold=None))
    index.add(_key((1, 0), (1, 0)), "Paris", 0, "first wording")
    index.add(_key((1, 0.05), (0, 1)), "female", 1, "gender")  # another question of the subject
    index.add(_key((1, 0.01), (0.95, 0.3)), "Rome", 2, "second wording")  # the first question again
    rewording = _key((1, 0.02), (0.99, -0.1))  # nearer the first wording than the second
    found = index.search(np.stack([_key((1, 0), (1, 0)), _key((1, 0.01), (0.95, 0.3)), rewording,
                                   _key((1, 0.05), (0, 1))]))
    assert found.block_ids.tolist() == [0, 2, 2, 1]  # each wording keeps its own; a rewording gets the latest
    assert found.edit_ids[2] == "second wording"
    index.scope.latest_of_question = False  # the previous rule: the member it resembles most
    assert index.search(rewording[None]).block_ids.tolist() == [0]
    config = tiny_config(index={"key_function": "sentence_encoder", "scope_verifier": "builtin"})
    restored = BlockIndex.from_files(config, 4, BlockIndex(index, 3).files(), "snapshot")
    assert restored.index.scope.latest_of_question is False  # a snapshot routes as it was written
    assert restored.search(rewording[None]).block_ids.tolist() == [0]


def test_with_a_cluster_per_edit_a_later_edit_of_the_same_target_keeps_its_rewordings():
    """Two edits with one target (CounterFact: "English" many times): joined, the second is a member of
    the first's cluster, whose radius around the first key need not hold the second's rewordings."""
    first, second = _key((1, 0), (1, 0)), _key((0.8, 0.6), (0, 1))  # cosine distance 0.2 in the routing view
    rewording = _key((0.6, 0.8), (0.1, 1))  # 0.04 from the second, 0.4 from the first
    joined = NeuronIndex(4, "cosine", r_init=0.3, scope=_toy_scope(None))
    own = NeuronIndex(4, "cosine", r_init=0.3, scope=_toy_scope(None), cluster_per_edit=True)
    events = [(index.add(first, "English", 0, "a"), index.add(second, "English", 1, "b")) for index in (joined, own)]
    assert [e.kind for e in events[0]] == ["added", "member"] and len(joined.clusters) == 1
    assert [e.kind for e in events[1]] == ["added", "added"] and len(own.clusters) == 2 and own.separated == 0
    assert joined.search(rewording[None]).block_ids.tolist() == [-1]  # 0.4 from the centre: outside radius 0.3
    assert own.search(np.stack([rewording, first, second])).block_ids.tolist() == [1, 0, 1]
    config = tiny_config(index={"key_function": "sentence_encoder", "scope_verifier": "builtin"})
    restored = BlockIndex.from_files(config, 4, BlockIndex(own, 2).files(), "snapshot")
    assert restored.index.cluster_per_edit and restored.search(rewording[None]).block_ids.tolist() == [1]
    arrays, meta = joined.state()  # a snapshot written before the rule has no such field: it keeps joining
    meta = _before_the_policy(meta)
    assert "scope_cluster_per_edit" not in meta
    old = NeuronIndex.from_state(arrays, meta, scope=_toy_scope(None))
    assert not old.cluster_per_edit and old.add(_key((0.9, 0.1), (1, 0)), "English", 2, "c").kind == "member"
    with pytest.raises(ValueError, match="scope test"):
        NeuronIndex(4, "cosine", cluster_per_edit=True)


def _routing_cosine_verifier() -> ScopeVerifier:
    """Keys of a 2-d routing view and a names view; logit = the routing views' cosine - 0.5."""
    dims = [2, 256]
    w1 = np.zeros((sum(2 * d + 1 for d in dims), 1), np.float32)
    w1[4, 0] = 1.0  # the routing view's cosine feature
    return ScopeVerifier({"w1": w1, "b1": np.zeros(1, np.float32), "w2": np.ones(1, np.float32),
                          "b2": np.array([-0.5], np.float32)}, {"views": "prompt,names", "view_dims": "2,256"})


def test_members_naming_what_the_query_names_rank_first_and_a_rewording_moves_on_only_to_the_same_names():
    """In a large bank "Ferrari F40" and "Ferrari FXX" share a template, and the names gate lets such
    near-identical names through: a rewording about the F40 that lies nearer the FXX's key must still
    reach the F40's edit, and move on to a later edit only when it asks about the F40 again."""
    verifier = _routing_cosine_verifier()  # every prompt here passes at 0, the nearest scores highest

    def key(route: tuple[float, float], prompt: str) -> np.ndarray:
        return np.concatenate([np.array(route, np.float32), names(prompt)])

    def bank(prefer: bool) -> NeuronIndex:
        index = NeuronIndex(2 + 256, "cosine", r_init=0.3, cluster_per_edit=True,
                            scope=ScopeTest(verifier, 0.0, None, True, prefer))
        index.add(key((1, 0), "Ferrari F40 is produced by"), "Fiat", 0, "f40")
        index.add(key((1, 0.1), "Ferrari FXX is produced by"), "Honda", 1, "fxx")
        return index

    rewording = key((1, 0.09), "The maker of Ferrari F40 is")  # nearer the FXX's routing key
    assert bank(prefer=False).search(rewording[None]).block_ids.tolist() == [1]  # the verifier's score alone
    index = bank(prefer=True)
    assert index.search(rewording[None]).block_ids.tolist() == [0]
    why = index.search(rewording[None]).decisions[0]  # the FXX scored higher; the names rule chose the F40
    assert (why.rule, why.edit_id, why.considered) == ("same_names_first", "f40", 2) and why.score >= why.bar
    index.add(key((1, 0.2), "Ferrari FXX was made by"), "Tesla", 2, "fxx again")
    assert index.search(rewording[None]).block_ids.tolist() == [0]  # another subject asked again: no move
    index.add(key((1, -0.2), "Ferrari F40 was made by"), "BMW", 3, "f40 again")  # scores below the first
    assert index.search(rewording[None]).block_ids.tolist() == [3]  # its own question asked again: the latest
    assert index.search(rewording[None]).decisions[0].rule == "latest_of_question"
    assert index.search(rewording[None]).decisions[0].edit_id == "f40 again"

    config = tiny_config(index={"key_function": "sentence_encoder", "scope_verifier": "builtin"})
    restored = BlockIndex.from_files(config, 2 + 256, BlockIndex(index, 4).files(), "snapshot")
    assert restored.index.scope.prefer_same_names and restored.search(rewording[None]).block_ids.tolist() == [3]
    files = _files_before_the_policy(BlockIndex(bank(prefer=False), 2).files())
    assert "scope_prefer_same_names" not in json.loads(files["index.json"])  # written before the rule
    old = BlockIndex.from_files(config, 2 + 256, files, "snapshot")  # it ranks by score alone
    assert not old.index.scope.prefer_same_names and old.search(rewording[None]).block_ids.tolist() == [1]
    # a verifier without a names view has nothing to rank by: the rule is off, whatever was asked
    assert not ScopeTest(_toy_scope().verifier, 0.0, prefer_same_names=True).prefer_same_names


def test_the_bar_rises_with_the_members_that_name_what_the_query_names():
    """A subject edited many times gives a question about it that no edit asks one chance per edit to
    pass: with k members naming what the query names (most closely), the threshold rises by ln(k)."""
    verifier = _routing_cosine_verifier()

    def key(angle: float, prompt: str) -> np.ndarray:
        return np.concatenate([np.array([np.cos(angle), np.sin(angle)], np.float32), names(prompt)])

    def bank(bar: float, edits: list[tuple[float, str]]) -> NeuronIndex:
        index = NeuronIndex(2 + 256, "cosine", r_init=0.3, candidates=8, cluster_per_edit=True,
                            scope=ScopeTest(verifier, -1.0, None, True, True, namesake_bar=bar))
        for block, (angle, prompt) in enumerate(edits):
            index.add(key(angle, prompt), f"target {block}", block, prompt)
        return index

    instrument = (0.6435, "What instrument is Ariadne musica scored for?")  # cosine 0.8 to the probe: logit 0.3
    namesakes = [instrument, (-0.6435, "Who composed Ariadne musica?"), (-0.7, "In what year was Ariadne musica written?"),
                 (-0.75, "Which language is Ariadne musica in?")]
    probe = key(0.0, "When was Ariadne musica abolished?")  # asks none of them
    assert bank(1.0, [instrument]).search(probe[None]).block_ids.tolist() == [0]  # one namesake: the bar is -1
    many = bank(1.0, namesakes)
    assert many.search(probe[None]).block_ids.tolist() == [-1]  # four: -1 + ln 4 = 0.39 > 0.3
    assert bank(0.0, namesakes).search(probe[None]).block_ids[0] >= 0  # a flat threshold lets it through
    others = [instrument, (-0.6435, "Who composed Boris Godunov?"), (0.7, "In what year was Hamlet written?"),
              (-0.7, "Which language is Le Monde in?")]
    assert bank(1.0, others).search(probe[None]).block_ids.tolist() == [0]  # other subjects do not raise it
    # nor do near-namesakes (names cosine 0.76-0.80 to the probe's, 1.0 to the instrument edit's): another
    # subject each, which the ranking rule puts behind the query's own
    near = [instrument, (-0.6435, "Who composed Ariadne auf Naxos?"), (-0.7, "In what year was Ariadnea written?"),
            (-0.75, "Which language is Ariadne Ferrara in?")]
    assert bank(1.0, near).search(probe[None]).block_ids.tolist() == [0]
    # an edited wording still reaches its edit, and a close rewording clears the raised bar (logit 0.49)
    close = key(0.6435 - 0.14, "What instrument was Ariadne musica scored for?")
    assert many.search(np.stack([key(*instrument), close])).block_ids.tolist() == [0, 0]

    config = tiny_config(index={"key_function": "sentence_encoder", "scope_verifier": "builtin"})
    restored = BlockIndex.from_files(config, 2 + 256, BlockIndex(many, 4).files(), "snapshot")
    assert restored.index.scope.namesake_bar == 1.0 and restored.search(probe[None]).block_ids.tolist() == [-1]
    flat = _files_before_the_policy(BlockIndex(bank(0.0, namesakes), 4).files())
    assert "scope_namesake_bar" not in json.loads(flat["index.json"])  # written before the bar: one flat threshold
    old = BlockIndex.from_files(config, 2 + 256, flat, "snapshot")
    assert old.index.scope.namesake_bar == 0.0 and old.search(probe[None]).block_ids[0] >= 0
    # written before the closest rule: every member from NAMESAKE_COSINE counts, as it did then
    files = _files_before_the_policy(BlockIndex(bank(1.0, near), 4).files())
    meta = json.loads(files["index.json"])
    assert meta.pop("scope_closest_namesakes") is True
    before = BlockIndex.from_files(config, 2 + 256, {**files, "index.json": json.dumps(meta).encode()}, "snapshot")
    assert not before.index.scope.closest_namesakes and before.search(probe[None]).block_ids.tolist() == [-1]
    with pytest.raises(ValueError, match="namesake_bar"):
        ScopeTest(verifier, 0.0, namesake_bar=-1.0)
    assert ScopeTest(_toy_scope().verifier, 0.0, namesake_bar=1.0).namesake_bar == 0.0  # no names view: flat


def test_a_training_paraphrase_is_another_key_of_its_edit_and_leaves_with_it():
    from melo_ray.records import EditRecord

    editor = MeloEditor(tiny_config(train={"num_iter": 2}, index={"r_init": 0.01}))
    record = EditRecord(prompt="Where does the apple live?", target="Oslo", train_rephrases=("Apple's home is",), id="a")
    other = EditRecord(prompt="Who paints the sea?", target="Ada", id="b")
    editor.edit([record, other])
    assert editor.index.index.num_members == 3
    assert editor.route(["Apple's home is"]).ids.tolist() == editor.route([record.prompt]).ids.tolist() != [-1]
    editor.revert(["a"])
    assert editor.index.index.num_members == 1 and editor.route(["Apple's home is"]).ids.tolist() == [-1]


def test_held_out_report_places_the_threshold_on_same_subject_pairs_and_says_when_there_are_none():
    from melo_ray.editors.melo.scope.training.verifier_training import held_out_report

    pairs = [("a", "b", 0, "subject", "zsre"), ("a", "c", 0, "subject", "zsre"), ("a", "d", 1, "rephrase", "zsre")]
    report = held_out_report(np.array([-2.0, 1.0, 3.0]), pairs)  # too few pairs for the 200 rule: they count anyway
    assert report["threshold"] == pytest.approx(np.quantile([-2.0, 1.0], 0.995))
    assert report["held_out_zsre_rephrase_accepted"] == 1.0 and report["held_out_zsre_subject_accepted"] == 0.5  # the maximum lies above its 99.5% point
    with pytest.raises(ValueError, match="same-subject"):
        held_out_report(np.array([3.0]), pairs[2:])


def test_a_snapshot_carries_the_whole_scope_policy_and_refuses_one_it_cannot_read():
    config = tiny_config(index={"key_function": "sentence_encoder", "key_module": None, "scope_verifier": "builtin"})
    verifier = ScopeVerifier.load(BUILTIN_VERIFIER)
    index = BlockIndex.create(config, verifier.key_dim)
    # no threshold in the config: the one calibrated into the verifier file
    assert index.index.scope.threshold == verifier.calibrated_threshold is not None
    files = index.files()
    meta = json.loads(files["index.json"])
    policy = ScopePolicy.from_json(meta["scope_policy"], "test")
    assert meta["scope_policy"] == policy.to_json() and set(meta["scope_policy"]) == {
        "threshold", "conflict_threshold", "latest_of_question", "prefer_same_names", "namesake_bar",
        "closest_namesakes", "focus_reach", "cluster_per_edit", "version"}
    assert not [k for k in meta if k.startswith("scope_") and k != "scope_policy"]  # no flat keys beside it
    # a config with other rules opens the snapshot with the snapshot's own
    other = tiny_config(index={"key_function": "sentence_encoder", "key_module": None, "scope_verifier": "builtin",
                               "scope_threshold": 99.0, "scope_focus_reach": False})
    restored = BlockIndex.from_files(other, verifier.key_dim, files, "snap")
    assert restored.index.scope.policy(restored.index.cluster_per_edit) == policy
    for broken in ({k: v for k, v in policy.to_json().items() if k != "namesake_bar"},
                   {**policy.to_json(), "version": 99}, {**policy.to_json(), "extra_rule": True}):
        bad = {**files, "index.json": json.dumps({**meta, "scope_policy": broken}).encode()}
        with pytest.raises(SnapshotError, match="snap.*scope"):
            BlockIndex.from_files(config, verifier.key_dim, bad, "snap")


def test_a_verifier_without_a_calibrated_threshold_needs_one_in_the_config(tmp_path):
    bare = ScopeVerifier.load(BUILTIN_VERIFIER)
    bare = ScopeVerifier(bare._weights(), {k: v for k, v in bare.meta.items() if k not in ("threshold", "calibrated_on")})
    path = tmp_path / "verifier.safetensors"
    path.write_bytes(bare.to_bytes())
    config = tiny_config(index={"key_function": "sentence_encoder", "key_module": None, "scope_verifier": str(path)})
    with pytest.raises(ValueError, match="scope_threshold"):
        BlockIndex.create(config, bare.key_dim)
    set_here = tiny_config(index={"key_function": "sentence_encoder", "key_module": None,
                                  "scope_verifier": str(path), "scope_threshold": 12.5})
    assert BlockIndex.create(set_here, bare.key_dim).index.scope.threshold == 12.5
