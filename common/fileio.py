"""Files and folders that appear whole or not at all (write beside the target, then rename), and
the SHA-256 of a file, read in blocks.

A reader (another worker process, a player, a user's script) must never see half a file: a crash
mid-write leaves only a hidden temporary, which is removed when the writer fails and ignored by
every listing. ``os.replace`` is atomic within one filesystem, which is why the temporary is made
in the target's own folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replaced_atomically(target: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    The caller writes the temporary however it likes (open it, hand it to an encoder or a
    download). If the ``with`` block raises, the temporary is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)


def write_bytes_atomically(target: str | Path, data: bytes) -> None:
    with replaced_atomically(target) as temp:
        temp.write_bytes(data)


@contextmanager
def folder_replaced_atomically(target: str | Path, *, replace: bool) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it becomes ``target``.

    With ``replace`` an existing ``target`` is swapped out; without it an existing ``target`` is
    kept (another process put the same content there first) and the staging folder is dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "content")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if replace or not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of the file at ``path``, read 1 MB at a time (models and segments are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
