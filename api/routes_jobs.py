"""``/v1/jobs``: submit, list, follow, cancel and resume jobs: the CLI's ``submit``, ``jobs``,
``status``, ``cancel`` and ``resume`` over HTTP, calling the same functions."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from lipfarm.common import defaults
from lipfarm.common.state import ApiToken, JobState
from lipfarm.api.audio_url import fetch_audio, storage_key
from lipfarm.api.auth import reader, writer
from lipfarm.api.context import Farm, farm
from lipfarm.api.errors import ApiError, documented
from lipfarm.api.listing import page_of_jobs
from lipfarm.api.public import public_base
from lipfarm.api.params import JOB_ID, JobFields, JobFromStorage, request_body_schema, validated
from lipfarm.api.schemas import Job, JobList, JobStateName
from lipfarm.api.submission import JobRequest, submit_request
from lipfarm.api.uploads import MB, read_form, read_json, upload_folder
from lipfarm.api.views import job_view
from lipfarm.scheduler.submit import safe_file_name

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def _job_request(request: Request, folder: Path, the_farm: Farm) -> JobRequest:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        limit = int(the_farm.settings.api_max_audio_mb * MB)
        form = await read_form(request, folder, file_limits={"audio": limit})
        audio = form.files.get("audio")
        if audio is None:
            raise ApiError(422, "audio: the form has no audio file", field="audio")
        named = audio.path.with_name(safe_file_name(audio.filename))
        audio.path.rename(named)
        return JobRequest(validated(JobFields, form.fields), audio_file=named, audio_sha256=audio.sha256)
    if content_type == "application/json":
        return await _json_request(validated(JobFromStorage, await read_json(request)), folder, the_farm)
    raise ApiError(415, "send multipart/form-data (an audio upload) or application/json (audio already in "
                        "the farm's storage as audio_key, or by URL as audio_url)", field="Content-Type")


async def _json_request(params, folder: Path, the_farm: Farm) -> JobRequest:
    """A JSON submission: audio named by ``audio_key``, or by ``audio_url`` (fetched now: ``api.audio_url``)."""
    if (params.audio_key is None) == (params.audio_url is None):
        field = "audio_url" if params.audio_key else "audio_key"
        raise ApiError(422, f"{field}: give audio_key or audio_url (one of them is required, not both)", field=field)
    if params.audio_key is not None:
        return JobRequest(params, audio_key=params.audio_key)
    key = storage_key(params.audio_url)
    if key is not None:
        return JobRequest(params, audio_key=key, audio_field="audio_url")
    path = await run_in_threadpool(fetch_audio, params.audio_url, folder, the_farm.settings)
    return JobRequest(params, audio_file=path, audio_sha256=await run_in_threadpool(_sha256, path),
                      audio_field="audio_url")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _view(the_farm: Farm, job_id: str, base: str) -> dict:
    return job_view(the_farm.store().status(job_id), the_farm.signer(), now=time.time(),
                    public=the_farm.redactor().text, base=base)


@router.post("", status_code=201, response_model=Job, summary="Submit a job",
             openapi_extra={"requestBody": request_body_schema()},
             responses={200: {"model": Job, "description": "The job an earlier request with this idempotency key "
                                                            "made, with the same parameters"},
                        **documented(401, 403, 404, 409, 413, 415, 422, 429, 503, 504)})
async def create_job(request: Request, response: Response,
                     idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=255),
                     token: ApiToken = Depends(writer), the_farm: Farm = Depends(farm),
                     base: str = Depends(public_base)) -> dict:
    """Render ``audio`` onto ``avatar``: a multipart upload (the ``audio`` file and the fields), or a
    JSON body naming audio already in the farm's storage (``audio_key``) or where to fetch it (``audio_url``:
    https, or ``storage:KEY``). Checked, uploaded and queued
    as by ``lipfarm submit``; nothing is queued on bad input."""
    with upload_folder(the_farm.settings) as folder:
        job_request = await _job_request(request, folder, the_farm)
        submitted = await run_in_threadpool(submit_request, the_farm, token, job_request, idempotency_key, base)
    response.status_code = 201 if submitted.created else 200
    return await run_in_threadpool(_view, the_farm, submitted.handle.job_id, base)


@router.get("", response_model=JobList, summary="List jobs, newest first (the token's tenant's; an admin's: all)",
            responses=documented(401, 422, 429, 503))
def list_jobs(state: JobStateName | None = Query(None, description="only jobs in this state"),
              limit: int = Query(defaults.API_PAGE_JOBS, ge=1, le=defaults.API_MAX_PAGE_JOBS),
              cursor: str | None = Query(None, max_length=512, description="next_cursor of the previous page"),
              token: ApiToken = Depends(reader), the_farm: Farm = Depends(farm),
              base: str = Depends(public_base)) -> dict:
    store, now = the_farm.store(), time.time()
    page = page_of_jobs(store, state=JobState(state) if state else None, limit=limit, cursor=cursor,
                        tenant=None if token.admin else token.tenant)
    signer = the_farm.signer()
    public = the_farm.redactor().text
    statuses = store.statuses(page.job_ids)
    return {"jobs": [job_view(status, signer, now=now, public=public, base=base) for status in statuses],
            "next_cursor": page.next_cursor}


@router.get("/{job_id}", response_model=Job, summary="A job's state and progress",
            responses=documented(401, 404, 422, 429, 503))
def get_job(job_id: str = JOB_ID, token: ApiToken = Depends(reader), the_farm: Farm = Depends(farm),
            base: str = Depends(public_base)) -> dict:
    """404 for another tenant's job, as for one that does not exist (an admin token sees all)."""
    return _view(the_farm, the_farm.owned(job_id, token).job_id, base)


@router.delete("/{job_id}", response_model=Job, summary="Cancel a job",
               responses=documented(401, 403, 404, 409, 422, 429, 503))
def cancel_job(job_id: str = JOB_ID, token: ApiToken = Depends(writer), the_farm: Farm = Depends(farm),
               base: str = Depends(public_base)) -> dict:
    """Running chunks stop at their next batch, queued ones are dropped; nothing is published.
    409 if the job had already ended."""
    handle = the_farm.handle(job_id, token)
    if not handle.cancel():
        raise ApiError(409, f"job {job_id} already ended: {handle.status().state.value}", field="job_id")
    return _view(the_farm, job_id, base)


@router.post("/{job_id}/resume", response_model=Job, summary="Go on with a failed or cancelled job",
             responses=documented(401, 403, 404, 409, 422, 429, 503))
def resume_job(job_id: str = JOB_ID, token: ApiToken = Depends(writer), the_farm: Farm = Depends(farm),
               base: str = Depends(public_base)) -> dict:
    """Its unfinished chunks are queued again (committed ones are kept). 409 unless it failed or was cancelled."""
    handle = the_farm.handle(job_id, token)
    state = handle.status().state
    if state not in (JobState.FAILED, JobState.CANCELLED):
        raise ApiError(409, f"job {job_id} is {state.value}: only a failed or cancelled job can be resumed",
                       field="job_id")
    handle.resume()
    return _view(the_farm, job_id, base)
