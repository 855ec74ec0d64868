"""Tenants: who a job belongs to, and what each tenant may ask of the farm.

A tenant is a name (``default`` for everything made before tenants existed). Tokens carry one
(``lipfarm token create --tenant``), jobs record the one of the token that submitted them, and the
API shows a tenant only its own jobs. ``lipfarm tenant set`` gives a tenant limits, kept in one
hash (``Keys.tenants``: name -> JSON), read by every API process:

- ``max_queued``: jobs not yet ended it may have at once (0: no limit); one more is refused with 429;
- ``rps``: requests per second, a token bucket in Redis (``take``) of one second's worth (at least
  one request), shared by every API process; 0: no limit;
- ``weight``: its share of the workers when several tenants wait (the scheduler reads ``weights``).

Like the rest of ``common.state``, the only code that touches these keys.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

import redis

from lipfarm.common.errors import InputError
from lipfarm.common.state.keys import Keys
from lipfarm.common.state.records import DEFAULT_TENANT
from lipfarm.common.state.guard import guarded
from lipfarm.common.state.store import StateStore

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # short and plain: it is a metrics label too

# KEYS[1] the bucket; ARGV rate (tokens/s), burst, now. Returns {1 if taken else 0, tokens left}.
_TAKE = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local data = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(data[1]) or burst, tonumber(data[2]) or now
if now > at then tokens = math.min(burst, tokens + (now - at) * rate); at = now end
local taken = 0
if tokens >= 1 then tokens = tokens - 1; taken = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(at))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {taken, tostring(tokens)}
"""


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError("invalid tenant name", field="tenant",
                         expected="1 to 32 of a-z, 0-9, '_' and '-', starting with a letter or digit",
                         found=repr(name)[:80])
    return name


@dataclass(frozen=True)
class Tenant:
    name: str
    max_queued: int = 0  # jobs not yet ended at once; 0: no limit
    rps: float = 0.0  # requests per second; 0: no limit
    weight: float = 1.0  # share of the workers (the scheduler's fair share)


@dataclass(frozen=True)
class Taken:
    """The answer of the rate limiter: whether this request may go on, and what is left."""

    allowed: bool
    remaining: int
    retry_after_s: int  # when refused: seconds until a request is allowed again


class TenantStore:
    """Tenants' limits and weights, their request buckets, their jobs not yet ended."""

    def __init__(self, client: redis.Redis, keys: Keys, *, where: str = "") -> None:
        self.redis, self.keys, self.where = client, keys, where
        self._take = client.register_script(_TAKE)

    @classmethod
    def of(cls, store: StateStore) -> "TenantStore":
        return cls(store.redis, store.keys, where=store.where)

    @guarded
    def set(self, name: str, *, max_queued: int | None = None, rps: float | None = None,
            weight: float | None = None) -> Tenant:
        """Change what is given (the rest is kept); returns the tenant as it is now."""
        current = self.get(check_tenant_name(name))
        for field, value in (("max_queued", max_queued), ("rps", rps), ("weight", weight)):
            if value is not None and (not math.isfinite(value) or value < 0 or field == "weight" and value == 0):
                raise InputError(f"invalid {field}", field=field,
                                 expected="a positive number" if field == "weight" else "0 (no limit) or more",
                                 found=str(value))
        tenant = Tenant(name, current.max_queued if max_queued is None else int(max_queued),
                        current.rps if rps is None else float(rps),
                        current.weight if weight is None else float(weight))
        with self.redis.pipeline() as pipe:  # the weight also where the claim script reads it, at once
            pipe.hset(self.keys.tenants(), name, json.dumps(asdict(tenant)))
            pipe.hset(self.keys.tenant_weights(), name, repr(tenant.weight))
            pipe.execute()
        return tenant

    @guarded
    def get(self, name: str) -> Tenant:
        """The tenant's limits (none, weight 1, for a tenant never set)."""
        return self._parse(name, self.redis.hget(self.keys.tenants(), name))

    @staticmethod
    def _parse(name: str, raw: str | None) -> Tenant:
        if not raw:
            return Tenant(name)
        data = json.loads(raw)
        return Tenant(name, int(data.get("max_queued", 0)), float(data.get("rps", 0)), float(data.get("weight", 1)))

    @guarded
    def list(self) -> list[Tenant]:
        """Every tenant that was set, and ``default``, by name."""
        found = {name: self._parse(name, raw) for name, raw in self.redis.hgetall(self.keys.tenants()).items()}
        found.setdefault(DEFAULT_TENANT, Tenant(DEFAULT_TENANT))
        return [found[name] for name in sorted(found)]

    def weights(self) -> dict[str, float]:
        """Each set tenant's weight (a tenant not listed weighs 1): what the scheduler shares workers by."""
        return {tenant.name: tenant.weight for tenant in self.list()}

    @guarded
    def take(self, tenant: Tenant, *, now: float) -> Taken:
        """One request of ``tenant`` against its ``rps`` bucket (always allowed without a limit)."""
        if tenant.rps <= 0:
            return Taken(True, 0, 0)
        burst = max(1.0, tenant.rps)
        taken, left = self._take(keys=[self.keys.tenant_bucket(tenant.name)], args=[tenant.rps, burst, now])
        left = float(left)
        wait = 0 if taken else max(1, math.ceil((1 - left) / tenant.rps))
        return Taken(bool(taken), int(left), wait)

    @guarded
    def unfinished_jobs(self, tenant: str) -> int:
        """Jobs of ``tenant`` that have not ended (queued, planning, rendering, finalizing)."""
        job_ids = list(self.redis.smembers(self.keys.active()))
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.keys.job(job_id), "tenant")
            owners = pipe.execute()
        return sum(1 for owner in owners if (owner or DEFAULT_TENANT) == tenant)
