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

import json
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import redis

from lipfarm.common.errors import NotFoundError, QuotaError, ServiceError
from lipfarm.common.retry import retry_delay_s
from lipfarm.common.state import scripts
from lipfarm.common.state.connection import mask_url, redis_failure, redis_tls_options, url_without_tls_params
from lipfarm.common.state.figures import FarmFigures
from lipfarm.common.state.guard import guarded
from lipfarm.common.state.keys import Keys
from lipfarm.common.state.recovery import RecoveryVerbs
from lipfarm.common.state.webhook_state import WebhookVerbs
from lipfarm.common.state.records import (JOB_MOVES, AttemptRecord, ChunkRecord, ChunkState, JobRecord, JobState,
                                  JobStatus, Verdict, WebhookRecord, redis_text)

SCRIPTS = ("claim", "claim_next", "offer", "beat", "commit", "requeue", "fail", "release", "reopen", "take_finalize",
           "beat_finalize", "finish_done", "release_finalize", "job_move", "resume",
           "observe", "first_commit", "webhook_open", "webhook_begin", "webhook_end", "forget", "create_job")


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


def _retry_schedule(max_attempts: int, *, worker_lost: bool) -> str:
    """The retry rule as the requeueing scripts take it: the delay after each count of attempts spent."""
    return ",".join(repr(retry_delay_s(spent, worker_lost=worker_lost)) for spent in range(max_attempts + 1))




