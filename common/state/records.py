"""What the state store keeps about jobs and chunks, as typed records, and the moves between states.

Records live in Redis hashes as strings; ``JobRecord.from_hash`` / ``ChunkRecord.from_hash`` parse
them once into typed values, and ``JobRecord.to_hash`` writes one whole. The Lua scripts of
``common.state.scripts`` update single fields (counters, states) in place under the same names.

``JOB_MOVES`` and ``CHUNK_MOVES`` are the allowed state changes. Job moves made from Python are
checked against ``JOB_MOVES`` by the job-move script; every chunk move is made by a script, and
tests/test_state_machine.py drives every script from every state and fails if one makes a move the
table does not list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum

from lipfarm.common import defaults
from lipfarm.common.errors import ServiceError
from lipfarm.common.storage.layout import playlist_key

JOB_RECORD_VERSION = 1
DEFAULT_TENANT = "default"  # the tenant of every job and token made before tenants existed


class JobState(str, Enum):
    QUEUED = "queued"
    PLANNING = "planning"
    RENDERING = "rendering"
    FINALIZING = "finalizing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Ended: nothing more happens to the job unless a user resumes it (failed or cancelled)."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class ChunkState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_MOVES: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PLANNING, JobState.FAILED, JobState.CANCELLED}),
    # planning -> planning: a second planner takes over one that died (planning is idempotent)
    JobState.PLANNING: frozenset({JobState.PLANNING, JobState.RENDERING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RENDERING: frozenset({JobState.FINALIZING, JobState.FAILED, JobState.CANCELLED}),
    # finalizing -> rendering: the finalizer found a segment that failed its check; it is rendered again
    JobState.FINALIZING: frozenset({JobState.RENDERING, JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    # failed/cancelled -> queued or rendering: resumed by a user (planned again if it never was)
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.RENDERING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.RENDERING}),
}

CHUNK_MOVES: dict[ChunkState, frozenset[ChunkState]] = {
    ChunkState.QUEUED: frozenset({ChunkState.RUNNING, ChunkState.FAILED, ChunkState.CANCELLED}),
    # running -> running: an attempt whose lease expired is taken over by a new one
    ChunkState.RUNNING: frozenset({ChunkState.RUNNING, ChunkState.QUEUED, ChunkState.COMMITTED,
                                   ChunkState.FAILED, ChunkState.CANCELLED}),
    # committed -> queued: its segment failed the finalizer's check (missing, wrong size or hash)
    ChunkState.COMMITTED: frozenset({ChunkState.QUEUED, ChunkState.FAILED}),
    # failed/cancelled -> queued: its job was resumed
    ChunkState.FAILED: frozenset({ChunkState.QUEUED}),
    ChunkState.CANCELLED: frozenset({ChunkState.QUEUED}),
}


class Verdict(str, Enum):
    """What the store answers to a move: the outcome, as the scripts spell it."""

    OK = "ok"  # done as asked
    COMPLETE = "complete"  # a commit that completed its job: the caller queues the finalizer
    DUPLICATE = "duplicate"  # the chunk was committed already (a redelivered message)
    STALE = "stale"  # the caller's attempt no longer owns the chunk
    REFUSED = "refused"  # the job is not in a state that allows it (cancelled, failed)
    SKIP = "skip"  # nothing to do (running elsewhere, already ended, no such chunk)
    LATER = "later"  # a claim before the chunk's retry delay ran out: queue it again for then
    FAILED = "failed"  # the chunk, and its job, failed
    REQUEUED = "requeued"  # the chunk went back to the queue
    RELEASED = "released"  # handed back without spending the attempt
    STOPPED = "stopped"  # the job ended meanwhile; the chunk stopped with it
    LOST = "lost"  # a heartbeat from an attempt that no longer owns its chunk


def _number(value: str | None, kind=float):
    return kind(value) if value not in (None, "") else None


@dataclass(frozen=True)
class JobRecord:
    """A job as the state store keeps it. Times are Unix seconds."""

    job_id: str
    state: JobState
    priority: str
    avatar: str
    audio: str
    storage_url: str
    created_at: float
    updated_at: float
    rendering_at: float | None = None
    finished_at: float | None = None
    chunks_total: int = 0
    chunks_committed: int = 0
    frames_total: int = 0
    frames_committed: int = 0
    output_key: str = ""
    output_location: str = ""
    reason: str = ""
    finalize_enqueued_at: float | None = None
    finalize_attempt: int = 0
    finalizer: str = ""  # the worker finalizing it now
    playlist_chunks: int = 0  # chunks its HLS playlist lists (the committed ones from the start)
    playable_frames: int = 0  # frames those chunks hold
    first_playable_at: float | None = None
    half_playable_at: float | None = None
    rebuilt_at: float | None = None
    tenant: str = DEFAULT_TENANT  # whose job (the API token's tenant); records from before tenants read as default
    version: int = JOB_RECORD_VERSION

    @classmethod
    def queued(cls, submission, storage_url: str, *, now: float | None = None) -> "JobRecord":
        """The record of a job just submitted (or rebuilt at ``now``) from its ``Submission``."""
        return cls(job_id=submission.job_id, state=JobState.QUEUED, priority=submission.priority,
                   avatar=submission.avatar_name, audio=submission.audio_name, storage_url=storage_url,
                   created_at=submission.submitted_at,
                   updated_at=submission.submitted_at if now is None else now,
                   tenant=getattr(submission, "tenant", "") or DEFAULT_TENANT)

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> "JobRecord":
        version = _number(data.get("version"), int)
        if version != JOB_RECORD_VERSION:
            raise ServiceError(f"job record '{data.get('job_id', '?')}' in Redis has an unknown version "
                               f"(expected {JOB_RECORD_VERSION}, found {version})")
        values: dict = {}
        for spec in fields(cls):
            raw = data.get(spec.name)
            if spec.name == "state":
                values["state"] = JobState(raw)
            elif spec.type in ("int", "float", "float | None"):
                number = _number(raw, int if spec.type == "int" else float)
                if number is not None:
                    values[spec.name] = number
            elif raw is not None:
                values[spec.name] = raw
        return cls(**values)

    def to_hash(self) -> dict[str, str]:
        out = {}
        for name, value in asdict(self).items():
            if value is None:
                continue
            out[name] = value.value if isinstance(value, Enum) else repr(value) if isinstance(value, float) else str(value)
        return out


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk as the state store keeps it."""

    index: int
    state: ChunkState
    start_frame: int
    stop_frame: int
    attempt: int = 0  # the current (or last) attempt's number
    spent: int = 0  # attempts charged against the limit
    reopened: int = 0  # times its committed segment failed the finalizer's check
    worker: str = ""
    worker_started: str = ""  # the worker process's start time (tells a reused pid from the worker)
    token: str = ""
    reason: str = ""
    frames_done: int = 0
    peak_rss: int = 0
    started_at: float | None = None
    beat_at: float | None = None
    committed_at: float | None = None
    updated_at: float | None = None
    segment_key: str = ""
    segment_size: int = 0
    segment_sha256: str = ""
    hls_key: str = ""  # its HLS media segment
    hls_size: int = 0
    hls_sha256: str = ""
    lease_until: float | None = None  # the running attempt's lease deadline

    @classmethod
    def from_hash(cls, index: int, data: dict[str, str], *, lease_until: float | None = None) -> "ChunkRecord":
        values: dict = {"index": index, "state": ChunkState(data["state"]), "lease_until": lease_until}
        for spec in fields(cls):
            raw = data.get(spec.name)
            if spec.name in values or raw is None:
                continue
            if spec.type == "int":
                values[spec.name] = int(raw or 0)
            elif spec.type == "float | None":
                values[spec.name] = _number(raw)
            else:
                values[spec.name] = raw
        return cls(**values)

    @property
    def frames(self) -> int:
        return self.stop_frame - self.start_frame

    @property
    def frames_label(self) -> str:
        return f"{self.start_frame}-{self.stop_frame - 1}"


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt at a chunk, from its attempt log."""

    attempt: int
    worker: str
    started_at: float
    ended_at: float | None = None
    outcome: str = ""  # committed, requeued, failed, released, stopped, expired; "" while it runs
    reason: str = ""

    @classmethod
    def from_log(cls, events) -> list["AttemptRecord"]:
        attempts: dict[int, AttemptRecord] = {}
        for event in events:
            number = int(event["attempt"])
            if event["event"] == "started":
                attempts[number] = cls(number, event["worker"], float(event["at"]))
            elif number in attempts:
                attempts[number] = replace(attempts[number], ended_at=float(event["at"]), outcome=event["event"],
                                           reason=event.get("reason", ""))
        return [attempts[n] for n in sorted(attempts)]


@dataclass(frozen=True)
class RunningChunk:
    """A chunk being rendered, as a user following a job sees it."""

    index: int
    frames: str  # "250-499"
    worker: str
    attempt: int
    frames_done: int
    heartbeat_age_s: float
    lease_expired: bool  # its worker stopped beating: it will be taken back


@dataclass
class JobStatus:
    """What a user asks about a job: state, frames, chunks by state, time, output.

    Frames of running chunks count only while their lease is alive: an attempt whose worker died
    shows as an expired running chunk, not as progress. The estimate is the frames left at the rate
    of the job so far, so it grows while nothing progresses.
    """

    job_id: str
    state: JobState
    reason: str
    priority: str
    avatar: str
    audio: str
    created_at: float
    finished_at: float | None
    frames_total: int
    frames_done: int
    chunks: dict[str, int]
    elapsed_s: float
    eta_s: float | None
    output_key: str
    output_location: str
    workers: list[str] = field(default_factory=list)  # the workers rendering it now
    running: list[RunningChunk] = field(default_factory=list)
    playlist_key: str = ""  # its HLS playlist, once a chunk from the start is playable
    playable_until_s: float = 0.0  # how far a viewer can watch it now
    webhook: dict | None = None  # its webhook event's delivery (``WebhookRecord.to_dict``), if it has one
    tenant: str = DEFAULT_TENANT

    @classmethod
    def of(cls, job: JobRecord, chunks: list[ChunkRecord], *, now: float) -> "JobStatus":
        counts: dict[str, int] = {}
        for chunk in chunks:
            counts[chunk.state.value] = counts.get(chunk.state.value, 0) + 1
        running = [RunningChunk(c.index, c.frames_label, c.worker, c.attempt, c.frames_done,
                                round(now - (c.beat_at or c.started_at or now), 3),
                                c.lease_until is not None and c.lease_until <= now)
                   for c in chunks if c.state == ChunkState.RUNNING]
        live = [r for r in running if not r.lease_expired]
        frames_done = min(job.frames_total, job.frames_committed + sum(r.frames_done for r in live))
        eta = None
        started = job.rendering_at
        if job.state == JobState.RENDERING and started and frames_done > 0 and now > started:
            eta = (job.frames_total - frames_done) / (frames_done / (now - started))
        return cls(job_id=job.job_id, state=job.state, reason=job.reason, priority=job.priority,
                   avatar=job.avatar, audio=job.audio, created_at=job.created_at,
                   finished_at=job.finished_at, frames_total=job.frames_total, frames_done=frames_done,
                   chunks=counts, elapsed_s=(job.finished_at or now) - job.created_at, eta_s=eta,
                   output_key=job.output_key, output_location=job.output_location,
                   workers=sorted({r.worker for r in live}), running=running,
                   playlist_key=playlist_key(job.job_id) if job.playlist_chunks else "",
                   playable_until_s=round(job.playable_frames / defaults.FPS, 3), tenant=job.tenant)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["state"] = self.state.value
        return data


@dataclass(frozen=True)
class WebhookRecord:
    """A job's webhook event and how its delivery went (``common.webhooks``): what a user asks when
    a receiver says it heard nothing. Times are Unix seconds."""

    event_id: str
    type: str  # job.done, job.failed, job.cancelled
    url: str
    state: str  # pending (being delivered), delivered, failed (given up after LIPFARM_WEBHOOK_RETRY_S)
    created_at: float
    attempts: int = 0
    queued_at: float | None = None
    last_at: float | None = None
    last_status: int = 0  # the HTTP status of the last answer; 0: none (refused, timed out)
    last_error: str = ""
    next_at: float | None = None  # when the next attempt goes, while pending
    delivered_at: float | None = None
    log: tuple = ()  # each attempt: {attempt, at, status, error, duration_s, outcome}

    @classmethod
    def from_hash(cls, data: dict[str, str], log) -> "WebhookRecord":
        return cls(event_id=data["event_id"], type=data.get("type", ""), url=data.get("url", ""),
                   state=data.get("state", ""), created_at=float(data.get("created_at") or 0),
                   attempts=int(data.get("attempts") or 0), queued_at=_number(data.get("queued_at")),
                   last_at=_number(data.get("last_at")), last_status=int(float(data.get("last_status") or 0)),
                   last_error=data.get("last_error", ""), next_at=_number(data.get("next_at")),
                   delivered_at=_number(data.get("delivered_at")), log=tuple(log))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["log"] = list(self.log)
        return data


def redis_text(value) -> str:
    """A value as a script argument or hash field: floats in full (``repr``), the rest as text."""
    return repr(value) if isinstance(value, float) else str(value)
