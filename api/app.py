"""The API application, assembled: routes, error handlers, the jobs page, the OpenAPI document.

Nothing here connects to anything: the farm's services are reached on the first request that needs
them, so building the app (for ``--print-openapi``, or tests) does no I/O.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from lipfarm.common.config import Settings
from lipfarm.common.signing import check_public_url
from lipfarm.api import routes_avatars, routes_health, routes_jobs, routes_metrics, routes_models, routes_output
from lipfarm.api.context import Farm
from lipfarm.api.errors import install_error_handlers
from lipfarm.api.params import no_unknown_query

STATIC = Path(__file__).resolve().parent / "static"
DESCRIPTION = """The lipfarm render farm over HTTP: submit lip-sync jobs, follow them, fetch their videos.

Every operation but `/v1/health` needs `Authorization: Bearer <token>` (`lipfarm token create`;
read-only tokens may only read). Errors are `{"error": {"code", "message", "field"}}`.
"""


def _version() -> str:
    try:
        return metadata.version("lipfarm")
    except metadata.PackageNotFoundError:
        return "0"


def create_app(settings: Settings) -> FastAPI:
    """The API for the farm of ``settings``, with the jobs page at ``/``."""
    app = FastAPI(title="lipfarm", version=_version(), description=DESCRIPTION, docs_url=None, redoc_url=None,
                  dependencies=[Depends(no_unknown_query)])
    if settings.public_url:
        check_public_url(settings.public_url)
    app.state.farm = Farm(settings)
    install_error_handlers(app)
    for routes in (routes_health, routes_jobs, routes_output, routes_avatars, routes_models, routes_metrics):
        app.include_router(routes.router)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="jobs-page")
    return app
