"""Storage in a local directory: the embedded default (one machine, or a shared filesystem).

Writes go to a hidden temporary beside the object and are renamed into place, so a reader never
sees half an object; listings skip hidden names.
"""

from __future__ import annotations

import contextlib

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lipfarm.common.errors import InputError, NotFoundError, ServiceError
from lipfarm.common.fileio import replaced_atomically
from lipfarm.common.storage.base import Storage


class LocalStorage(Storage):
    """Storage in a local directory (one machine, or a shared filesystem)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise InputError("storage key escapes the storage root", field="key", found=repr(key))
        return path

    def put_file(self, key: str, path: Path) -> None:
        with self._writing(key) as target, replaced_atomically(target) as temp:
            shutil.copyfile(path, temp)

    def get_file(self, key: str, path: Path) -> None:
        source = self._existing(key)
        with replaced_atomically(path) as temp:
            shutil.copyfile(source, temp)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._writing(key) as target, replaced_atomically(target) as temp:
            temp.write_bytes(data)

    @contextmanager
    def _writing(self, key: str) -> Iterator[Path]:
        """The path of ``key``, with a write error named by the key (not a temporary file's name)."""
        try:
            yield self._path(key)
        except OSError as exc:
            raise ServiceError(f"cannot write '{key}' to {self.url}: {exc.strerror or exc}") from None

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

    def delete_prefix(self, prefix: str) -> None:
        """Delete under ``prefix``, folders too once empty (object stores have none to leave behind)."""
        super().delete_prefix(prefix)
        base = self._path(prefix) if prefix.strip("/") else None
        if base is None or not base.is_dir():
            return
        for folder in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            base.rmdir()

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
