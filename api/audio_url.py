"""``audio_url``: a job's audio given by URL, fetched by the API before the job is submitted.

- ``storage:KEY`` names an object in the farm's storage: the same as ``audio_key``.
- ``https://...`` is fetched through ``common.netguard``: its host resolved once and refused when any
  address is inside the farm's network (``LIPFARM_OUTBOUND_ALLOW`` lets some through; plain ``http://``
  is taken only from such allowed hosts, never from the open internet), the connection pinned to the
  checked address, a redirect refused (not followed), the size bounded while it streams
  (``LIPFARM_API_MAX_AUDIO_MB``), each read and the whole download bounded in time.

Every refusal is a 4xx naming ``audio_url``: 422 for a bad scheme, a refused address, an answer that
is not audio (the probe of ``submit_job`` says so); 413 too large; 404 when the server says not found;
422 for other answers and 504 for no answer in time. What a server answered is not echoed beyond its status.
"""

from __future__ import annotations

import http.client
from pathlib import Path
from urllib.parse import unquote, urlsplit

from lipfarm.common import defaults, netguard
from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError
from lipfarm.api.errors import ApiError
from lipfarm.scheduler.submit import safe_file_name

FIELD = "audio_url"
STORAGE = "storage:"
MB = 1 << 20


def storage_key(url: str) -> str | None:
    """The storage key of a ``storage:KEY`` URL, else None."""
    return url[len(STORAGE):] if url.startswith(STORAGE) else None


def _name(target: netguard.Target) -> str:
    """The file's name, from the URL's last path segment (the probe reads its content, not its name)."""
    return safe_file_name(unquote(urlsplit(target.url).path.rsplit("/", 1)[-1]))


def fetch_audio(url: str, folder: Path, settings: Settings) -> Path:
    """Download ``url`` into ``folder``; the file, or an ``ApiError`` naming ``audio_url``."""
    try:
        target = netguard.check_url(url, settings.outbound_allow, field=FIELD)
    except InputError as exc:
        raise ApiError(422, str(exc), field=FIELD) from None
    if target.scheme != "https" and not netguard.inside(target):
        raise ApiError(422, f"{FIELD}: https:// only (or storage:KEY); plain http:// is taken only from hosts "
                            f"an operator allows with {netguard.ALLOW_ENV}", field=FIELD)
    dest = folder / _name(target)
    try:
        status, _ = netguard.fetch(target, dest, max_bytes=int(settings.api_max_audio_mb * MB),
                                   timeout_s=defaults.API_AUDIO_URL_TIMEOUT_S,
                                   total_s=defaults.API_AUDIO_URL_TOTAL_S, field=FIELD)
    except netguard.TooLarge as exc:
        raise ApiError(413, str(exc), field=FIELD) from None
    except TimeoutError:
        raise ApiError(504, f"{FIELD}: the server did not send the audio in time", code="fetch_timeout",
                       field=FIELD) from None
    except (OSError, http.client.HTTPException):
        raise ApiError(422, f"{FIELD}: no answer from {target.host}", code="fetch_failed", field=FIELD) from None
    if status in (404, 410):
        raise ApiError(404, f"{FIELD}: {target.host} answered {status}: not found", field=FIELD)
    if 300 <= status < 400:
        raise ApiError(422, f"{FIELD}: {target.host} answered a redirect ({status}): give the final URL "
                            "(redirects are not followed)", field=FIELD)
    if status != 200:
        raise ApiError(422, f"{FIELD}: {target.host} answered HTTP {status}", code="fetch_failed", field=FIELD)
    return dest
