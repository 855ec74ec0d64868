"""A job submission over HTTP, once its body is read: checked, made idempotent, handed to ``submit_job``.

Everything cheap is checked before an idempotency key is claimed (the options, the webhook URL, the
avatar, the models), so a refused request rarely holds a key. Then the key is claimed with a job id
chosen now: a retry while the first request is still uploading finds the same job id, and gets that
job once it exists. The submission itself is ``submit_job`` (or ``submit_from_storage``), the very
function ``lipfarm submit`` calls: it probes the audio, checks the models' contract, uploads, and
queues the plan; nothing is queued if it refuses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from lipfarm.common import defaults
from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError, LipfarmError, NotFoundError, QuotaError
from lipfarm.common.identity import new_job_id
from lipfarm.common.state import ApiToken, IdempotencyClaim
from lipfarm.api.avatar_archive import as_uploaded
from lipfarm.api.context import Farm
from lipfarm.api.errors import ApiError
from lipfarm.api.model_cache import model_file
from lipfarm.api.params import fingerprint, render_options
from lipfarm.scheduler.submit import JobHandle, check_webhook_url, submit_from_storage, submit_job

MB = 1 << 20


@dataclass(frozen=True)
class JobRequest:
    """A submission as received: the parameters, and the audio (an uploaded file or a storage key)."""

    params: BaseModel
    audio_file: Path | None = None
    audio_sha256: str = ""
    audio_key: str = ""
    audio_field: str = ""  # the request field that gave the audio, where it is not "audio" / "audio_key"

    @property
    def audio(self) -> str:
        return self.audio_key or self.audio_sha256


@dataclass(frozen=True)
class Submitted:
    handle: JobHandle
    created: bool  # False: an earlier request with the same idempotency key made it


@functools.cache
def _demo_models(settings: Settings) -> tuple[Path, Path]:
    """The demo models (made on first use, with the demo avatar), as ``lipfarm submit`` defaults to."""
    from lipfarm.demo.assets import ensure_demo_assets

    demo = ensure_demo_assets(settings)
    return demo.encoder, demo.generator


def _models(farm: Farm, params: BaseModel) -> tuple[Path, Path]:
    if params.encoder is None and params.generator is None:
        return _demo_models(farm.settings)
    if params.encoder is None or params.generator is None:
        missing = "encoder" if params.encoder is None else "generator"
        raise ApiError(422, f"{missing}: give both encoder and generator, or neither (the demo models)",
                       field=missing)
    storage = farm.storage()
    return (model_file(storage, farm.settings, params.encoder, field="encoder"),
            model_file(storage, farm.settings, params.generator, field="generator"))


def _checked(farm: Farm, request: JobRequest) -> dict:
    """The keyword arguments of ``submit_job``, every cheap check passed."""
    params = request.params
    options = render_options(params, farm.settings)
    webhook_url = check_webhook_url(params.webhook_url, farm.settings.outbound_allow) if params.webhook_url else ""
    encoder, generator = _models(farm, params)
    avatars = farm.avatars()
    try:
        avatars.get(params.avatar)
    except NotFoundError:  # named without this machine's folder: the client cannot see it
        known = ", ".join(avatars.names()) or "none"
        raise ApiError(404, f"unknown avatar '{params.avatar}' (known: {known}; import one with POST /v1/avatars)",
                       field="avatar") from None
    except InputError as exc:  # a name that cannot be an avatar's ("../x")
        raise ApiError(422, str(exc), field="avatar") from None
    return dict(avatar=params.avatar, encoder=encoder, generator=generator, options=options,
                priority=params.priority, webhook_url=webhook_url)


def _submit(settings: Settings, request: JobRequest, job_id: str, job: dict) -> JobHandle:
    try:
        return _submit_audio(settings, request, job_id, job)
    except QuotaError as exc:  # submissions racing each other: the record refused the one too many
        raise _too_many(exc) from None


def _submit_audio(settings: Settings, request: JobRequest, job_id: str, job: dict) -> JobHandle:
    if request.audio_file is not None:
        try:
            return submit_job(settings, audio=request.audio_file, job_id=job_id, **job)
        except InputError as exc:
            renamed = as_uploaded(exc, {str(request.audio_file.parent): ""})
            if renamed is exc:
                raise
            raise ApiError(422, str(renamed), field=request.audio_field or renamed.field or "audio") from None
    try:
        return submit_from_storage(settings, audio_key=request.audio_key, job_id=job_id,
                                   max_bytes=int(settings.api_max_audio_mb * MB), **job)
    except NotFoundError as exc:
        raise ApiError(404, str(exc), field=request.audio_field or "audio_key") from None
    except InputError as exc:
        if not request.audio_field:
            raise
        raise ApiError(422, str(exc), field=request.audio_field) from None


def _within_quota(farm: Farm, token: ApiToken) -> None:
    """429 if the token's tenant has as many jobs not yet ended as it may (``lipfarm tenant set --max-queued``)."""
    tenants = farm.tenants()
    limit = tenants.get(token.tenant).max_queued
    if limit <= 0:
        return
    unfinished = tenants.unfinished_jobs(token.tenant)
    if unfinished >= limit:  # a quick refusal before the upload; the job's record is the exact check
        raise _too_many(QuotaError("", tenant=token.tenant, limit=limit, unfinished=unfinished))


