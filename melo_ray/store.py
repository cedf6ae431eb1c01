"""A versioned snapshot store on a local folder or any URI pyarrow.fs understands (s3://, gs://, ...).

Layout under the root:
    versions/v00000042/{manifest.json, adapters-*.safetensors, index.*} one verified snapshot each
    LATEST.json                                                       {"version": 42, "checksum": ...}
    PIN.json                                                          optional: replicas serve this version
    WRITER.json                                                       who writes now (a job, a revert)
    jobs/<job id>/...                                                 job state and rejects

Publishing writes the version's files, the manifest last, reads them back and verifies them, and only
then points LATEST.json at the version. On a local folder the version is written to a temporary name
and renamed (atomic); object stores have no rename, so there a version without a verified manifest is
simply never pointed at, and is removed by the next prune. Readers go through LATEST.json.
A file whose name, size and SHA-256 match the previous version's is reused (hard link; server-side
copy on object stores) rather than written again: a large LoRA bank in segments costs one segment
per version. Readers verify every file whatever its origin.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from melo_ray.snapshots import (
    MANIFEST,
    SnapshotError,
    build_manifest,
    check_no_strays,
    manifest_bytes,
    parse_manifest,
    read_verified_files,
    write_snapshot,
)

LATEST = "LATEST.json"
PIN = "PIN.json"
WRITER = "WRITER.json"


class StoreBusyError(SnapshotError):
    """Another writer (a running job, another operation) holds the store."""
_VERSION_DIR = re.compile(r"^v(\d{8})$")
_LEFTOVER = re.compile(r"^\.v\d{8}\.(tmp|old)-[0-9a-f]{32}$")


def resolve_uri(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI; local paths become absolute."""
    text = str(uri)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) for bad URIs
            raise SnapshotError(f"{text}: not a usable storage URI: {exc}") from exc
    return pafs.LocalFileSystem(), os.path.abspath(text)


