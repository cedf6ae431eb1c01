"""Operating a snapshot store: inspect edits, revert some, roll back, pin replicas, compact, export.

Every operation that publishes takes the store's writer lease first (the one a running bulk-edit
job holds), so it cannot race a job; it reads the latest verified version, changes an editor
restored from it, and publishes the result as a new version. Nothing is deleted: replicas follow
the new version as they follow any publish, and older versions stay until the store prunes them.
The CLI (`melo-ray edits ...`, `melo-ray store ...`, `melo-ray export`) calls these functions.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from melo_ray.editors.edit_log import read_edit_log
from melo_ray.editors.protocol import Editor
from melo_ray.editors.registry import editor_from_snapshot
from melo_ray.snapshots import SnapshotError
from melo_ray.store import LATEST, Lease, SnapshotStore, open_snapshots


def _store(uri: str | Path) -> SnapshotStore:
    store = SnapshotStore(uri)
    if store.get_bytes(LATEST) is None:
        raise SnapshotError(f"{uri}: not a snapshot store with a published version (no {LATEST})")
    return store


def _read_serving(source: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The verified version replicas serve: a store's pinned or latest one, or one snapshot folder."""
    snapshots = open_snapshots(source)
    version = snapshots.serving_version()
    if version is None:
        raise SnapshotError(f"{source}: no published snapshot yet")
    return snapshots.read(version)


def load_latest(source: str | Path) -> tuple[Editor, dict[str, Any]]:
    """The editor of the version replicas serve, and its manifest."""
    manifest, files = _read_serving(source)
    return editor_from_snapshot(manifest, files, f"{source} v{manifest['version']}"), manifest


# -- inspect -------------------------------------------------------------------------------------
def list_edits(source: str | Path, contains: str | None = None) -> list[dict[str, Any]]:
    """Every edit of the latest version: id, prompt, target, block, version added (oldest first);
    `contains` keeps those whose id, prompt or target holds the text (case-insensitive)."""
    _, files = _read_serving(source)
    entries = [asdict(e) for e in read_edit_log(files, str(source)).values()]
    if contains:
        needle = contains.casefold()
        entries = [e for e in entries if any(needle in str(e[k]).casefold() for k in ("id", "prompt", "target"))]
    return entries


def explain(source: str | Path, prompt: str) -> dict[str, Any]:
    """Which edit would fire for `prompt` on the serving version, the distance, and the decision."""
    editor, manifest = load_latest(source)
    return {"snapshot_version": manifest["version"], "editor": editor.name, **editor.explain(prompt)}


def versions(uri: str | Path) -> list[dict[str, Any]]:
    """The versions a store holds, oldest first, with what made each and which one replicas serve."""
    store = _store(uri)
    latest, pinned = store.latest_version(), store.pinned_version()
    rows = []
    for version in store.versions():
        try:
            manifest = store.read_manifest(version)
        except SnapshotError as exc:
            rows.append({"version": version, "error": str(exc)})
            continue
        rows.append({
            "version": version, "editor": manifest.get("editor"), "edits": manifest.get("stats", {}).get("edits"),
            "made_by": manifest.get("operation") or ({"job": manifest["job"]["id"]} if manifest.get("job") else None),
            "published_at": manifest.get("published_at"), "latest": version == latest, "pinned": version == pinned,
        })
    return rows


def diff(uri: str | Path, old: int, new: int) -> dict[str, Any]:
    """Edits added and removed between two versions of a store (by id)."""
    store = _store(uri)
    logs = []
    for version in (old, new):
        _, files = store.read(version)
        logs.append(read_edit_log(files, f"{uri} v{version}"))
    added = [asdict(e) for i, e in logs[1].items() if i not in logs[0]]
    removed = [asdict(e) for i, e in logs[0].items() if i not in logs[1]]
    return {"from": old, "to": new, "added": added, "removed": removed}


