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

from common.errors import ServiceError

JOB_RECORD_VERSION = 1


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
    JobState.FINALIZING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

CHUNK_MOVES: dict[ChunkState, frozenset[ChunkState]] = {
    ChunkState.QUEUED: frozenset({ChunkState.RUNNING, ChunkState.FAILED, ChunkState.CANCELLED}),
    # running -> running: an attempt whose lease expired is taken over by a new one
    ChunkState.RUNNING: frozenset({ChunkState.RUNNING, ChunkState.QUEUED, ChunkState.COMMITTED,
                                   ChunkState.FAILED, ChunkState.CANCELLED}),
    ChunkState.COMMITTED: frozenset(),
    ChunkState.FAILED: frozenset(),
    ChunkState.CANCELLED: frozenset(),
}


class Verdict(str, Enum):
    """What the store answers to a move: the outcome, as the scripts spell it."""

    OK = "ok"  # done as asked
    COMPLETE = "complete"  # a commit that completed its job: the caller queues the finalizer
    DUPLICATE = "duplicate"  # the chunk was committed already (a redelivered message)
    STALE = "stale"  # the caller's attempt no longer owns the chunk
    REFUSED = "refused"  # the job is not in a state that allows it (cancelled, failed)
    SKIP = "skip"  # nothing to do (running elsewhere, already ended, no such chunk)
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
    rebuilt_at: float | None = None
    version: int = JOB_RECORD_VERSION

    @classmethod
    def queued(cls, submission, storage_url: str, *, now: float | None = None) -> "JobRecord":
        """The record of a job just submitted (or rebuilt at ``now``) from its ``Submission``."""
        return cls(job_id=submission.job_id, state=JobState.QUEUED, priority=submission.priority,
                   avatar=submission.avatar_name, audio=submission.audio_name, storage_url=storage_url,
                   created_at=submission.submitted_at,
                   updated_at=submission.submitted_at if now is None else now)

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
    worker: str = ""
    token: str = ""
    reason: str = ""
    frames_done: int = 0
    peak_rss: int = 0
    started_at: float | None = None
    beat_at: float | None = None
    committed_at: float | None = None
    updated_at: float | None = None

    @classmethod
    def from_hash(cls, index: int, data: dict[str, str]) -> "ChunkRecord":
        return cls(index=index, state=ChunkState(data["state"]),
                   start_frame=int(data.get("start_frame") or 0), stop_frame=int(data.get("stop_frame") or 0),
                   attempt=int(data.get("attempt") or 0), spent=int(data.get("spent") or 0),
                   worker=data.get("worker", ""),
                   token=data.get("token", ""), reason=data.get("reason", ""),
                   frames_done=int(data.get("frames_done") or 0), peak_rss=int(data.get("peak_rss") or 0),
                   started_at=_number(data.get("started_at")), beat_at=_number(data.get("beat_at")),
                   committed_at=_number(data.get("committed_at")), updated_at=_number(data.get("updated_at")))

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


@dataclass
class JobStatus:
    """What a user asks about a job: state, frames, chunks by state, time, output."""

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
    workers: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, job: JobRecord, chunks: list[ChunkRecord], *, now: float) -> "JobStatus":
        counts: dict[str, int] = {}
        for chunk in chunks:
            counts[chunk.state.value] = counts.get(chunk.state.value, 0) + 1
        in_flight = sum(c.frames_done for c in chunks if c.state == ChunkState.RUNNING)
        frames_done = min(job.frames_total, job.frames_committed + in_flight)
        eta = None
        started = job.rendering_at
        if job.state == JobState.RENDERING and started and frames_done > 0 and now > started:
            eta = (job.frames_total - frames_done) / (frames_done / (now - started))
        return cls(job_id=job.job_id, state=job.state, reason=job.reason, priority=job.priority,
                   avatar=job.avatar, audio=job.audio, created_at=job.created_at,
                   finished_at=job.finished_at, frames_total=job.frames_total, frames_done=frames_done,
                   chunks=counts, elapsed_s=(job.finished_at or now) - job.created_at, eta_s=eta,
                   output_key=job.output_key, output_location=job.output_location,
                   workers=sorted({c.worker for c in chunks if c.worker}))

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["state"] = self.state.value
        return data
