"""Operating a store that lives on S3 (moto's server, configured by the four standard AWS variables
only): revert, versions and diff, rollback over a dead writer's lease, pin, compaction and PEFT export,
through the same CLI and functions as a local store."""
from __future__ import annotations

import json

import pytest

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray import operations
from melo_ray.cli.main import main as cli
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.store import SnapshotStore, StoreBusyError, open_snapshots


def test_revert_rollback_pin_compact_and_export_on_an_s3_store(s3_env, tmp_path):
    uri = s3_env.new_prefix()
    editor = MeloEditor(tiny_config())
    store = SnapshotStore(uri, keep=10)
    records = fact_records(0, 10)
    for start in (0, 5):  # two batches: blocks 0 and 1
        editor.edit(records[start : start + 5])
        editor.publish(store)
    assert store.latest_version() == 2 and not (tmp_path / uri.split("://")[1]).exists()

    # revert the first batch: block 0 is left without live edits
    assert cli(["edits", "revert", "--store", uri, "--ids", ",".join(r["id"] for r in records[:5])]) == 0
    assert [v["version"] for v in operations.versions(uri)] == [1, 2, 3]
    assert {e["id"] for e in operations.diff(uri, 2, 3)["removed"]} == {r["id"] for r in records[:5]}

    # compaction drops block 0 and answers exactly as before
    reverted = MeloEditor.load(uri)
    prompts = [r["prompt"] for r in records] + UNRELATED
    before = [g.output for g in reverted.generate(prompts, 6)]
    assert cli(["store", "compact", "--store", uri]) == 0
    compacted = MeloEditor.load(uri)
    assert compacted.version == 4 and [g.output for g in compacted.generate(prompts, 6)] == before
    assert operations.versions(uri)[-1]["made_by"]["compact"]["dropped_blocks"] == [0]

    # a dead job's lease stops a rollback until the operator breaks it
    store.put_bytes("WRITER.json", json.dumps({"owner": "job:dead", "pid": 1, "host": "gone", "epoch": 9}).encode())
    with pytest.raises(StoreBusyError, match="job:dead"):
        operations.rollback(uri, 2)
    assert cli(["store", "rollback", "--store", uri, "--to", "2", "--break-lock"]) == 0
    rolled = MeloEditor.load(uri)
    assert rolled.version == 5 and set(rolled.edit_log) == {r["id"] for r in records}
    assert store.writer() is None  # the operator's lease was given back

    # pin: readers serve v3 whatever is latest, until unpinned
    assert cli(["store", "pin", "--store", uri, "--version", "3"]) == 0
    assert open_snapshots(uri).serving_version() == 3 and store.latest_version() == 5
    assert {e["id"] for e in operations.list_edits(uri)} == {r["id"] for r in records[5:]}
    assert cli(["store", "unpin", "--store", uri]) == 0
    assert open_snapshots(uri).serving_version() == 5

    # export the served version's blocks as PEFT adapters
    assert cli(["export", "--store", uri, "--format", "peft", "--out", str(tmp_path / "adapters")]) == 0
    routing = json.loads((tmp_path / "adapters" / "routing.json").read_text())
    assert routing["snapshot_version"] == 5 and len(routing["edits"]) == 10
    assert (tmp_path / "adapters" / "block-00001" / "adapter_model.safetensors").is_file()


def test_a_pointer_read_while_it_is_replaced_is_read_again(s3_env, monkeypatch):
    """Bug: a replica polling LATEST.json on S3 got it cut at the old object's size (pyarrow reads with
    a HEAD, then ranged GETs) while a writer replaced it with a longer one: "unreadable"."""
    store = SnapshotStore(s3_env.new_prefix())
    store.publish(1, {"a.bin": b"a"}, {"version": 1})
    whole = store.get_bytes("LATEST.json")
    reads = iter([whole[: len(whole) // 2], whole])
    monkeypatch.setattr(store, "get_bytes", lambda name: next(reads))
    assert store.latest_version() == 1
