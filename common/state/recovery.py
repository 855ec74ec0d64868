"""The state verbs of the recovery pass (``scheduler.reconcile``): leases and what outlived them,
jobs that will not move on by themselves, partly lost state, rebuilds, and the farm's identity.
Mixed into ``StateStore``; the recovery pass decides what to queue, these find what is stuck."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lipfarm.common.errors import NotFoundError
from lipfarm.common.state.guard import guarded
from lipfarm.common.state.keys import Keys
from lipfarm.common.state.records import ChunkRecord, ChunkState, JobRecord, JobState
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




class RecoveryVerbs:
    """What the recovery pass reads and repairs (a part of ``StateStore``)."""

    # --- recovery ---------------------------------------------------------------------------------

    @guarded
    def farm_id(self) -> str | None:
        """The farm id kept in this Redis (None: never made, or Redis lost its data)."""
        return self.redis.get(self.keys.farm_id())

    @guarded
    def claim_farm_id(self, candidate: str) -> str:
        """Keep ``candidate`` as the farm id unless one is kept already; returns the one kept."""
        self.redis.set(self.keys.farm_id(), candidate, nx=True)
        return self.redis.get(self.keys.farm_id())

    @guarded
    def generation(self) -> str | None:
        """The marker the last rebuild left; None means Redis lost its data since (or never had it)."""
        return self.redis.get(self.keys.generation())

    @guarded
    def set_generation(self, *, now: float | None = None) -> None:
        now = self._at(now)
        self.redis.set(self.keys.generation(), repr(now))

    @guarded
    def take_rebuild_lock(self, owner: str, *, ttl_s: float) -> bool:
        """One rebuild from storage at a time: two would restore the same job over each other."""
        return bool(self.redis.set(self.keys.rebuild_lock(), owner, nx=True, ex=max(1, int(ttl_s))))

    @guarded
    def release_rebuild_lock(self, owner: str) -> None:
        if self.redis.get(self.keys.rebuild_lock()) == owner:
            self.redis.delete(self.keys.rebuild_lock())

    @guarded
    def take_repair_turn(self, owner: str, *, interval_s: float) -> bool:
        """Whether ``owner`` looks for partly lost state now (once per ``interval_s`` across the farm)."""
        return bool(self.redis.set(self.keys.repair_turn(), owner, nx=True, px=max(1, int(interval_s * 1000))))

    @guarded
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

    @guarded
    def reactivate(self, job_id: str) -> None:
        """Put an unfinished job back in the active set (the recovery pass reads only that set)."""
        self.redis.sadd(self.keys.active(), job_id)

    @guarded
    def purge(self, job_id: str) -> None:
        """Remove what is left of a job whose state is partly lost, before it is restored from storage
        as a rebuild would: every key of its own, and its entries in the farm-wide sets."""
        keys = self.keys
        own = [keys.job(job_id), keys.sched_waiting(job_id), keys.webhook(job_id), keys.webhook_attempts(job_id),
               keys.playlist_lock(job_id), keys.playlist_dirty(job_id), keys.attempts(job_id, "finalize")]
        own += list(self.redis.scan_iter(f"{keys.chunk(job_id, '')}*")) + list(
            self.redis.scan_iter(f"{keys.attempts(job_id, '')}*"))
        leases = [m for m in self.redis.zrange(keys.leases(), 0, -1) if m.startswith(f"{job_id}:")]
        state, priority, tenant, running = self.redis.hmget(keys.job(job_id), "state", "priority", "tenant", "running")
        with self.redis.pipeline() as pipe:
            if state in ("done", "failed", "cancelled"):
                pipe.hincrby(keys.metrics_totals(), f"jobs_{state}", -1)
            if int(running or 0) > 0:  # its running chunks no longer count against its tenant's share
                pipe.hincrby(keys.sched_running(priority or "normal"), tenant or "default", -int(running))
            pipe.delete(*own)
            if leases:
                pipe.zrem(keys.leases(), *leases)
            pipe.zrem(keys.finalize_leases(), job_id)
            pipe.zrem(keys.jobs(), job_id)
            pipe.srem(keys.active(), job_id)
            pipe.srem(keys.unrecorded(), job_id)
            pipe.zrem(keys.webhooks_due(), job_id)
            pipe.execute()

    @guarded
    def take_reconcile_turn(self, owner: str, *, interval_s: float) -> bool:
        """Whether ``owner`` runs this interval's recovery pass: the first to ask in each interval does."""
        return bool(self.redis.set(self.keys.reconcile_turn(), owner, nx=True, px=max(1, int(interval_s * 1000))))

    @guarded
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

    @guarded
    def expired_leases(self, now: float | None = None) -> list[tuple[str, int]]:
        now = self._at(now)
        members = self.redis.zrangebyscore(self.keys.leases(), "-inf", repr(now))
        return [Keys.parse_lease_member(m) for m in members]

    @guarded
    def expired_finalizers(self, now: float | None = None) -> list[str]:
        now = self._at(now)
        return list(self.redis.zrangebyscore(self.keys.finalize_leases(), "-inf", repr(now)))

    @guarded
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

    @guarded
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

    @guarded
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
