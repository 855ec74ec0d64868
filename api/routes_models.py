"""``/v1/models``: ONNX models uploaded once, by content, and named by their SHA-256 in submissions.

An upload is checked against the SyncTalk_2D contract (``common.models``: an audio encoder or a
UNet generator, self-contained, standard operators) before it is stored as ``models/<sha256>.onnx``,
where ``lipfarm submit`` puts the models it uploads.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from lipfarm.common.errors import ModelError
from lipfarm.common.fileio import file_sha256
from lipfarm.common.state import ApiToken
from lipfarm.common.storage.layout import model_key
from lipfarm.api.auth import reader, writer
from lipfarm.api.context import Farm, farm
from lipfarm.api.errors import ApiError, documented
from lipfarm.api.model_cache import model_file, model_kind, stored_model_hashes
from lipfarm.api.schemas import Model, ModelList
from lipfarm.api.uploads import MB, UploadedFile, read_form, upload_folder
from lipfarm.scheduler.submit import safe_file_name

router = APIRouter(prefix="/v1/models", tags=["models"])
_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["model"],
    "properties": {"model": {"type": "string", "format": "binary",
                             "description": "an ONNX audio encoder or UNet generator"}}}}}}


def _store_model(the_farm: Farm, upload: UploadedFile) -> dict:
    path = upload.path.with_name(safe_file_name(upload.filename, "model.onnx"))
    upload.path.rename(path)
    sha256 = file_sha256(path)
    try:
        kind = model_kind(path, sha256)
    except ModelError as exc:  # named as the client named it, not by this machine's temporary folder
        raise ApiError(422, str(exc).replace(f"{path.parent}/", ""), code="bad_model", field="model") from None
    storage = the_farm.storage()
    if not storage.exists(model_key(sha256)):
        storage.put_file(model_key(sha256), path)
    return {"sha256": sha256, "kind": kind, "size": path.stat().st_size}


@router.post("", status_code=201, response_model=Model, summary="Upload a model",
             openapi_extra={"requestBody": _BODY}, responses=documented(401, 403, 413, 415, 422, 429, 503))
async def upload_model(request: Request, token: ApiToken = Depends(writer), the_farm: Farm = Depends(farm)) -> dict:
    """Checked against the model contract, stored by content: submit with its ``sha256`` as
    ``encoder`` or ``generator``."""
    with upload_folder(the_farm.settings) as folder:
        form = await read_form(request, folder, file_limits={"model": int(the_farm.settings.api_max_model_mb * MB)})
        if "model" not in form.files:
            raise ApiError(422, "model: the form has no model file", field="model")
        unknown = sorted(form.fields)
        if unknown:
            raise ApiError(422, f"{unknown[0]}: not a field of this form (only the model file)", field=unknown[0])
        return await run_in_threadpool(_store_model, the_farm, form.files["model"])


def _listing(the_farm: Farm) -> dict:
    storage, models = the_farm.storage(), []
    for sha256 in stored_model_hashes(storage):
        path = model_file(storage, the_farm.settings, sha256, field="model")
        models.append({"sha256": sha256, "kind": model_kind(path, sha256), "size": path.stat().st_size})
    return {"models": models}


@router.get("", response_model=ModelList, summary="List the farm's models", responses=documented(401, 429, 503))
def list_models(token: ApiToken = Depends(reader), the_farm: Farm = Depends(farm)) -> dict:
    return _listing(the_farm)
