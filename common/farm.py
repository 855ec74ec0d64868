"""A farm's id: which jobs in a storage are this farm's.

Farms may share a storage (a bucket, a folder): each stamps its id in every ``job.json`` it submits,
and a rebuild from storage adopts only jobs stamped with its own id (or with none: jobs from before
farm ids), so two farms never render, nor publish, each other's jobs.

The id is kept in Redis (made once, with SET NX, by whichever process asks first), so every host
of a farm uses the same one while Redis keeps it. It is ``LIPFARM_FARM_ID`` where that is set (a
Redis that keeps another id is refused: two ids on one Redis and prefix are a misconfiguration);
unset, it is derived from the Redis URL (password left out) and the key prefix, so a Redis that lost
its data (the reason a rebuild runs) gets the same id again, and two farms, which cannot share both
a Redis and a prefix, get different ones. Hosts that reach one Redis by different names derive
different ids: set ``LIPFARM_FARM_ID`` there.
"""

from __future__ import annotations

import hashlib

from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError, ServiceError
from lipfarm.common.state import StateStore
from lipfarm.common.state.connection import mask_url, url_without_tls_params


def derived_farm_id(settings: Settings) -> str:
    """The id of a farm that sets none: the same wherever the same Redis and prefix are configured."""
    where = f"{mask_url(url_without_tls_params(settings.redis_url))}|{settings.key_prefix}"
    return f"farm-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


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


def farm_id(store: StateStore, settings: Settings) -> str:
    """This farm's id (see the module docstring); ``ServiceError`` if Redis keeps another than the
    configured one."""
    kept = check_farm_id(store, settings)
    return kept or store.claim_farm_id(settings.farm_id.strip() or derived_farm_id(settings))
