"""The client's errors: one class for every refusal of the API, one for a webhook that does not verify."""

from __future__ import annotations

import httpx


class ApiError(Exception):
    """The API refused: ``status`` (HTTP), ``code`` (for programs: invalid, not_found, too_large...),
    ``message`` (one line naming the field), ``field`` (the request field at fault, or None),
    ``retry_after_s`` (from Retry-After, where the API gave one)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after_s = retry_after_s

    @classmethod
    def of(cls, response: httpx.Response) -> "ApiError":
        """The error of a non-2xx answer, from its ``{"error": {...}}`` body (or its status alone)."""
        try:
            error = response.json()["error"]
            code, message, field = str(error["code"]), str(error["message"]), error.get("field")
        except (ValueError, KeyError, TypeError):
            code, message, field = "http_error", f"HTTP {response.status_code}", None
        retry = response.headers.get("Retry-After", "")
        return cls(response.status_code, code, message, field, float(retry) if retry.isdigit() else None)


def raise_for_error(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise ApiError.of(response)
    return response


class WebhookSignatureError(ValueError):
    """A webhook request whose ``Lipfarm-Signature`` is missing, wrong, or too old."""
