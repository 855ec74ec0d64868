"""Job and chunk state in Redis: one state enum each, an allowed-moves table, atomic moves.

Every chunk move is one Lua script, so each is a single atomic step with its checks:

- ``claim``: queued -> running. A new attempt gets a fresh ownership token and a lease (a deadline
  in the ``leases`` sorted set). An attempt whose lease expired may be taken over.
- ``beat``: extends the lease, records frames done and peak memory; answers 'lost' to an attempt
  that no longer owns its chunk and 'stopped' when the job is no longer rendering.
- ``commit``: running -> committed, only with the current token; idempotent; the commit that
  completes the job (and only that one) is told to enqueue the finalizer.
- ``requeue``: an expired lease goes back to queued (the reconciler), or fails the chunk, and its
  job, when the chunk is out of attempts.
- ``fail``: the attempt reports an error: retryable ones requeue while attempts remain, others
  fail the chunk and the job with the reason.
- ``release``: a worker shutting down gives its chunk back without spending the attempt.

Time is always a parameter (``now``), so tests never sleep. Reads have no side effects.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from enum import Enum

import redis

from common.errors import NotFoundError, ServiceError
from common.keys import Keys


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


JOB_MOVES: dict[JobState, set[JobState]] = {
    JobState.QUEUED: {JobState.PLANNING, JobState.FAILED, JobState.CANCELLED},
    # planning -> planning: a second planner takes over one that died (planning is idempotent)
    JobState.PLANNING: {JobState.PLANNING, JobState.RENDERING, JobState.FAILED, JobState.CANCELLED},
    JobState.RENDERING: {JobState.FINALIZING, JobState.FAILED, JobState.CANCELLED},
    JobState.FINALIZING: {JobState.DONE, JobState.FAILED, JobState.CANCELLED},
    JobState.DONE: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}

# The chunk moves each script makes (tests/test_jobstate.py checks the scripts keep to them).
CHUNK_MOVES: dict[ChunkState, set[ChunkState]] = {
    ChunkState.QUEUED: {ChunkState.RUNNING, ChunkState.FAILED, ChunkState.CANCELLED},
    ChunkState.RUNNING: {ChunkState.RUNNING, ChunkState.QUEUED, ChunkState.COMMITTED,
                         ChunkState.FAILED, ChunkState.CANCELLED},
    ChunkState.COMMITTED: set(),
    ChunkState.FAILED: set(),
    ChunkState.CANCELLED: set(),
}

# KEYS = chunk, job, leases, active; ARGV[1] = job id, ARGV[2] = chunk index, ARGV[3] = now.
_PRELUDE = """
local chunk, job, leases, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, index, now = ARGV[1], ARGV[2], ARGV[3]
local member = job_id .. ':' .. index
local function fail_job(reason)
  local js = redis.call('HGET', job, 'state')
  if js == 'done' or js == 'failed' or js == 'cancelled' then return end
  redis.call('HSET', job, 'state', 'failed', 'reason', reason, 'updated_at', now, 'finished_at', now)
  redis.call('SREM', active, job_id)
end
local function fail_chunk(reason)
  redis.call('HSET', chunk, 'state', 'failed', 'reason', reason, 'updated_at', now, 'token', '')
  redis.call('ZREM', leases, member)
  fail_job('chunk ' .. index .. ' failed: ' .. reason)
end
local function stop_chunk(reason)
  redis.call('HSET', chunk, 'state', 'cancelled', 'reason', reason, 'updated_at', now, 'token', '')
  redis.call('ZREM', leases, member)
end
local function owned_by(token)
  return redis.call('HGET', chunk, 'state') == 'running' and redis.call('HGET', chunk, 'token') == token
end
"""

# ARGV[4] worker, [5] token, [6] lease deadline, [7] max attempts
_CLAIM = _PRELUDE + """
local js = redis.call('HGET', job, 'state')
local state = redis.call('HGET', chunk, 'state')
if not state then return {'skip', 'no such chunk'} end
if js ~= 'rendering' then
  if state == 'queued' and (js == 'cancelled' or js == 'failed') then stop_chunk('job ' .. js) end
  return {'skip', 'job is ' .. tostring(js)}
end
if state == 'running' then
  local lease = tonumber(redis.call('ZSCORE', leases, member) or '0')
  if lease > tonumber(now) then return {'skip', 'running in another attempt'} end
elseif state ~= 'queued' then
  return {'skip', 'chunk is ' .. state}
