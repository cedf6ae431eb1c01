"""Snapshot folders: written atomically, verified on load, no pickle anywhere.

A snapshot is a folder of plain files (safetensors, JSON, hnswlib's graph) plus `manifest.json`,
which records every file's SHA-256 and a checksum over the manifest itself. Writing goes to a hidden
temporary folder beside the target, is read back and verified, and only then renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

FORMAT = "melo-ray-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class SnapshotError(RuntimeError):
    """A snapshot that is missing, incomplete or does not match its checksums."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_snapshot(target: str | Path, files: dict[str, bytes], meta: dict[str, Any]) -> dict[str, Any]:
    """Write files + manifest to `target` atomically; returns the manifest."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name, data in files.items():
            _write_file(staging / name, data)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **meta,
            "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
        }
        manifest["checksum"] = _manifest_checksum(manifest)
        _write_file(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        read_snapshot(staging)  # verify what is on disk before anyone can see it
        if target.exists():
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise SnapshotError(f"{folder}: no {MANIFEST}; not a snapshot or not fully written")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{path}: format_version {manifest.get('format_version')} is not supported")
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise SnapshotError(f"{path}: manifest checksum mismatch (edited or corrupted)")
    return manifest


def read_snapshot(folder: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Manifest and file contents, after checking every file against its SHA-256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files: dict[str, bytes] = {}
    for name, info in manifest["files"].items():
        path = folder / name
        if Path(name).name != name:
            raise SnapshotError(f"{folder}: file name '{name}' is not a plain name")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SnapshotError(f"{path}: missing or unreadable: {exc}") from exc
        if _sha256(data) != info["sha256"]:
            raise SnapshotError(f"{path}: checksum mismatch (corrupted or replaced)")
        files[name] = data
    return manifest, files
