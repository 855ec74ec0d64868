"""``Farm``: what every request works with, made once per API process and shared by its requests.

The state store is connected on first use, not at start: an API started while Redis is down still
serves ``/v1/health`` (503, saying why) and recovers by itself when Redis is back. Job handles are
the same ``JobHandle`` the CLI uses, with each job's own storage (a job records where it lives), given
only to a token of the job's tenant (or an admin's).
"""

from __future__ import annotations

import functools
import threading

from fastapi import Request

from lipfarm.common.avatar import AvatarStore
from lipfarm.common.config import Settings
from lipfarm.common.errors import NotFoundError
from lipfarm.common.state import ApiToken, JobRecord, StateStore, TenantStore, TokenStore
from lipfarm.common.storage import Storage, open_storage
from lipfarm.common.storage.layout import checked_part
from lipfarm.api.redact import Redactor
from lipfarm.api.signing import Signer
from lipfarm.scheduler.submit import JobHandle, connect_farm


class Farm:
    """The farm as the API sees it: settings, state, storage, tokens, the URL signer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: StateStore | None = None
        self._signer: Signer | None = None
        self._tenants: TenantStore | None = None
        self._redactor: Redactor | None = None
        self._lock = threading.Lock()
        self.storage_at = functools.lru_cache(maxsize=8)(self._open_storage)

    def store(self) -> StateStore:
        """The state store (connected and checked on first use; redis-py reconnects by itself after)."""
        with self._lock:
            if self._store is None:
                self._store = connect_farm(self.settings)
            return self._store

    def redactor(self) -> Redactor:
        """What hides the storage URL and server paths from clients (``api.redact``)."""
        if self._redactor is None:
            self._redactor = Redactor(self.settings)
        return self._redactor

    def tokens(self) -> TokenStore:
        return TokenStore.of(self.store())

    def tenants(self) -> TenantStore:
        if self._tenants is None:  # it registers its Lua script once
            self._tenants = TenantStore.of(self.store())
        return self._tenants

    def _open_storage(self, url: str) -> Storage:
        return open_storage(url, self.settings)

    def storage(self) -> Storage:
        """The storage new jobs go to (``LIPFARM_STORAGE_URL``)."""
        return self.storage_at(self.settings.storage_url)

    def avatars(self) -> AvatarStore:
        return AvatarStore(self.settings.avatars_dir)

    def signer(self) -> Signer:
        """The URL signer, with ``LIPFARM_API_SECRET`` or the secret every API process shares in Redis."""
        if self._signer is None:
            secret = self.settings.api_secret_key or self.tokens().signing_secret()
            self._signer = Signer(secret, ttl_s=self.settings.api_url_ttl_s)
        return self._signer

    def owned(self, job_id: str, token: ApiToken | None) -> JobRecord:
        """The job's record, if ``token`` may see it (None: a signed URL already said so); another
        tenant's job is as unknown as a job that does not exist (``NotFoundError``, the same words)."""
        record = self.store().job(checked_part(job_id, "job_id"))
        if token is not None and not token.sees(record.tenant):
            raise NotFoundError(f"unknown job '{job_id}'")
        return record

    def handle(self, job_id: str, token: ApiToken | None = None) -> JobHandle:
        """The job's handle, if ``token`` may see it (``NotFoundError`` for an unknown job or another tenant's)."""
        record = self.owned(job_id, token)
        return JobHandle(job_id, self.store(), self.storage_at(record.storage_url))


def farm(request: Request) -> Farm:
    """The dependency routes take the farm from."""
    return request.app.state.farm
