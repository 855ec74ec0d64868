"""Connections a farm process keeps: the state store and object storage.

Made on first use in the process that uses them (a Celery worker's child, after the fork) and kept
for its life, like faster-whisper's cached session. Importing this module does no I/O.
"""

from __future__ import annotations

import functools

from lipfarm.common import scratch
from lipfarm.common.config import Settings, load_settings
from lipfarm.common.errors import ServiceError
from lipfarm.common.farm import check_farm_id
from lipfarm.common.state import StateStore
from lipfarm.common.state.connection import check_eviction_policy
from lipfarm.common.storage import Storage, open_storage


@functools.cache
def settings() -> Settings:
    return load_settings()


def connect_state(current: Settings, url: str = "") -> StateStore:
    """The state store at ``url`` (default ``LIPFARM_REDIS_URL``), reachable and safe: every role
    connects through here, so each refuses at start a Redis that may evict keys (``ServiceError``,
    exit 5) unless ``LIPFARM_ALLOW_EVICTING_REDIS`` accepts the risk, and one that keeps another
    farm's id than ``LIPFARM_FARM_ID``. Temporary folders of this host's dead processes are swept
    first (``common.scratch``): every role starts here, reachable Redis or not."""
    scratch.sweep(current.temp_dir)
    store = StateStore.connect(url or current.redis_url, current.key_prefix, tls_ca_file=current.redis_tls_ca_file)
    check_store_policy(store, current)
    check_farm_id(store, current)
    return store


def refuse_evicting_redis(current: Settings) -> None:
    """At the start of a long-running role that rides out a Redis that does not answer yet (the API,
    ``reconcile --loop``): refuse one that may evict keys (``EvictingRedisError``, exit 5), and let an
    unreachable one be, for the role to connect once it answers."""
    from lipfarm.common.state.connection import EvictingRedisError

    for url in {current.redis_url, current.broker_url}:
        try:
            connect_state(current, url)
        except EvictingRedisError:
            raise
        except ServiceError:
            pass


def check_store_policy(store: StateStore, current: Settings) -> None:
    """``ServiceError`` if the store's Redis may evict keys and the settings do not accept it."""
    check_eviction_policy(store.redis, store.where, allow=bool(current.allow_evicting_redis))


@functools.cache
def state_store() -> StateStore:
    return connect_state(settings())


@functools.lru_cache(maxsize=8)
def storage_at(url: str) -> Storage:
    """The storage at ``url`` (a job's record names the one it was submitted to), opened once."""
    return open_storage(url, settings())


def storage() -> Storage:
    """The installation's storage (``LIPFARM_STORAGE_URL``), where new jobs go."""
    return storage_at(settings().storage_url)


def reset() -> None:
    """Forget every connection (tests switch settings within one process)."""
    for cached in (settings, state_store, storage_at):
        cached.cache_clear()
