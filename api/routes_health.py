"""``/v1/health``: whether this API can serve, for load balancers and probes (no token needed).

200 when Redis (state and broker) and the storage answer; 503 naming each that does not, with the
same line the CLI would print (the Redis password masked; the storage URL and server paths not
shown: ``api.redact``, as the check needs no token). A Redis that may evict keys
(``maxmemory-policy`` other than ``noeviction``) is a 503 too, unless ``LIPFARM_ALLOW_EVICTING_REDIS``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from lipfarm.common import defaults
from lipfarm.common.errors import LipfarmError
from lipfarm.common import services
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
    store = the_farm.store()
    store.generation()  # one read: the connection answers
    services.check_store_policy(store, settings)  # asked each time: a policy can change under a running API
    if settings.broker_url != settings.redis_url:
        services.connect_state(settings, settings.broker_url)


@router.get("/v1/health", response_model=Health, summary="Whether Redis and the storage answer",
            responses={503: {"model": Health, "description": "A service does not answer: which, and why"}})
def health(the_farm: Farm = Depends(farm)) -> JSONResponse:
    checks = {"redis": _check(lambda: _redis(the_farm)),
              "storage": _check(lambda: the_farm.storage().check(), the_farm.redactor().text)}
    ok = all(result == "ok" for result in checks.values())
    body = {"status": "ok" if ok else "unavailable", "checks": checks}
    if checks["redis"] == "ok":  # the farm keeps time by Redis; a host far off it is worth a look
        drift = the_farm.store().clock_drift()
        body["clock_drift_s"] = round(drift, 3)
        if abs(drift) > defaults.CLOCK_DRIFT_WARN_S:
            body["warnings"] = [f"this host's clock is {drift:+.1f} s off Redis's: fix its clock (NTP)"]
    return JSONResponse(body, status_code=200 if ok else 503)
