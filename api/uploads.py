"""Request bodies read as streams, never whole in memory: multipart forms and small JSON documents.

``read_form`` feeds the body, as it arrives, to python-multipart's streaming parser: each file part
goes straight to a temporary file, hashed and counted as it is written, and the moment a part passes
its limit the request is refused with 413, before the rest of the body is read (a declared
``Content-Length`` over the sum of the limits is refused before reading anything). Text fields are
bounded too. Starlette's own form parser spools to disk as well, but has no size limit for files;
FastAPI's ``UploadFile`` parameters would also read the whole body before the route could refuse it.

Each piece of a body must come within ``LIPFARM_API_BODY_TIMEOUT_S`` of the one before: a client that
declares a body and stops sending it is answered 408 and its connection closed, not waited for.

Writes to the temporary file happen on the event loop: they are small (the chunks the server
receives) and go to the page cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, BinaryIO, Iterator

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from lipfarm.common import defaults
from lipfarm.common.config import Settings
from lipfarm.common.scratch import scratch_dir
from lipfarm.api.errors import ApiError

MB = 1 << 20
JSON_LIMIT_BYTES = 1 * MB


@dataclass
class UploadedFile:
    """A file part, written to ``path``."""

    field: str
    filename: str  # as the client named it (may be "")
    path: Path
    size: int = 0
    sha256: str = ""


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)


def _too_large(name: str, limit: int) -> ApiError:
    return ApiError(413, f"{name}: the upload is larger than allowed (at most {limit / MB:g} MB)", field=name)


class _Parts:
    """The parser's callbacks: each part's headers, then its data into a field or a file."""

    def __init__(self, folder: Path, file_limits: dict[str, int]) -> None:
        self.folder, self.file_limits = folder, file_limits
        self.form = Form()
        self.count = 0
        self.ended = False
        self._headers: dict[str, str] = {}
        self._header_field = self._header_value = b""
        self._name = ""
        self._text = bytearray()
        self._file: UploadedFile | None = None
        self._out: BinaryIO | None = None
        self._hash = hashlib.sha256()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._on_field, "on_header_value": self._on_value,
                "on_header_end": self._on_header_end, "on_headers_finished": self._on_headers,
                "on_part_data": self._on_data, "on_part_end": self._on_part_end, "on_end": self._on_end}

    def _begin(self) -> None:
        self.count += 1
        if self.count > defaults.API_FORM_MAX_PARTS:
            raise ApiError(413, f"the form has more than {defaults.API_FORM_MAX_PARTS} parts")
        self._headers, self._header_field, self._header_value = {}, b"", b""

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field = self._header_value = b""

    def _on_headers(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise ApiError(422, "a form part without a name (Content-Disposition: form-data; name=...)")
        if name in self.form.fields or name in self.form.files:
            raise ApiError(422, f"{name}: given more than once", field=name)
        self._name, self._text = name, bytearray()
        if name in self.file_limits:
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self._file = UploadedFile(name, filename, self.folder / f"part-{self.count}")
            self._out, self._hash = open(self._file.path, "wb"), hashlib.sha256()

    def _on_data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if self._file is None:
            self._text += piece
            if len(self._text) > defaults.API_FORM_FIELD_BYTES:
                raise _too_large(self._name, defaults.API_FORM_FIELD_BYTES)
            return
        self._file.size += len(piece)
        if self._file.size > self.file_limits[self._name]:
            raise _too_large(self._name, self.file_limits[self._name])
        self._out.write(piece)
        self._hash.update(piece)

    def _on_part_end(self) -> None:
        if self._file is None:
            try:
                self.form.fields[self._name] = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(422, f"{self._name}: not UTF-8 text", field=self._name) from None
            return
        self.close()
        self._file.sha256 = self._hash.hexdigest()
        self.form.files[self._name], self._file = self._file, None

    def _on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(415, "expected a multipart/form-data body with a boundary", field="Content-Type")
    return options[b"boundary"]


async def body_pieces(request: Request) -> AsyncIterator[bytes]:
    """The body as it arrives; 408 (closing the connection) when the next piece takes longer than
    ``LIPFARM_API_BODY_TIMEOUT_S``."""
    timeout_s = request.app.state.farm.settings.api_body_timeout_s
    pieces = request.stream().__aiter__()
    while True:
        try:
            piece = await asyncio.wait_for(pieces.__anext__(), timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiError(408, f"body: nothing arrived for {timeout_s:g} s (LIPFARM_API_BODY_TIMEOUT_S)",
                           code="request_timeout", field="body", headers={"Connection": "close"}) from None
        yield piece


def _declared_length(request: Request) -> int | None:
    text = request.headers.get("content-length", "")
    return int(text) if text.isdigit() else None


async def read_form(request: Request, folder: Path, *, file_limits: dict[str, int]) -> Form:
    """The multipart form of ``request``: its text fields, and its files (those named in
    ``file_limits``, each bounded by its limit in bytes) written under ``folder``."""
    boundary = _boundary(request)
    declared = _declared_length(request)
    budget = sum(file_limits.values()) + defaults.API_FORM_MAX_PARTS * (defaults.API_FORM_FIELD_BYTES + 1024)
    if declared is not None and declared > budget:
        name = next(iter(file_limits)) if len(file_limits) == 1 else "body"
        raise _too_large(name, file_limits.get(name, budget))
    parts = _Parts(folder, file_limits)
    parser = MultipartParser(boundary, parts.callbacks())
    try:
        async for chunk in body_pieces(request):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(422, f"malformed multipart body ({exc})", field="body") from None
    finally:
        parts.close()
    if not parts.ended:
        raise ApiError(422, "malformed multipart body (it ends before its closing boundary)", field="body")
    return parts.form


async def read_json(request: Request, *, limit: int = JSON_LIMIT_BYTES) -> object:
    """The JSON document of ``request`` (at most ``limit`` bytes), or 413/422 saying what is wrong."""
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise _too_large("body", limit)
    body = bytearray()
    async for chunk in body_pieces(request):
        body += chunk
        if len(body) > limit:
            raise _too_large("body", limit)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ApiError(422, f"body: not valid JSON ({exc})", field="body") from None


@contextmanager
def upload_folder(settings: Settings) -> Iterator[Path]:
    """A temporary folder (under this process's own, ``common.scratch``) for one request's uploads,
    removed with them after; a partial upload of an API killed with -9 goes at the next start."""
    with scratch_dir("lipfarm-upload-", settings.temp_dir) as folder:
        yield folder
