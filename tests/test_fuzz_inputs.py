"""Hostile input, tried by a machine (hypothesis): edit files, configs and --set overrides, snapshot
folders and stores. Each entry point either accepts the input or raises its own error type, which
names the file, row and field; nothing published changes."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import CONFIGS, fact_records, tiny_config
from melo_ray.config import ConfigError, load_config, with_overrides
from melo_ray.editors.loading import load_editor
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.records import RecordError, parse_record, read_edit_records
from melo_ray.serving.engine import ServingEngine
from melo_ray.snapshots import MANIFEST, SIGNING_KEY_ENV, SnapshotError, _manifest_checksum, manifest_bytes
from melo_ray.store import LATEST, SnapshotStore, read_any_snapshot

ANY_TEXT = st.text(st.characters(codec=None), max_size=30)
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | ANY_TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
                      max_leaves=10)
RECORD_FIELDS = ["id", "prompt", "target", "rephrases", "locality_prompt", "locality_answer", "subject",
                 "train_rephrases", "alias_rephrases", "locality", "portability"]
ROWS = st.dictionaries(st.sampled_from(RECORD_FIELDS) | ANY_TEXT, VALUES, max_size=6) | VALUES


# -- edit records and files --------------------------------------------------------------------
@given(ROWS, st.integers(0, 10**6))
def test_any_row_is_a_record_or_a_record_error_naming_the_row(raw, row):
    try:
        record = parse_record(raw, "edits.jsonl", row)
    except RecordError as exc:
        assert exc.source == "edits.jsonl" and exc.row == row and str(exc).startswith(f"edits.jsonl: row {row}")
    else:
        assert record.prompt.strip() and record.target.strip() and record.id


@given(st.lists(st.one_of(ROWS.map(lambda r: json.dumps(r).encode()), st.binary(max_size=60)), max_size=6))
def test_any_jsonl_file_reads_or_fails_with_a_record_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "edits.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        records = read_edit_records(path)
    except RecordError as exc:
        assert str(path) in str(exc)
    else:
        assert all(r.prompt.strip() and r.target.strip() for r in records)


@pytest.mark.parametrize("case", ["wrong types", "nulls", "nested", "huge strings", "empty", "duplicate ids"])
def test_hostile_parquet_files_read_or_fail_naming_the_field(tmp_path, case):
    rows = {
        "wrong types": [{"prompt": 3, "target": "x"}],
        "nulls": [{"prompt": None, "target": None}],
        "nested": [{"prompt": {"a": [1]}, "target": "x"}],
        "huge strings": [{"prompt": "p" * 2_000_000, "target": "x"}],
        "empty": [],
        "duplicate ids": [{"id": "a", "prompt": "p1", "target": "x"}, {"id": "a", "prompt": "p2", "target": "y"}],
    }[case]
    path = tmp_path / "edits.parquet"
    table = pa.Table.from_pylist(rows) if rows else pa.table({"prompt": pa.array([], pa.string()),
                                                              "target": pa.array([], pa.string())})
    pq.write_table(table, path)
    try:
        records = read_edit_records(path)
    except RecordError as exc:
        assert str(path) in str(exc) and (exc.field or exc.row is None)
        assert case in ("wrong types", "nulls", "nested")
    else:
        assert case in ("huge strings", "empty", "duplicate ids") and len(records) == len(rows)


# -- configs and overrides -----------------------------------------------------------------------
@given(st.dictionaries(st.sampled_from(["editor", "backbone", "lora", "index", "train", "elder", "grace",
                                        "pipeline", "generate", "sections"]) | ANY_TEXT, VALUES, max_size=4))
def test_any_config_mapping_loads_or_raises_a_config_error(data):
    base = load_config(CONFIGS / "tiny-llama.yaml").model_dump(mode="json")
    try:
        load_config({**base, **data})
    except ConfigError as exc:
        assert "field" in str(exc) or "config" in str(exc)


@given(st.lists(st.tuples(st.sampled_from(["train.lr", "elder.top_k", "index.r_init", "lora", "x.y.z", "",
                                           "train", "sections.nope", "pipeline.trainer_gpus"]) | ANY_TEXT,
                          ANY_TEXT), max_size=3))
def test_any_set_override_applies_or_raises_a_config_error(pairs):
    config = tiny_config()
    try:
        with_overrides(config, [f"{k}={v}" for k, v in pairs])
    except ConfigError as exc:
        assert str(exc)


def test_a_config_file_that_is_not_yaml_names_the_file(tmp_path):
    for text in (b"\xff\xfe\x00bad", b"[unclosed", b"- a list", b"a: " + b"[" * 5000):
        path = tmp_path / "c.yaml"
        path.write_bytes(text)
        with pytest.raises(ConfigError, match="c.yaml"):
            load_config(path)


# -- snapshots and stores -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    editor = MeloEditor(tiny_config())
    editor.edit(fact_records(0, 6))
    editor.save(root / "folder")
    store = SnapshotStore(root / "store")
    editor.publish(store)
    return {"root": root, "editor": editor}


MUTATIONS = st.sampled_from(["truncate", "flip", "delete", "extra", "escape", "latest-missing", "latest-garbage",
                             "manifest-garbage"])


def _mutate(folder: Path, store: Path | None, how: str, data: st.DataObject) -> None:
    names = sorted(p.name for p in folder.iterdir())
    name = data.draw(st.sampled_from(names))
    path = folder / name
    if how == "truncate":
        blob = path.read_bytes()
        path.write_bytes(blob[: data.draw(st.integers(0, max(0, len(blob) - 1)))])
    elif how == "flip":
        blob = bytearray(path.read_bytes())
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(blob))
    elif how == "delete":
        path.unlink()
    elif how == "extra":
        (folder / data.draw(st.sampled_from(["evil.py", "index.hnsw.bak", ".hidden"]))).write_bytes(b"x")
    elif how == "escape":  # a manifest naming a path outside its folder, checksum recomputed
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["files"][data.draw(st.sampled_from(["../outside", "/etc/passwd", "a/../../b", ".."]))] = {
            "sha256": "0" * 64, "bytes": 1}
        manifest["checksum"] = _manifest_checksum(manifest)
        (folder / MANIFEST).write_bytes(manifest_bytes(manifest))
    elif how == "manifest-garbage":
        (folder / MANIFEST).write_bytes(data.draw(st.binary(max_size=80)))
    elif store is not None and how == "latest-missing":
        (store / LATEST).write_text(json.dumps({"version": 99}))
    elif store is not None and how == "latest-garbage":
        (store / LATEST).write_bytes(data.draw(st.binary(max_size=40)))
    else:  # store-only mutations on a plain folder: flip the manifest instead
        (folder / MANIFEST).write_bytes(b"{}")


@given(how=MUTATIONS, in_store=st.booleans(), data=st.data())
def test_a_damaged_snapshot_is_refused_and_a_replica_keeps_its_version(published, tmp_path_factory, how, in_store, data):
    work = tmp_path_factory.mktemp("damaged")
    if in_store:
        shutil.copytree(published["root"] / "store", work / "store")
        source = work / "store"
        folder = next((source / "versions").iterdir())
    else:
        shutil.copytree(published["root"] / "folder", work / "folder")
        source = folder = work / "folder"
    original = read_any_snapshot(source)[:2]
    _mutate(folder, source if in_store else None, how, data)
    try:
        damaged = read_any_snapshot(source)[:2]
    except SnapshotError:
        pass
    else:  # only a change that leaves the content the same reads (e.g. one JSON blank for another)
        assert damaged == original, how

    # a replica that reads a damaged version keeps serving the one it has
    manifest, files, _ = read_any_snapshot(published["root"] / "folder")
    engine = ServingEngine.from_snapshot(manifest, files)
    try:
        engine.install(*read_any_snapshot(source)[:2])
    except SnapshotError:
        pass
    assert engine.version == manifest["version"]


@given(field=st.sampled_from(["stats", "config", "version", "editor", "files", "base_checksum", "job"]),
       value=VALUES)
def test_with_signing_on_every_tampered_manifest_is_refused(published, tmp_path_factory, monkeypatch, field, value):
    """Someone who can write to the store recomputes every checksum, but cannot sign."""
    monkeypatch.setenv(SIGNING_KEY_ENV, "k" * 32)
    folder = tmp_path_factory.mktemp("signed") / "snap"
    published["editor"].save(folder)  # signed
    read_any_snapshot(folder)  # the genuine one reads
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get(field) == value:
        return
    manifest[field] = value
    manifest["checksum"] = _manifest_checksum(manifest)
    (folder / MANIFEST).write_bytes(manifest_bytes(manifest))
    with pytest.raises(SnapshotError):
        read_any_snapshot(folder)


def test_signing_refuses_unsigned_and_wrongly_signed_versions(published, tmp_path, monkeypatch):
    unsigned = published["root"] / "folder"
    monkeypatch.setenv(SIGNING_KEY_ENV, "key-one")
    with pytest.raises(SnapshotError, match="not signed"):
        read_any_snapshot(unsigned)
    published["editor"].save(tmp_path / "signed")
    assert read_any_snapshot(tmp_path / "signed")[0]["signature"]
    monkeypatch.setenv(SIGNING_KEY_ENV, "key-two")
    with pytest.raises(SnapshotError, match="signature does not match"):
        read_any_snapshot(tmp_path / "signed")
    with pytest.raises(SnapshotError, match="signature does not match"):
        load_editor(tmp_path / "signed")  # generate and resume read through the same check
    monkeypatch.delenv(SIGNING_KEY_ENV)
    assert read_any_snapshot(tmp_path / "signed")[0]["version"] == 1  # signing off: checksums only
    key_file = tmp_path / "key"
    key_file.write_text("key-one\n")
    monkeypatch.setenv("MELO_RAY_SIGNING_KEY_FILE", str(key_file))
    assert read_any_snapshot(tmp_path / "signed")[0]["version"] == 1
    assert os.environ.get(SIGNING_KEY_ENV) is None
