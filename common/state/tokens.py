"""What the HTTP API keeps in Redis: its tokens, its URL-signing secret and idempotency keys.

- **Tokens** (``lipfarm token create|list|revoke``): a token is ``lf_`` and 43 random URL-safe
  characters (256 bits). Redis keeps only its SHA-256, with a name, an id (the first 12 hex digits of
  that hash, safe to show), its tenant (``default`` for tokens made before tenants), a read-only and
  an admin flag and the time it was made: a copy of Redis gives no
  usable token. A token is looked up by the hash of what a request presents; 256 random bits need no
  slow hash (there is nothing to guess), and the lookup time says nothing about a stored token.
- **The signing secret**: ``<video>`` elements cannot send a bearer header, so the API gives them
  URLs signed with HMAC-SHA256. Every API process must sign alike: the secret is made once (``SET
  NX``) and read by all, unless ``LIPFARM_API_SECRET`` sets one.
- **Idempotency keys**: a client that retries a submission with the same ``Idempotency-Key`` must get
  the same job, never a second one. ``claim`` records the key with the parameters' fingerprint and
  the job id chosen for it, atomically (``SET NX``), before anything is submitted; ``complete`` keeps
  it for ``IDEMPOTENCY_TTL_S``; a submission that failed ``release``-s it. A claim whose process died
  mid-submission expires after ``IDEMPOTENCY_PENDING_S``. Keys are scoped to the token that made them.

Like the rest of ``common.state``, the only code that touches these keys.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

import redis

from lipfarm.common.errors import InputError, NotFoundError
from lipfarm.common.state.keys import Keys
from lipfarm.common.state.records import DEFAULT_TENANT
from lipfarm.common.state.tenants import check_tenant_name
from lipfarm.common.state.guard import guarded
from lipfarm.common.state.store import StateStore

TOKEN_PREFIX = "lf_"
_NAME_MAX = 64


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiToken:
    """A token as the API knows it (never its value)."""

    id: str
    name: str
    read_only: bool
    created_at: float
    tenant: str = DEFAULT_TENANT
    admin: bool = False  # sees and steers every tenant's jobs

    @property
    def access(self) -> str:
        return ("admin, " if self.admin else "") + ("read-only" if self.read_only else "read-write")

    def sees(self, tenant: str) -> bool:
        """Whether this token may see (and, if it writes, steer) a job of ``tenant``."""
        return self.admin or tenant == self.tenant


@dataclass(frozen=True)
class IdempotencyClaim:
    """The answer to claiming an idempotency key: ``won`` if this request may submit ``job_id``;
    otherwise what an earlier request with the key recorded (``done`` once its job was queued)."""

    won: bool
    fingerprint: str
    job_id: str
    done: bool


def check_token_name(name: str) -> str:
    if not name or len(name) > _NAME_MAX or not name.isprintable() or name != name.strip():
        raise InputError("invalid token name", field="name",
                         expected=f"1 to {_NAME_MAX} printable characters, no outer spaces", found=repr(name))
    return name


def check_idempotency_key(key: str) -> str:
    if not key or len(key) > 255 or not key.isprintable():
        raise InputError("invalid idempotency key", field="idempotency_key",
                         expected="1 to 255 printable characters", found=repr(key[:80]))
    return key


class TokenStore:
    """API tokens, the signing secret and idempotency keys (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, where: str = "") -> None:
        self.redis, self.keys, self.where = client, keys, where

    @classmethod
    def of(cls, store: StateStore) -> "TokenStore":
        """The token store on the state store's Redis connection."""
        return cls(store.redis, store.keys, where=store.where)

    # --- tokens -------------------------------------------------------------------------------------

    @guarded
    def create(self, *, name: str | None, read_only: bool, now: float, tenant: str = DEFAULT_TENANT,
               admin: bool = False) -> tuple[ApiToken, str]:
        """A new token of ``tenant``: its record and its value (shown once, never stored)."""
        value = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_digest(value)
        token = ApiToken(digest[:12], check_token_name(name or f"token-{digest[:8]}"), read_only, now,
                         check_tenant_name(tenant), admin)
        if not self.redis.hsetnx(self.keys.api_token_names(), token.name, digest):
            raise InputError("a token of this name exists (revoke it first, or pick another name)",
                             field="name", found=token.name)
        self.redis.hset(self.keys.api_token(digest), mapping={
            "id": token.id, "name": token.name, "read_only": int(read_only), "created_at": repr(now),
            "tenant": token.tenant, "admin": int(admin)})
        return token, value

    @guarded
    def find(self, value: str) -> ApiToken | None:
        """The token whose value is ``value``, or None."""
        if not value.startswith(TOKEN_PREFIX):
            return None
        return self._record(self.redis.hgetall(self.keys.api_token(token_digest(value))))

    @staticmethod
    def _record(data: dict) -> ApiToken | None:
        if not data:
            return None
        return ApiToken(data["id"], data["name"], data.get("read_only") == "1", float(data["created_at"]),
                        data.get("tenant") or DEFAULT_TENANT, data.get("admin") == "1")

    @guarded
    def list(self) -> list[ApiToken]:
        """Every token, oldest first."""
        digests = self.redis.hgetall(self.keys.api_token_names())
        with self.redis.pipeline(transaction=False) as pipe:
            for digest in digests.values():
                pipe.hgetall(self.keys.api_token(digest))
            records = [self._record(data) for data in pipe.execute()]
        return sorted((r for r in records if r is not None), key=lambda r: (r.created_at, r.name))

    @guarded
    def forget_lost(self) -> list[str]:
        """Names whose token record Redis lost (the name list kept, the token gone): removed, so the
        list says what works. Their holders get 401 and need a new token; the names are returned."""
        names = self.redis.hgetall(self.keys.api_token_names())
        with self.redis.pipeline(transaction=False) as pipe:
            for digest in names.values():
                pipe.exists(self.keys.api_token(digest))
            present = pipe.execute()
        lost = [name for name, there in zip(names, present) if not there]
        if lost:
            self.redis.hdel(self.keys.api_token_names(), *lost)
        return lost

    @guarded
    def revoke(self, name: str) -> ApiToken:
        """Remove the token named ``name``; requests carrying it are refused from now on."""
        digest = self.redis.hget(self.keys.api_token_names(), name)
        if digest is None:
            known = ", ".join(sorted(self.redis.hkeys(self.keys.api_token_names()))) or "none"
            raise NotFoundError(f"unknown token '{name}' (known: {known})")
        token = self._record(self.redis.hgetall(self.keys.api_token(digest)))
        with self.redis.pipeline() as pipe:
            pipe.delete(self.keys.api_token(digest))
            pipe.hdel(self.keys.api_token_names(), name)
            pipe.execute()
        return token or ApiToken(digest[:12], name, False, 0.0)

    # --- the signing secret -------------------------------------------------------------------------

    @guarded
    def signing_secret(self) -> str:
        """The secret every API process signs URLs with: made by the first to ask, read by the rest."""
        self.redis.set(self.keys.api_secret(), secrets.token_hex(32), nx=True)
        return self.redis.get(self.keys.api_secret())

    # --- idempotency keys ---------------------------------------------------------------------------

    def _idempotency_key(self, scope: str, key: str) -> str:
        return self.keys.idempotency(scope, token_digest(check_idempotency_key(key)))

    @guarded
    def claim(self, scope: str, key: str, *, fingerprint: str, job_id: str, pending_s: float) -> IdempotencyClaim:
        """Claim ``key`` for a submission of ``job_id``, or learn what an earlier request did with it."""
        where = self._idempotency_key(scope, key)
        record = json.dumps({"fingerprint": fingerprint, "job_id": job_id, "done": False})
        for _ in range(3):  # the earlier claim may expire between our SET and GET
            if self.redis.set(where, record, nx=True, ex=max(1, int(pending_s))):
                return IdempotencyClaim(True, fingerprint, job_id, False)
            found = self.redis.get(where)
            if found is not None:
                earlier = json.loads(found)
                return IdempotencyClaim(False, earlier["fingerprint"], earlier["job_id"], earlier["done"])
        raise RuntimeError(f"idempotency key {where} kept changing")  # pragma: no cover

    @guarded
    def complete(self, scope: str, key: str, *, fingerprint: str, job_id: str, ttl_s: float) -> None:
        """The claimed submission queued its job: the key answers with it for ``ttl_s``."""
        record = json.dumps({"fingerprint": fingerprint, "job_id": job_id, "done": True})
        self.redis.set(self._idempotency_key(scope, key), record, ex=max(1, int(ttl_s)))

    @guarded
    def release(self, scope: str, key: str, *, job_id: str) -> None:
        """The claimed submission was refused: free the key (if it is still this claim's)."""
        where = self._idempotency_key(scope, key)
        found = self.redis.get(where)
        if found is not None and json.loads(found)["job_id"] == job_id:
            self.redis.delete(where)