end
local attempt = tonumber(redis.call('HGET', chunk, 'attempt') or '0')
local max_attempts = tonumber(ARGV[7])
if attempt >= max_attempts then
  local last = redis.call('HGET', chunk, 'reason') or ''
  fail_chunk('out of attempts (' .. attempt .. ' of ' .. max_attempts .. '); last: ' .. last)
  return {'failed', 'out of attempts'}
end
attempt = attempt + 1
redis.call('HSET', chunk, 'state', 'running', 'attempt', attempt, 'token', ARGV[5], 'worker', ARGV[4],
           'started_at', now, 'updated_at', now, 'beat_at', now, 'frames_done', 0)
redis.call('ZADD', leases, ARGV[6], member)
if not redis.call('HGET', job, 'rendering_at') then redis.call('HSET', job, 'rendering_at', now) end
return {'ok', tostring(attempt)}
"""

# ARGV[4] token, [5] lease deadline, [6] frames done, [7] peak rss bytes
_BEAT = _PRELUDE + """
if not owned_by(ARGV[4]) then return 'lost' end
if redis.call('HGET', job, 'state') ~= 'rendering' then return 'stopped' end
redis.call('ZADD', leases, ARGV[5], member)
redis.call('HSET', chunk, 'frames_done', ARGV[6], 'beat_at', now, 'peak_rss', ARGV[7])
return 'ok'
"""

# ARGV[4] token, [5] frames
_COMMIT = _PRELUDE + """
local state = redis.call('HGET', chunk, 'state')
if state == 'committed' then return {'duplicate'} end
if not owned_by(ARGV[4]) then return {'stale', tostring(state)} end
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then stop_chunk('job ' .. tostring(js)) return {'refused', 'job is ' .. tostring(js)} end
redis.call('HSET', chunk, 'state', 'committed', 'committed_at', now, 'updated_at', now,
           'frames_done', ARGV[5], 'reason', '', 'token', '')
redis.call('ZREM', leases, member)
local done = redis.call('HINCRBY', job, 'chunks_committed', 1)
redis.call('HINCRBY', job, 'frames_committed', ARGV[5])
redis.call('HSET', job, 'updated_at', now)
if done == tonumber(redis.call('HGET', job, 'chunks_total')) and redis.call('HSETNX', job, 'finalize_enqueued_at', now) == 1 then
  return {'complete'}
end
return {'ok'}
"""

# ARGV[4] reason, [5] max attempts
_REQUEUE = _PRELUDE + """
local lease = redis.call('ZSCORE', leases, member)
if lease and tonumber(lease) > tonumber(now) then return {'skip', 'lease renewed'} end
redis.call('ZREM', leases, member)
if redis.call('HGET', chunk, 'state') ~= 'running' then return {'skip', 'not running'} end
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then stop_chunk('job ' .. tostring(js)) return {'skip', 'job is ' .. tostring(js)} end
local attempt = tonumber(redis.call('HGET', chunk, 'attempt') or '0')
local reason = 'attempt ' .. attempt .. ': ' .. ARGV[4]
if attempt >= tonumber(ARGV[5]) then fail_chunk(reason .. ' (out of attempts)') return {'failed', reason} end
redis.call('HSET', chunk, 'state', 'queued', 'reason', reason, 'updated_at', now, 'token', '')
return {'requeued', reason}
"""

# ARGV[4] token, [5] reason, [6] retryable 1/0, [7] max attempts
_FAIL = _PRELUDE + """
if not owned_by(ARGV[4]) then return {'stale'} end
redis.call('ZREM', leases, member)
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then stop_chunk('job ' .. tostring(js)) return {'stopped'} end
local attempt = tonumber(redis.call('HGET', chunk, 'attempt') or '0')
local reason = 'attempt ' .. attempt .. ': ' .. ARGV[5]
if ARGV[6] == '1' and attempt < tonumber(ARGV[7]) then
  redis.call('HSET', chunk, 'state', 'queued', 'reason', reason, 'updated_at', now, 'token', '')
  return {'requeued'}
end
fail_chunk(ARGV[5])
return {'failed'}
"""

# ARGV[4] token, [5] reason
_RELEASE = _PRELUDE + """
if not owned_by(ARGV[4]) then return {'stale'} end
redis.call('ZREM', leases, member)
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then stop_chunk('job ' .. tostring(js)) return {'stopped'} end
redis.call('HINCRBY', chunk, 'attempt', -1)
redis.call('HSET', chunk, 'state', 'queued', 'reason', ARGV[5], 'updated_at', now, 'token', '')
return {'released'}
"""

# KEYS = job, active; ARGV = job id, now, target state, allowed from (comma list), reason, extra k/v...
_JOB_MOVE = """
local job, active = KEYS[1], KEYS[2]
local state = redis.call('HGET', job, 'state')
if not state then return {'missing'} end
local ok = false
for s in string.gmatch(ARGV[4], '[^,]+') do if s == state then ok = true end end
if not ok then return {'refused', state} end
redis.call('HSET', job, 'state', ARGV[3], 'updated_at', ARGV[2])
if ARGV[5] ~= '' then redis.call('HSET', job, 'reason', ARGV[5]) end
for i = 6, #ARGV, 2 do redis.call('HSET', job, ARGV[i], ARGV[i + 1]) end
if ARGV[3] == 'done' or ARGV[3] == 'failed' or ARGV[3] == 'cancelled' then
  redis.call('HSET', job, 'finished_at', ARGV[2])
  redis.call('SREM', active, ARGV[1])
