"""Verifying a webhook request as the farm signs it (``Lipfarm-Signature: t=<unix>,v1=<hex>``):
HMAC-SHA256 with the farm's ``LIPFARM_WEBHOOK_SECRET`` over ``"<t>." + body``, the time recent."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, Mapping

from lipfarm.client.errors import WebhookSignatureError

HEADER = "Lipfarm-Signature"


def verify_webhook(body: bytes, headers: Mapping[str, str], secret: str, *, tolerance_s: float = 300,
                   now: float | None = None) -> dict[str, Any]:
    """The event of a webhook request whose signature is right and recent; else ``WebhookSignatureError``.
    ``body`` is the raw request body (as received: re-encoded JSON would not verify)."""
    header = next((value for name, value in headers.items() if name.lower() == HEADER.lower()), "")
    try:
        parts = dict(item.strip().split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        raise WebhookSignatureError(f"no valid {HEADER} header") from None
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, given):
        raise WebhookSignatureError("the signature does not match the body and secret")
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise WebhookSignatureError(f"the signature is older than {tolerance_s:g} s (a replay?)")
    return json.loads(body)
