"""``/metrics``: the farm's figures for Prometheus (``common.metrics.FARM``), read at scrape time.

- jobs by state: every job the farm knows, one pipelined read per thousand jobs;
- queue lengths: the broker's Redis lists, one per queue and priority step, each step named by its
  job priority and lane (``front``: a fast start's first chunks; ``normal``; ``late``: the step past
  the last priority, which lipfarm never sends to);
- farm-wide committed frames and chunks (kept by the commit script) and the time-to-first-chunk and
  publish-tail histograms (observed by workers into the state store: see ``common.metrics``).

**Open by default.** It holds counts only (no job ids, names or URLs), and Prometheus' usual scrape
configurations (the manifests' ``prometheus.io/*`` annotations) send no token. Where the API is
exposed beyond the monitoring network, ``LIPFARM_API_METRICS_AUTH=1`` makes it need an API token, a
read-only one included (Prometheus: ``authorization: {credentials: lf_...}``). Every API process
exports the same farm-wide series: scrape one of them. Not in the OpenAPI document (it is not JSON).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lipfarm.common import metrics
from lipfarm.common.errors import ServiceError
from lipfarm.common.state.connection import mask_url
from lipfarm.api.auth import authenticated, bearer
from lipfarm.api.context import Farm, farm

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def farm_metrics(credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                       the_farm: Farm = Depends(farm)) -> Response:
    if the_farm.settings.api_metrics_auth:
        await run_in_threadpool(authenticated, credentials, the_farm)
    families = await run_in_threadpool(read_farm, the_farm)
    return Response(generate_latest(_Families(families)), media_type=CONTENT_TYPE_LATEST)


class _Families:
    """What ``generate_latest`` reads: metric families already collected."""

    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        return self.families


def read_farm(the_farm: Farm) -> list:
    """The farm's metric families, read now (``ServiceError`` if Redis or the broker do not answer)."""
    store = the_farm.store()
    histograms = {m.store_name: store.histogram(m.store_name) for m in (metrics.TIME_TO_FIRST_CHUNK,
                                                                       metrics.PUBLISH_TAIL)}
    return metrics.farm_families(jobs=store.job_counts(), queues=queue_lengths(), totals=store.totals(),
                                 histograms=histograms)


def lanes() -> list[tuple[str, dict[str, str]]]:
    """Every broker list of lipfarm's queues (kombu's naming: ``render``, ``render:1``, ...) with its
    labels: the queue, the job priority and the lane its step is."""
    from lipfarm.common.celery_app import PRIORITIES, PRIORITY_STEPS, QUEUES

    def named(step: int) -> tuple[str, str]:
        for name, value in PRIORITIES.items():
            if step in (value - 1, value):
                return name, "front" if step == value - 1 else "normal"
        return max(PRIORITIES, key=PRIORITIES.get), "late"

    return [(queue if step == 0 else f"{queue}:{step}",
             {"queue": queue, "priority": named(step)[0], "lane": named(step)[1]})
            for queue in QUEUES for step in PRIORITY_STEPS]


def queue_lengths() -> list[tuple[dict[str, str], int]]:
    """Messages waiting in each list of ``lanes`` (not those a worker holds)."""
    from lipfarm.common.celery_app import app

    with app.connection_for_read() as connection:
        try:
            client = connection.default_channel.client
            return [(labels, int(client.llen(name))) for name, labels in lanes()]
        except connection.connection_errors + connection.channel_errors as exc:
            raise ServiceError(f"cannot read the queue lengths: the broker at {mask_url(app.conf.broker_url)} "
                               f"is unreachable ({exc.__class__.__name__}: {exc})") from None
