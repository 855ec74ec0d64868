"""Who may do what: a bearer token on every request but the health check and the page itself.

``reader`` accepts any known token; ``writer`` refuses read-only ones (403). The output of a job can
also be fetched with a signed URL instead (``signed_or_reader``), which is what the page's video
player uses. Tokens are made with ``lipfarm token create`` and checked in ``common.state.tokens``.
The dependencies run before a route reads its body, so an upload without a valid token is refused
before any of it is read.
"""

from __future__ import annotations

import time

from fastapi import Depends, Query, Request, Security
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


def reader(credentials: HTTPAuthorizationCredentials | None = Security(bearer),
           the_farm: Farm = Depends(farm)) -> ApiToken:
    """Any valid token (read-only ones included)."""
    return _token(credentials, the_farm)


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
                     the_farm: Farm = Depends(farm)) -> None:
    """A valid token, or a valid signature of this very path (``output_url`` in a job's JSON)."""
    if credentials is not None:
        _token(credentials, the_farm)
        return
    if expires is None and signature is None:
        _token(None, the_farm)
    if not the_farm.signer().valid(request.url.path, expires, signature, now=time.time()):
        raise ApiError(401, "the signed URL is invalid or has expired: fetch the job again for a fresh one",
                       field="signature")
