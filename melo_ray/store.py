"""A versioned snapshot store on a local folder or any URI pyarrow.fs understands (s3://, gs://, ...).

Layout under the root:
    versions/v00000042-7-3f2a9c01b2d4/{manifest.json, ...}   one verified snapshot each; the name holds the
                                                           version, the writer's epoch and a random tag
    LATEST.json     {"version": 42, "checksum": ..., "epoch": 7, "folders": {"42": "v00000042-7-...", ...}}
    PIN.json        optional: replicas serve this version
    WRITER.json     the writer lease: owner (job id, operation), epoch, pid, host, since
    jobs/<job id>/...                                      job state and rejects

Publishing writes the version's files into a folder no other writer uses (its name carries the
writer's epoch and a random tag), the manifest last, reads them back and verifies them, and only then
moves LATEST.json to name that folder. Two writers therefore never mix files in one folder, and a
version that was not verified is never named by LATEST.json. Readers go through LATEST.json, whose
`folders` map names the folder of every version the store keeps (stores written before it had the
map use plain `v00000042` folders, still read). A file whose name, size and SHA-256 match the previous
version's is reused (hard link; server-side copy on object stores) rather than written again.

One writer at a time, fenced (melo_ray/atomic_files.py gives the compare-and-swap each backend has:
O_EXCL-style link and flock locally, If-None-Match / If-Match requests on S3):
- The lease, WRITER.json, is taken by an exclusive create; a second writer that starts at the same
  moment fails the create and gets an error naming the holder. Breaking a lease (`--break-lock`, or
  a job resuming its own dead run) replaces it only if it is still the one read.
- Every lease carries an epoch, one more than any before. Taking a lease also writes its epoch into
  LATEST.json, by compare-and-swap, before the new holder does anything else.
- LATEST.json moves only by compare-and-swap against the content the publisher read, and only if the
  epoch in it is the publisher's own. A writer whose lease was broken either reads a newer epoch there
  or finds LATEST.json changed under it: it can never publish again, and its folder is left for the
  next prune.
On backends without conditional writes (not local, not S3) the same steps check, then write.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from melo_ray.atomic_files import AtomicFiles, Versioned, atomic_files
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

log = logging.getLogger(__name__)

LATEST = "LATEST.json"
PIN = "PIN.json"
WRITER = "WRITER.json"


class StoreBusyError(SnapshotError):
    """Another writer (a running job, another operation) holds the store."""


class FencedError(SnapshotError):
    """This writer's lease was broken (a newer epoch holds the store): it may not publish any more."""


# v00000042 (stores written before epochs) or v00000042-<epoch>-<tag>
_VERSION_DIR = re.compile(r"^v(\d{8})(?:-(\d+)-([0-9a-f]{12}))?$")
_REREADS = 5  # of a pointer file caught half-replaced on an object store
_LEFTOVER = re.compile(r"^\.v\d{8}(?:-\d+-[0-9a-f]{12})?\.(tmp|old)-[0-9a-f]{32}$")


@dataclass(frozen=True)
class Lease:
    """A held writer lease: who, and the epoch every publish under it must still find current."""

    owner: str
    epoch: int
    pid: int
    host: str
    since: str


@dataclass(frozen=True)
class _Pointer:
    """LATEST.json: the published version, the current epoch and the folder of every kept version."""

    version: int | None
    checksum: str | None
    epoch: int
    folders: dict[int, str]
    token: str | None  # names the bytes it was read from (None: there is no LATEST.json)

    def to_bytes(self) -> bytes:
        return json.dumps({"version": self.version, "checksum": self.checksum, "epoch": self.epoch,
                           "folders": {str(v): name for v, name in sorted(self.folders.items())}}).encode()