class SnapshotStore:
    """Versioned, verified snapshots of one editor under one root."""

    def __init__(self, uri: str | Path, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.uri = str(uri)
        self.fs, self.root = resolve_uri(uri)
        self.keep = keep
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- plain files under the root ----------------------------------------------------------------
    def _path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}"

    def get_bytes(self, relative: str) -> bytes | None:
        """A file's bytes, or None when it does not exist."""
        path = self._path(relative)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def put_bytes(self, relative: str, data: bytes) -> None:
        """Write a file so that readers see the old or the new bytes, never a part."""
        path = self._path(relative)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            temp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        else:  # a single-object PUT is atomic on object stores
            with self.fs.open_output_stream(path) as stream:
                stream.write(data)

    # -- versions ----------------------------------------------------------------------------------
    @staticmethod
    def version_name(version: int) -> str:
        return f"v{version:08d}"

    def version_path(self, version: int) -> str:
        return self._path(f"versions/{self.version_name(version)}")

    def local_folder(self, version: int) -> Path:
        if not self.is_local:
            raise SnapshotError(f"{self.uri}: not a local store")
        return Path(self.version_path(version))

    def latest_version(self) -> int | None:
        return self._version_file(LATEST)

    def _version_file(self, name: str) -> int | None:
        """The version a pointer file (LATEST.json, PIN.json) names; None when it does not exist."""
        data = self.get_bytes(name)
        if data is None:
            return None
        try:
            version = json.loads(data)["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise ValueError(f"version {version!r} is not a non-negative integer")
            return version
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise SnapshotError(f"{self._path(name)}: unreadable: {exc}") from exc

    def versions(self) -> list[int]:
        """Version numbers that have a folder (published or not), oldest first."""
        selector = pafs.FileSelector(self._path("versions"), allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            match = _VERSION_DIR.match(info.base_name)
            if match and info.type == pafs.FileType.Directory:
                found.append(int(match.group(1)))
        return sorted(found)

    def publish(self, version: int, files: dict[str, bytes], meta: dict[str, Any]) -> dict[str, Any]:
        """Write, verify and publish `version`; then prune old versions. Returns the manifest."""
        latest = self.latest_version()
        if latest is not None and version <= latest:
            raise SnapshotError(f"{self.uri}: version {version} is not newer than the published {latest}")
        manifest = build_manifest(files, meta)  # hashed once here; the read-back below verifies them
        unchanged = self._unchanged_files(latest, manifest)
        if self.is_local:
            reuse = {name: Path(self.version_path(latest)) / name for name in unchanged}
            write_snapshot(self.version_path(version), files, meta, reuse, manifest)
        else:
            folder = self.version_path(version)
            self.fs.create_dir(folder, recursive=True)
            for name, data in files.items():
                if name in unchanged:  # a server-side copy: the bytes do not travel again
                    self.fs.copy_file(f"{self.version_path(latest)}/{name}", f"{folder}/{name}")
                    continue
                with self.fs.open_output_stream(f"{folder}/{name}") as stream:
                    stream.write(data)
            with self.fs.open_output_stream(f"{folder}/{MANIFEST}") as stream:
                stream.write(manifest_bytes(manifest))
            self.read(version)  # verify before it is published
        self.put_bytes(LATEST, json.dumps({"version": version, "checksum": manifest["checksum"]}).encode())
        self.prune()
        return manifest

    def _unchanged_files(self, latest: int | None, manifest: dict[str, Any]) -> set[str]:
        """Files whose bytes the latest version already holds (same name, size and SHA-256)."""
        if latest is None:
            return set()
        try:
            listed = self.read_manifest(latest)["files"]
        except SnapshotError:
            return set()  # nothing reused from a version that does not read back
        return {name for name, info in manifest["files"].items() if name in listed
                and listed[name].get("bytes") == info["bytes"] and listed[name]["sha256"] == info["sha256"]}

    # -- one writer at a time -----------------------------------------------------------------------
    def writer(self) -> dict[str, Any] | None:
        data = self.get_bytes(WRITER)
        if data is None:
            return None
        try:
            holder = json.loads(data)
        except (ValueError, RecursionError):
            return {"owner": "unreadable WRITER.json"}
        return holder if isinstance(holder, dict) else {"owner": "unreadable WRITER.json"}

    @contextmanager
    def writing(self, owner: str, *, take_over: bool = False) -> Iterator[None]:
        """Hold the store's writer lease for `owner` (e.g. "job:day-1", "revert"). Another owner's
        lease is an error naming it; `take_over` lets the same owner resume after a crash, and an
        operator break a dead writer's lease. On a local store the lease is created exclusively;
        object stores have no exclusive create, so there it guards against mistakes, not races."""
        holder = self.writer()
        if holder is not None and not (take_over or holder.get("owner") == owner):
            raise StoreBusyError(
                f"{self.uri}: '{holder.get('owner')}' is writing to this store (since {holder.get('since')}, "
                f"pid {holder.get('pid')} on {holder.get('host')}); wait for it to end, or pass --break-lock "
                "if it is dead")
        lease = json.dumps({"owner": owner, "pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        path = self._path(WRITER)
        if self.is_local and holder is None:
            self.fs.create_dir(self.root, recursive=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise StoreBusyError(f"{self.uri}: another writer took the store just now") from None
            with os.fdopen(fd, "wb") as handle:
                handle.write(lease)
        else:
            self.put_bytes(WRITER, lease)
        try:
            yield
        finally:
            current = self.writer()
            if current is not None and current.get("owner") == owner and current.get("pid") == os.getpid():
                self.fs.delete_file(path)

    # -- pinning ------------------------------------------------------------------------------------
    def pinned_version(self) -> int | None:
        return self._version_file(PIN)

    def pin(self, version: int) -> None:
        """Replicas serve `version` (verified now) until unpin(), whatever is published meanwhile."""
        self.read(version)
        self.put_bytes(PIN, json.dumps({"version": version}).encode())

    def unpin(self) -> None:
        if self.get_bytes(PIN) is not None:
            self.fs.delete_file(self._path(PIN))

    def serving_version(self) -> int | None:
        """What replicas should serve: the pinned version if any, else the latest published."""
        pinned = self.pinned_version()
        return pinned if pinned is not None else self.latest_version()

    def read_manifest(self, version: int | None = None) -> dict[str, Any]:
        version = self._pick(version)
        path = f"{self.version_path(version)}/{MANIFEST}"
        try:
            with self.fs.open_input_stream(path) as stream:
                data = stream.read()
        except OSError as exc:
            raise SnapshotError(f"{path}: missing or unreadable: {exc}") from exc
        return parse_manifest(data, path)

    def read(self, version: int | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
        """A verified (manifest, files) of `version` (default: the latest published)."""
        version = self._pick(version)
        manifest = self.read_manifest(version)
        folder = self.version_path(version)

        def read(name: str) -> bytes:
            with self.fs.open_input_stream(f"{folder}/{name}") as stream:
                return stream.read()

        files = read_verified_files(manifest, read, folder)
        check_no_strays(manifest, _names_in(self.fs, folder), folder)
        return manifest, files

    def _pick(self, version: int | None) -> int:
        if version is not None:
            return version
        latest = self.latest_version()
        if latest is None:
            raise SnapshotError(f"{self.uri}: no published snapshot yet")
        return latest

    def prune(self) -> list[int]:
        """Keep the newest `keep` versions up to LATEST; remove older ones and crashed-write leftovers.

        One writer per store (the job's driver), so a leftover temporary folder is never in use."""
        latest = self.latest_version()
        if latest is None:
            return []
        candidates = [v for v in self.versions() if v <= latest]
        pinned = self.pinned_version()
        removed = [v for v in candidates[: max(0, len(candidates) - self.keep)] if v != pinned]
        for version in removed:
            self.fs.delete_dir(self.version_path(version))
        selector = pafs.FileSelector(self._path("versions"), allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if _LEFTOVER.match(info.base_name):
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)
        return removed


class SnapshotFolder:
    """One snapshot folder (as `melo-ray edit --out` writes it) read like a store with one version:
    the version its manifest names. The folder is replaced atomically on each write, so a reader
    that polls `latest_version` follows it the way it follows a store."""

    def __init__(self, uri: str | Path) -> None:
        self.uri = str(uri)
        self.fs, self.root = resolve_uri(uri)

    def _get(self, name: str) -> bytes | None:
        path = f"{self.root.rstrip('/')}/{name}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def read_manifest(self, version: int | None = None) -> dict[str, Any]:
        data = self._get(MANIFEST)
        if data is None:
            raise SnapshotError(f"{self.uri}: no {MANIFEST}; not a snapshot folder")
        manifest = parse_manifest(data, f"{self.uri}/{MANIFEST}")
        if version is not None and manifest.get("version") != version:
            raise SnapshotError(f"{self.uri}: holds version {manifest.get('version')}, not {version}")
        return manifest

    def serving_version(self) -> int | None:
        return self.latest_version()

    def latest_version(self) -> int | None:
        try:
            return int(self.read_manifest()["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{self.uri}: manifest has no usable version: {exc}") from exc

    def read(self, version: int | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
        manifest = self.read_manifest(version)

        def read(name: str) -> bytes:
            data = self._get(name)
            if data is None:
                raise FileNotFoundError(name)
            return data

        files = read_verified_files(manifest, read, self.uri)
        check_no_strays(manifest, _names_in(self.fs, self.root), self.uri)
        return manifest, files


def _names_in(fs: pafs.FileSystem, folder: str) -> set[str]:
    return {info.base_name for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))}


def open_snapshots(uri: str | Path) -> SnapshotStore | SnapshotFolder:
    """A store root (it has LATEST.json, or nothing yet) or a single snapshot folder (manifest.json)."""
    store = SnapshotStore(uri)
    if store.get_bytes(LATEST) is None and store.get_bytes(MANIFEST) is not None:
        return SnapshotFolder(uri)
    return store


def read_any_snapshot(uri: str | Path) -> tuple[dict[str, Any], dict[str, bytes], str]:
    """A verified snapshot from a store root (its latest version) or a single snapshot folder."""
    source = open_snapshots(uri)
    if isinstance(source, SnapshotStore) and source.latest_version() is None:
        raise SnapshotError(f"{uri}: neither a snapshot store (no {LATEST}) nor a snapshot folder (no {MANIFEST})")
    manifest, files = source.read()
    where = f"{source.uri} v{manifest['version']}" if isinstance(source, SnapshotStore) else source.uri
    return manifest, files, where
