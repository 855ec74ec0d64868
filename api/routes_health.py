"""``/v1/health``: whether this API can serve, for load balancers and probes (no token needed).

200 when Redis (state and broker) and the storage answer; 503 naming each that does not, with the
same line the CLI would print (the Redis password masked; the storage URL and server paths not
shown: ``api.redact``, as the check needs no token).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from lipfarm.common.errors import LipfarmError
from lipfarm.common.state import StateStore
from lipfarm.api.context import Farm, farm
from lipfarm.api.schemas import Health

router = APIRouter(tags=["health"])


def _check(action, public=str) -> str:
    try:
        action()
    except LipfarmError as exc:
        return public(str(exc))
    return "ok"


def _redis(the_farm: Farm) -> None:
    settings = the_farm.settings
    the_farm.store().generation()  # one read: the connection answers
    if settings.broker_url != settings.redis_url:
        StateStore.connect(settings.broker_url, settings.key_prefix, tls_ca_file=settings.redis_tls_ca_file)


@router.get("/v1/health", response_model=Health, summary="Whether Redis and the storage answer",
            responses={503: {"model": Health, "description": "A service does not answer: which, and why"}})
def health(the_farm: Farm = Depends(farm)) -> JSONResponse:
    checks = {"redis": _check(lambda: _redis(the_farm)), "storage": _check(lambda: the_farm.storage().check(), the_farm.redactor().text)}
    ok = all(result == "ok" for result in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)
