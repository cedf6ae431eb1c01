"""Snapshot folders: written atomically, verified on load, no pickle anywhere.

A snapshot is a folder of plain files (safetensors, JSON, hnswlib's graph) plus `manifest.json`,
which records every file's SHA-256 and a checksum over the manifest itself. With a signing key
(MELO_RAY_SIGNING_KEY, or a file named by MELO_RAY_SIGNING_KEY_FILE) the manifest also carries an
HMAC-SHA256 over everything else in it, and every reader refuses a version that is unsigned or
signed with another key. Checksums catch corruption; only the signature stops someone who can
write to the store but does not hold the key. Writing goes to a hidden
temporary folder beside the target, is read back and verified, and only then renamed into place.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

FORMAT = "melo-ray-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNING_KEY_ENV = "MELO_RAY_SIGNING_KEY"
SIGNING_KEY_FILE_ENV = "MELO_RAY_SIGNING_KEY_FILE"


class SnapshotError(RuntimeError):
    """A snapshot that is missing, incomplete or does not match its checksums."""


@dataclass(frozen=True)
class SnapshotMeta:
    """What every manifest says besides its files, whoever writes it (an editor's save or publish, the
    bulk-edit job's writer): the editor, the version, the config, the base weights' checksum and the
    editor's counters; `extra` adds writer-specific JSON (the job's resume state)."""

    editor: str
    version: int
    config: Mapping[str, Any]
    base_checksum: str
    stats: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"editor": self.editor, "version": self.version, "config": dict(self.config),
                "base_checksum": self.base_checksum, "stats": dict(self.stats), **self.extra}


def check_editor(found: Any, expected: str, where: str, hint: str = "") -> None:
    """Refuse a snapshot written by another editor than `expected` (`found`: its manifest's `editor`);
    each editor reads only its own snapshots, and a store holds one editor's."""
    if found != expected:
        raise SnapshotError(f"{where}: snapshot is for editor '{found}', not '{expected}'" + (f"; {hint}" if hint else ""))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(manifest: dict[str, Any], *leave_out: str) -> bytes:
    body = {k: v for k, v in manifest.items() if k not in leave_out}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    return _sha256(_canonical(manifest, "checksum", "signature"))


def signing_key() -> bytes | None:
    """The snapshot signing key from the environment (None: signing is off)."""
    key = os.environ.get(SIGNING_KEY_ENV)
    if not key and os.environ.get(SIGNING_KEY_FILE_ENV):
        path = Path(os.environ[SIGNING_KEY_FILE_ENV])
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise SnapshotError(f"{SIGNING_KEY_FILE_ENV}={path}: cannot read the signing key: {exc}") from exc
    return key.encode() if key else None


def _signature(manifest: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, _canonical(manifest, "signature"), hashlib.sha256).hexdigest()


def safetensors_metadata(data: bytes, what: str) -> dict[str, str]:
    """The string metadata of a safetensors file (its JSON header's __metadata__), read without loading
    the tensors; `what` names the file in errors."""
    if len(data) < 8:
        raise ValueError(f"{what}: file is too short")
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: header is not JSON ({exc})") from exc
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: metadata is not a mapping")
    return meta


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def build_manifest(files: dict[str, bytes], meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest for these files: format, `meta`, each file's SHA-256, and its own checksum."""
    for name in files:
        if not _plain_name(name):
            raise SnapshotError(f"snapshot file name '{name}' is not allowed")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
    }
    manifest["checksum"] = _manifest_checksum(manifest)
    key = signing_key()
    if key is not None:
        manifest["signature"] = _signature(manifest, key)
    return manifest


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def write_snapshot(target: str | Path, files: dict[str, bytes], meta: dict[str, Any],
                   reuse: Mapping[str, Path] | None = None, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write files + manifest to `target` atomically; returns the manifest.

    `reuse` names files whose bytes already lie, verified, in an earlier snapshot (same SHA-256):
    they are hard-linked (or copied where links are not possible) instead of written again, which
    keeps a long job's snapshots of a large, mostly unchanged LoRA bank incremental. `manifest`: one
    already built from these files and `meta` (build_manifest), so their bytes are hashed once."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = build_manifest(files, meta)
    elif set(manifest["files"]) != set(files):
        raise ValueError("write_snapshot: the manifest given lists other files than those to write")
    reuse = dict(reuse or {})
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name, data in files.items():
            if name in reuse:
                _link_or_copy(reuse[name], staging / name)
            else:
                _write_file(staging / name, data)
        _write_file(staging / MANIFEST, manifest_bytes(manifest))
        _verify_written(staging, manifest, set(reuse) & set(files))  # before anyone can see it
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


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(source, target)


def _verify_written(folder: Path, manifest: dict[str, Any], reused: set[str]) -> None:
    """Read back what was just written, reused files included (reading costs far less than writing,
    and damage to a file an earlier version holds must not pass into a new one), and check that no
    file the manifest does not list is there."""
    parse_manifest((folder / MANIFEST).read_bytes(), str(folder / MANIFEST))
    for name, info in manifest["files"].items():
        if _sha256((folder / name).read_bytes()) != info["sha256"]:
            kind = "reused file (damaged in an earlier version)" if name in reused else "file"
            raise SnapshotError(f"{folder}/{name}: {kind}: checksum mismatch right after writing")
    check_no_strays(manifest, {p.name for p in folder.iterdir()}, str(folder))


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Decode and check a manifest's format and self-checksum."""
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting
        raise SnapshotError(f"{where}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{where}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{where}: format_version {manifest.get('format_version')} is not supported")
    _check_shape(manifest, where)
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise SnapshotError(f"{where}: manifest checksum mismatch (edited or corrupted)")
    key = signing_key()
    if key is not None:
        signature = manifest.get("signature")
        if not isinstance(signature, str):
            raise SnapshotError(f"{where}: snapshot is not signed, and signing is on ({SIGNING_KEY_ENV} is set)")
        if not hmac.compare_digest(signature, _signature(manifest, key)):
            raise SnapshotError(f"{where}: snapshot signature does not match the configured key (tampered, "
                                "or signed with another key)")
    return manifest


def _plain_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and Path(name).name == name
            and not any(c in name for c in "/\\\x00"))


def _check_shape(manifest: dict[str, Any], where: str) -> None:
    """The fields every reader relies on have the types it expects (a writer with the store's
    credentials can recompute checksums, so a well-summed manifest is not yet a sane one)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise SnapshotError(f"{where}: manifest 'files' is not a mapping")
    for name, info in files.items():
        if not _plain_name(name):
            raise SnapshotError(f"{where}: file name {name!r} is not a plain name inside the snapshot folder")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise SnapshotError(f"{where}: manifest entry for '{name}' has no sha256")
    version = manifest.get("version")
    if "version" in manifest and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
        raise SnapshotError(f"{where}: manifest 'version' must be a non-negative integer")
    for field, kind in (("editor", str), ("config", dict), ("stats", dict)):
        if field in manifest and not isinstance(manifest[field], kind):
            raise SnapshotError(f"{where}: manifest '{field}' must be a {kind.__name__}")


def read_verified_files(manifest: dict[str, Any], read: Callable[[str], bytes], where: str) -> dict[str, bytes]:
    """Every file the manifest lists, read with `read(name)` and checked against its SHA-256."""
    files: dict[str, bytes] = {}
    for name, info in manifest["files"].items():
        if not _plain_name(name):
            raise SnapshotError(f"{where}: file name {name!r} is not a plain name")
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


def check_no_strays(manifest: dict[str, Any], present: set[str], where: str) -> None:
    """A snapshot folder holds its manifest and the files it lists, nothing else."""
    strays = sorted(present - set(manifest["files"]) - {MANIFEST})
    if strays:
        raise SnapshotError(f"{where}: files the manifest does not list: {strays[:5]}")


def read_snapshot(folder: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Manifest and file contents, after checking every file against its SHA-256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = read_verified_files(manifest, lambda name: (folder / name).read_bytes(), str(folder))
    check_no_strays(manifest, {p.name for p in folder.iterdir()}, str(folder))
    return manifest, files
