"""A job's output and its live HLS files, for players: signed URLs or a token.

From local storage the file is served by Starlette's ``FileResponse``, which answers ``Range``
requests (206 with ``Content-Range``): a browser seeks in the video without downloading it first.
From S3 the answer is a redirect (302) to a presigned URL: the bytes never pass through the API.
The live playlist is served by the API itself (players resolve its segments against its URL, so
those come back here too), its segments like the output.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse, Response

from lipfarm.common.errors import NotFoundError
from lipfarm.common.state import ApiToken, JobState
from lipfarm.common.storage import Storage
from lipfarm.common.storage.layout import checked_part
from lipfarm.api.auth import signed_or_reader
from lipfarm.api.context import Farm, farm
from lipfarm.api.errors import ApiError, documented
from lipfarm.api.params import ID_PATTERN, JOB_ID
from lipfarm.api.signing import live_folder

router = APIRouter(prefix="/v1/jobs", tags=["output"])
_MEDIA = {".mp4": "video/mp4", ".ts": "video/mp2t", ".m3u8": "application/vnd.apple.mpegurl"}
_PLAYER = {200: {"description": "The file (206 for a Range request)", "content": {"video/mp4": {}}},
           302: {"description": "S3 storage: a presigned URL of the file"}}
# the live folder holds the playlist and its segments: each served with its own type
_LIVE = {**_PLAYER, 200: {"description": "The playlist, or one of its segments (206 for a Range request)",
                          "content": {media: {} for media in sorted(set(_MEDIA.values()))}}}


def _serve(storage: Storage, key: str, *, cache: str) -> Response:
    media = _MEDIA.get(key[key.rfind("."):], "application/octet-stream")
    local = storage.local_path(key)
    if local is None:
        return RedirectResponse(storage.location(key), status_code=302)
    if not local.is_file():
        raise NotFoundError(f"no object '{key}' in {storage.url}")
    return FileResponse(local, media_type=media, content_disposition_type="inline",
                        filename=key.rsplit("/", 1)[-1], headers={"Cache-Control": cache})


@router.get("/{job_id}/output", summary="A done job's video (a signed URL or a token)", response_class=Response,
            responses={**_PLAYER, **documented(401, 404, 409, 422, 429, 503)})
def job_output(job_id: str = JOB_ID, token: ApiToken | None = Depends(signed_or_reader),
               the_farm: Farm = Depends(farm)):
    record = the_farm.owned(job_id, token)
    if record.state != JobState.DONE or not record.output_key:
        raise ApiError(409, f"job {job_id} is {record.state.value}: it has no output yet", field="job_id")
    return _serve(the_farm.storage_at(record.storage_url), record.output_key, cache="private, max-age=3600")


@router.get("/{job_id}/live/{expires}/{signature}/{name}", summary="A file of a job's live HLS playlist",
            response_class=Response, responses={**_LIVE, **documented(401, 404, 422, 429, 503)})
def live_file(job_id: str = JOB_ID, expires: int = PathParam(ge=0), signature: str = PathParam(max_length=128),
              name: str = PathParam(pattern=ID_PATTERN),
              the_farm: Farm = Depends(farm)):
    """The playlist (or one of its segments) whose URL ``playlist_url`` of the job's JSON gave."""
    if not the_farm.signer().valid(live_folder(job_id), expires, signature, now=time.time()):
        raise ApiError(401, "the signed URL is invalid or has expired: fetch the job again for a fresh one",
                       field="signature")
    status = the_farm.store().status(checked_part(job_id, "job_id"))
    playlist = getattr(status, "playlist_key", "") or ""
    if not playlist:
        raise NotFoundError(f"job {job_id} has no live playlist")
    key = f"{playlist.rsplit('/', 1)[0]}/{checked_part(name, 'name')}"
    storage = the_farm.storage_at(the_farm.store().job(job_id).storage_url)
    if key == playlist:  # changes as chunks commit: served here, never cached
        return Response(storage.get_bytes(key), media_type=_MEDIA[".m3u8"], headers={"Cache-Control": "no-store"})
    return _serve(storage, key, cache="private, max-age=86400")
