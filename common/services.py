"""Connections a farm process keeps: the state store, object storage, and the worker caches.

Made on first use in the process that uses them (a Celery worker's child, after the fork) and kept
for its life, like faster-whisper's cached session. Importing this module does no I/O.
"""

from __future__ import annotations

import functools

from common.config import Settings, load_settings
from common.jobstate import StateStore
from common.storage import Storage, open_storage


def storage_for(settings: Settings) -> Storage:
    return open_storage(settings.storage_url, **settings.s3_settings())


@functools.cache
def settings() -> Settings:
    return load_settings()


@functools.cache
def state_store() -> StateStore:
    current = settings()
    return StateStore.connect(current.redis_url, current.key_prefix)


@functools.cache
def storage() -> Storage:
    """The installation's storage (``LIPFARM_STORAGE_URL``), where new jobs go."""
    return storage_for(settings())


@functools.lru_cache(maxsize=8)
def storage_at(url: str) -> Storage:
    """The storage a job was submitted to (its record names it), with this process's credentials."""
    return open_storage(url, **settings().s3_settings())


def reset() -> None:
    """Forget every connection (tests switch settings within one process)."""
    for cached in (settings, state_store, storage, storage_at):
        cached.cache_clear()