def _too_many(exc: QuotaError) -> ApiError:
    wait = defaults.TENANT_QUEUED_RETRY_S
    return ApiError(429, f"tenant '{exc.tenant}' has {exc.unfinished} jobs not yet ended, its limit: submit again "
                         "once one ends", code="too_many_jobs", field="tenant",
                    headers={"Retry-After": str(wait), "RateLimit-Policy": f'"queued";q={exc.limit}',
                             "RateLimit": f'"queued";r=0;t={wait}'})


def submit_request(farm: Farm, token: ApiToken, request: JobRequest, header_key: str | None,
                   api_url: str = "") -> Submitted:
    """Submit ``request`` (idempotently where it carries a key) as a job of the token's tenant, within
    its quota of jobs not yet ended; see the module docstring. ``api_url``, the API's public base URL
    as this request reached it, is kept with the job for its webhook's ``output_url``."""
    job = {**_checked(farm, request), "tenant": token.tenant, "api_url": api_url,
           "max_unfinished": farm.tenants().get(token.tenant).max_queued}  # reserved as the job is recorded
    key = request.params.idempotency_key or header_key
    if not key:
        _within_quota(farm, token)
        return Submitted(_submit(farm.settings, request, new_job_id(), job), True)
    tokens = farm.tokens()
    prints = fingerprint(request.params, request.audio)
    claim = tokens.claim(token.id, key, fingerprint=prints, job_id=new_job_id(),
                         pending_s=defaults.IDEMPOTENCY_PENDING_S)
    if not claim.won:
        return Submitted(_earlier(farm, key, claim, prints), False)
    try:
        _within_quota(farm, token)  # a retry of a job already made is answered above, whatever the quota
        handle = _submit(farm.settings, request, claim.job_id, job)
    except (LipfarmError, ApiError):
        if farm.store().exists(claim.job_id):  # made, then failed (its plan could not be queued): keep it
            tokens.complete(token.id, key, fingerprint=prints, job_id=claim.job_id, ttl_s=defaults.IDEMPOTENCY_TTL_S)
        else:  # refused before anything was made: a corrected retry may use the key
            tokens.release(token.id, key, job_id=claim.job_id)
        raise
    tokens.complete(token.id, key, fingerprint=prints, job_id=claim.job_id, ttl_s=defaults.IDEMPOTENCY_TTL_S)
    return Submitted(handle, True)


def _earlier(farm: Farm, key: str, claim: IdempotencyClaim, prints: str) -> JobHandle:
    """The job an earlier request with ``key`` made, if it had the same parameters and made one."""
    if claim.fingerprint != prints:
        raise ApiError(409, f"idempotency key {key!r} was used with other parameters: a new job needs a new key",
                       code="idempotency_conflict", field="idempotency_key")
    if claim.done or farm.store().exists(claim.job_id):
        return farm.handle(claim.job_id)
    raise ApiError(409, f"a request with idempotency key {key!r} is still being submitted: try again shortly",
                   code="idempotency_in_progress", field="idempotency_key",
                   headers={"Retry-After": str(defaults.IDEMPOTENCY_RETRY_AFTER_S)})
