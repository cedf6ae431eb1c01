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
from collections.abc import Callable
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


def build_manifest(files: dict[str, bytes], meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest for these files: format, `meta`, each file's SHA-256, and its own checksum."""
    for name in files:
        if Path(name).name != name or name == MANIFEST:
            raise SnapshotError(f"snapshot file name '{name}' is not allowed")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
    }
    manifest["checksum"] = _manifest_checksum(manifest)
    return manifest


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def write_snapshot(target: str | Path, files: dict[str, bytes], meta: dict[str, Any]) -> dict[str, Any]:
    """Write files + manifest to `target` atomically; returns the manifest."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(files, meta)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name, data in files.items():
            _write_file(staging / name, data)
        _write_file(staging / MANIFEST, manifest_bytes(manifest))
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


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Decode and check a manifest's format and self-checksum."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{where}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{where}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{where}: format_version {manifest.get('format_version')} is not supported")
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise SnapshotError(f"{where}: manifest checksum mismatch (edited or corrupted)")
    return manifest


def read_verified_files(manifest: dict[str, Any], read: Callable[[str], bytes], where: str) -> dict[str, bytes]:
    """Every file the manifest lists, read with `read(name)` and checked against its SHA-256."""
    files: dict[str, bytes] = {}
    for name, info in manifest["files"].items():
        if Path(name).name != name:
            raise SnapshotError(f"{where}: file name '{name}' is not a plain name")
        try:
            data = read(name)
        except OSError as exc:
            raise SnapshotError(f"{where}/{name}: missing or unreadable: {exc}") from exc
        if _sha256(data) != info["sha256"]:
            raise SnapshotError(f"{where}/{name}: checksum mismatch (corrupted or replaced)")
        files[name] = data
    return files


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise SnapshotError(f"{folder}: no {MANIFEST}; not a snapshot or not fully written")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: unreadable manifest: {exc}") from exc
    return parse_manifest(data, str(path))


def read_snapshot(folder: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Manifest and file contents, after checking every file against its SHA-256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    return manifest, read_verified_files(manifest, lambda name: (folder / name).read_bytes(), str(folder))
