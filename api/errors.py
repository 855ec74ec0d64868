"""Every answer that is not a success: one JSON shape, the right status, nothing from a traceback.

``{"error": {"code": "...", "message": "...", "field": "..."}}``: ``message`` is the same one line
the CLI prints, ``field`` names the request field at fault where there is one. The mapping:

- ``ApiError`` (raised by the routes themselves): its own status and code;
- request validation (FastAPI's pydantic errors): 422, the field from the error's location;
- ``ModelError`` 422 ``bad_model``; other ``InputError`` 422 ``invalid`` (the error's field);
  ``NotFoundError`` 404; ``ServiceError`` 503; other ``LipfarmError`` (a job failed, cancelled) 409;
- Starlette's own HTTP errors (an unknown path, a wrong method): their status;
- anything else is a bug: 500 ``internal``, logged with its traceback under an id the body names.

Messages name no server path and not the farm's storage URL (``api.redact``): those are the operator's.
"""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lipfarm.common.errors import InputError, LipfarmError, ModelError, NotFoundError, ServiceError
from lipfarm.api.schemas import ErrorBody

log = logging.getLogger("lipfarm.api")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
               422: "invalid", 429: "too_many_requests", 503: "service_unavailable",
               504: "gateway_timeout"}


class ApiError(Exception):
    """A refusal a route decides on: status, a code for programs, a line for people, the field."""

    def __init__(self, status: int, message: str, *, code: str | None = None, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers
        self.code = code or _HTTP_CODES.get(status, "error")


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status,
                        headers=headers)


def lipfarm_error_response(exc: LipfarmError, field: str | None = None, message: str | None = None) -> JSONResponse:
    """The answer to a ``LipfarmError`` raised by the functions the routes call (see the module docstring)."""
    message = str(exc) if message is None else message
    if isinstance(exc, ModelError):
        return error_response(422, "bad_model", message, field or exc.field)
    if isinstance(exc, InputError):
        return error_response(422, "invalid", message, field or exc.field)
    if isinstance(exc, NotFoundError):
        return error_response(404, "not_found", message, field)
    if isinstance(exc, ServiceError):
        return error_response(503, "service_unavailable", message, field)
    return error_response(409, "conflict", message, field)


def _public(request: Request, message: str) -> str:
    """``message`` without the farm's storage URL or server paths (``redact``)."""
    the_farm = getattr(request.app.state, "farm", None)
    return the_farm.redactor().text(message) if the_farm is not None else message


def _validation_field(error: dict) -> str | None:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    return location[0] if location else None


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, _public(request, exc.message), exc.field, exc.headers)


async def _on_lipfarm_error(request: Request, exc: LipfarmError) -> JSONResponse:
    return lipfarm_error_response(exc, message=_public(request, str(exc)))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    field = _validation_field(first)
    message = first.get("msg", "invalid request")
    return error_response(422, "invalid", f"{field}: {message}" if field else message, field)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.status_code)
    return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), detail,
                          headers=getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    incident = secrets.token_hex(6)
    log.error("internal error %s on %s %s", incident, request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", f"internal error (logged as {incident})")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(LipfarmError, _on_lipfarm_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


def documented(*statuses: int) -> dict:
    """OpenAPI ``responses`` entries for error statuses (all with the error body's schema)."""
    words = {401: "No token, or a token the farm does not know", 403: "A read-only token asked to write",
             404: "Not found", 409: "Conflicts with the current state", 413: "The upload is larger than allowed",
             415: "Not the content type this operation takes", 422: "Bad input, naming the field",
             429: "Over the tenant's requests per second or queued jobs (see Retry-After and RateLimit)",
             503: "A service the farm needs is unreachable",
             504: "audio_url: the server did not send the audio in time"}
    return {status: {"model": ErrorBody, "description": words[status]} for status in statuses}
