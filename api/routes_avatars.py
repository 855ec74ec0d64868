"""``/v1/avatars``: the avatars jobs can use (this API's avatar folder, as ``lipfarm avatar list``),
and importing one from an uploaded archive (as ``lipfarm avatar import``)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from lipfarm.common.avatar import Avatar
from lipfarm.common.errors import LipfarmError
from lipfarm.common.state import ApiToken
from lipfarm.api.auth import reader, writer
from lipfarm.api.avatar_archive import import_archive
from lipfarm.api.context import Farm, farm
from lipfarm.api.errors import ApiError, documented
from lipfarm.api.params import validated
from lipfarm.api.schemas import AvatarCreated, AvatarList
from lipfarm.api.uploads import MB, read_form, upload_folder

router = APIRouter(prefix="/v1/avatars", tags=["avatars"])
log = logging.getLogger("lipfarm.api")


class AvatarForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="the avatar's name in lipfarm")
    replace: bool = Field(False, description="replace an avatar of the same name")


def _avatar_view(avatar: Avatar) -> dict:
    return {"name": avatar.name, "frames": avatar.frame_count, "width": avatar.width, "height": avatar.height,
            "size": f"{avatar.width}x{avatar.height}", "hash": avatar.content_hash,
            "layout": str(avatar.source.get("layout", ""))}


@router.get("", response_model=AvatarList, summary="List avatars", responses=documented(401, 429, 503))
def list_avatars(token: ApiToken = Depends(reader), the_farm: Farm = Depends(farm)) -> dict:
    store, found = the_farm.avatars(), []
    for name in store.names():
        try:
            found.append(_avatar_view(store.get(name)))
        except LipfarmError as exc:  # one damaged avatar must not hide the others
            log.warning("avatar '%s' is damaged: %s", name, exc)
    return {"avatars": found}


def _archive_body() -> dict:
    form = AvatarForm.model_json_schema()
    form["properties"]["archive"] = {"type": "string", "format": "binary",
                                     "description": "a .tar, .tar.gz or .zip of a SyncTalk_2D dataset, a pre-cut "
                                                    "package or a lipfarm avatar package"}
    form["required"] = ["name", "archive"]
    form.pop("additionalProperties", None)
    return {"required": True, "content": {"multipart/form-data": {"schema": form}}}


@router.post("", status_code=201, response_model=AvatarCreated, summary="Import an avatar from an archive",
             openapi_extra={"requestBody": _archive_body()}, responses=documented(401, 403, 409, 413, 415, 422, 429, 503))
async def create_avatar(request: Request, token: ApiToken = Depends(writer), the_farm: Farm = Depends(farm)) -> dict:
    """The archive is checked member by member before anything is extracted, then imported as by
    ``lipfarm avatar import``. 409 if the name is taken, unless ``replace`` is true."""
    with upload_folder(the_farm.settings) as folder:
        limit = int(the_farm.settings.api_max_avatar_mb * MB)
        form = await read_form(request, folder, file_limits={"archive": limit})
        params = validated(AvatarForm, form.fields)
        archive = form.files.get("archive")
        if archive is None:
            raise ApiError(422, "archive: the form has no archive file", field="archive")
        store = the_farm.avatars()
        if (store.path(params.name) / "avatar.json").exists() and not params.replace:
            raise ApiError(409, f"an avatar named '{params.name}' exists (send replace=true to replace it)",
                           field="name")
        avatar = await run_in_threadpool(import_archive, archive.path, name=params.name, store=store,
                                         settings=the_farm.settings, replace=params.replace,
                                         shown_as=archive.filename or "archive")
    return {**_avatar_view(avatar), "pairing": str(avatar.source.get("pairing", ""))}