end
return {'ok', state}
"""


@dataclass(frozen=True)
class Claim:
    status: str  # ok | skip | failed
    detail: str = ""
    token: str = ""
    attempt: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class JobStatus:
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

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["state"] = self.state.value
        return data


def _decode(values: dict) -> dict:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in values.items()}


class StateStore:
    """Job and chunk records in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._scripts = {name: client.register_script(text) for name, text in (
            ("claim", _CLAIM), ("beat", _BEAT), ("commit", _COMMIT), ("requeue", _REQUEUE),
            ("fail", _FAIL), ("release", _RELEASE), ("job_move", _JOB_MOVE))}

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

    def _chunk_call(self, name: str, job_id: str, index: int, now: float, *args):
        keys = [self.keys.chunk(job_id, index), self.keys.job(job_id), self.keys.leases(), self.keys.active()]
        result = self._scripts[name](keys=keys, args=[job_id, index, repr(now), *args])
        return result if isinstance(result, str) else [str(part) for part in result]

    def claim(self, job_id: str, index: int, *, worker: str, now: float, lease_s: float,
              max_attempts: int) -> Claim:
        token = secrets.token_hex(8)
        result = self._chunk_call("claim", job_id, index, now, worker, token, repr(now + lease_s), max_attempts)
        if result[0] == "ok":
            return Claim("ok", token=token, attempt=int(result[1]))
        return Claim(result[0], result[1] if len(result) > 1 else "")

    def beat(self, job_id: str, index: int, token: str, *, now: float, lease_s: float,
             frames_done: int, peak_rss: int = 0) -> str:
        return self._chunk_call("beat", job_id, index, now, token, repr(now + lease_s), frames_done, peak_rss)

    def commit(self, job_id: str, index: int, token: str, *, frames: int, now: float) -> str:
        return self._chunk_call("commit", job_id, index, now, token, frames)[0]

    def requeue(self, job_id: str, index: int, *, now: float, reason: str, max_attempts: int) -> str:
        return self._chunk_call("requeue", job_id, index, now, reason, max_attempts)[0]

    def fail(self, job_id: str, index: int, token: str, *, reason: str, retryable: bool, now: float,
             max_attempts: int) -> str:
        return self._chunk_call("fail", job_id, index, now, token, reason, int(retryable), max_attempts)[0]

    def release(self, job_id: str, index: int, token: str, *, reason: str, now: float) -> str:
        return self._chunk_call("release", job_id, index, now, token, reason)[0]

    def is_current(self, job_id: str, index: int, token: str) -> bool:
        """Whether ``token`` still owns a running chunk of a rendering job (a cheap read)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.chunk(job_id, index), "state", "token")
            pipe.hget(self.keys.job(job_id), "state")
            (state, owner), job_state = pipe.execute()
        return state == ChunkState.RUNNING and owner == token and job_state == JobState.RENDERING

    # --- jobs -------------------------------------------------------------------------------------

    def create_job(self, job_id: str, record: dict, *, now: float) -> None:
        data = {**{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in record.items()},
                "job_id": job_id, "state": JobState.QUEUED.value, "created_at": repr(now),
                "updated_at": repr(now)}
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.job(job_id), mapping=data)
            pipe.zadd(self.keys.jobs(), {job_id: now})
            pipe.sadd(self.keys.active(), job_id)
            pipe.execute()

    def move_job(self, job_id: str, to: JobState, *, now: float, reason: str = "", **fields) -> bool:
        """Move a job along ``JOB_MOVES``; False if its current state does not allow the move."""
        allowed = ",".join(s.value for s, targets in JOB_MOVES.items() if to in targets)
        extra = [str(x) for pair in fields.items() for x in pair]
        result = self._scripts["job_move"](keys=[self.keys.job(job_id), self.keys.active()],
                                           args=[job_id, repr(now), to.value, allowed, reason, *extra])
        if result[0] == "missing":
            raise NotFoundError(f"unknown job '{job_id}'")
        return result[0] == "ok"

    def add_chunks(self, job_id: str, frame_ranges: list[tuple[int, int]], *, now: float) -> None:
        """Chunk records of a planned job (existing ones are kept: planning may run twice)."""
        with self.redis.pipeline() as pipe:
            for index, (start, stop) in enumerate(frame_ranges):
                key = self.keys.chunk(job_id, index)
                pipe.hsetnx(key, "state", ChunkState.QUEUED.value)
                pipe.hsetnx(key, "attempt", 0)
                pipe.hset(key, mapping={"start_frame": start, "stop_frame": stop, "updated_at": repr(now)})
            pipe.hset(self.keys.job(job_id), mapping={
                "chunks_total": len(frame_ranges), "frames_total": frame_ranges[-1][1] if frame_ranges else 0})
            pipe.hsetnx(self.keys.job(job_id), "chunks_committed", 0)
            pipe.hsetnx(self.keys.job(job_id), "frames_committed", 0)
            pipe.execute()

    def cancel(self, job_id: str, *, now: float, reason: str = "cancelled by user") -> bool:
        """Cancel a job that has not finished; its queued chunks are dropped. False if it had."""
        if not self.move_job(job_id, JobState.CANCELLED, now=now, reason=reason):
            return False
        record = self.job(job_id)
        with self.redis.pipeline() as pipe:
            for index in range(int(record.get("chunks_total", 0) or 0)):
                pipe.hget(self.keys.chunk(job_id, index), "state")
            states = pipe.execute()
        with self.redis.pipeline() as pipe:
            for index, state in enumerate(states):
                if state == ChunkState.QUEUED:
                    pipe.hset(self.keys.chunk(job_id, index),
                              mapping={"state": ChunkState.CANCELLED.value, "reason": reason,
                                       "updated_at": repr(now)})
            pipe.execute()
        return True

    # --- reads ------------------------------------------------------------------------------------

    def job(self, job_id: str) -> dict:
        record = self.redis.hgetall(self.keys.job(job_id))
        if not record:
            raise NotFoundError(f"unknown job '{job_id}'")
        return _decode(record)

    def chunks(self, job_id: str, count: int) -> list[dict]:
        with self.redis.pipeline(transaction=False) as pipe:
            for index in range(count):
                pipe.hgetall(self.keys.chunk(job_id, index))
            return [_decode(c) for c in pipe.execute()]

    def job_ids(self, limit: int = 20) -> list[str]:
        return list(self.redis.zrevrange(self.keys.jobs(), 0, limit - 1))

    def active_job_ids(self) -> list[str]:
        return sorted(self.redis.smembers(self.keys.active()))

    def expired_leases(self, now: float) -> list[tuple[str, int]]:
        members = self.redis.zrangebyscore(self.keys.leases(), "-inf", repr(now))
        return [Keys.parse_lease_member(m) for m in members]

    def status(self, job_id: str, *, now: float) -> JobStatus:
        """What a user asks about a job: state, frames, chunks by state, time, output."""
        record = self.job(job_id)
        total_chunks = int(record.get("chunks_total", 0) or 0)
        chunks = self.chunks(job_id, total_chunks)
        counts: dict[str, int] = {}
        in_flight = 0
        for chunk in chunks:
            counts[chunk.get("state", "?")] = counts.get(chunk.get("state", "?"), 0) + 1
            if chunk.get("state") == ChunkState.RUNNING:
                in_flight += int(chunk.get("frames_done", 0) or 0)
        frames_total = int(record.get("frames_total", 0) or 0)
        frames_done = min(frames_total, int(record.get("frames_committed", 0) or 0) + in_flight)
        created = float(record["created_at"])
        finished = float(record["finished_at"]) if record.get("finished_at") else None
        state = JobState(record["state"])
        eta = None
        started = float(record["rendering_at"]) if record.get("rendering_at") else None
        if state == JobState.RENDERING and started and frames_done > 0 and now > started:
            eta = (frames_total - frames_done) / (frames_done / (now - started))
        return JobStatus(
            job_id=job_id, state=state, reason=record.get("reason", ""),
            priority=record.get("priority", ""), avatar=record.get("avatar", ""),
            audio=record.get("audio", ""), created_at=created, finished_at=finished,
            frames_total=frames_total, frames_done=frames_done, chunks=counts,
            elapsed_s=(finished or now) - created, eta_s=eta,
            output_key=record.get("output_key", ""), output_location=record.get("output_location", ""),
            workers=sorted({c["worker"] for c in chunks if c.get("worker")}))