# -- change: each publishes a new version under the writer lease ---------------------------------
def _publish(store: SnapshotStore, lease: Lease, editor: Editor, manifest: dict[str, Any],
             operation: dict[str, Any], *, keep_job: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {"operation": operation, "published_at": _now()}
    if keep_job and manifest.get("job"):
        extra["job"] = manifest["job"]  # a job resumed later continues from where it was
    return store.publish(editor.version, editor.snapshot_files(), editor.snapshot_meta(**extra), lease=lease)


def revert(uri: str | Path, ids: list[str], *, break_lock: bool = False) -> dict[str, Any]:
    """Publish a new version without these edits. An unknown id is an error naming it; then nothing
    is published."""
    if not ids:
        raise ValueError("revert: no edit ids given")
    started = time.perf_counter()
    store = _store(uri)
    with store.writing("melo-ray edits revert", take_over=break_lock) as lease:
        manifest, files = store.read()
        editor = editor_from_snapshot(manifest, files, f"{uri} v{manifest['version']}")
        loaded = time.perf_counter()
        reverted = editor.revert(ids)  # moves the version on by one
        published = _publish(store, lease, editor, manifest, {"revert": reverted, "from_version": manifest["version"]},
                             keep_job=True)
    return {"version": published["version"], "reverted": reverted, "edits": published["stats"]["edits"],
            "seconds": time.perf_counter() - started, "load_seconds": loaded - started}


def rollback(uri: str | Path, to: int, *, break_lock: bool = False) -> dict[str, Any]:
    """Publish a new version whose state equals version `to` (which must still be in the store)."""
    store = _store(uri)
    with store.writing("melo-ray store rollback", take_over=break_lock) as lease:
        latest = store.latest_version()
        assert latest is not None
        manifest, files = store.read(to)  # verified
        meta = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files", "checksum",
                                                             "signature", "job", "operation", "published_at")}
        meta.update(version=latest + 1, operation={"rollback_to": to, "from_version": latest}, published_at=_now())
        published = store.publish(latest + 1, dict(files), meta, lease=lease)
    return {"version": published["version"], "rolled_back_to": to, "edits": published["stats"]["edits"]}


def compact(uri: str | Path, *, break_lock: bool = False) -> dict[str, Any]:
    """Drop blocks no live edit uses and renumber the rest, in a new version that answers exactly as
    the old one; the snapshot shrinks by what was dropped."""
    store = _store(uri)
    with store.writing("melo-ray store compact", take_over=break_lock) as lease:
        manifest, files = store.read()
        editor = editor_from_snapshot(manifest, files, f"{uri} v{manifest['version']}")
        compacting = getattr(editor, "compact", None)
        if compacting is None:
            raise NotImplementedError(f"the '{editor.name}' editor has no blocks to compact")
        dropped = compacting()
        editor.version = int(manifest["version"]) + 1
        published = _publish(store, lease, editor, manifest, {"compact": {"dropped_blocks": dropped},
                                                       "from_version": manifest["version"]}, keep_job=True)
    before = sum(f["bytes"] for f in manifest["files"].values())
    after = sum(f["bytes"] for f in published["files"].values())
    return {"version": published["version"], "dropped_blocks": dropped, "bytes_before": before, "bytes_after": after}


def export(source: str | Path, out: str | Path, fmt: str = "peft") -> dict[str, Any]:
    """Write the serving version's blocks as standard adapters (`fmt` "peft") plus a routing file."""
    if fmt != "peft":
        raise ValueError(f"export format '{fmt}': only 'peft' is supported")
    from melo_ray.export import export_peft

    editor, manifest = load_latest(source)
    backbone = editor.config.backbone
    return {"snapshot_version": manifest["version"],
            **export_peft(editor, out, base_model=backbone.path if backbone.source == "local" else None)}


def pin(uri: str | Path, version: int) -> None:
    """Replicas that follow this store serve `version` until unpin()."""
    _store(uri).pin(version)


def unpin(uri: str | Path) -> None:
    _store(uri).unpin()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
