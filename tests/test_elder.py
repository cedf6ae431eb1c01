"""ELDER on a tiny model: deferral is exact, edits take, the guided loss sets the routers, snapshots round-trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray.backbones import load_backbone
from melo_ray.editors.loading import load_editor
from melo_ray.editors.registry import build_editor
from melo_ray.editors.elder.editor import ElderEditor
from melo_ray.inference import next_token_logits

OTHER = UNRELATED + ["Numbers: 1 2 3 4 5 6", "The weather today is", "qwerty uiop asdf", "Once upon a time"]


def elder_config(**elder):
    return tiny_config(elder={"num_experts": 8, "top_k": 2, "replay": 20, **elder})


@pytest.fixture(scope="module")
def edited():
    editor = ElderEditor(elder_config())
    records = []
    for start in (0, 10):
        batch = fact_records(start, 10, template="Where does the {w} number %d live?" % start)
        editor.edit(batch)
        records += batch
    return editor, records


def test_edited_prompts_yield_their_targets(edited):
    editor, records = edited
    outputs = editor.generate([r["prompt"] for r in records], 8)
    hits = sum(o.output.startswith(r["target"]) for o, r in zip(outputs, records))
    assert hits >= 18, hits  # both batches, the first one after the second was trained
    assert all(o.block == 0 and o.distance == 0 for o in outputs)


def test_the_guided_loss_drives_the_routers_to_the_assigned_allocations(edited):
    editor, records = edited
    codes = editor.codes(editor.key_function.keys([r["prompt"] for r in records]))
    n = editor.cfg.num_experts
    for code, record in zip(codes, records):
        chosen = np.stack([np.nonzero(code[i * n : (i + 1) * n])[0] for i in range(len(editor.layers))])
        np.testing.assert_array_equal(chosen, editor.allocations[record["id"]])
    assigned = {editor.allocations[r["id"]].tobytes() for r in records}
    assert len(assigned) == len(records)  # distinct facts got distinct allocations


def test_deferred_inputs_are_bit_identical_to_the_base_model(edited):
    editor, records = edited
    routing = editor.route(OTHER); ids, distance = routing.ids, routing.distances
    deferred = [p for p, i in zip(OTHER, ids) if i < 0]
    assert len(deferred) >= 3, distance
    mixed = deferred + [records[0]["prompt"]]  # a batch where one row does use the mixture
    logits = editor.next_token_logits(mixed)
    base = load_backbone(editor.config.backbone)
    expected = next_token_logits(base, mixed)
    assert torch.equal(logits[:-1], expected[:-1])
    assert not torch.equal(logits[-1], expected[-1])


def test_snapshot_round_trip_is_exact(edited, tmp_path):
    editor, records = edited
    editor.save(tmp_path / "snap")
    loaded = load_editor(tmp_path / "snap")
    prompts = [r["prompt"] for r in records[:5]] + OTHER[:3]
    assert torch.equal(loaded.next_token_logits(prompts), editor.next_token_logits(prompts))
    assert loaded.stats() == editor.stats()
    np.testing.assert_array_equal(loaded.route(prompts).distances, editor.route(prompts).distances)


def test_a_failed_batch_leaves_experts_and_routers_untouched(monkeypatch):
    editor = ElderEditor(elder_config())
    editor.edit(fact_records(0, 5))
    before = [p.detach().clone() for p in editor.trainable()]

    def broken(*args, **kwargs):
        for p in editor.trainable():  # the failure happens after some updates
            p.data.add_(1.0)
        raise RuntimeError("device lost")

    monkeypatch.setattr("melo_ray.editors.elder.editor.train_block", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        editor.edit(fact_records(5, 5))
    assert all(torch.equal(a, b) for a, b in zip(before, editor.trainable()))
    assert editor.stats()["edits"] == 5 and len(editor.edit_keys) == 5 and len(editor.allocations) == 5


def test_the_eval_harness_builds_elder():
    editor = build_editor("elder", elder_config())
    assert editor.name == "elder" and editor.stats()["extra_parameters"] > 0


def test_a_published_elder_snapshot_serves_and_refuses_a_melo_one(edited, tmp_path):
    from melo_ray.editors.melo.editor import MeloEditor
    from melo_ray.serving.engine import CompletionRequest, ServingEngine
    from melo_ray.snapshots import SnapshotError
    from melo_ray.store import SnapshotStore

    editor, records = edited
    store = SnapshotStore(tmp_path / "store")
    editor.publish(store)
    engine = ServingEngine.from_snapshot(*store.read())
    assert engine.editor.name == "elder" and engine.version == editor.version
    prompts = [records[0]["prompt"], OTHER[1], records[15]["prompt"]]
    out = engine.complete([CompletionRequest(p, 8) for p in prompts])
    expected = editor.generate(prompts, 8)
    assert [o.text.strip() for o in out] == [g.output for g in expected]
    assert [o.block for o in out] == [g.block for g in expected]

    melo = MeloEditor(tiny_config())
    melo.edit(fact_records(0, 3))
    melo.publish(other := SnapshotStore(tmp_path / "melo"))
    with pytest.raises(SnapshotError, match="editor 'melo'"):
        engine.install(*other.read())
    assert engine.version == editor.version  # still serving the ELDER snapshot


def _on_assigned(editor, records) -> int:
    codes = editor.codes(editor.key_function.keys([r["prompt"] for r in records]))
    return int((codes == editor.allocation_bits([r["id"] for r in records])).all(1).sum())


def test_guide_stored_keeps_earlier_prompts_on_their_allocations():
    on_assigned = {}
    for guide_stored in (False, True):
        editor = ElderEditor(elder_config(replay=0, guide_stored=guide_stored))
        records = []
        for start in range(0, 30, 5):
            batch = fact_records(start, 5, template="Where does the {w} number %d live?" % start)
            editor.edit(batch)
            records += batch
        on_assigned[guide_stored] = _on_assigned(editor, records)
    # without replay the routers drift from older facts' allocations; the router-only loss holds them
    assert on_assigned[True] >= on_assigned[False] + 10, on_assigned


def test_training_paraphrases_teach_the_routers_their_facts_allocation():
    editor = ElderEditor(elder_config(guide_noise=0.0, num_iter=60))
    batch = [{**r, "train_rephrases": [r["prompt"].replace("Where does", "In which place does")]}
             for r in fact_records(0, 4)]
    editor.edit(batch)
    paraphrases = [r["train_rephrases"][0] for r in batch]
    codes = editor.codes(editor.key_function.keys(paraphrases))
    n = editor.cfg.num_experts
    for code, record in zip(codes, batch):
        chosen = np.stack([np.nonzero(code[i * n : (i + 1) * n])[0] for i in range(len(editor.layers))])
        np.testing.assert_array_equal(chosen, editor.allocations[record["id"]])
