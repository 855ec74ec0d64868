"""Who may do what: a bearer token on every request but the health check and the page itself.

``reader`` accepts any known token; ``writer`` refuses read-only ones (403). Every token belongs to a
tenant, and each request spends one of its tenant's requests per second (``TenantStore.take``): over
the limit, 429 with ``Retry-After`` and the IETF draft's ``RateLimit`` / ``RateLimit-Policy`` headers,
which also come with every answer of a limited tenant. The output of a job can
also be fetched with a signed URL instead (``signed_or_reader``), which is what the page's video
player uses. Tokens are made with ``lipfarm token create`` and checked in ``common.state.tokens``.
The dependencies run before a route reads its body, so an upload without a valid token is refused
before any of it is read.
"""

from __future__ import annotations

import time

from fastapi import Depends, Query, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lipfarm.common.state import ApiToken
from lipfarm.api.context import Farm, farm
from lipfarm.api.errors import ApiError

bearer = HTTPBearer(auto_error=False, scheme_name="token",
                    description="an API token from `lipfarm token create`, as `Authorization: Bearer lf_...`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _token(credentials: HTTPAuthorizationCredentials | None, the_farm: Farm) -> ApiToken:
    if credentials is None:
        raise ApiError(401, "no API token: send `Authorization: Bearer <token>` (make one with `lipfarm token "
                       "create`)", field="Authorization", headers=_CHALLENGE)
    token = the_farm.tokens().find(credentials.credentials)
    if token is None:
        raise ApiError(401, "the API token is not known to this farm (revoked, or from another farm)",
                       field="Authorization", headers=_CHALLENGE)
    return token


def rate_headers(rps: float, remaining: int, reset_s: int) -> dict[str, str]:
    """The draft's headers (draft-ietf-httpapi-ratelimit-headers): the policy, and where the client is in it."""
    return {"RateLimit-Policy": f'"rps";q={max(1, int(rps))};w=1', "RateLimit": f'"rps";r={remaining};t={reset_s}'}


def authenticated(credentials: HTTPAuthorizationCredentials | None, the_farm: Farm) -> tuple[ApiToken, dict]:
    """The request's token, after spending one of its tenant's requests; and the headers saying how many are left."""
    token = _token(credentials, the_farm)
    tenants = the_farm.tenants()
    tenant = tenants.get(token.tenant)
    taken = tenants.take(tenant, now=time.time())
    if tenant.rps <= 0:
        return token, {}
    headers = rate_headers(tenant.rps, taken.remaining, taken.retry_after_s)
    if not taken.allowed:
        raise ApiError(429, f"tenant '{token.tenant}' is over its {tenant.rps:g} requests per second: "
                            f"try again in {taken.retry_after_s} s", code="rate_limited",
                       headers={"Retry-After": str(taken.retry_after_s), **headers})
    return token, headers


def reader(response: Response, credentials: HTTPAuthorizationCredentials | None = Security(bearer),
           the_farm: Farm = Depends(farm)) -> ApiToken:
    """Any valid token (read-only ones included), within its tenant's request rate."""
    token, headers = authenticated(credentials, the_farm)
    response.headers.update(headers)
    return token


def writer(token: ApiToken = Depends(reader)) -> ApiToken:
    """A token that may change things: submit, cancel, resume, upload."""
    if token.read_only:
        raise ApiError(403, f"token '{token.name}' is read-only: this needs a read-write token",
                       field="Authorization")
    return token


def signed_or_reader(request: Request,
                     expires: int | None = Query(None, description="with `signature`: a signed URL's expiry"),
                     signature: str | None = Query(None, max_length=128, description="a signed URL's signature"),
                     credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                     the_farm: Farm = Depends(farm)) -> ApiToken | None:
    """A valid token (returned: the route checks it may see the job), or a valid signature of this very
    path (``output_url`` in a job's JSON, given only to those who may see it): None."""
    if credentials is not None:
        return authenticated(credentials, the_farm)[0]
    if expires is None and signature is None:
        _token(None, the_farm)
    if not the_farm.signer().valid(request.url.path, expires, signature, now=time.time()):
        raise ApiError(401, "the signed URL is invalid or has expired: fetch the job again for a fresh one",
                       field="signature")
    return None
