"""The serving engine without Ray: mixed batches, per-request lengths, stop strings, swaps."""
from __future__ import annotations

import pytest

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.serving.engine import CompletionRequest, ServingEngine
from melo_ray.snapshots import SnapshotError
from melo_ray.store import SnapshotStore


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    store = SnapshotStore(tmp_path_factory.mktemp("store"))
    editor = MeloEditor(tiny_config())
    editor.edit(fact_records(0, 10))
    editor.publish(store)
    return store, editor


def test_a_mixed_batch_matches_the_editor_and_shorter_requests_are_prefixes(published):
    store, editor = published
    engine = ServingEngine.from_snapshot(*store.read())
    records = fact_records(0, 3)
    prompts = [records[0]["prompt"], UNRELATED[0], records[2]["prompt"]]
    out = engine.complete([CompletionRequest(p, 8) for p in prompts])
    expected = editor.generate(prompts, 8)
    assert [o.text.strip() for o in out] == [g.output for g in expected]
    assert [o.block for o in out] == [g.block for g in expected] and out[1].block is None
    assert all(o.version == 1 for o in out)
    mixed = engine.complete([CompletionRequest(UNRELATED[0], 3), CompletionRequest(UNRELATED[0], 8)])
    assert mixed[0].completion_tokens == 3 and mixed[0].finish_reason == "length"
    assert out[1].text.startswith(mixed[0].text)


def test_stop_strings_cut_the_text(published):
    store, _ = published
    engine = ServingEngine.from_snapshot(*store.read())
    record = fact_records(0, 1)[0]
    full = engine.complete([CompletionRequest(record["prompt"], 8)])[0].text
    cut = engine.complete([CompletionRequest(record["prompt"], 8, stop=(full.strip()[2:4],))])[0]
    assert cut.finish_reason == "stop" and full.startswith(cut.text) and len(cut.text) < len(full)


def test_install_refuses_a_snapshot_of_another_base_model(published, tmp_path):
    store, _ = published
    engine = ServingEngine.from_snapshot(*store.read())
    manifest, files = store.read()
    with pytest.raises(SnapshotError, match="other base weights"):
        engine.install({**manifest, "base_checksum": "0" * 64}, files)
    assert engine.version == 1  # still serving what it had
