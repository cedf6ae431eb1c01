"""Small files that change only by compare-and-swap: the store's lease (WRITER.json) and its pointer
(LATEST.json).

Every backend offers the same four operations: `read` (bytes and a token naming that exact content),
`create` (only if the file does not exist), `swap` (only if the file still has the content a token
named) and `delete` (the same condition). The store builds its lease and its fencing on them.

- Local folders: `create` links a fully written temporary file into place (link fails if the name
  exists); `swap` and `delete` compare and change under an exclusive `flock` on `.atomic.lock` in the
  store root (processes of one host; NFS locks are only as good as the server's). The token is the
  content's SHA-256.
- S3 and S3-compatible servers (`s3://`): PutObject with `If-None-Match: *` (create) and `If-Match:
  <ETag>` (swap), DeleteObject with `If-Match`. pyarrow's S3 filesystem cannot send these headers, so
  these few requests go through boto3, configured by the same standard AWS variables
  (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) that pyarrow reads.
- Any other URI (gs://, ...): no conditional writes here; the operations check, then write. They
  guard against mistakes, not races, and the store says so in a warning when a writer starts.

Failures to reach the backend are raised as OSError, as pyarrow raises them, so a caller retries
both kinds alike.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Protocol

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

LOCK_FILE = ".atomic.lock"


@dataclass(frozen=True)
class Versioned:
    """A small file's bytes (None: absent) and a token naming exactly these bytes."""

    data: bytes | None
    token: str | None


class AtomicFiles(Protocol):
    conditional: bool  # False: check-then-write only (no backend support)

    def read(self, name: str) -> Versioned: ...

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist; False if it does."""

    def swap(self, name: str, data: bytes, token: str) -> bool:
        """Replace `name` only if its content is still the one `token` named; False if it changed."""

    def delete(self, name: str, token: str) -> bool:
        """Delete `name` only if its content is still the one `token` named."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalAtomicFiles:
    conditional = True

    def __init__(self, root: str) -> None:
        self.root = root

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read(self, name: str) -> Versioned:
        try:
            with open(self._path(name), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return Versioned(None, None)
        return Versioned(data, _sha256(data))

    def _staged(self, name: str, data: bytes) -> str:
        os.makedirs(self.root, exist_ok=True)
        temp = self._path(f"{name}.tmp-{uuid.uuid4().hex}")
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return temp

    def _locked(self) -> int:
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self._path(LOCK_FILE), os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def create(self, name: str, data: bytes) -> bool:
        temp = self._staged(name, data)
        try:
            os.link(temp, self._path(name))  # atomic, and fails if the name exists: O_EXCL with content
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL, then the content
            return self._create_exclusive(name, data)
        finally:
            os.unlink(temp)

    def _create_exclusive(self, name: str, data: bytes) -> bool:
        try:
            fd = os.open(self._path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def swap(self, name: str, data: bytes, token: str) -> bool:
        temp = self._staged(name, data)
        fd = self._locked()
        try:
            if self.read(name).token != token:
                return False
            os.replace(temp, self._path(name))
            return True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            if os.path.exists(temp):
                os.unlink(temp)

    def delete(self, name: str, token: str) -> bool:
        fd = self._locked()
        try:
            if self.read(name).token != token:
                return False
            os.unlink(self._path(name))
            return True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class S3AtomicFiles:
    """Conditional requests on one prefix of one bucket (`path` is pyarrow's "bucket/prefix")."""

    conditional = True

    def __init__(self, path: str) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # readers never need it; writers do
            raise OSError("writing to an s3:// store needs boto3 for conditional writes: "
                          "pip install 'melo-ray[ray]'") from exc
        self.bucket, _, prefix = path.partition("/")
        self.prefix = prefix.strip("/")
        # boto3 reads AWS_ENDPOINT_URL, the keys and AWS_REGION itself; few quick retries: the caller
        # (the job) retries with backoff and says so in its log
        self.client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=30,
                                                       retries={"max_attempts": 2, "mode": "standard"}))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, method: str, **kwargs: object) -> dict | None:
        """The request's response; None when a condition failed (412, or 409 for a concurrent one)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(errno.ENOENT, f"s3://{self.bucket}/{kwargs.get('Key')}") from exc
            raise OSError(f"s3://{self.bucket}/{kwargs.get('Key')}: {method}: {exc}") from exc
        except BotoCoreError as exc:  # endpoint unreachable, timeouts
            raise OSError(f"s3://{self.bucket}/{kwargs.get('Key')}: {method}: {exc}") from exc

    def read(self, name: str) -> Versioned:
        try:
            response = self._call("get_object", Key=self._key(name))
        except FileNotFoundError:
            return Versioned(None, None)
        assert response is not None
        return Versioned(response["Body"].read(), response["ETag"])

    def create(self, name: str, data: bytes) -> bool:
        return self._call("put_object", Key=self._key(name), Body=data, IfNoneMatch="*") is not None

    def swap(self, name: str, data: bytes, token: str) -> bool:
        return self._call("put_object", Key=self._key(name), Body=data, IfMatch=token) is not None

    def delete(self, name: str, token: str) -> bool:
        return self._call("delete_object", Key=self._key(name), IfMatch=token) is not None


class UncheckedFiles:
    """A filesystem without conditional writes: check, then write."""

    conditional = False

    def __init__(self, fs: pafs.FileSystem, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")

    def read(self, name: str) -> Versioned:
        path = f"{self.root}/{name}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return Versioned(None, None)
        with self.fs.open_input_stream(path) as stream:
            data = stream.read()
        return Versioned(data, _sha256(data))

    def _write(self, name: str, data: bytes) -> bool:
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(f"{self.root}/{name}") as stream:
            stream.write(data)
        return True

    def create(self, name: str, data: bytes) -> bool:
        return self.read(name).data is None and self._write(name, data)

    def swap(self, name: str, data: bytes, token: str) -> bool:
        return self.read(name).token == token and self._write(name, data)

    def delete(self, name: str, token: str) -> bool:
        if self.read(name).token != token:
            return False
        self.fs.delete_file(f"{self.root}/{name}")
        return True


def atomic_files(fs: pafs.FileSystem, root: str) -> AtomicFiles:
    """The strongest compare-and-swap this filesystem offers."""
    if isinstance(fs, pafs.LocalFileSystem):
        return LocalAtomicFiles(root)
    if type(fs).__name__ == "S3FileSystem":
        return S3AtomicFiles(root)
    log.warning("%s: no conditional writes on %s; the writer lease checks, then writes", root, type(fs).__name__)
    return UncheckedFiles(fs, root)