class StateStore(RecoveryVerbs, FarmFigures, WebhookVerbs):
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

    @guarded
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

    @guarded
    def claim(self, job_id: str, index: int, *, worker: str, now: float | None = None, lease_s: float,
              max_attempts: int, worker_started: str = "") -> Claim:
        """Claim a chunk: a new attempt, or a SKIP naming the attempt that holds it."""
        now = self._at(now)
        token = secrets.token_hex(8)
        return self._claim(self._call("claim", job_id, index, now, worker, token, repr(now + lease_s),
                                      max_attempts, worker_started), token)

    @guarded
    def offer(self, job_id: str, indexes: list[int], *, now: float | None = None) -> int:
        """Offer a rendering job's chunks in its priority's lane; the caller sends one slot message
        (``claim_next``) per chunk offered. Returns how many were (0 if the job is not rendering)."""
        if not indexes:
            return 0
        return int(self._call("offer", job_id, None, now, *indexes)[0])

    @guarded
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

    @guarded
    def set_tenant_weight(self, tenant: str, weight: float) -> None:
        """A tenant's weight in the fair share of workers (each busy tenant gets weight / sum of
        the busy tenants' weights); takes effect at the next claim."""
        if not weight > 0:
            raise ValueError(f"a tenant's weight must be above 0, not {weight}")
        self.redis.hset(self.keys.tenant_weights(), tenant, repr(float(weight)))

    @guarded
    def beat(self, job_id: str, index: int, token: str, *, now: float | None = None, lease_s: float,
             frames_done: int, peak_rss: int = 0) -> Verdict:
        now = self._at(now)
        return Verdict(self._call("beat", job_id, index, now, token, repr(now + lease_s), frames_done, peak_rss)[0])

    @guarded
    def commit(self, job_id: str, index: int, token: str, *, frames: int, segment: Segment, now: float | None = None) -> Verdict:
        now = self._at(now)
        return Verdict(self._call("commit", job_id, index, now, token, frames, segment.key, segment.size,
                                  segment.sha256, segment.hls_key, segment.hls_size, segment.hls_sha256)[0])

    @guarded
    def requeue(self, job_id: str, index: int, *, now: float | None = None, reason: str, max_attempts: int,
                dead_token: str = "") -> Move:
        """Requeue an attempt whose lease expired, or (``dead_token``) whose process is known dead."""
        now = self._at(now)
        return self._move(self._call("requeue", job_id, index, now, reason, max_attempts, dead_token,
                                     _retry_schedule(max_attempts, worker_lost=True)))

    @guarded
    def fail(self, job_id: str, index: int, token: str, *, reason: str, retryable: bool, now: float | None = None,
             max_attempts: int) -> Move:
        now = self._at(now)
        return self._move(self._call("fail", job_id, index, now, token, reason, int(retryable), max_attempts,
                                     _retry_schedule(max_attempts, worker_lost=False)))

    @guarded
    def release(self, job_id: str, index: int, token: str, *, reason: str, now: float | None = None) -> Verdict:
        now = self._at(now)
        return Verdict(self._call("release", job_id, index, now, token, reason)[0])

    @guarded
    def reopen(self, job_id: str, index: int, *, reason: str, now: float | None = None, max_reopens: int) -> Verdict:
        """A committed chunk whose segment failed its check goes back to the queue (see the script)."""
        now = self._at(now)
        return Verdict(self._call("reopen", job_id, index, now, reason, max_reopens)[0])

    @staticmethod
    def _move(result: list[str]) -> Move:
        return Move(Verdict(result[0]), result[1] if len(result) > 1 else "",
                    int(result[2]) if len(result) > 2 and result[2] else 0,
                    float(result[3]) if len(result) > 3 else 0.0)

    @guarded
    def is_current(self, job_id: str, index: int, token: str) -> bool:
        """Whether ``token`` still owns a running chunk of a rendering job (a cheap read)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.chunk(job_id, index), "state", "token")
            pipe.hget(self.keys.job(job_id), "state")
            (state, owner), job_state = pipe.execute()
        return state == ChunkState.RUNNING and owner == token and job_state == JobState.RENDERING

    # --- the finalizer ----------------------------------------------------------------------------

    @guarded
    def take_finalizer(self, job_id: str, *, worker: str, now: float | None = None, lease_s: float,
                       worker_started: str = "", take_over: str = "") -> Claim:
        """Become the job's one finalizer (a lease with a token, renewed by ``beat_finalizer``)."""
        now = self._at(now)
        token = secrets.token_hex(8)
        return self._claim(self._call("take_finalize", job_id, None, now, worker, token, repr(now + lease_s),
                                      worker_started, take_over), token)

    @guarded
    def beat_finalizer(self, job_id: str, token: str, *, now: float | None = None, lease_s: float) -> Verdict:
        now = self._at(now)
        return Verdict(self._call("beat_finalize", job_id, None, now, token, repr(now + lease_s))[0])

    @guarded
    def finish_done(self, job_id: str, token: str, *, output_location: str, now: float | None = None) -> Verdict:
        """The finalizer publishes: the job is done (refused if it was cancelled meanwhile)."""
        now = self._at(now)
        return Verdict(self._call("finish_done", job_id, None, now, token, output_location)[0])

    @guarded
    def release_finalizer(self, job_id: str, token: str, *, outcome: str, reason: str, now: float | None = None) -> Verdict:
        """Give up the finalize lease: ``outcome`` is 'reopened' (chunks to render again) or 'released'."""
        now = self._at(now)
        return Verdict(self._call("release_finalize", job_id, None, now, token, outcome, reason)[0])

    @guarded
    def expire_finalizer(self, job_id: str, token: str) -> None:
        """The finalizer holding ``token`` is known dead: let the next finalizer take over at once."""
        if self.redis.hget(self.keys.job(job_id), "finalizer_token") == token:
            self.redis.zadd(self.keys.finalize_leases(), {job_id: 0}, xx=True)

    @guarded
    def finalize_attempts(self, job_id: str) -> list[AttemptRecord]:
        return self._attempt_log(self.keys.attempts(job_id, "finalize"))

    # --- job moves --------------------------------------------------------------------------------

    @guarded
    def create_job(self, record: JobRecord, *, max_unfinished: int = 0) -> None:
        """Record a new job. With ``max_unfinished``, only if its tenant has fewer jobs not yet ended
        (counted and recorded in one step: ``QuotaError`` otherwise)."""
        if max_unfinished > 0 and not record.state.terminal:
            fields = [redis_text(x) for pair in record.to_hash().items() for x in pair]
            keys = self.keys
            answer = self._scripts["create_job"](
                keys=[keys.job(record.job_id), keys.jobs(), keys.active()],
                args=[record.job_id, max_unfinished, record.tenant, repr(record.created_at), keys.job(""), *fields])
            if answer[0] == "full":
                raise QuotaError(f"tenant '{record.tenant}' has {answer[1]} jobs not yet ended, its limit: "
                                 "submit again once one ends", tenant=record.tenant, limit=max_unfinished,
                                 unfinished=int(answer[1]))
            return
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.job(record.job_id), mapping=record.to_hash())
            pipe.zadd(self.keys.jobs(), {record.job_id: record.created_at})
            if not record.state.terminal:
                pipe.sadd(self.keys.active(), record.job_id)
            pipe.execute()

    @guarded
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
        extra = [redis_text(x) for pair in (fields or {}).items() for x in pair]
        result = self._call("job_move", job_id, None, now, to.value, allowed, reason, *extra)
        if result[0] == "missing":
            raise NotFoundError(f"unknown job '{job_id}'")
        return result[0] == Verdict.OK

    @guarded
    def start_planning(self, job_id: str, *, now: float | None = None) -> bool:
        now = self._at(now)
        return self._job_move(job_id, JobState.PLANNING, now=now)

    @guarded
    def start_rendering(self, job_id: str, frame_ranges: list[tuple[int, int]], *, output_key: str,
                        now: float | None = None) -> bool:
        """Create the planned chunks (existing ones are kept: planning may run twice) and move to
        rendering; False if the job moved on meanwhile (cancelled)."""
        now = self._at(now)
        self._add_chunks(job_id, frame_ranges, now=now)
        return self._job_move(job_id, JobState.RENDERING, now=now, fields={"output_key": output_key})

    @guarded
    def finish(self, job_id: str, state: JobState, *, now: float | None = None, reason: str) -> bool:
        """End a job that has not ended as failed, with the reason (its chunks stop with it)."""
        now = self._at(now)
        if state != JobState.FAILED:
            raise ValueError(f"finish() ends a job as failed, not {state.value}: see finish_done and cancel")
        return self._job_move(job_id, state, now=now, reason=reason)

    @guarded
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

    @guarded
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

    @guarded
    def touch(self, job_id: str, *, now: float | None = None) -> None:
        """Record that a recovery pass acted on a job (its ``updated_at``): the next pass waits out
        its grace again before taking the job for stalled."""
        now = self._at(now)
        self.redis.hset(self.keys.job(job_id), "updated_at", repr(now))

    @guarded
    def mark_finalizer_enqueued(self, job_id: str, *, now: float | None = None) -> None:
        now = self._at(now)
        self.redis.hset(self.keys.job(job_id), "finalize_enqueued_at", repr(now))

    # --- the HLS playlist ---------------------------------------------------------------------------

    @guarded
    def mark_playlist_dirty(self, job_id: str) -> None:
        self.redis.set(self.keys.playlist_dirty(job_id), "1", ex=3600)

    @guarded
    def take_playlist_dirty(self, job_id: str) -> bool:
        """Whether the playlist was marked behind since the last take (and clear the mark)."""
        return self.redis.getdel(self.keys.playlist_dirty(job_id)) is not None

    @guarded
    def take_playlist_lock(self, job_id: str, owner: str, *, ttl_s: float) -> bool:
        return bool(self.redis.set(self.keys.playlist_lock(job_id), owner, nx=True, px=int(ttl_s * 1000)))

    @guarded
    def release_playlist_lock(self, job_id: str, owner: str) -> None:
        if self.redis.get(self.keys.playlist_lock(job_id)) == owner:
            self.redis.delete(self.keys.playlist_lock(job_id))

    @guarded
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

    @guarded
    def unrecorded_job_ids(self) -> list[str]:
        """Jobs that ended in Redis and whose end storage has not recorded yet (the outbox)."""
        return sorted(self.redis.smembers(self.keys.unrecorded()))

    @guarded
    def mark_recorded(self, job_id: str) -> None:
        self.redis.srem(self.keys.unrecorded(), job_id)

    @guarded
    def snapshot(self, job_id: str) -> dict:
        """Everything about an ended job, to record in storage: its record, chunks and attempt logs."""
        job = self.job(job_id)
        chunks = self._raw_chunks(job_id, job.chunks_total)
        logs = [self.redis.lrange(self.keys.attempts(job_id, i), 0, -1) for i in range(job.chunks_total)]
        final = self.redis.lrange(self.keys.attempts(job_id, "finalize"), 0, -1)
        return {"job": self.redis.hgetall(self.keys.job(job_id)), "chunks": chunks,
                "attempts": [[json.loads(e) for e in log] for log in logs],
                "finalize_attempts": [json.loads(e) for e in final]}

    @guarded
    def restore_snapshot(self, snapshot: dict) -> None:
        """Recreate an ended job exactly as ``snapshot`` recorded it (a rebuild after Redis lost it)."""
        record = JobRecord.from_hash(snapshot["job"])
        job_id = record.job_id
        before = self.redis.hget(self.keys.job(job_id), "state")
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.job(job_id), mapping=snapshot["job"])
            pipe.zadd(self.keys.jobs(), {job_id: record.created_at})
            if record.state.terminal and before is None:  # counted as it comes back (forget uncounts it)
                pipe.hincrby(self.keys.metrics_totals(), f"jobs_{record.state.value}", 1)
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

    # --- reads ------------------------------------------------------------------------------------

    @guarded
    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.job(job_id)))

    @guarded
    def job(self, job_id: str) -> JobRecord:
        record = self.redis.hgetall(self.keys.job(job_id))
        if not record and self._recall is not None and (snapshot := self._recall(job_id)) is not None:
            self.restore_snapshot(snapshot)  # an ended job that left Redis: back until the next pass
            record = self.redis.hgetall(self.keys.job(job_id))
        if not record:
            raise NotFoundError(f"unknown job '{job_id}'")
        return JobRecord.from_hash(record)

    @guarded
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
                  keys.playlist_dirty(job_id), keys.metrics_totals()],
            args=[job_id, repr(ended_before), keys.chunk(job_id, ""), keys.attempts(job_id, "")]))

    def _raw_chunks(self, job_id: str, count: int) -> list[dict]:
        with self.redis.pipeline(transaction=False) as pipe:
            for index in range(count):
                pipe.hgetall(self.keys.chunk(job_id, index))
            return pipe.execute()

    @guarded
    def chunks(self, job_id: str, count: int | None = None) -> list[ChunkRecord]:
        """The job's chunk records, in order (the first ``count``, or all it has)."""
        count = self.job(job_id).chunks_total if count is None else count
        raw = self._raw_chunks(job_id, count)
        deadlines = self.redis.zmscore(self.keys.leases(), [f"{job_id}:{i}" for i in range(count)]) if count else []
        return [ChunkRecord.from_hash(i, c, lease_until=deadline)
                for i, (c, deadline) in enumerate(zip(raw, deadlines)) if c]

    @guarded
    def chunk(self, job_id: str, index: int) -> ChunkRecord:
        data = self.redis.hgetall(self.keys.chunk(job_id, index))
        if not data:
            raise NotFoundError(f"job '{job_id}' has no chunk {index}")
        return ChunkRecord.from_hash(index, data, lease_until=self.redis.zscore(self.keys.leases(),
                                                                                  f"{job_id}:{index}"))

    @guarded
    def attempts(self, job_id: str, index: int) -> list[AttemptRecord]:
        """Every attempt at a chunk, in order: who ran it, when it started and ended, how."""
        return self._attempt_log(self.keys.attempts(job_id, index))

    def _attempt_log(self, key: str) -> list[AttemptRecord]:
        return AttemptRecord.from_log(json.loads(e) for e in self.redis.lrange(key, 0, -1))

    @guarded
    def job_ids(self, limit: int = 20) -> list[str]:
        return list(self.redis.zrevrange(self.keys.jobs(), 0, limit - 1))

    @guarded
    def active_job_ids(self) -> list[str]:
        return sorted(self.redis.smembers(self.keys.active()))

    @guarded
    def status(self, job_id: str, *, now: float | None = None) -> JobStatus:
        now = self._at(now)
        job = self.job(job_id)
        status = JobStatus.of(job, self.chunks(job_id, job.chunks_total), now=now)
        webhook = self.webhook(job_id)
        status.webhook = webhook.to_dict() if webhook else None
        return status

    @guarded
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
