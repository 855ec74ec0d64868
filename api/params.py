"""The parameters of a job submission, as the API takes them: one pydantic model per body kind.

``JobFields`` are the form fields of a multipart submission (beside the ``audio`` file);
``JobFromStorage`` is the JSON body naming audio already in the farm's storage. Render options are
the ``RenderOptions`` fields by name, derived from the dataclass so the API cannot fall behind it;
``RenderOptions`` itself validates them (as for the CLI), and its errors name the field. The same
models write the request bodies of the OpenAPI document.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields as dataclass_fields
from typing import Literal

from fastapi import Path as PathParam, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from lipfarm.common import defaults
from lipfarm.common.config import Settings
from lipfarm.common.options import OPTION_HELP, RenderOptions
from lipfarm.api.errors import ApiError

SHA256_PATTERN = r"^[0-9a-f]{64}$"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # common.storage.layout.checked_part, which also refuses ".."
JOB_ID = PathParam(pattern=ID_PATTERN, description="a job id, as the submission answered")
_KINDS = {"int": int, "str": str, "bool": bool}


class _JobBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    avatar: str = Field(min_length=1, max_length=128, description="name of an avatar (GET /v1/avatars)")
    priority: Literal[defaults.PRIORITIES] = Field(defaults.PRIORITY,  # type: ignore[valid-type]
                                                   description="high chunks run before normal before low")
    encoder: str | None = Field(None, pattern=SHA256_PATTERN,
                                description="SHA-256 of an audio encoder from POST /v1/models (default: the demo's)")
    generator: str | None = Field(None, pattern=SHA256_PATTERN,
                                  description="SHA-256 of a UNet generator from POST /v1/models (default: the demo's)")
    webhook_url: str | None = Field(None, max_length=2048, description="http(s) URL told when the job ends")
    idempotency_key: str | None = Field(None, min_length=1, max_length=255,
                                        description="the same key with the same parameters gives the same job "
                                                    "(or send the Idempotency-Key header)")


def _option_fields() -> dict:
    return {spec.name: (_KINDS[spec.type] | None,
                        Field(None, description=f"{OPTION_HELP.get(spec.name, 'render option')} "
                                                f"(default {spec.default})"))
            for spec in dataclass_fields(RenderOptions)}


JobFields = create_model("JobFields", __base__=_JobBase, **_option_fields())
JobFromStorage = create_model(
    "JobFromStorage", __base__=JobFields,
    audio_key=(str | None, Field(None, min_length=1, max_length=1024,
                                 description="key of the audio in the farm's storage, e.g. uploads/talk.wav "
                                             "(this or audio_url)")),
    audio_url=(str | None, Field(None, min_length=1, max_length=2048,
                                 description="where the API fetches the audio: https://... (no redirects; a public "
                                             "address) or storage:KEY (this or audio_key)")))
OPTION_NAMES = tuple(spec.name for spec in dataclass_fields(RenderOptions))


def validated(model: type[BaseModel], data: object) -> BaseModel:
    """``model`` from ``data``, or a 422 naming the first field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(422, f"{field}: {first['msg']}" if field else first["msg"], field=field) from None


def render_options(params: BaseModel, settings: Settings) -> RenderOptions:
    """The job's ``RenderOptions``: the fields given, the installation's precision and backend by
    default (as ``lipfarm submit``). Raises ``InputError`` naming the field."""
    given = {name: getattr(params, name) for name in OPTION_NAMES}
    given["precision"] = given["precision"] or settings.precision
    given["backend"] = given["backend"] or settings.backend
    return RenderOptions(**{name: value for name, value in given.items() if value is not None})


def fingerprint(params: BaseModel, audio: str) -> str:
    """What an idempotency key is bound to: every parameter but the key, and the audio (its SHA-256,
    or its storage key)."""
    data = params.model_dump(exclude={"idempotency_key"})
    return hashlib.sha256(json.dumps([data, audio], sort_keys=True).encode()).hexdigest()


def request_body_schema() -> dict:
    """The OpenAPI ``requestBody`` of ``POST /v1/jobs``: a multipart upload, or JSON naming stored audio."""
    form = JobFields.model_json_schema()
    form["properties"] = {"audio": {"type": "string", "format": "binary",
                                    "description": "the audio file (wav, flac, mp3, ogg, m4a, mp4, mov)"},
                          **{name: _without_null(spec) for name, spec in form["properties"].items()}}
    form["required"] = ["audio", *form.get("required", [])]
    form.pop("additionalProperties", None)
    return {"required": True, "content": {
        "multipart/form-data": {"schema": form},
        "application/json": {"schema": JobFromStorage.model_json_schema()}}}


def _without_null(spec: dict) -> dict:
    """A form field's schema without pydantic's "or null": a form field is given or left out."""
    options = [option for option in spec.get("anyOf", []) if option.get("type") != "null"]
    if len(options) != 1:
        return spec
    plain = {key: value for key, value in spec.items() if key not in ("anyOf", "default")}
    return {**options[0], **plain}


def _query_names(dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def no_unknown_query(request: Request) -> None:
    """Refuse query parameters the operation does not take: ``?sate=done`` is a typo, not a filter,
    and answering with every job would hide it. (An app-wide dependency.)"""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    unknown = sorted(set(request.query_params) - _query_names(dependant))
    if unknown:
        raise ApiError(422, f"{unknown[0]}: not a query parameter of this operation", field=unknown[0])
