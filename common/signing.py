"""Signed URLs: what a ``<video>`` element (which cannot send a bearer header), and a webhook receiver, are given instead.

A URL is signed with HMAC-SHA256 over its path and its expiry (Unix seconds), keyed by the API's
secret: ``/v1/jobs/<id>/output?expires=<t>&signature=<hex>``. The expiry is rounded up to a step
(an hour at most), so the URL a job's JSON carries stays the same from one poll to the next and a
page does not reload a playing video. HLS players resolve segment URIs relative to the playlist's
URL and drop its query string, so the live playlist's signature sits in the path instead, covering
the whole folder: ``/v1/jobs/<id>/live/<t>/<hex>/<file>``.

What clients are given is absolute: the API's public base URL (``LIPFARM_PUBLIC_URL``, checked by
``check_public_url``, or the request's host) before the signed path; times beside their seconds are
ISO 8601 UTC (``iso_utc``).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import math
from urllib.parse import urlsplit

from lipfarm.common.errors import InputError


class Signer:
    """Signs and checks URL paths with ``secret``; a signature lives ``ttl_s`` (plus the rounding step)."""

    def __init__(self, secret: str, *, ttl_s: float) -> None:
        if not secret:
            raise ValueError("a signing secret is needed")
        self._key = secret.encode()
        self.ttl_s = ttl_s
        self.step_s = min(3600.0, max(1.0, ttl_s / 6))

    def expires(self, now: float) -> int:
        return int(math.ceil((now + self.ttl_s) / self.step_s) * self.step_s)

    def signature(self, path: str, expires: int) -> str:
        return hmac.new(self._key, f"{expires}\n{path}".encode(), hashlib.sha256).hexdigest()

    def valid(self, path: str, expires: int | None, signature: str | None, *, now: float) -> bool:
        """Whether ``signature`` signs ``path`` until ``expires`` and that is still to come."""
        if expires is None or not signature or expires < now:
            return False
        return hmac.compare_digest(self.signature(path, expires).encode(), signature.encode("utf-8", "replace"))

    def signed(self, path: str, *, now: float) -> str:
        """``path`` with its expiry and signature as query parameters."""
        expires = self.expires(now)
        return f"{path}?expires={expires}&signature={self.signature(path, expires)}"

    def signed_folder(self, folder: str, name: str, *, now: float) -> str:
        """``<folder>/<expires>/<signature>/<name>``: a signature any file of the folder shares."""
        expires = self.expires(now)
        return f"{folder}/{expires}/{self.signature(folder, expires)}/{name}"


def output_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/output"


def live_folder(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/live"


def iso_utc(seconds: float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC time (``2026-12-06T17:16:47.123Z``), what clients parse; None stays None."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_public_url(url: str, field: str = "LIPFARM_PUBLIC_URL") -> str:
    """``url`` without its trailing slash if it is an http(s) URL with a host and no query; else ``InputError``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise InputError("not an http(s) URL with a host (and no query)", field=field,
                         expected="https://lipfarm.example.com or https://example.com/lipfarm", found=repr(url[:200]))
    return url.rstrip("/")
