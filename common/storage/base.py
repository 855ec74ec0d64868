"""The object-storage interface every backend implements (a local directory, S3).

Keys are '/'-separated paths, the same in every backend; ``common.storage.layout`` makes them.
Writes are atomic in every backend: a reader sees a whole object or none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator


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