def resolve_uri(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI; local paths become absolute.

    s3:// URIs take their endpoint, keys and region from the standard AWS variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), which pyarrow reads."""
    text = str(uri)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) for bad URIs
            raise SnapshotError(f"{text}: not a usable storage URI: {exc}") from exc
    return pafs.LocalFileSystem(), os.path.abspath(text)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class SnapshotStore:
    """Versioned, verified snapshots of one editor under one root."""

    def __init__(self, uri: str | Path, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.uri = str(uri)
        self.fs, self.root = resolve_uri(uri)
        self.keep = keep
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._atomic: AtomicFiles | None = None

    @property
    def atomic(self) -> AtomicFiles:
        """Compare-and-swap on the lease and the pointer (made when first needed: readers never need it)."""
        if self._atomic is None:
            self._atomic = atomic_files(self.fs, self.root)
        return self._atomic

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

    def get_json_bytes(self, relative: str) -> bytes | None:
        """A small JSON file that writers replace in place (LATEST.json, PIN.json, WRITER.json).

        pyarrow reads an object with a HEAD, then ranged GETs of the size the HEAD gave: read while the
        object is being replaced by a longer one, it comes back cut at the old size. A cut JSON object
        never parses, so such a read is simply made again."""
        data = self.get_bytes(relative)
        for _ in range(_REREADS):
            if data is None or self.is_local or _parses(data):
                break
            data = self.get_bytes(relative)
        return data

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

    # -- the pointer ---------------------------------------------------------------------------------
    def _parse_pointer(self, found: Versioned) -> _Pointer:
        if found.data is None:
            return _Pointer(None, None, 0, {}, None)
        try:
            body = json.loads(found.data)
            version, epoch = body["version"], body.get("epoch", 0)
            for value in (version, epoch):
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                    raise ValueError(f"{value!r} is not a non-negative integer")
            folders = body.get("folders") or {}
            if not isinstance(folders, dict) or not all(
                    isinstance(n, str) and _VERSION_DIR.match(n) and int(n[1:9]) == int(v) for v, n in folders.items()):
                raise ValueError("'folders' is not a map of versions to their folders")
            return _Pointer(version, body.get("checksum"), epoch or 0, {int(v): n for v, n in folders.items()},
                            found.token)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise SnapshotError(f"{self._path(LATEST)}: unreadable: {exc}") from exc

    def _pointer(self) -> _Pointer:
        """LATEST.json as readers see it (no token)."""
        return self._parse_pointer(Versioned(self.get_json_bytes(LATEST), None))

    # -- versions ----------------------------------------------------------------------------------
    @staticmethod
    def version_name(version: int) -> str:
        """The folder name of a version in stores written before epochs (still read)."""
        return f"v{version:08d}"

    def version_path(self, version: int, pointer: _Pointer | None = None) -> str:
        folders = (pointer or self._pointer()).folders
        return self._path(f"versions/{folders.get(version, self.version_name(version))}")

    def local_folder(self, version: int) -> Path:
        if not self.is_local:
            raise SnapshotError(f"{self.uri}: not a local store")
        return Path(self.version_path(version))

    def latest_version(self) -> int | None:
        return self._pointer().version

    def _version_file(self, name: str) -> int | None:
        """The version PIN.json names; None when it does not exist."""
        data = self.get_json_bytes(name)
        if data is None:
            return None
        try:
            version = json.loads(data)["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise ValueError(f"version {version!r} is not a non-negative integer")
            return version
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise SnapshotError(f"{self._path(name)}: unreadable: {exc}") from exc

    def _folders(self) -> list[tuple[int, int | None, str]]:
        """(version, writer epoch or None, name) of every version folder, published or not."""
        selector = pafs.FileSelector(self._path("versions"), allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            match = _VERSION_DIR.match(info.base_name)
            if match and info.type == pafs.FileType.Directory:
                epoch = int(match.group(2)) if match.group(2) is not None else None
                found.append((int(match.group(1)), epoch, info.base_name))
        return found

    def versions(self) -> list[int]:
        """Version numbers that have a folder (published or not), oldest first."""
        return sorted({version for version, _, _ in self._folders()})

    def publish(self, version: int, files: dict[str, bytes], meta: dict[str, Any],
                lease: Lease | None = None) -> dict[str, Any]:
        """Write, verify and publish `version`; then prune old versions. Returns the manifest.

        With `lease` (from `writing`) the publish is fenced: it fails with FencedError, and publishes
        nothing, once the lease was broken. Without one (a store no job writes: tests, one-off
        scripts) it is refused while anyone holds the lease. Publishing again a version this writer
        already published with the same content (a retry whose answer was lost) returns its manifest."""
        pointer = self._parse_pointer(self.atomic.read(LATEST))
        if lease is not None:
            self._check_epoch(lease, pointer)
        elif (holder := self.writer()) is not None:
            raise StoreBusyError(self._busy_message(holder))
        epoch = lease.epoch if lease is not None else pointer.epoch
        manifest = build_manifest(files, meta)  # hashed once here; the read-back below verifies them
        latest = pointer.version
        if latest is not None and version == latest and pointer.checksum == manifest["checksum"]:
            return manifest  # already published: an earlier try went through
        if latest is not None and version <= latest:
            raise SnapshotError(f"{self.uri}: version {version} is not newer than the published {latest}")
        name = f"{self.version_name(version)}-{epoch}-{uuid.uuid4().hex[:12]}"
        self._write_version(name, files, meta, manifest, pointer)
        self._move_latest(pointer, version, manifest["checksum"], epoch, name, lease)
        self.prune()
        return manifest

    def _write_version(self, name: str, files: dict[str, bytes], meta: dict[str, Any], manifest: dict[str, Any],
                       pointer: _Pointer) -> None:
        """Write and verify one version's folder (a name no other writer uses)."""
        latest = pointer.version
        unchanged = self._unchanged_files(pointer, manifest)
        folder = self._path(f"versions/{name}")
        previous = self.version_path(latest, pointer) if latest is not None else ""
        if self.is_local:
            reuse = {file: Path(previous) / file for file in unchanged}
            write_snapshot(folder, files, meta, reuse, manifest)
            return
        self.fs.create_dir(folder, recursive=True)
        for file, data in files.items():
            if file in unchanged:  # a server-side copy: the bytes do not travel again
                self.fs.copy_file(f"{previous}/{file}", f"{folder}/{file}")
                continue
            with self.fs.open_output_stream(f"{folder}/{file}") as stream:
                stream.write(data)
        with self.fs.open_output_stream(f"{folder}/{MANIFEST}") as stream:
            stream.write(manifest_bytes(manifest))
        self._read_folder(folder)  # verify before it is published

    def _kept_folders(self, pointer: _Pointer, version: int, name: str) -> dict[int, str]:
        """The folders LATEST.json names after publishing `version`: the newest `keep`, and the pinned one."""
        folders = dict(pointer.folders)
        if pointer.version is not None and not folders:  # a store written before the map: plain folders
            folders = {v: n for v, epoch, n in self._folders() if epoch is None and v <= pointer.version}
        folders[version] = name
        newest = sorted(folders)[-self.keep:]
        pinned = self.pinned_version()
        return {v: n for v, n in folders.items() if v in newest or v == pinned}

    def _move_latest(self, pointer: _Pointer, version: int, checksum: str, epoch: int, name: str,
                     lease: Lease | None) -> None:
        """LATEST.json -> the new version, only if nobody changed it since `pointer` was read."""
        moved = _Pointer(version, checksum, epoch, self._kept_folders(pointer, version, name), None)
        if pointer.token is None:
            done = self.atomic.create(LATEST, moved.to_bytes())
        else:
            done = self.atomic.swap(LATEST, moved.to_bytes(), pointer.token)
        if done:
            return
        now = self._parse_pointer(self.atomic.read(LATEST))
        if lease is not None:
            self._check_epoch(lease, now)
        raise SnapshotError(f"{self.uri}: LATEST.json changed while version {version} was written (now version "
                            f"{now.version}, epoch {now.epoch}); nothing published")

    def _check_epoch(self, lease: Lease, pointer: _Pointer) -> None:
        if pointer.epoch != lease.epoch:
            holder = self.writer() or {}
            raise FencedError(
                f"{self.uri}: the writer lease of '{lease.owner}' (epoch {lease.epoch}) was broken; epoch "
                f"{pointer.epoch} ('{holder.get('owner', 'unknown')}' on {holder.get('host', '?')}) holds the "
                "store now, so this writer publishes nothing more")

    def _unchanged_files(self, pointer: _Pointer, manifest: dict[str, Any]) -> set[str]:
        """Files whose bytes the latest version already holds (same name, size and SHA-256)."""
        if pointer.version is None:
            return set()
        try:
            listed = self._read_folder_manifest(self.version_path(pointer.version, pointer))["files"]
        except SnapshotError:
            return set()  # nothing reused from a version that does not read back
        return {name for name, info in manifest["files"].items() if name in listed
                and listed[name].get("bytes") == info["bytes"] and listed[name]["sha256"] == info["sha256"]}

    # -- one writer at a time -----------------------------------------------------------------------
    def writer(self) -> dict[str, Any] | None:
        data = self.get_json_bytes(WRITER)
        return None if data is None else _parse_holder(data)

    def _busy_message(self, holder: dict[str, Any]) -> str:
        return (f"{self.uri}: '{holder.get('owner')}' is writing to this store (since {holder.get('since')}, "
                f"pid {holder.get('pid')} on {holder.get('host')}, epoch {holder.get('epoch')}); wait for it to "
                "end, or pass --break-lock if it is dead")

    @contextmanager
    def writing(self, owner: str, *, take_over: bool = False) -> Iterator[Lease]:
        """Hold the store's writer lease for `owner` (e.g. "job:day-1", "revert"); yields the Lease that
        `publish` checks. Another owner's lease is an error naming it; `take_over` breaks it (an operator
        taking the store from a dead writer), and the same owner takes its own lease over (a job resuming
        after its driver died) unless that holder is a live process on this host. Either way the old
        holder is fenced: it can publish nothing more."""
        lease = self._acquire(owner, take_over)
        try:
            yield lease
        finally:
            self._release(lease)

    def _acquire(self, owner: str, take_over: bool) -> Lease:
        found = self.atomic.read(WRITER)
        pointer = self._parse_pointer(self.atomic.read(LATEST))
        holder = _parse_holder(found.data) if found.data is not None else None
        if holder is not None and not take_over:
            ours = holder.get("owner") == owner
            alive_here = (holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid()
                          and isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]))
            if not ours or alive_here:
                raise StoreBusyError(self._busy_message(holder))
        held_epoch = holder.get("epoch") if holder is not None else 0
        epoch = max(pointer.epoch, held_epoch if isinstance(held_epoch, int) else 0) + 1
        lease = Lease(owner=owner, epoch=epoch, pid=os.getpid(), host=socket.gethostname(), since=_now())
        data = json.dumps(asdict(lease)).encode()
        if found.data is None:
            taken = self.atomic.create(WRITER, data)
        else:
            taken = self.atomic.swap(WRITER, data, found.token)
        if not taken:
            raise StoreBusyError(self._busy_message(self.writer() or {"owner": "another writer, just now"}))
        if holder is not None:
            log.warning("%s: took the writer lease from '%s' (epoch %s); it can publish nothing more",
                        self.uri, holder.get("owner"), holder.get("epoch"))
        self._fence(lease)
        return lease

    def _fence(self, lease: Lease) -> None:
        """Write the new epoch into LATEST.json, so that every older writer's next move of it fails."""
        for _ in range(20):  # only a publish racing this one changes it; each try is one request
            pointer = self._parse_pointer(self.atomic.read(LATEST))
            if pointer.epoch >= lease.epoch:
                raise StoreBusyError(f"{self.uri}: a newer writer (epoch {pointer.epoch}) took the store while "
                                     f"'{lease.owner}' was taking it")
            fenced = _Pointer(pointer.version, pointer.checksum, lease.epoch, pointer.folders, None).to_bytes()
            if pointer.token is None:
                if self.atomic.create(LATEST, fenced):
                    return
            elif self.atomic.swap(LATEST, fenced, pointer.token):
                return
        raise StoreBusyError(f"{self.uri}: LATEST.json keeps changing; another writer is publishing")

    def _release(self, lease: Lease) -> None:
        """Give the lease back if it is still ours; a store that cannot be reached keeps it (the next
        run of the same owner takes it over)."""
        try:
            found = self.atomic.read(WRITER)
            if found.data is not None and _parse_holder(found.data).get("epoch") == lease.epoch:
                self.atomic.delete(WRITER, found.token)
        except OSError as exc:
            log.warning("%s: could not release the writer lease of '%s': %s", self.uri, lease.owner, exc)

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

    def _read_folder_manifest(self, folder: str) -> dict[str, Any]:
        path = f"{folder}/{MANIFEST}"
        try:
            with self.fs.open_input_stream(path) as stream:
                data = stream.read()
        except OSError as exc:
            raise SnapshotError(f"{path}: missing or unreadable: {exc}") from exc
        return parse_manifest(data, path)

    def read_manifest(self, version: int | None = None) -> dict[str, Any]:
        pointer = self._pointer()
        return self._read_folder_manifest(self.version_path(self._pick(version, pointer), pointer))

    def read(self, version: int | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
        """A verified (manifest, files) of `version` (default: the latest published)."""
        pointer = self._pointer()
        return self._read_folder(self.version_path(self._pick(version, pointer), pointer))

    def _read_folder(self, folder: str) -> tuple[dict[str, Any], dict[str, bytes]]:
        manifest = self._read_folder_manifest(folder)

        def read(name: str) -> bytes:
            with self.fs.open_input_stream(f"{folder}/{name}") as stream:
                return stream.read()

        files = read_verified_files(manifest, read, folder)
        check_no_strays(manifest, _names_in(self.fs, folder), folder)
        return manifest, files

    def _pick(self, version: int | None, pointer: _Pointer) -> int:
        if version is not None:
            return version
        if pointer.version is None:
            raise SnapshotError(f"{self.uri}: no published snapshot yet")
        return pointer.version

    def prune(self) -> list[int]:
        """Remove version folders LATEST.json no longer names (older than the newest `keep`, or written
        by a writer that lost), and crashed-write leftovers. A folder of a version newer than LATEST is
        kept while its writer's epoch is the current one: that writer may still be publishing it."""
        pointer = self._pointer()
        if pointer.version is None:
            return []
        named = set(pointer.folders.values())
        pinned = self.pinned_version()
        if not named:  # a store written before the map: keep the newest `keep` plain folders
            plain = sorted(v for v, _, _ in self._folders() if v <= pointer.version)
            named = {self.version_name(v) for v in plain[-self.keep:]} | (
                {self.version_name(pinned)} if pinned is not None else set())
        removed = []
        for version, epoch, name in self._folders():
            in_flight = version > pointer.version and (epoch is None or epoch >= pointer.epoch)
            if name in named or in_flight:
                continue
            self.fs.delete_dir(self._path(f"versions/{name}"))
            removed.append(version)
        selector = pafs.FileSelector(self._path("versions"), allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if _LEFTOVER.match(info.base_name):
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)
        return sorted(removed)


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, RecursionError):
        return False


def _parse_holder(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except (ValueError, RecursionError):
        return {"owner": "unreadable WRITER.json"}
    return holder if isinstance(holder, dict) else {"owner": "unreadable WRITER.json"}


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
