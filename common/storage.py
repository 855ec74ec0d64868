"""Object storage: one interface, a local directory (the embedded default) and S3 through boto3.

Keys are '/'-separated paths, the same in both backends (see the ``*_key`` functions below). Writes
are atomic in both: a local write goes to a temporary file renamed into place, an S3 PUT is atomic
by nature. Large files go through boto3's transfer manager (multipart, parallel parts).

``open_storage(url)`` picks the backend: a path or ``file://`` URL, or ``s3://bucket[/prefix]``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

from common.errors import NotFoundError, ServiceError

# --- The storage layout (ARCHITECTURE.md) -----------------------------------------------------------


def avatar_key(content_hash: str) -> str:
    return f"avatars/{content_hash}/avatar.tar"


def model_key(sha256: str) -> str:
    return f"models/{sha256}.onnx"


def input_key(job_id: str, filename: str) -> str:
    return f"jobs/{job_id}/input/{filename}"


def pcm_key(job_id: str) -> str:
    return f"jobs/{job_id}/input/audio_16k.f32"


def plan_key(job_id: str) -> str:
    return f"jobs/{job_id}/plan.json"


def segment_key(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/chunks/{index:05d}.mp4"


def commit_key(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/chunks/{index:05d}.json"


def output_key(job_id: str) -> str:
    return f"jobs/{job_id}/output.mp4"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


class Storage(ABC):
    """Where plans, inputs, segments and outputs live."""

    url: str

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def read_range(self, key: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of an object."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        for key in list(self.list(prefix)):
            self.delete(key)

    @abstractmethod
    def check(self) -> None:
        """Raise ``ServiceError`` if the storage cannot be used (unreachable, missing, refused)."""

    def local_path(self, key: str) -> Path | None:
        """A path at which the object can be read in place, where the backend has one."""
        return None

    @abstractmethod
    def location(self, key: str) -> str:
        """Where a user finds the object: a path, or a presigned HTTPS URL for S3."""


class LocalStorage(Storage):
    """Storage in a local directory (one machine, or a shared filesystem)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def _atomic_write(self, key: str, write) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                write(out)
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as source:
            self._atomic_write(key, lambda out: shutil.copyfileobj(source, out, 1 << 20))

    def get_file(self, key: str, path: Path) -> None:
        source = self._existing(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda out: out.write(data))

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def read_range(self, key: str, start: int, stop: int) -> bytes:
        with self._existing(key).open("rb") as handle:
            handle.seek(start)
            return handle.read(stop - start)

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"no object '{key}' in {self.url}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix) if prefix.strip("/") else self.root
        if base.is_file():
            yield prefix
            return
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(self.root).as_posix()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(f"storage directory {self.root} is not usable ({exc.strerror})") from None
        if not os.access(self.root, os.W_OK):
            raise ServiceError(f"storage directory {self.root} is not writable")

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def location(self, key: str) -> str:
        return str(self._path(key))


def open_storage(url: str, **s3_settings) -> Storage:
    """The storage at ``url``: a directory path, ``file:///path`` or ``s3://bucket[/prefix]``."""
    if url.startswith("s3://"):
        from common.s3 import S3Storage

        bucket, _, prefix = url[len("s3://"):].partition("/")
        return S3Storage(bucket, prefix, **s3_settings)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return LocalStorage(url)
