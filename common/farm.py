"""A farm's id: which jobs in a storage are this farm's.

Farms may share a storage (a bucket, a folder): each stamps its id in every ``job.json`` it submits,
and a rebuild from storage adopts only jobs stamped with its own id (or with none: jobs from before
farm ids), so two farms never render, nor publish, each other's jobs.

The id is kept in Redis (made once, with SET NX, by whichever process asks first). It is
``LIPFARM_FARM_ID`` where that is set (a Redis that keeps another id is refused: two farms on one
Redis and prefix are one farm). Unset, it is made once; a Redis that lost it (the reason a rebuild
runs) takes the id of the storage's first farm (``farm.json`` at the storage's root), so the farm
that owns the storage finds its jobs again. Farms that share a storage should set the id: a second
farm whose Redis lost its data cannot otherwise tell itself from the first.
"""

from __future__ import annotations

import json
import secrets

from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError, NotFoundError, ServiceError
from lipfarm.common.state import StateStore
from lipfarm.common.storage import Storage
from lipfarm.common.storage.layout import FARM_KEY


def new_farm_id() -> str:
    return f"farm-{secrets.token_hex(6)}"


def storage_farm(storage: Storage) -> str | None:
    """The id of the first farm that used ``storage`` (None: no farm has yet, or it is unreadable)."""
    try:
        return str(json.loads(storage.get_bytes(FARM_KEY))["farm_id"]) or None
    except (NotFoundError, ValueError, KeyError, TypeError):
        return None


def check_farm_id(store: StateStore, settings: Settings) -> str | None:
    """The id Redis keeps; ``ServiceError`` if it is not the configured one (every role checks at start)."""
    configured, kept = settings.farm_id.strip(), store.farm_id()
    if configured and kept and configured != kept:
        raise ServiceError(f"Redis at {store.where} (prefix {store.keys.prefix}) belongs to farm {kept}, and "
                           f"LIPFARM_FARM_ID says {configured}: give each farm its own Redis or prefix "
                           "(LIPFARM_KEY_PREFIX), or the same id")
    if configured and any(c.isspace() or c == "/" for c in configured):
        raise InputError("not a farm id", field="LIPFARM_FARM_ID", expected="letters, digits, '-', '_'",
                         found=repr(configured))
    return kept


def farm_id(store: StateStore, settings: Settings, storage: Storage | None = None) -> str:
    """This farm's id (see the module docstring); ``ServiceError`` if Redis keeps another than the
    configured one. With ``storage``, the storage records it as its first farm if none is recorded."""
    configured, kept = settings.farm_id.strip(), check_farm_id(store, settings)
    farm = kept or store.claim_farm_id(configured or (storage and storage_farm(storage)) or new_farm_id())
    if storage is not None and storage_farm(storage) is None:
        storage.put_bytes(FARM_KEY, json.dumps({"farm_id": farm}).encode())
    return farm
