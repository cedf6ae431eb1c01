"""Operating a store: revert single edits, list and explain them, versions, diff, rollback, pin,
compaction and PEFT export, with tiny models and a real store on disk."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray import operations
from melo_ray.backbones import load_backbone
from melo_ray.editors.protocol import RevertError
from melo_ray.editors.routing import Routing
from melo_ray.editors.registry import build_editor, editor_from_snapshot
from melo_ray.store import SnapshotStore, StoreBusyError

SETTINGS = {"melo": {}, "grace": {"grace": {"num_iter": 20}}, "elder": {"elder": {"num_experts": 8, "num_iter": 20}}}


def _store_with(name: str, tmp_path, batches: int = 2, per_batch: int = 5):
    config = tiny_config(**SETTINGS.get(name, {})).model_copy(update={"editor": name})
    editor = build_editor(name, config)
    store = SnapshotStore(tmp_path / "store", keep=10)
    records = fact_records(0, batches * per_batch)
    for start in range(0, len(records), per_batch):
        editor.edit(records[start : start + per_batch])
        editor.publish(store)
    return editor, store, records


def _latest(store: SnapshotStore):
    manifest, files = store.read()
    return editor_from_snapshot(manifest, files, "test"), manifest


@pytest.mark.parametrize("name", ["melo", "grace", "elder"])
def test_reverting_one_edit_changes_no_other_output(name, tmp_path):
    editor, store, records = _store_with(name, tmp_path)
    prompts = [r["prompt"] for r in records]
    before = editor.next_token_logits(prompts + UNRELATED)
    victim = records[3]["id"]
    result = operations.revert(store.uri, [victim])
    assert result["reverted"] == [victim] and result["version"] == 3 and result["edits"] == len(records) - 1

    after_editor, manifest = _latest(store)
    assert victim not in after_editor.edit_log and len(after_editor.edit_log) == len(records) - 1
    after = after_editor.next_token_logits(prompts + UNRELATED)
    others = [i for i in range(len(prompts) + len(UNRELATED)) if i != 3]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)  # exactly as before
    # the reverted prompt now runs on the base model
    assert after_editor.routing([prompts[3]]).ids[0] == -1
    base = after_editor.next_token_logits(prompts + UNRELATED, base=True)  # same batch: same numerics
    torch.testing.assert_close(after[3], base[3], rtol=0, atol=0)


def test_reverting_an_unknown_id_names_it_and_publishes_nothing(tmp_path):
    _, store, _ = _store_with("melo", tmp_path)
    latest = store.latest_version()
    with pytest.raises(RevertError, match="no-such-edit"):
        operations.revert(store.uri, ["f1", "no-such-edit"])
    assert store.latest_version() == latest and store.writer() is None


def test_sequential_lora_says_it_cannot_revert(tmp_path):
    _, store, records = _store_with("lora", tmp_path, batches=1)
    with pytest.raises(NotImplementedError, match="cannot revert"):
        operations.revert(store.uri, [records[0]["id"]])
    assert store.latest_version() == 1


def test_a_revert_cannot_race_a_running_job(tmp_path):
    _, store, records = _store_with("melo", tmp_path, batches=1)
    with store.writing("job:nightly"):
        with pytest.raises(StoreBusyError, match="job:nightly"):
            operations.revert(store.uri, [records[0]["id"]])
        assert store.latest_version() == 1
    assert operations.revert(store.uri, [records[0]["id"]])["version"] == 2
    # a writer that died leaves its lease; an operator breaks it explicitly
    store.put_bytes("WRITER.json", json.dumps({"owner": "job:dead", "pid": 1}).encode())
    with pytest.raises(StoreBusyError):
        operations.revert(store.uri, [records[1]["id"]])
    assert operations.revert(store.uri, [records[1]["id"]], break_lock=True)["version"] == 3


def test_list_explain_versions_diff_rollback_and_pin(tmp_path):
    editor, store, records = _store_with("melo", tmp_path)
    listed = operations.list_edits(store.uri)
    assert [e["id"] for e in listed] == [r["id"] for r in records]
    assert listed[6] == {"id": "f6", "prompt": records[6]["prompt"], "target": records[6]["target"], "version": 2,
                         "block": 1}
    assert [e["id"] for e in operations.list_edits(store.uri, contains=records[2]["target"].upper())] == [
        r["id"] for r in records if r["target"] == records[2]["target"]]

    why = operations.explain(store.uri, records[4]["prompt"])
    assert why["fires"] and why["edit_id"] == "f4" and why["block"] == 0 and why["distance"] == pytest.approx(0, abs=1e-5)
    far = operations.explain(store.uri, UNRELATED[1])
    assert not far["fires"] and far["edit_id"] is None and "base model" in far["decision"]

    operations.revert(store.uri, ["f0", "f7"])
    change = operations.diff(store.uri, 2, 3)
    assert sorted(e["id"] for e in change["removed"]) == ["f0", "f7"] and change["added"] == []
    rolled = operations.rollback(store.uri, to=1)
    assert rolled == {"version": 4, "rolled_back_to": 1, "edits": 5}
    editor_v4, manifest = _latest(store)
    assert manifest["operation"]["rollback_to"] == 1 and sorted(editor_v4.edit_log) == [f"f{i}" for i in range(5)]
    assert operations.diff(store.uri, 1, 4) == {"from": 1, "to": 4, "added": [], "removed": []}
    rows = operations.versions(store.uri)
    assert [r["version"] for r in rows] == [1, 2, 3, 4] and rows[-1]["latest"]

    operations.pin(store.uri, 2)
    assert store.serving_version() == 2 and [r["pinned"] for r in operations.versions(store.uri)] == [0, 1, 0, 0]
    assert operations.list_edits(store.uri)[-1]["id"] == "f9"  # what replicas serve: the pinned v2
    operations.unpin(store.uri)
    assert store.serving_version() == 4


def test_compaction_drops_dead_blocks_and_answers_exactly_as_before(tmp_path):
    editor, store, records = _store_with("melo", tmp_path, batches=3, per_batch=4)
    operations.revert(store.uri, [r["id"] for r in records[4:8]])  # every edit of block 1
    before_editor, before_manifest = _latest(store)
    prompts = [r["prompt"] for r in records] + UNRELATED
    before = before_editor.next_token_logits(prompts)
    result = operations.compact(store.uri)
    assert result["dropped_blocks"] == [1] and result["bytes_after"] < result["bytes_before"]
    after_editor, manifest = _latest(store)
    assert manifest["stats"]["blocks"] == 2 and after_editor.edit_log["f9"].block == 1  # renumbered
    torch.testing.assert_close(after_editor.next_token_logits(prompts), before, rtol=0, atol=0)
    after_editor.edit(fact_records(20, 2))  # the bank keeps growing after compaction
    assert after_editor.stats()["blocks"] == 3


def test_an_exported_block_matches_ours_under_real_peft(tmp_path):
    from peft import PeftModel

    editor, store, records = _store_with("melo", tmp_path)
    out = tmp_path / "export"
    result = operations.export(store.uri, out)
    assert result["adapters"] == ["block-00000", "block-00001"] and result["edits"] == len(records)
    routing = json.loads((out / "routing.json").read_text())
    assert {e["id"]: e["adapter"] for e in routing["edits"]}["f7"] == "block-00001"

    restored, _ = _latest(store)
    for block, chunk in ((0, records[:5]), (1, records[5:])):
        prompts = [r["prompt"] for r in chunk]
        with restored.routed(Routing(np.full(len(prompts), block), np.zeros(len(prompts)))):
            from melo_ray.inference import next_token_logits

            ours = next_token_logits(restored.backbone, prompts)
        base = load_backbone(restored.config.backbone)
        peft_model = PeftModel.from_pretrained(base.model, str(out / f"block-{block:05d}"))
        peft_model.eval()
        base.model = peft_model
        theirs = next_token_logits(base, prompts)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_the_cli_operates_a_store(tmp_path, capsys):
    from melo_ray.cli.main import main

    _, store, records = _store_with("melo", tmp_path)
    assert main(["edits", "list", "--store", str(store.root), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(records)
    assert main(["edits", "revert", "--store", str(store.root), "--ids", "f2,f3"]) == 0
    assert json.loads(capsys.readouterr().out)["reverted"] == ["f2", "f3"]
    assert main(["edits", "revert", "--store", str(store.root), "--ids", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["store", "versions", "--store", str(store.root)]) == 0
    assert "LATEST" in capsys.readouterr().out.splitlines()[-1]
    assert main(["store", "rollback", "--store", str(store.root), "--to", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 4
    assert main(["edits", "explain", "--store", str(store.root), "--prompt", records[2]["prompt"]]) == 0
    assert json.loads(capsys.readouterr().out)["edit_id"] == "f2"
