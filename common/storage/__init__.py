"""Object storage: where every job's inputs, plan, segments and output live.

``open_storage(url, settings)`` is the one way to open a storage: a directory path or ``file://``
URL gives a ``LocalStorage`` (the embedded default), ``s3://bucket[/prefix]`` an ``S3Storage`` with
the installation's S3 settings. ``common.storage.layout`` names every key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lipfarm.common.storage.base import Storage
from lipfarm.common.storage.local import LocalStorage

if TYPE_CHECKING:
    from lipfarm.common.config import Settings

__all__ = ["LocalStorage", "Storage", "open_storage"]


def open_storage(url: str, settings: "Settings | None" = None) -> Storage:
    """The storage at ``url``, with ``settings``' S3 endpoint and credentials where it is S3."""
    if url.startswith("s3://"):
        from lipfarm.common.storage.s3 import S3Storage

        bucket, _, prefix = url[len("s3://"):].partition("/")
        return S3Storage(bucket, prefix, **(settings.s3_settings() if settings else {}))
    if url.startswith("file://"):
        url = url[len("file://"):]
    return LocalStorage(url)
