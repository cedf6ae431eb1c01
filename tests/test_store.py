"""The versioned snapshot store: publish, read back verified, prune, refuse corruption; local and file:// URIs."""
from __future__ import annotations

import json

import pytest

from melo_ray.snapshots import SnapshotError
from melo_ray.store import SnapshotStore, read_any_snapshot


def publish(store: SnapshotStore, version: int, text: str = "x") -> dict:
    return store.publish(version, {"a.bin": text.encode() * 10, "b.json": b'{"k": 1}'}, {"version": version})


@pytest.mark.parametrize("as_uri", [False, True])
def test_publish_read_and_prune(tmp_path, as_uri):
    root = tmp_path / "store"
    store = SnapshotStore(f"file://{root}" if as_uri else root, keep=2)
    assert store.latest_version() is None
    with pytest.raises(SnapshotError, match="no published snapshot"):
        store.read()
    for version in (1, 2, 5):
        publish(store, version, text=str(version))
    assert store.latest_version() == 5
    manifest, files = store.read()
    assert manifest["version"] == 5 and files["a.bin"] == b"5" * 10
    assert store.versions() == [2, 5]  # keep=2
    with pytest.raises(SnapshotError, match="not newer"):
        publish(store, 5)
    manifest, files, where = read_any_snapshot(root)
    assert manifest["version"] == 5 and "v5" in where


def test_a_corrupted_version_is_refused_and_latest_still_points_at_it(tmp_path):
    store = SnapshotStore(tmp_path, keep=3)
    publish(store, 1)
    publish(store, 2, text="y")  # a.bin differs, so v2 holds its own copy (unchanged files are shared)
    (store.local_folder(2) / "a.bin").write_bytes(b"tampered")
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        store.read()
    manifest, _ = store.read(1)  # older versions stay readable
    assert manifest["version"] == 1
    edited = json.loads((store.local_folder(1) / "manifest.json").read_text())
    edited["version"] = 7
    (store.local_folder(1) / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(SnapshotError, match="manifest checksum"):
        store.read(1)


def test_leftovers_of_a_crashed_write_are_pruned(tmp_path):
    store = SnapshotStore(tmp_path, keep=5)
    publish(store, 1)
    leftover = tmp_path / "versions" / f".v00000002.tmp-{'0' * 32}"
    leftover.mkdir()
    (leftover / "a.bin").write_bytes(b"half")
    publish(store, 2)
    assert not leftover.exists() and store.versions() == [1, 2]


def test_bad_uris_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(SnapshotError, match="not a usable storage URI"):
        SnapshotStore("nosuchscheme://bucket/x")
    with pytest.raises(SnapshotError, match="neither a snapshot store"):
        read_any_snapshot(tmp_path)


def test_unchanged_files_are_reused_not_rewritten(tmp_path):
    store = SnapshotStore(tmp_path / "store", keep=2)
    big, small = b"b" * 4096, b"s"
    store.publish(1, {"big.bin": big, "small.bin": small}, {"version": 1})
    store.publish(2, {"big.bin": big, "small.bin": b"t"}, {"version": 2})
    first, second = store.local_folder(1), store.local_folder(2)
    assert (first / "big.bin").stat().st_ino == (second / "big.bin").stat().st_ino  # one file, two versions
    assert (first / "small.bin").stat().st_ino != (second / "small.bin").stat().st_ino
    store.publish(3, {"big.bin": big, "small.bin": b"u"}, {"version": 3})  # prunes v1: v2's link survives
    assert store.versions() == [2, 3]
    for version in (2, 3):
        manifest, files = store.read(version)
        assert files["big.bin"] == big
    # a reused file that was damaged after its publish is still caught when read
    with open(store.local_folder(3) / "big.bin", "r+b") as handle:
        handle.write(b"X")
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        store.read(2)


def test_a_manifest_built_for_other_files_is_refused_before_anything_is_written(tmp_path):
    from melo_ray.snapshots import build_manifest, write_snapshot

    manifest = build_manifest({"a.bin": b"a"}, {"version": 1})
    with pytest.raises(ValueError, match="other files"):
        write_snapshot(tmp_path / "v1", {"a.bin": b"a", "b.bin": b"b"}, {"version": 1}, manifest=manifest)
    assert not (tmp_path / "v1").exists()
    written = write_snapshot(tmp_path / "v1", {"a.bin": b"a"}, {"version": 1}, manifest=manifest)
    assert written is manifest and (tmp_path / "v1" / "a.bin").read_bytes() == b"a"
