"""The API's answers as pydantic models: they validate what the routes return and, through FastAPI,
write the OpenAPI document (docs/openapi.json) that clients, schemathesis and the jobs page rely on.

``Job`` is exactly what the jobs page (static/app.js) reads; its fields come from ``JobStatus``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from lipfarm.common.state import JobState

JobStateName = Literal[tuple(state.value for state in JobState)]  # type: ignore[valid-type]


class ErrorDetail(BaseModel):
    code: str = Field(description="for programs: invalid, not_found, conflict, too_large, unauthorized, ...")
    message: str = Field(description="one line for people, naming the file or field, expected and found")
    field: str | None = Field(description="the request field at fault, where there is one")


class ErrorBody(BaseModel):
    error: ErrorDetail


class RunningChunk(BaseModel):
    index: int
    frames: str = Field(description='the chunk\'s frames, inclusive: "250-499"')
    worker: str
    attempt: int
    frames_done: int
    heartbeat_age_s: float
    lease_expired: bool = Field(description="its worker stopped beating: it will be taken back")


class Webhook(BaseModel):
    event_id: str = Field(description="stable across attempts: receivers deduplicate by it")
    type: str = Field(description="job.done, job.failed or job.cancelled")
    url: str
    state: Literal["pending", "delivered", "failed"] = Field(description="failed: given up after LIPFARM_WEBHOOK_RETRY_S")
    attempts: int
    last_status: int = Field(description="the HTTP status of the last answer; 0 when there was none")
    last_error: str = Field(description='"" when a receiver answered; otherwise "no HTTP answer" or '
                                        '"refused: not a public address" (never an error\'s own text: it would map '
                                        'the farm\'s network)')
    next_at: float | None = Field(description="when the next attempt goes, while pending (Unix seconds)")
    next_at_iso: str | None = Field(description="next_at as ISO 8601 UTC")
    delivered_at: float | None = Field(description="Unix seconds")
    delivered_at_iso: str | None = Field(description="delivered_at as ISO 8601 UTC")


class Job(BaseModel):
    id: str
    tenant: str = Field(description="whose job: the tenant of the token that submitted it")
    state: JobStateName
    priority: str
    avatar: str
    audio: str
    created_at: float = Field(description="Unix seconds")
    created_at_iso: str = Field(description='created_at as ISO 8601 UTC: "2026-12-06T17:16:47.123Z"')
    finished_at: float | None = Field(description="Unix seconds, once it ended")
    finished_at_iso: str | None = Field(description="finished_at as ISO 8601 UTC")
    elapsed_s: float
    eta_s: float | None = Field(description="at the job's pace so far; null until it is known")
    frames_done: int
    frames_total: int = Field(description="0 until the job is planned")
    chunks: dict[str, int] = Field(description="chunks by state")
    reason: str = Field(description="why it failed or was cancelled")
    output_url: str | None = Field(description="an absolute signed URL of the output (no token needed), once done")
    playlist_url: str | None = Field(description="an absolute signed URL of its HLS playlist while it renders, where "
                                                           "there is one")
    playable_until_s: float = Field(description="how far the playlist can be watched now")
    running: list[RunningChunk]
    webhook: Webhook | None = Field(description="how telling its webhook URL of its end went, once it ended")


class JobList(BaseModel):
    jobs: list[Job] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class Avatar(BaseModel):
    name: str
    frames: int
    width: int
    height: int
    size: str = Field(description='"1280x720"')
    hash: str = Field(description="the content hash: frames, rects and size")
    layout: str = Field(description="what it was imported from")


class AvatarCreated(Avatar):
    pairing: str = Field(description="which frame went with which landmarks or rect")


class AvatarList(BaseModel):
    avatars: list[Avatar]


class Model(BaseModel):
    sha256: str
    kind: Literal["encoder", "generator"]
    size: int = Field(description="bytes")


class ModelList(BaseModel):
    models: list[Model]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(description='"ok", or why the service does not answer')
    clock_drift_s: float | None = Field(None, description="this API host's clock minus Redis's, in seconds")
    warnings: list[str] = Field(default_factory=list, description="what is worth a look though the API serves")
