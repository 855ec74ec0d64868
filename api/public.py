"""The API's public base URL, written before every URL a client is given (``output_url``, ``playlist_url``).

``LIPFARM_PUBLIC_URL`` when the operator set it (it wins: a proxy's headers cannot change it); else
the request's own: ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` where a proxy sets them (their first
value), then the ``Host`` header. A header that is not a plain scheme or host is ignored, not echoed:
what a client sends must not turn into a link to somewhere else with a stray character.
"""

from __future__ import annotations

import re

from fastapi import Request

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")


def _first(value: str | None) -> str:
    return (value or "").split(",")[0].strip()


def public_base(request: Request) -> str:
    """``https://host[:port][/prefix]`` of this API as its client reached it (no trailing slash)."""
    configured = request.app.state.farm.settings.public_url
    if configured:
        return configured.rstrip("/")
    proto = _first(request.headers.get("x-forwarded-proto")).lower()
    if proto not in ("http", "https"):
        proto = request.url.scheme
    host = _first(request.headers.get("x-forwarded-host")) or _first(request.headers.get("host"))
    if not _HOST.match(host):
        host = request.url.netloc
    return f"{proto}://{host}"
