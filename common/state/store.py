"""``StateStore``: the one door to lipfarm's state in Redis. Nothing else reads or writes its keys.

Every move is one Lua script (``common.state.scripts``), a single atomic step with its checks:

- chunks: ``claim`` (queued -> running, with an ownership token and a lease; an expired attempt, or
  one whose process is known dead, is taken over), ``beat`` (renew the lease, report progress),
  ``commit`` (only the current token; idempotent; the commit that completes the job answers
  COMPLETE and its caller queues the finalizer), ``requeue`` (an expired or dead attempt goes
  back), ``fail`` (retryable errors requeue while attempts remain, others fail the chunk and its
  job), ``release`` (a worker shutting down hands the chunk back), ``reopen`` (a committed chunk
  whose segment failed its check is rendered again);
- the finalizer holds a lease with a token too: ``take_finalizer``, ``beat_finalizer``,
  ``finish_done``, ``release_finalizer``;
- jobs: ``start_planning``, ``start_rendering``, ``finish`` (failed), ``cancel``. A job that ends
  ends with all its chunks in one step, and goes to an outbox of ends that storage has not
  recorded yet (``unrecorded_job_ids``), so no end is lost between Redis and storage;
  ``forget_ended`` removes ended jobs whose end storage holds, after ``LIPFARM_JOB_RETENTION_S``.

A Redis that cannot be reached raises ``ServiceError`` naming it, from every verb: callers that
must ride out an outage catch one kind of error. Time is Redis's clock (``now()``, Redis's TIME):
the farm's hosts never compare their own clocks, so one that is minutes off neither fails nor delays
a healthy job. Every verb takes ``now`` as an optional parameter, so tests can move time and never
sleep; reads have no side effects, but one: with a recall set (the CLI's and the API's
store), asking for a job that left Redis restores it from its ``ended.json``.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable

import redis

from lipfarm.common.errors import NotFoundError, ServiceError
from lipfarm.common.retry import retry_delay_s
from lipfarm.common.state import scripts
from lipfarm.common.state.connection import mask_url, redis_failure, redis_tls_options, url_without_tls_params
from lipfarm.common.state.keys import Keys
from lipfarm.common.state.records import (JOB_MOVES, AttemptRecord, ChunkRecord, ChunkState, JobRecord, JobState,
                                  JobStatus, Verdict, WebhookRecord)

SCRIPTS = ("claim", "claim_next", "offer", "beat", "commit", "requeue", "fail", "release", "reopen", "take_finalize",
           "beat_finalize", "finish_done", "release_finalize", "job_move", "resume",
           "observe", "first_commit", "webhook_open", "webhook_begin", "webhook_end", "forget")


@dataclass(frozen=True)
class Claim:
    """The answer to a claim (of a chunk or of a job's finalizer)."""

    verdict: Verdict  # OK, SKIP, LATER (``detail``: seconds to wait) or FAILED
    detail: str = ""
    token: str = ""
    attempt: int = 0
    owner: str = ""  # on SKIP because another attempt runs: its worker, process start, token
    owner_started: str = ""
    owner_token: str = ""
    job_id: str = ""  # what a lane's slot was bound to (claim_next)
    index: int = -1

    @property
    def ok(self) -> bool:
        return self.verdict == Verdict.OK


@dataclass(frozen=True)
class Move:
    """The answer to a chunk move that may requeue: the verdict, the attempts spent so far, and on
    REQUEUED how long the next attempt waits (the retry rule; a claim before then is told LATER)."""

    verdict: Verdict
    detail: str = ""
    spent: int = 0
    delay_s: float = 0.0


@dataclass(frozen=True)
class Resumed:
    """The answer to resuming a job: the chunks queued again, or that it must be planned again."""

    verdict: Verdict
    queued: list[int] = field(default_factory=list)
    replan: bool = False
    detail: str = ""


@dataclass(frozen=True)
class Segment:
    """A chunk's rendered segment (and its HLS media segment) as its commit records them."""

    key: str
    size: int
    sha256: str
    hls_key: str = ""
    hls_size: int = 0
    hls_sha256: str = ""


@dataclass(frozen=True)
class Lease:
    """A running attempt (of a chunk, or a job's finalizer) and who holds it."""

    job_id: str
    index: int | None  # None: the finalizer
    worker: str
    worker_started: str
    token: str


class Damage(str, Enum):
    """State that Redis lost part of (a failover, a key deleted by hand): the recovery pass repairs it."""

    RECORD_LOST = "record lost"  # listed among the jobs, its record gone
    NOT_ACTIVE = "not active"  # unfinished, but missing from the active set the recovery pass reads
    CHUNKS_LOST = "chunks lost"  # rendering or finalizing with some chunk records gone


class Stall(str, Enum):
    """Why a job is not moving on its own."""

    FINALIZER_NOT_QUEUED = "finalizer not queued"  # all chunks committed, the finalize message lost
    FINALIZER_DIED = "finalizer died"  # finalizing, and nobody holds its finalize lease
    PLAN_LOST = "plan lost"  # queued or planning for too long: the plan message or its planner lost


@dataclass(frozen=True)
class StalledJob:
    job: JobRecord
    stall: Stall


def _retry_schedule(max_attempts: int, *, worker_lost: bool) -> str:
    """The retry rule as the requeueing scripts take it: the delay after each count of attempts spent."""
    return ",".join(repr(retry_delay_s(spent, worker_lost=worker_lost)) for spent in range(max_attempts + 1))


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _guarded(method):
    """Redis errors out of ``method`` become one ``ServiceError`` naming the server."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError) as exc:
            raise ServiceError(f"cannot reach Redis at {self.where} ({exc.__class__.__name__}: {exc})") from None
        except (redis.OutOfMemoryError, redis.exceptions.ExecAbortError) as exc:  # full, and it evicts nothing
            raise ServiceError(f"Redis at {self.where} refused a write: {' '.join(str(exc).split())[:200]} "
                               "(raise its maxmemory or free memory)") from None

    return guarded


class StateStore:
    """Job and chunk records in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, where: str = "") -> None:
        self.redis = client
        self.keys = keys
        kwargs = client.connection_pool.connection_kwargs
        self.where = where or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
        self._scripts = {name: client.register_script(getattr(scripts, name.upper())) for name in SCRIPTS}
        # Where an ended job that left Redis (LIPFARM_JOB_RETENTION_S) is found again: job id -> its
        # ended.json snapshot, or None. Set by the CLI and the API (``recall_ended_from``); workers need none.
        self._recall: Callable[[str], dict | None] | None = None

    def recall_ended_from(self, recall: Callable[[str], dict | None]) -> "StateStore":
        """Bring back, on first ask, an ended job that left Redis, from what ``recall`` finds in storage."""
        self._recall = recall
        return self

    @classmethod
    def connect(cls, url: str, prefix: str, *, tls_ca_file: str = "") -> "StateStore":
        """Connect (``redis://``, or ``rediss://`` over TLS) and ping, or ``ServiceError`` saying why in
        one line (unreachable, credentials refused, TLS failed), the password masked. Fails fast."""
        client = redis.Redis.from_url(url_without_tls_params(url), socket_connect_timeout=3, socket_timeout=10,
                                      health_check_interval=30, decode_responses=True,
                                      **redis_tls_options(url, tls_ca_file))
        try:
            client.ping()
        except redis.RedisError as exc:
            raise ServiceError(redis_failure(url, exc)) from None
        return cls(client, Keys(prefix), where=mask_url(url))

    # --- calling the scripts ----------------------------------------------------------------------

    @_guarded
    def now(self) -> float:
        """Redis's clock, in Unix seconds. Every lease, retry delay, stall and retention time is
        measured on it, so a host whose clock is off neither fails nor delays anyone's work."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def _at(self, now: float | None) -> float:
        """``now`` when a caller (a test) gives one, else Redis's clock."""
        return self.now() if now is None else now

    def clock_drift(self) -> float:
        """How far this host's clock is ahead of Redis's (negative: behind), in seconds; the
        round trip's half is taken off, so the figure is good to a few milliseconds."""
        sent = time.time()
        redis_now = self.now()
        return (sent + time.time()) / 2 - redis_now

    def _call(self, name: str, job_id: str, index, now: float | None, *args) -> list[str]:
        now = self._at(now)
        keys = self.keys
        chunk = keys.chunk(job_id, index) if isinstance(index, int) else ""
        log = keys.attempts(job_id, index if isinstance(index, int) else "finalize")
        prefixes = f"{keys.chunk(job_id, '')} {keys.attempts(job_id, '')} {keys.prefix}"
        result = self._scripts[name](
            keys=[keys.job(job_id), chunk, keys.leases(), keys.active(), log, keys.unrecorded(),
                  keys.finalize_leases(), keys.metrics_totals()],
            args=[job_id, index if isinstance(index, int) else "finalize", repr(now), prefixes, *args])
        return [result] if isinstance(result, str) else [str(part) for part in result]

    @staticmethod
    def _claim(result: list[str], token: str) -> Claim:
        if result[0] == Verdict.OK:
            return Claim(Verdict.OK, token=token, attempt=int(result[1]))
        owner = result[2:5] if len(result) >= 5 else ["", "", ""]
        return Claim(Verdict(result[0]), result[1] if len(result) > 1 else "", owner=owner[0],
                     owner_started=owner[1], owner_token=owner[2])

    # --- chunk moves ------------------------------------------------------------------------------

    @_guarded
    def claim(self, job_id: str, index: int, *, worker: str, now: float | None = None, lease_s: float,
              max_attempts: int, worker_started: str = "") -> Claim:
        """Claim a chunk: a new attempt, or a SKIP naming the attempt that holds it."""
        now = self._at(now)
        token = secrets.token_hex(8)
        return self._claim(self._call("claim", job_id, index, now, worker, token, repr(now + lease_s),
                                      max_attempts, worker_started), token)

    @_guarded
    def offer(self, job_id: str, indexes: list[int], *, now: float | None = None) -> int:
        """Offer a rendering job's chunks in its priority's lane; the caller sends one slot message
        (``claim_next``) per chunk offered. Returns how many were (0 if the job is not rendering)."""
        if not indexes:
            return 0
        return int(self._call("offer", job_id, None, now, *indexes)[0])

    @_guarded
    def claim_next(self, priority: str, *, worker: str, now: float | None = None, lease_s: float,
                   max_attempts: int, worker_started: str = "") -> Claim:
        """Bind a slot of ``priority``'s lane to the chunk fair share picks, and claim it: the
        claim names the chunk (``job_id``, ``index``); SKIP when nothing waits in the lane."""
        now = self._at(now)
        token = secrets.token_hex(8)
        result = self._call("claim_next", "", None, now, worker, token, repr(now + lease_s), max_attempts,
                            worker_started, priority)
        if result[0] == "empty":
            return Claim(Verdict.SKIP, f"nothing waits in the {priority} lane")
        claim = self._claim(result[:-2], token)
        return replace(claim, job_id=result[-2], index=int(result[-1]))

    @_guarded
    def set_tenant_weight(self, tenant: str, weight: float) -> None:
        """A tenant's weight in the fair share of workers (each busy tenant gets weight / sum of
        the busy tenants' weights); takes effect at the next claim."""
        if not weight > 0:
            raise ValueError(f"a tenant's weight must be above 0, not {weight}")
        self.redis.hset(self.keys.tenant_weights(), tenant, repr(float(weight)))

    @_guarded
    def beat(self, job_id: str, index: int, token: str, *, now: float | None = None, lease_s: float,
             frames_done: int, peak_rss: int = 0) -> Verdict:
        now = self._at(now)
        return Verdict(self._call("beat", job_id, index, now, token, repr(now + lease_s), frames_done, peak_rss)[0])

    @_guarded
    def commit(self, job_id: str, index: int, token: str, *, frames: int, segment: Segment, now: float | None = None) -> Verdict:
        now = self._at(now)
        return Verdict(self._call("commit", job_id, index, now, token, frames, segment.key, segment.size,
                                  segment.sha256, segment.hls_key, segment.hls_size, segment.hls_sha256)[0])

    @_guarded
    def requeue(self, job_id: str, index: int, *, now: float | None = None, reason: str, max_attempts: int,
                dead_token: str = "") -> Move:
        """Requeue an attempt whose lease expired, or (``dead_token``) whose process is known dead."""
        now = self._at(now)
        return self._move(self._call("requeue", job_id, index, now, reason, max_attempts, dead_token,
                                     _retry_schedule(max_attempts, worker_lost=True)))

    @_guarded
    def fail(self, job_id: str, index: int, token: str, *, reason: str, retryable: bool, now: float | None = None,
             max_attempts: int) -> Move:
        now = self._at(now)
        return self._move(self._call("fail", job_id, index, now, token, reason, int(retryable), max_attempts,
                                     _retry_schedule(max_attempts, worker_lost=False)))

    @_guarded
    def release(self, job_id: str, index: int, token: str, *, reason: str, now: float | None = None) -> Verdict:
        now = self._at(now)
        return Verdict(self._call("release", job_id, index, now, token, reason)[0])

    @_guarded
    def reopen(self, job_id: str, index: int, *, reason: str, now: float | None = None, max_reopens: int) -> Verdict:
        """A committed chunk whose segment failed its check goes back to the queue (see the script)."""
        now = self._at(now)
        return Verdict(self._call("reopen", job_id, index, now, reason, max_reopens)[0])

    @staticmethod
    def _move(result: list[str]) -> Move:
        return Move(Verdict(result[0]), result[1] if len(result) > 1 else "",
                    int(result[2]) if len(result) > 2 and result[2] else 0,
                    float(result[3]) if len(result) > 3 else 0.0)

    @_guarded
    def is_current(self, job_id: str, index: int, token: str) -> bool:
        """Whether ``token`` still owns a running chunk of a rendering job (a cheap read)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.chunk(job_id, index), "state", "token")
            pipe.hget(self.keys.job(job_id), "state")
            (state, owner), job_state = pipe.execute()
        return state == ChunkState.RUNNING and owner == token and job_state == JobState.RENDERING

    # --- the finalizer ----------------------------------------------------------------------------

    @_guarded
    def take_finalizer(self, job_id: str, *, worker: str, now: float | None = None, lease_s: float,
                       worker_started: str = "", take_over: str = "") -> Claim:
        """Become the job's one finalizer (a lease with a token, renewed by ``beat_finalizer``)."""
        now = self._at(now)
        token = secrets.token_hex(8)
        return self._claim(self._call("take_finalize", job_id, None, now, worker, token, repr(now + lease_s),
                                      worker_started, take_over), token)

    @_guarded
    def beat_finalizer(self, job_id: str, token: str, *, now: float | None = None, lease_s: float) -> Verdict:
        now = self._at(now)
        return Verdict(self._call("beat_finalize", job_id, None, now, token, repr(now + lease_s))[0])

    @_guarded
    def finish_done(self, job_id: str, token: str, *, output_location: str, now: float | None = None) -> Verdict:
        """The finalizer publishes: the job is done (refused if it was cancelled meanwhile)."""
        now = self._at(now)
        return Verdict(self._call("finish_done", job_id, None, now, token, output_location)[0])

    @_guarded
    def release_finalizer(self, job_id: str, token: str, *, outcome: str, reason: str, now: float | None = None) -> Verdict:
        """Give up the finalize lease: ``outcome`` is 'reopened' (chunks to render again) or 'released'."""
        now = self._at(now)
        return Verdict(self._call("release_finalize", job_id, None, now, token, outcome, reason)[0])

    @_guarded
    def expire_finalizer(self, job_id: str, token: str) -> None:
        """The finalizer holding ``token`` is known dead: let the next finalizer take over at once."""
        if self.redis.hget(self.keys.job(job_id), "finalizer_token") == token:
            self.redis.zadd(self.keys.finalize_leases(), {job_id: 0}, xx=True)

    @_guarded
    def finalize_attempts(self, job_id: str) -> list[AttemptRecord]:
        return self._attempt_log(self.keys.attempts(job_id, "finalize"))

    # --- job moves --------------------------------------------------------------------------------

    @_guarded
    def create_job(self, record: JobRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.job(record.job_id), mapping=record.to_hash())
            pipe.zadd(self.keys.jobs(), {record.job_id: record.created_at})
            if not record.state.terminal:
                pipe.sadd(self.keys.active(), record.job_id)
            pipe.execute()

    @_guarded
    def withdraw(self, job_id: str) -> None:
        """Remove a job whose submission failed before it was queued (deletes free memory: allowed
        even in a full Redis, outside MULTI, which a full Redis refuses whole)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.job(job_id))
            pipe.zrem(self.keys.jobs(), job_id)
            pipe.srem(self.keys.active(), job_id)
            pipe.execute()

    def _job_move(self, job_id: str, to: JobState, *, now: float | None = None, reason: str = "",
                  fields: dict | None = None) -> bool:
        """Move a job along ``JOB_MOVES``; False if its current state does not allow the move."""
        now = self._at(now)
        allowed = ",".join(s.value for s, targets in JOB_MOVES.items() if to in targets)
        extra = [_text(x) for pair in (fields or {}).items() for x in pair]
        result = self._call("job_move", job_id, None, now, to.value, allowed, reason, *extra)
        if result[0] == "missing":
            raise NotFoundError(f"unknown job '{job_id}'")
        return result[0] == Verdict.OK

    @_guarded
    def start_planning(self, job_id: str, *, now: float | None = None) -> bool:
        now = self._at(now)
        return self._job_move(job_id, JobState.PLANNING, now=now)

    @_guarded
    def start_rendering(self, job_id: str, frame_ranges: list[tuple[int, int]], *, output_key: str,
                        now: float | None = None) -> bool:
        """Create the planned chunks (existing ones are kept: planning may run twice) and move to
        rendering; False if the job moved on meanwhile (cancelled)."""
        now = self._at(now)
        self._add_chunks(job_id, frame_ranges, now=now)
        return self._job_move(job_id, JobState.RENDERING, now=now, fields={"output_key": output_key})

    @_guarded
    def finish(self, job_id: str, state: JobState, *, now: float | None = None, reason: str) -> bool:
        """End a job that has not ended as failed, with the reason (its chunks stop with it)."""
        now = self._at(now)
        if state != JobState.FAILED:
            raise ValueError(f"finish() ends a job as failed, not {state.value}: see finish_done and cancel")
        return self._job_move(job_id, state, now=now, reason=reason)

    @_guarded
    def resume(self, job_id: str, *, now: float | None = None) -> Resumed:
        """Resume a failed or cancelled job (see the script); REFUSED names the state it is in."""
        now = self._at(now)
        result = self._call("resume", job_id, None, now)
        if result[0] == "missing":
            raise NotFoundError(f"unknown job '{job_id}'")
        if result[0] == "replan":
            return Resumed(Verdict.OK, replan=True)
        if result[0] == Verdict.REFUSED:
            return Resumed(Verdict.REFUSED, detail=result[1])
        return Resumed(Verdict.OK, queued=[int(i) for i in result[1:]])

    @_guarded
    def cancel(self, job_id: str, *, now: float | None = None, reason: str = "cancelled by user") -> bool:
        """Cancel a job that has not ended; its chunks stop with it. False if it had ended."""
        now = self._at(now)
        return self._job_move(job_id, JobState.CANCELLED, now=now, reason=reason)

    def _add_chunks(self, job_id: str, frame_ranges: list[tuple[int, int]], *, now: float | None = None) -> None:
        now = self._at(now)
        with self.redis.pipeline() as pipe:
            for index, (start, stop) in enumerate(frame_ranges):
                key = self.keys.chunk(job_id, index)
                pipe.hsetnx(key, "state", ChunkState.QUEUED.value)
                pipe.hsetnx(key, "attempt", 0)
                pipe.hsetnx(key, "spent", 0)
                pipe.hset(key, mapping={"start_frame": start, "stop_frame": stop, "updated_at": repr(now)})
            pipe.hset(self.keys.job(job_id), mapping={
                "chunks_total": len(frame_ranges), "frames_total": frame_ranges[-1][1] if frame_ranges else 0})
            pipe.hsetnx(self.keys.job(job_id), "chunks_committed", 0)
            pipe.hsetnx(self.keys.job(job_id), "frames_committed", 0)
            pipe.execute()

    @_guarded
    def touch(self, job_id: str, *, now: float | None = None) -> None:
        """Record that a recovery pass acted on a job (its ``updated_at``): the next pass waits out
        its grace again before taking the job for stalled."""
        now = self._at(now)
        self.redis.hset(self.keys.job(job_id), "updated_at", repr(now))

    @_guarded
    def mark_finalizer_enqueued(self, job_id: str, *, now: float | None = None) -> None:
        now = self._at(now)
        self.redis.hset(self.keys.job(job_id), "finalize_enqueued_at", repr(now))

    # --- the HLS playlist ---------------------------------------------------------------------------

    @_guarded
    def mark_playlist_dirty(self, job_id: str) -> None:
        self.redis.set(self.keys.playlist_dirty(job_id), "1", ex=3600)

    @_guarded
    def take_playlist_dirty(self, job_id: str) -> bool:
        """Whether the playlist was marked behind since the last take (and clear the mark)."""
        return self.redis.getdel(self.keys.playlist_dirty(job_id)) is not None

    @_guarded
    def take_playlist_lock(self, job_id: str, owner: str, *, ttl_s: float) -> bool:
        return bool(self.redis.set(self.keys.playlist_lock(job_id), owner, nx=True, px=int(ttl_s * 1000)))

    @_guarded
    def release_playlist_lock(self, job_id: str, owner: str) -> None:
        if self.redis.get(self.keys.playlist_lock(job_id)) == owner:
            self.redis.delete(self.keys.playlist_lock(job_id))

    @_guarded
    def set_playlist(self, job_id: str, *, chunks: int, frames: int, frames_total: int, now: float | None = None) -> None:
        """The playlist now lists ``chunks`` chunks (``frames`` frames); the first and the half-way
        moments are kept, for time-to-first-frame figures."""
        now = self._at(now)
        key = self.keys.job(job_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping={"playlist_chunks": chunks, "playable_frames": frames})
            if chunks:
                pipe.hsetnx(key, "first_playable_at", repr(now))
            if frames_total and 2 * frames >= frames_total:
                pipe.hsetnx(key, "half_playable_at", repr(now))
            pipe.execute()

    # --- recording ends in storage -----------------------------------------------------------------

    @_guarded
    def unrecorded_job_ids(self) -> list[str]:
        """Jobs that ended in Redis and whose end storage has not recorded yet (the outbox)."""
        return sorted(self.redis.smembers(self.keys.unrecorded()))

    @_guarded
    def mark_recorded(self, job_id: str) -> None:
        self.redis.srem(self.keys.unrecorded(), job_id)

    @_guarded
    def snapshot(self, job_id: str) -> dict:
        """Everything about an ended job, to record in storage: its record, chunks and attempt logs."""
        job = self.job(job_id)
        chunks = self._raw_chunks(job_id, job.chunks_total)
        logs = [self.redis.lrange(self.keys.attempts(job_id, i), 0, -1) for i in range(job.chunks_total)]
        final = self.redis.lrange(self.keys.attempts(job_id, "finalize"), 0, -1)
        return {"job": self.redis.hgetall(self.keys.job(job_id)), "chunks": chunks,
                "attempts": [[json.loads(e) for e in log] for log in logs],
                "finalize_attempts": [json.loads(e) for e in final]}

    @_guarded
    def restore_snapshot(self, snapshot: dict) -> None:
        """Recreate an ended job exactly as ``snapshot`` recorded it (a rebuild after Redis lost it)."""
        record = JobRecord.from_hash(snapshot["job"])
        job_id = record.job_id
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.job(job_id), mapping=snapshot["job"])
            pipe.zadd(self.keys.jobs(), {job_id: record.created_at})
            for index, chunk in enumerate(snapshot["chunks"]):
                if chunk:
                    pipe.hset(self.keys.chunk(job_id, index), mapping=chunk)
            for index, log in enumerate(snapshot["attempts"]):
                if log:
                    pipe.rpush(self.keys.attempts(job_id, index), *[json.dumps(e) for e in log])
            if snapshot["finalize_attempts"]:
                pipe.rpush(self.keys.attempts(job_id, "finalize"),
                           *[json.dumps(e) for e in snapshot["finalize_attempts"]])
            pipe.execute()

    # --- recovery ---------------------------------------------------------------------------------

    @_guarded
    def farm_id(self) -> str | None:
        """The farm id kept in this Redis (None: never made, or Redis lost its data)."""
        return self.redis.get(self.keys.farm_id())

    @_guarded
    def claim_farm_id(self, candidate: str) -> str:
        """Keep ``candidate`` as the farm id unless one is kept already; returns the one kept."""
        self.redis.set(self.keys.farm_id(), candidate, nx=True)
        return self.redis.get(self.keys.farm_id())

    @_guarded
    def generation(self) -> str | None:
        """The marker the last rebuild left; None means Redis lost its data since (or never had it)."""
        return self.redis.get(self.keys.generation())

    @_guarded
    def set_generation(self, *, now: float | None = None) -> None:
        now = self._at(now)
        self.redis.set(self.keys.generation(), repr(now))

    @_guarded
    def take_rebuild_lock(self, owner: str, *, ttl_s: float) -> bool:
        """One rebuild from storage at a time: two would restore the same job over each other."""
        return bool(self.redis.set(self.keys.rebuild_lock(), owner, nx=True, ex=max(1, int(ttl_s))))

    @_guarded
    def release_rebuild_lock(self, owner: str) -> None:
        if self.redis.get(self.keys.rebuild_lock()) == owner:
            self.redis.delete(self.keys.rebuild_lock())

    @_guarded
    def take_repair_turn(self, owner: str, *, interval_s: float) -> bool:
        """Whether ``owner`` looks for partly lost state now (once per ``interval_s`` across the farm)."""
        return bool(self.redis.set(self.keys.repair_turn(), owner, nx=True, px=max(1, int(interval_s * 1000))))

    @_guarded
    def damaged_jobs(self) -> list[tuple[str, Damage]]:
        """Jobs whose state Redis lost part of, in three pipelined reads whatever their number: a
        listed job without its record, an unfinished job missing from the active set, a rendering or
        finalizing job with chunk records missing."""
        ids = self.redis.zrange(self.keys.jobs(), 0, -1)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), "state", "chunks_total")
            records = pipe.execute()
        active = self.redis.smembers(self.keys.active())
        damaged, counted = [], []
        for job_id, (state, total) in zip(ids, records):
            if state is None:
                damaged.append((job_id, Damage.RECORD_LOST))
                continue
            if state not in ("done", "failed", "cancelled") and job_id not in active:
                damaged.append((job_id, Damage.NOT_ACTIVE))
            if state in ("rendering", "finalizing") and int(total or 0):
                counted.append((job_id, int(total)))
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, total in counted:
                pipe.exists(*[self.keys.chunk(job_id, i) for i in range(total)])
            present = pipe.execute()
        damaged += [(job_id, Damage.CHUNKS_LOST) for (job_id, total), n in zip(counted, present) if n < total]
        return damaged

    @_guarded
    def reactivate(self, job_id: str) -> None:
        """Put an unfinished job back in the active set (the recovery pass reads only that set)."""
        self.redis.sadd(self.keys.active(), job_id)

    @_guarded
    def purge(self, job_id: str) -> None:
        """Remove what is left of a job whose state is partly lost, before it is restored from storage
        as a rebuild would: every key of its own, and its entries in the farm-wide sets."""
        keys = self.keys
        own = [keys.job(job_id), keys.sched_waiting(job_id), keys.webhook(job_id), keys.webhook_attempts(job_id),
               keys.playlist_lock(job_id), keys.playlist_dirty(job_id), keys.attempts(job_id, "finalize")]
        own += list(self.redis.scan_iter(f"{keys.chunk(job_id, '')}*")) + list(
            self.redis.scan_iter(f"{keys.attempts(job_id, '')}*"))
        leases = [m for m in self.redis.zrange(keys.leases(), 0, -1) if m.startswith(f"{job_id}:")]
        with self.redis.pipeline() as pipe:
            pipe.delete(*own)
            if leases:
                pipe.zrem(keys.leases(), *leases)
            pipe.zrem(keys.finalize_leases(), job_id)
            pipe.zrem(keys.jobs(), job_id)
            pipe.srem(keys.active(), job_id)
            pipe.srem(keys.unrecorded(), job_id)
            pipe.zrem(keys.webhooks_due(), job_id)
            pipe.execute()

    @_guarded
    def take_reconcile_turn(self, owner: str, *, interval_s: float) -> bool:
        """Whether ``owner`` runs this interval's recovery pass: the first to ask in each interval does."""
        return bool(self.redis.set(self.keys.reconcile_turn(), owner, nx=True, px=max(1, int(interval_s * 1000))))

    @_guarded
    def leases(self) -> list[Lease]:
        """Every running attempt, of chunks and of finalizers, with who holds it."""
        found = []
        with self.redis.pipeline(transaction=False) as pipe:
            members = self.redis.zrange(self.keys.leases(), 0, -1)
            finalizing = self.redis.zrange(self.keys.finalize_leases(), 0, -1)
            parsed = [Keys.parse_lease_member(m) for m in members]
            for job_id, index in parsed:
                pipe.hmget(self.keys.chunk(job_id, index), "worker", "worker_started", "token")
            for job_id in finalizing:
                pipe.hmget(self.keys.job(job_id), "finalizer", "finalizer_started", "finalizer_token")
            owners = pipe.execute()
        for (job_id, index), (worker, started, token) in zip(parsed + [(j, None) for j in finalizing], owners):
            if worker and token:
                found.append(Lease(job_id, index, worker, started or "", token))
        return found

    @_guarded
    def expired_leases(self, now: float | None = None) -> list[tuple[str, int]]:
        now = self._at(now)
        members = self.redis.zrangebyscore(self.keys.leases(), "-inf", repr(now))
        return [Keys.parse_lease_member(m) for m in members]

    @_guarded
    def expired_finalizers(self, now: float | None = None) -> list[str]:
        now = self._at(now)
        return list(self.redis.zrangebyscore(self.keys.finalize_leases(), "-inf", repr(now)))

    @_guarded
    def stalled_jobs(self, *, now: float | None = None, grace_s: float) -> list[StalledJob]:
        """Active jobs that will not move on by themselves (see ``Stall``), ``grace_s`` after their
        last change, so a message on its way is not taken for a lost one."""
        now = self._at(now)
        found = []
        for job_id in self.active_job_ids():
            try:
                job = self.job(job_id)
            except NotFoundError:
                continue
            stall = self._stall(job, now=now, grace_s=grace_s)
            if stall is not None:
                found.append(StalledJob(job, stall))
        return found

    def _stall(self, job: JobRecord, *, now: float | None = None, grace_s: float) -> Stall | None:
        if job.state == JobState.RENDERING:
            complete = job.chunks_total > 0 and job.chunks_committed == job.chunks_total
            enqueued = job.finalize_enqueued_at
            if complete and (not enqueued or now - enqueued > grace_s):
                return Stall.FINALIZER_NOT_QUEUED
        elif job.state == JobState.FINALIZING:
            held = self.redis.zscore(self.keys.finalize_leases(), job.job_id)
            if held is None and now - job.updated_at > grace_s:
                return Stall.FINALIZER_DIED
        elif job.state in (JobState.QUEUED, JobState.PLANNING) and now - job.updated_at > grace_s:
            return Stall.PLAN_LOST
        return None

    @_guarded
    def waiting_chunks(self, *, now: float | None = None, grace_s: float) -> list[tuple[JobRecord, ChunkRecord]]:
        """Queued chunks of rendering jobs, queued more than ``grace_s`` ago: if no render message
        is waiting in the broker, theirs was lost (``grace_s`` must exceed the longest retry delay)."""
        now = self._at(now)
        found = []
        for job_id in self.active_job_ids():
            try:
                job = self.job(job_id)
            except NotFoundError:  # its record was lost: the repair step restores it from storage
                continue
            if job.state != JobState.RENDERING:
                continue
            for chunk in self.chunks(job_id, job.chunks_total):
                if chunk.state == ChunkState.QUEUED and now - (chunk.updated_at or now) > grace_s:
                    found.append((job, chunk))
        return found

    @_guarded
    def restore_job(self, record: JobRecord, frame_ranges: list[tuple[int, int]], *,
                    committed: dict[int, dict], now: float | None = None) -> None:
        """Recreate an unfinished job lost from Redis from what storage records: ``record`` (queued),
        its planned chunks with those in ``committed`` (index -> commit marker fields: frames,
        attempt, worker, committed_at, segment) marked committed, moved to rendering."""
        now = self._at(now)
        self.create_job(record)
        if not frame_ranges:
            return
        self._add_chunks(record.job_id, frame_ranges, now=now)
        with self.redis.pipeline() as pipe:
            for index, marker in committed.items():
                pipe.hset(self.keys.chunk(record.job_id, index), mapping={
                    "state": ChunkState.COMMITTED.value, "frames_done": marker["frames"],
                    "attempt": marker["attempt"], "worker": marker["worker"],
                    "committed_at": repr(marker["committed_at"]), "segment_key": marker["segment_key"],
                    "segment_size": marker["segment_size"], "segment_sha256": marker["segment_sha256"],
                    "hls_key": marker.get("hls_key", ""), "hls_size": marker.get("hls_size", 0),
                    "hls_sha256": marker.get("hls_sha256", ""), "reason": "restored from its commit marker"})
            pipe.hset(self.keys.job(record.job_id), mapping={
                "chunks_committed": len(committed), "frames_committed": sum(m["frames"] for m in committed.values())})
            pipe.execute()
        self._job_move(record.job_id, JobState.PLANNING, now=now)
        self._job_move(record.job_id, JobState.RENDERING, now=now, fields={"output_key": record.output_key})

    # --- reads ------------------------------------------------------------------------------------

    @_guarded
    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.job(job_id)))

    @_guarded
    def job(self, job_id: str) -> JobRecord:
        record = self.redis.hgetall(self.keys.job(job_id))
        if not record and self._recall is not None and (snapshot := self._recall(job_id)) is not None:
            self.restore_snapshot(snapshot)  # an ended job that left Redis: back until the next pass
            record = self.redis.hgetall(self.keys.job(job_id))
        if not record:
            raise NotFoundError(f"unknown job '{job_id}'")
        return JobRecord.from_hash(record)

    @_guarded
    def forget_ended(self, *, ended_before: float, limit: int = 500, batch: int = 500) -> list[str]:
        """Remove from Redis ended jobs that ended before ``ended_before``, whose end is recorded in
        storage and whose webhook event is not pending: at most ``limit``, oldest first. Storage
        keeps them (``ended.json``); ``job()`` brings one back when a recall is set."""
        forgotten: list[str] = []
        start = 0
        while len(forgotten) < limit:
            # created before the cut-off is necessary (a job ends after it is created), not enough
            ids = self.redis.zrangebyscore(self.keys.jobs(), "-inf", ended_before, start=start, num=batch)
            if not ids:
                break
            kept = 0
            for job_id in ids[:limit - len(forgotten)]:
                if self._forget(job_id, ended_before):
                    forgotten.append(job_id)
                else:
                    kept += 1
            start += kept  # the removed ones no longer count in the ranks
        return forgotten

    def _forget(self, job_id: str, ended_before: float) -> bool:
        keys = self.keys
        return bool(self._scripts["forget"](
            keys=[keys.job(job_id), keys.jobs(), keys.active(), keys.unrecorded(), keys.webhook(job_id),
                  keys.webhook_attempts(job_id), keys.webhooks_due(), keys.playlist_lock(job_id),
                  keys.playlist_dirty(job_id)],
            args=[job_id, repr(ended_before), keys.chunk(job_id, ""), keys.attempts(job_id, "")]))

    def _raw_chunks(self, job_id: str, count: int) -> list[dict]:
        with self.redis.pipeline(transaction=False) as pipe:
            for index in range(count):
                pipe.hgetall(self.keys.chunk(job_id, index))
            return pipe.execute()

    @_guarded
    def chunks(self, job_id: str, count: int | None = None) -> list[ChunkRecord]:
        """The job's chunk records, in order (the first ``count``, or all it has)."""
        count = self.job(job_id).chunks_total if count is None else count
        raw = self._raw_chunks(job_id, count)
        deadlines = self.redis.zmscore(self.keys.leases(), [f"{job_id}:{i}" for i in range(count)]) if count else []
        return [ChunkRecord.from_hash(i, c, lease_until=deadline)
                for i, (c, deadline) in enumerate(zip(raw, deadlines)) if c]

    @_guarded
    def chunk(self, job_id: str, index: int) -> ChunkRecord:
        data = self.redis.hgetall(self.keys.chunk(job_id, index))
        if not data:
            raise NotFoundError(f"job '{job_id}' has no chunk {index}")
        return ChunkRecord.from_hash(index, data, lease_until=self.redis.zscore(self.keys.leases(),
                                                                                  f"{job_id}:{index}"))

    @_guarded
    def attempts(self, job_id: str, index: int) -> list[AttemptRecord]:
        """Every attempt at a chunk, in order: who ran it, when it started and ended, how."""
        return self._attempt_log(self.keys.attempts(job_id, index))

    def _attempt_log(self, key: str) -> list[AttemptRecord]:
        return AttemptRecord.from_log(json.loads(e) for e in self.redis.lrange(key, 0, -1))

    @_guarded
    def job_ids(self, limit: int = 20) -> list[str]:
        return list(self.redis.zrevrange(self.keys.jobs(), 0, limit - 1))

    @_guarded
    def active_job_ids(self) -> list[str]:
        return sorted(self.redis.smembers(self.keys.active()))

    @_guarded
    def status(self, job_id: str, *, now: float | None = None) -> JobStatus:
        now = self._at(now)
        job = self.job(job_id)
        status = JobStatus.of(job, self.chunks(job_id, job.chunks_total), now=now)
        webhook = self.webhook(job_id)
        status.webhook = webhook.to_dict() if webhook else None
        return status

    @_guarded
    def statuses(self, job_ids: list[str], *, now: float | None = None) -> list[JobStatus]:
        """The status of each of ``job_ids`` still in Redis, in order, in two round trips whatever
        their number (the job lists of the CLI and the API). Jobs that left Redis are left out."""
        now = self._at(now)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.job(job_id))
                pipe.hgetall(self.keys.webhook(job_id))
                pipe.lrange(self.keys.webhook_attempts(job_id), 0, -1)
            raw = pipe.execute()
        found = [(JobRecord.from_hash(job), hook, log) for job, hook, log in zip(raw[0::3], raw[1::3], raw[2::3]) if job]
        with self.redis.pipeline(transaction=False) as pipe:
            for job, _, _ in found:
                for index in range(job.chunks_total):
                    pipe.hgetall(self.keys.chunk(job.job_id, index))
                if job.chunks_total:
                    pipe.zmscore(self.keys.leases(), [f"{job.job_id}:{i}" for i in range(job.chunks_total)])
            replies = iter(pipe.execute())
        statuses = []
        for job, hook, log in found:
            chunks = [next(replies) for _ in range(job.chunks_total)]
            deadlines = next(replies) if job.chunks_total else []
            status = JobStatus.of(job, [ChunkRecord.from_hash(i, c, lease_until=d)
                                        for i, (c, d) in enumerate(zip(chunks, deadlines)) if c], now=now)
            status.webhook = WebhookRecord.from_hash(hook, [json.loads(e) for e in log]).to_dict() if hook else None
            statuses.append(status)
        return statuses

    # --- farm-wide figures, for the API's /metrics (common.metrics names and buckets them) ---------
    # Figures of the farm as a whole are kept here rather than in a process's memory: a job's first
    # commit and its publication happen in whichever worker gets there, and workers come and go
    # (scaled to zero), so these survive them and the API exports one series for the farm.

    @_guarded
    def observe(self, name: str, value: float, *, buckets: tuple[float, ...]) -> None:
        """Add ``value`` to histogram ``name``."""
        self._scripts["observe"](keys=[self.keys.metrics_histogram(name)],
                                 args=[repr(float(value)), *[repr(float(b)) for b in buckets]])

    @_guarded
    def first_commit(self, job_id: str, *, now: float | None = None, histogram: str, buckets: tuple[float, ...]) -> float | None:
        """Mark the job's first commit, once; the first caller also observes the seconds since the
        job was submitted into ``histogram`` and gets them back (later callers get None)."""
        now = self._at(now)
        delay = self._scripts["first_commit"](keys=[self.keys.job(job_id), self.keys.metrics_histogram(histogram)],
                                              args=[repr(now), *[repr(float(b)) for b in buckets]])
        return None if delay is None else float(delay)

    @_guarded
    def histogram(self, name: str) -> dict[str, float]:
        """Histogram ``name`` as kept: per-bucket counts by bound ('+Inf' past the last), 'count', 'sum'."""
        return {field: float(value) for field, value in self.redis.hgetall(self.keys.metrics_histogram(name)).items()}

    @_guarded
    def totals(self) -> dict[str, int]:
        """Farm-wide counters the commit script keeps: frames_committed, chunks_committed."""
        return {field: int(value) for field, value in self.redis.hgetall(self.keys.metrics_totals()).items()}

    @_guarded
    def job_counts(self, *, batch: int = 1000) -> dict[str, int]:
        """Jobs by state, every job counted (one pipelined read per ``batch`` jobs: O(jobs) per call)."""
        counts = {state.value: 0 for state in JobState}
        total = self.redis.zcard(self.keys.jobs())
        for start in range(0, total, batch):
            ids = self.redis.zrange(self.keys.jobs(), start, start + batch - 1)
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(self.keys.job(job_id), "state")
                for state in pipe.execute():
                    if state in counts:
                        counts[state] += 1
        return counts

    # --- webhooks (common.webhooks): one event per job end, each attempt recorded --------------------

    def _webhook_call(self, name: str, job_id: str, *args) -> object:
        return self._scripts[name](keys=[self.keys.webhook(job_id), self.keys.webhook_attempts(job_id),
                                         self.keys.webhooks_due()],
                                   args=[_text(a) for a in (*args, job_id)])

    @_guarded
    def open_webhook(self, job_id: str, *, event_id: str, event_type: str, url: str, now: float | None = None) -> bool:
        """Record the job's webhook event (replacing an earlier event of the job, e.g. before a resume);
        True if this very event was queued for delivery already."""
        now = self._at(now)
        return bool(self._webhook_call("webhook_open", job_id, event_id, event_type, url, now))

    @_guarded
    def mark_webhook_queued(self, job_id: str, event_id: str, *, now: float | None = None) -> None:
        now = self._at(now)
        key = self.keys.webhook(job_id)
        if self.redis.hget(key, "event_id") == event_id:
            self.redis.hsetnx(key, "queued_at", repr(now))

    @_guarded
    def begin_webhook_attempt(self, job_id: str, event_id: str, attempt: int, *, now: float | None = None,
                              stale_s: float) -> tuple[str, str]:
        """May attempt ``attempt`` of the event go now? ('ok', ''), ('skip', why) if it was made, the
        event delivered, given up or superseded, or ('busy', why) while another sender is at it."""
        now = self._at(now)
        verdict, detail = self._webhook_call("webhook_begin", job_id, event_id, attempt, now, stale_s)
        return str(verdict), str(detail)

    @_guarded
    def end_webhook_attempt(self, job_id: str, event_id: str, attempt: int, *, now: float | None = None, outcome: str,
                            status: int, error: str, duration_s: float, next_at: float | None) -> None:
        """Record how an attempt went: ``outcome`` delivered, retry (at ``next_at``) or failed (given up)."""
        now = self._at(now)
        self._webhook_call("webhook_end", job_id, event_id, attempt, now, outcome, status, error[:500],
                           round(duration_s, 3), "" if next_at is None else next_at)

    @_guarded
    def overdue_webhooks(self, *, now: float | None = None, grace_s: float) -> list[tuple[str, str, int]]:
        """Pending webhook events whose next attempt should have begun more than ``grace_s`` ago:
        (job id, event id, the attempt to make). Their delivery message was lost (or a sender died)."""
        now = self._at(now)
        overdue = []
        for job_id in self.redis.zrangebyscore(self.keys.webhooks_due(), "-inf", now - grace_s):
            record = self.webhook(job_id)
            if record is None or record.state != "pending":  # its record is gone: nothing to send
                self.redis.zrem(self.keys.webhooks_due(), job_id)
                continue
            overdue.append((job_id, record.event_id, record.attempts + 1))
        return overdue

    @_guarded
    def webhook(self, job_id: str) -> WebhookRecord | None:
        """The job's webhook event and its delivery, or None if it has none (no URL, or not ended)."""
        data = self.redis.hgetall(self.keys.webhook(job_id))
        if not data:
            return None
        log = [json.loads(e) for e in self.redis.lrange(self.keys.webhook_attempts(job_id), 0, -1)]
        return WebhookRecord.from_hash(data, log)

