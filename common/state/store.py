"""``StateStore``: the one door to lipfarm's state in Redis. Nothing else reads or writes its keys.

Every chunk move is one Lua script (``common.state.scripts``), so each is a single atomic step
with its checks:

- ``claim``: queued -> running. A new attempt gets a fresh ownership token and a lease (a deadline
  in the ``leases`` sorted set). An attempt whose lease expired may be taken over.
- ``beat``: extends the lease, records frames done and peak memory; answers LOST to an attempt
  that no longer owns its chunk and STOPPED when the job is no longer rendering.
- ``commit``: running -> committed, only with the current token; idempotent; the commit that
  completes the job (and only that one) answers COMPLETE: its caller queues the finalizer.
- ``requeue``: an expired lease goes back to queued (the reconciler), or fails the chunk, and its
  job, when the chunk is out of attempts.
- ``fail``: the attempt reports an error: retryable ones requeue while attempts remain, others
  fail the chunk and the job with the reason.
- ``release``: a worker shutting down gives its chunk back without spending the attempt.

Job moves are checked against ``JOB_MOVES`` by one script; the verbs below (``start_planning``,
``start_rendering``, ``finish``, ``cancel``, ...) are the only ways to make them, each writing
the fields its move needs. Time is always a parameter (``now``), so tests never sleep; reads have
no side effects.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from enum import Enum

import redis

from common.errors import NotFoundError, ServiceError
from common.state import scripts
from common.state.keys import Keys
from common.state.records import (JOB_MOVES, AttemptRecord, ChunkRecord, ChunkState, JobRecord, JobState, JobStatus,
                                  Verdict)


@dataclass(frozen=True)
class Claim:
    verdict: Verdict  # OK, SKIP or FAILED
    detail: str = ""
    token: str = ""
    attempt: int = 0

    @property
    def ok(self) -> bool:
        return self.verdict == Verdict.OK


class Stall(str, Enum):
    """Why a job is not moving on its own."""

    FINALIZER_NOT_QUEUED = "finalizer not queued"  # all chunks committed, the finalize message lost
    FINALIZER_DIED = "finalizer died"  # left finalizing, nobody holds its finalize lease
    PLAN_LOST = "plan lost"  # queued or planning for too long: the plan message or its planner lost


@dataclass(frozen=True)
class StalledJob:
    job: JobRecord
    stall: Stall


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


class StateStore:
    """Job and chunk records in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._scripts = {name: client.register_script(getattr(scripts, name.upper())) for name in (
            "claim", "beat", "commit", "requeue", "fail", "release", "job_move")}

    @classmethod
    def connect(cls, url: str, prefix: str) -> "StateStore":
        """Connect and ping, or ``ServiceError`` naming the URL (fails fast, never hangs)."""
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10,
                                      health_check_interval=30, decode_responses=True)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise ServiceError(f"cannot reach Redis at {url} ({exc.__class__.__name__}: {exc})") from None
        return cls(client, Keys(prefix))

    # --- chunk moves ------------------------------------------------------------------------------

    def _chunk_call(self, name: str, job_id: str, index: int, now: float, *args) -> list[str]:
        keys = [self.keys.chunk(job_id, index), self.keys.job(job_id), self.keys.leases(), self.keys.active(),
                self.keys.attempts(job_id, index)]
        result = self._scripts[name](keys=keys, args=[job_id, index, repr(now), *args])
        return [result] if isinstance(result, str) else [str(part) for part in result]

    def claim(self, job_id: str, index: int, *, worker: str, now: float, lease_s: float,
              max_attempts: int) -> Claim:
        token = secrets.token_hex(8)
        result = self._chunk_call("claim", job_id, index, now, worker, token, repr(now + lease_s), max_attempts)
        if result[0] == Verdict.OK:
            return Claim(Verdict.OK, token=token, attempt=int(result[1]))
        return Claim(Verdict(result[0]), result[1] if len(result) > 1 else "")

    def beat(self, job_id: str, index: int, token: str, *, now: float, lease_s: float,
             frames_done: int, peak_rss: int = 0) -> Verdict:
        return Verdict(self._chunk_call("beat", job_id, index, now, token, repr(now + lease_s), frames_done,
                                        peak_rss)[0])

    def commit(self, job_id: str, index: int, token: str, *, frames: int, now: float) -> Verdict:
        return Verdict(self._chunk_call("commit", job_id, index, now, token, frames)[0])

    def requeue(self, job_id: str, index: int, *, now: float, reason: str, max_attempts: int) -> Verdict:
        return Verdict(self._chunk_call("requeue", job_id, index, now, reason, max_attempts)[0])

    def fail(self, job_id: str, index: int, token: str, *, reason: str, retryable: bool, now: float,
             max_attempts: int) -> Verdict:
        return Verdict(self._chunk_call("fail", job_id, index, now, token, reason, int(retryable), max_attempts)[0])

    def release(self, job_id: str, index: int, token: str, *, reason: str, now: float) -> Verdict:
        return Verdict(self._chunk_call("release", job_id, index, now, token, reason)[0])

    def is_current(self, job_id: str, index: int, token: str) -> bool:
        """Whether ``token`` still owns a running chunk of a rendering job (a cheap read)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.chunk(job_id, index), "state", "token")
            pipe.hget(self.keys.job(job_id), "state")
            (state, owner), job_state = pipe.execute()
        return state == ChunkState.RUNNING and owner == token and job_state == JobState.RENDERING

    # --- job moves --------------------------------------------------------------------------------

    def create_job(self, record: JobRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.job(record.job_id), mapping=record.to_hash())
            pipe.zadd(self.keys.jobs(), {record.job_id: record.created_at})
            pipe.sadd(self.keys.active(), record.job_id)
            pipe.execute()

    def _move(self, job_id: str, to: JobState, *, now: float, reason: str = "",
              fields: dict | None = None) -> bool:
        """Move a job along ``JOB_MOVES``; False if its current state does not allow the move."""
        allowed = ",".join(s.value for s, targets in JOB_MOVES.items() if to in targets)
        extra = [_text(x) for pair in (fields or {}).items() for x in pair]
        result = self._scripts["job_move"](keys=[self.keys.job(job_id), self.keys.active()],
                                           args=[job_id, repr(now), to.value, allowed, reason, *extra])
        if result[0] == "missing":
            raise NotFoundError(f"unknown job '{job_id}'")
        return result[0] == Verdict.OK

    def start_planning(self, job_id: str, *, now: float) -> bool:
        return self._move(job_id, JobState.PLANNING, now=now)

    def start_rendering(self, job_id: str, frame_ranges: list[tuple[int, int]], *, output_key: str,
                        now: float) -> bool:
        """Create the planned chunks (existing ones are kept: planning may run twice) and move to
        rendering; False if the job moved on meanwhile (cancelled)."""
        self._add_chunks(job_id, frame_ranges, now=now)
        return self._move(job_id, JobState.RENDERING, now=now, fields={"output_key": output_key})

    def start_finalizing(self, job_id: str, *, now: float) -> bool:
        """Move a rendering job to finalizing; True also if it is finalizing already (a retry)."""
        return self.job(job_id).state == JobState.FINALIZING or self._move(job_id, JobState.FINALIZING, now=now)

    def finish(self, job_id: str, state: JobState, *, now: float, reason: str = "",
               output_location: str = "") -> bool:
        """End a job as done (with its output's location) or failed (with the reason)."""
        if state not in (JobState.DONE, JobState.FAILED):
            raise ValueError(f"finish() ends a job as done or failed, not {state.value}")
        fields = {"output_location": output_location} if output_location else None
        return self._move(job_id, state, now=now, reason=reason, fields=fields)

    def cancel(self, job_id: str, *, now: float, reason: str = "cancelled by user") -> bool:
        """Cancel a job that has not finished; its queued chunks are dropped. False if it had."""
        if not self._move(job_id, JobState.CANCELLED, now=now, reason=reason):
            return False
        queued = [c.index for c in self.chunks(job_id) if c.state == ChunkState.QUEUED]
        with self.redis.pipeline() as pipe:
            for index in queued:
                pipe.hset(self.keys.chunk(job_id, index),
                          mapping={"state": ChunkState.CANCELLED.value, "reason": reason, "updated_at": repr(now)})
            pipe.execute()
        return True

    def _add_chunks(self, job_id: str, frame_ranges: list[tuple[int, int]], *, now: float) -> None:
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

    # --- the finalizer ----------------------------------------------------------------------------

    def take_finalize_lease(self, job_id: str, *, worker: str, lease_s: float) -> bool:
        """One finalizer per job: True if ``worker`` now holds the job's finalize lease."""
        return bool(self.redis.set(self.keys.finalize_lease(job_id), worker, nx=True, ex=int(lease_s)))

    def release_finalize_lease(self, job_id: str) -> None:
        self.redis.delete(self.keys.finalize_lease(job_id))

    def mark_finalizer_enqueued(self, job_id: str, *, now: float) -> None:
        self.redis.hset(self.keys.job(job_id), "finalize_enqueued_at", repr(now))

    # --- recovery ---------------------------------------------------------------------------------

    def stalled_jobs(self, *, now: float, grace_s: float) -> list[StalledJob]:
        """Active jobs that will not move on by themselves (see ``Stall``), ``grace_s`` after their
        last change, so a message on its way is not taken for a lost one."""
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

    def _stall(self, job: JobRecord, *, now: float, grace_s: float) -> Stall | None:
        if job.state == JobState.RENDERING:
            complete = job.chunks_total > 0 and job.chunks_committed == job.chunks_total
            enqueued = job.finalize_enqueued_at
            if complete and (not enqueued or now - enqueued > grace_s):
                return Stall.FINALIZER_NOT_QUEUED
        elif job.state == JobState.FINALIZING:
            if not self.redis.exists(self.keys.finalize_lease(job.job_id)) and now - job.updated_at > grace_s:
                return Stall.FINALIZER_DIED
        elif job.state in (JobState.QUEUED, JobState.PLANNING) and now - job.updated_at > grace_s:
            return Stall.PLAN_LOST
        return None

    def restore_job(self, record: JobRecord, frame_ranges: list[tuple[int, int]], *,
                    committed: dict[int, int], now: float) -> None:
        """Recreate a job lost from Redis from what storage records: ``record`` (queued), its planned
        chunks with those in ``committed`` (index -> frames) marked committed, moved to rendering."""
        self.create_job(record)
        if not frame_ranges:
            return
        self._add_chunks(record.job_id, frame_ranges, now=now)
        with self.redis.pipeline() as pipe:
            for index, frames in committed.items():
                pipe.hset(self.keys.chunk(record.job_id, index),
                          mapping={"state": ChunkState.COMMITTED.value, "frames_done": frames,
                                   "reason": "restored from its commit marker"})
            pipe.hset(self.keys.job(record.job_id), mapping={
                "chunks_committed": len(committed), "frames_committed": sum(committed.values())})
            pipe.execute()
        self._move(record.job_id, JobState.PLANNING, now=now)
        self._move(record.job_id, JobState.RENDERING, now=now, fields={"output_key": record.output_key})

    def restore_done_job(self, record: JobRecord, *, output_location: str, now: float) -> None:
        """Recreate a job lost from Redis whose output storage holds: done."""
        self.create_job(record)
        for state in (JobState.PLANNING, JobState.RENDERING, JobState.FINALIZING):
            self._move(record.job_id, state, now=now)
        self._move(record.job_id, JobState.DONE, now=now, fields={"output_location": output_location})

    # --- reads ------------------------------------------------------------------------------------

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.job(job_id)))

    def job(self, job_id: str) -> JobRecord:
        record = self.redis.hgetall(self.keys.job(job_id))
        if not record:
            raise NotFoundError(f"unknown job '{job_id}'")
        return JobRecord.from_hash(record)

    def chunks(self, job_id: str, count: int | None = None) -> list[ChunkRecord]:
        """The job's chunk records, in order (the first ``count``, or all it has)."""
        count = self.job(job_id).chunks_total if count is None else count
        with self.redis.pipeline(transaction=False) as pipe:
            for index in range(count):
                pipe.hgetall(self.keys.chunk(job_id, index))
            return [ChunkRecord.from_hash(i, c) for i, c in enumerate(pipe.execute()) if c]

    def chunk(self, job_id: str, index: int) -> ChunkRecord:
        data = self.redis.hgetall(self.keys.chunk(job_id, index))
        if not data:
            raise NotFoundError(f"job '{job_id}' has no chunk {index}")
        return ChunkRecord.from_hash(index, data)

    def attempts(self, job_id: str, index: int) -> list[AttemptRecord]:
        """Every attempt at a chunk, in order: who ran it, when it started and ended, how."""
        return AttemptRecord.from_log(json.loads(e) for e in self.redis.lrange(self.keys.attempts(job_id, index), 0, -1))

    def job_ids(self, limit: int = 20) -> list[str]:
        return list(self.redis.zrevrange(self.keys.jobs(), 0, limit - 1))

    def active_job_ids(self) -> list[str]:
        return sorted(self.redis.smembers(self.keys.active()))

    def expired_leases(self, now: float) -> list[tuple[str, int]]:
        members = self.redis.zrangebyscore(self.keys.leases(), "-inf", repr(now))
        return [Keys.parse_lease_member(m) for m in members]

    def status(self, job_id: str, *, now: float) -> JobStatus:
        job = self.job(job_id)
        return JobStatus.of(job, self.chunks(job_id, job.chunks_total), now=now)
