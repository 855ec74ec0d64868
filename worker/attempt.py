"""One attempt at one chunk on a farm worker: claim, render, upload, commit.

``run_attempt`` is what the Celery render task calls (and what tests call directly). It owns the
chunk only while its token is current: a heartbeat thread renews the lease, the render checks
ownership before every batch and stops if the job was cancelled or the chunk reassigned, and the
commit is refused to any attempt but the current one.

- A chunk whose attempt's process died on this host is requeued at once (its pid is gone), not
  after its lease runs out: a render process killed mid-chunk costs seconds, not a lease.
- Redis outages shorter than the lease are ridden out: heartbeats and ownership checks that cannot
  reach Redis do not stop the render, and the commit is retried until the lease would have run out.
- The segment is hashed, uploaded under a key of its own attempt (retried with backoff), and the
  commit records its size and hash: the finalizer checks every segment against them.
- ``classify`` sorts what went wrong: bad input fails the chunk and its job at once; a cached
  avatar or model that no longer matches its hashes is repaired from storage and the chunk retried
  (the input is fine, the copy was not); anything else is retried after a delay (``common.retry``), until the
  chunk is out of attempts.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from lipfarm.common import defaults, metrics, shutdown
from lipfarm.common.messages import EnqueueJob, EnqueueRender
from lipfarm.common.scratch import scratch_dir
from lipfarm.common.config import Settings
from lipfarm.job.endings import follow_move
from lipfarm.common.errors import (AvatarError, CancelledError, InputError, LipfarmError, ModelError, NotFoundError,
                           ServiceError)
from lipfarm.common.fileio import file_sha256
from lipfarm.common.hls import mux_hls_segment
from lipfarm.common.identity import WorkerProcess, is_dead_here
from lipfarm.job.jobfiles import CommitMarker, JobFiles
from lipfarm.job.holds import hold_reached
from lipfarm.job.keepalive import KeepAlive
from lipfarm.common.plan import Plan
from lipfarm.common.retry import with_retries
from lipfarm.common.state import Claim, JobState, Segment, StateStore, Verdict
from lipfarm.common.storage import Storage
from lipfarm.job.playlist import advance_playlist
from lipfarm.common.storage.layout import audio_piece_key, hls_segment_key, segment_key
from lipfarm.common.sysinfo import peak_rss_bytes
from lipfarm.worker.assets import AssetCache, resolve_chunk
from lipfarm.worker.render import StageTimes, render_chunk
from lipfarm.worker.templates import TemplateCache

log = logging.getLogger(__name__)

# enqueue_render(job id, chunk, priority, frames label, delay in s)


@dataclass
class FarmContext:
    """What a worker process keeps across chunks (made once per process, after fork)."""

    settings: Settings
    store: StateStore
    storage_at: Callable[[str], Storage]  # a job's storage, from the URL in its record
    cache: AssetCache
    templates: TemplateCache
    process: WorkerProcess
    enqueue_render: EnqueueRender
    enqueue_finalize: EnqueueJob


class Outcome(str, Enum):
    """How an attempt ended, as the task reports it."""

    COMMITTED = "committed"
    DUPLICATE = "duplicate"  # the chunk was committed already
    SKIPPED = "skipped"  # not claimed: running elsewhere, job ended, ...
    REQUEUED = "requeued"  # failed, and queued again for another attempt
    FAILED = "failed"  # failed, and so did its job
    STOPPED = "stopped"  # the job was cancelled or the chunk reassigned
    CANCELLED = "cancelled"  # stopped because its job was cancelled (the attempt log says "stopped")
    STALE = "stale"  # this attempt had lost the chunk by the time it reported
    RELEASED = "released"  # the worker is shutting down: handed back and queued again, uncharged
    UNREPORTED = "unreported"  # Redis stayed out of reach; the lease will run out and the chunk go back


@dataclass
class AttemptResult:
    outcome: Outcome
    detail: str = ""
    frames: int = 0
    times: dict | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "outcome": self.outcome.value}


@functools.lru_cache(maxsize=32)
def _plan(storage: Storage, job_id: str) -> Plan:
    return JobFiles(storage, job_id).plan()


class Heartbeat(KeepAlive):
    """Renews an attempt's lease while in its ``with`` block, reports progress, and tells the
    render when to stop (``should_stop``, polled before every batch)."""

    def __init__(self, ctx: FarmContext, job_id: str, index: int, token: str, frames: int,
                 report: Callable[[int, int], None] | None) -> None:
        super().__init__(self._renew, interval_s=ctx.settings.heartbeat_interval_s, name=f"{job_id}:{index}")
        self.ctx, self.job_id, self.index, self.token = ctx, job_id, index, token
        self.frames, self.report = frames, report
        self.frames_done = 0
        # The lease runs out lease_s after the last renewal Redis took; measured here on the monotonic
        # clock, as a duration, since Redis's clock and this host's may differ.
        self.renewed_at = time.monotonic()

    @property
    def lease_until(self) -> float:
        return self.renewed_at + self.ctx.settings.lease_s

    def progress(self, frames_done: int) -> None:
        self.frames_done = frames_done

    def should_stop(self) -> bool:
        """A cheap Redis read, so a cancel stops the render at the next batch; a worker shutting
        down raises ``ShuttingDown`` here (also while held), so the chunk is handed back at once."""
        shutdown.check()
        self._check_ownership()
        while not self.lost and hold_reached(self.ctx.settings, f"{self.job_id}.{self.index}", self.frames_done):
            time.sleep(0.05)
            shutdown.check()
            self._check_ownership()
        return self.lost

    def _check_ownership(self) -> None:
        try:
            if not self.lost and not self.ctx.store.is_current(self.job_id, self.index, self.token):
                self.verdict = Verdict.LOST
        except ServiceError as exc:  # an outage: render on, the commit will know
            log.warning("chunk %s:%s: ownership check failed, rendering on: %s", self.job_id, self.index, exc)

    def _renew(self) -> Verdict:
        sent = time.monotonic()
        verdict = self.ctx.store.beat(self.job_id, self.index, self.token, lease_s=self.ctx.settings.lease_s,
                                      frames_done=self.frames_done, peak_rss=peak_rss_bytes())
        if verdict == Verdict.OK:
            self.renewed_at = sent
        if self.report is not None:
            self.report(self.frames_done, self.frames)
        return verdict


@dataclass(frozen=True)
class Failure:
    """What went wrong in an attempt, as the state store records it."""

    reason: str
    retryable: bool


def classify(exc: BaseException, *, cached_copy_broken: Callable[[BaseException], bool]) -> Failure:
    """Bad input fails the job at once; a broken cached copy, or anything else, may be retried."""
    reason = str(exc) if isinstance(exc, LipfarmError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (AvatarError, ModelError)) and _broken_or_unknown(cached_copy_broken, exc):
        return Failure(f"{reason} (this worker's cached copy was damaged: repaired from storage)", True)
    return Failure(reason, retryable=not isinstance(exc, InputError))


def _broken_or_unknown(cached_copy_broken: Callable[[BaseException], bool], exc: BaseException) -> bool:
    """Whether the cached copy was broken; if the check itself fails (storage down), assume so and retry."""
    try:
        return cached_copy_broken(exc)
    except LipfarmError as check:
        log.warning("cannot check the cached copy after %s: %s", exc, check)
        return True


def run_attempt(ctx: FarmContext, job_id: str, index: int, *,
                report: Callable[[int, int], None] | None = None, lane: str = "",
                on_bound: Callable[[str, int, str], None] | None = None) -> AttemptResult:
    """Claim chunk ``index`` of ``job_id`` (or, given a ``lane``, the chunk fair share binds the
    lane's slot to: ``on_bound`` hears which, and its frames), render it, upload its segment and commit it. A worker
    that is shutting down claims nothing (``ShuttingDown``: the task puts its message back) and
    hands back a chunk it holds (``Outcome.RELEASED``)."""
    shutdown.check()
    with shutdown.Busy():
        return _attempt(ctx, job_id, index, report, lane, on_bound)


def _attempt(ctx: FarmContext, job_id: str, index: int, report: Callable[[int, int], None] | None,
             lane: str, on_bound: Callable[[str, int, str], None] | None) -> AttemptResult:
    if lane:
        claim = ctx.store.claim_next(lane, worker=ctx.process.id, worker_started=ctx.process.started,
                                     lease_s=ctx.settings.lease_s, max_attempts=ctx.settings.max_attempts)
        if claim.job_id:
            job_id, index = claim.job_id, claim.index
    else:
        claim = _claim(ctx, job_id, index)
    if not claim.ok:
        outcome = Outcome.FAILED if claim.verdict == Verdict.FAILED else Outcome.SKIPPED
        return AttemptResult(outcome, claim.detail)
    metrics.attempt_started()
    job = ctx.store.job(job_id)
    plan: Plan | None = None
    try:
        storage = ctx.storage_at(job.storage_url)
        plan = _plan(storage, job_id)
        if lane and on_bound is not None:  # before the first heartbeat reports progress
            on_bound(job_id, index, plan.chunks[index].frames_label)
        segment, times, lease_until = _render_and_upload(ctx, storage, plan, index, claim, report)
    except shutdown.ShuttingDown:
        return _hand_back(ctx, job, index, plan, claim, shutdown.reason(ctx.process.id))
    except (KeyboardInterrupt, SystemExit):
        _hand_back(ctx, job, index, plan, claim, f"worker {ctx.process.id} interrupted: handed back")
        raise
    except Exception as exc:
        failure = Failure(str(exc), retryable=True) if isinstance(exc, CancelledError) else classify(
            exc, cached_copy_broken=lambda e: plan is not None and ctx.cache.repair_if_damaged(plan, storage, e))
        result = _failed(ctx, job, index, plan.chunks[index].frames_label if plan else "", claim, failure)
        metrics.attempt_failed(metrics.failure_reason(exc, retryable=failure.retryable),
                               retried=result.outcome == Outcome.REQUEUED)
        return result
    metrics.chunk_rendered(plan.chunks[index].frames, times.extra["render_s"], times.unet_s)
    return _commit(ctx, JobFiles(storage, job_id), plan, index, claim, job.priority, segment, times,
                   lease_until=lease_until)


def _hand_back(ctx: FarmContext, job, index: int, plan: Plan | None, claim: Claim, reason: str) -> AttemptResult:
    """Give the chunk back uncharged and queue it again (the one message for it from now on)."""
    verdict = ctx.store.release(job.job_id, index, claim.token, reason=reason)
    if verdict != Verdict.RELEASED:  # cancelled or taken meanwhile: nothing to queue
        return AttemptResult(Outcome.STOPPED if verdict == Verdict.STOPPED else Outcome.STALE, reason)
    ctx.enqueue_render(job.job_id, index, job.priority, plan.chunks[index].frames_label if plan else "", 0.0)
    log.warning("chunk %s:%s attempt %s: %s", job.job_id, index, claim.attempt, reason)
    return AttemptResult(Outcome.RELEASED, reason)


def _claim(ctx: FarmContext, job_id: str, index: int) -> Claim:
    """Claim the chunk. If an attempt whose process died on this host holds it (a render process
    killed mid-chunk, whose message Celery redelivers at once), requeue it now rather than when its
    lease runs out; the next attempt waits as the retry rule says."""
    process, settings = ctx.process, ctx.settings
    claim = ctx.store.claim(job_id, index, worker=process.id, worker_started=process.started,
                            lease_s=settings.lease_s, max_attempts=settings.max_attempts)
    if claim.verdict == Verdict.LATER:  # this message came before the chunk's retry delay ran out
        ctx.enqueue_render(job_id, index, ctx.store.job(job_id).priority, "", float(claim.detail))
        return Claim(Verdict.SKIP, f"waits {float(claim.detail):.1f} s before its next attempt: queued for then")
    if claim.verdict == Verdict.SKIP and claim.owner and is_dead_here(claim.owner, claim.owner_started):
        log.warning("chunk %s:%s: its worker %s died; requeueing it", job_id, index, claim.owner)
        move = ctx.store.requeue(job_id, index, reason=f"worker process {claim.owner} died",
                                 max_attempts=settings.max_attempts, dead_token=claim.owner_token)
        job = ctx.store.job(job_id)
        if move.verdict in (Verdict.REQUEUED, Verdict.FAILED):
            metrics.attempt_failed("crash", retried=move.verdict == Verdict.REQUEUED)
        follow_move(ctx.store, ctx.storage_at, job, index, move, ctx.enqueue_render)
        return Claim(move.verdict if move.verdict == Verdict.FAILED else Verdict.SKIP, "its worker died: requeued")
    return claim


def _render_and_upload(ctx: FarmContext, storage: Storage, plan: Plan, index: int, claim: Claim,
                       report: Callable[[int, int], None] | None) -> tuple[Segment, StageTimes, float]:
    """Render the chunk and upload its segment; returns it, the stage times and when the lease ends."""
    chunk = plan.chunks[index]
    started = time.perf_counter()
    with Heartbeat(ctx, plan.job_id, index, claim.token, chunk.frames, report) as beat, \
            scratch_dir("lipfarm-chunk-", ctx.settings.temp_dir) as temp:
        output = temp / "segment.mp4"
        work = resolve_chunk(plan, chunk, storage=storage, cache=ctx.cache, output=output)
        fetched = time.perf_counter()
        times = render_chunk(work, threads=ctx.settings.threads_per_process(), templates=ctx.templates,
                             progress=beat.progress, should_stop=beat.should_stop)
        rendered = time.perf_counter()
        key = segment_key(plan.job_id, index, claim.token)
        with_retries(lambda: storage.put_file(key, output), f"upload of segment {key}")
        segment = Segment(key, output.stat().st_size, file_sha256(output),
                          *_hls_segment(storage, plan, index, claim.token, output, beat))
        lease_until = beat.lease_until
    times.extra = {"fetch_s": fetched - started, "render_s": rendered - fetched,
                   "upload_s": time.perf_counter() - rendered}
    return segment, times, lease_until


def _hls_segment(storage: Storage, plan: Plan, index: int, token: str, video: Path,
                 beat: Heartbeat) -> tuple[str, int, str]:
    """The chunk's HLS media segment (its video and its share of the job's AAC), uploaded; its key,
    size and SHA-256 for the commit. ("", 0, "") where the job has no audio pieces (a plan from
    before them) or this chunk's never came: the chunk still commits, the playlist waits at it."""
    if not plan.audio.track_key:
        return "", 0, ""
    piece = video.with_name("audio.lfap")
    if not _wait_for_piece(storage, audio_piece_key(plan.job_id, index), piece, beat):
        log.warning("chunk %s:%s: its audio piece never came; committing it without an HLS segment",
                    plan.job_id, index)
        return "", 0, ""
    ts = video.with_name("segment.ts")
    info = mux_hls_segment(video, plan.chunks[index].start_frame, piece, ts)
    key = hls_segment_key(plan.job_id, index, token)
    with_retries(lambda: storage.put_file(key, ts), f"upload of HLS segment {key}")
    return key, info.bytes, info.sha256


def _wait_for_piece(storage: Storage, key: str, path: Path, beat: Heartbeat) -> bool:
    """Fetch the chunk's audio piece; the planner uploads pieces as it encodes, front to back, so a
    chunk that finished before the planner reached it waits (its lease kept alive meanwhile)."""
    deadline = time.monotonic() + defaults.AUDIO_PIECE_WAIT_S
    while not beat.lost:
        shutdown.check()
        try:
            storage.get_file(key, path)
            return True
        except NotFoundError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
    return False


def _advance_playlist(ctx: FarmContext, files: JobFiles) -> None:
    """List what is newly playable. Best effort: the next commit, or the job's end, catches up."""
    try:
        advance_playlist(ctx.store, files, enqueue_render=ctx.enqueue_render, max_reopens=ctx.settings.max_attempts)
    except LipfarmError as exc:
        log.warning("playlist of job %s not advanced: %s", files.job_id, exc)


def _until_redis_answers(call: Callable[[], object], *, until: float):
    """``call()``, retried through a Redis outage until ``until``; None if Redis stayed away."""
    wait = 0.5
    while True:
        try:
            return call()
        except ServiceError as exc:
            if time.monotonic() + wait > until:
                log.warning("Redis unreachable until the lease would run out: %s", exc)
                return None
            time.sleep(wait)
            wait = min(2 * wait, 4.0)


def _failed(ctx: FarmContext, job, index: int, label: str, claim: Claim, failure: Failure) -> AttemptResult:
    job_id = job.job_id
    move = _until_redis_answers(lambda: ctx.store.fail(job_id, index, claim.token, reason=failure.reason,
                                                       retryable=failure.retryable,
                                                       max_attempts=ctx.settings.max_attempts),
                                until=time.monotonic() + ctx.settings.lease_s)
    if move is None:
        return AttemptResult(Outcome.UNREPORTED, failure.reason)
    log.warning("chunk %s:%s attempt %s: %s (%s)", job_id, index, claim.attempt, failure.reason, move.verdict.value)
    follow_move(ctx.store, ctx.storage_at, job, index, move, ctx.enqueue_render, label)
    outcome = {Verdict.REQUEUED: Outcome.REQUEUED, Verdict.FAILED: Outcome.FAILED,
               Verdict.STOPPED: Outcome.STOPPED}.get(move.verdict, Outcome.STALE)
    if outcome in (Outcome.STOPPED, Outcome.STALE) and _job_cancelled(ctx, job_id):
        return AttemptResult(Outcome.CANCELLED, f"job {job_id} was cancelled: render stopped")
    return AttemptResult(outcome, failure.reason)


def _job_cancelled(ctx: FarmContext, job_id: str) -> bool:
    """Whether the job was cancelled (what an attempt that lost its chunk is told, for the task's state)."""
    try:
        return ctx.store.job(job_id).state == JobState.CANCELLED
    except LipfarmError:
        return False


def _commit(ctx: FarmContext, files: JobFiles, plan: Plan, index: int, claim: Claim, priority: str,
            segment: Segment, times: StageTimes, *, lease_until: float) -> AttemptResult:
    chunk = plan.chunks[index]
    before = time.perf_counter()
    verdict = _until_redis_answers(
        lambda: ctx.store.commit(plan.job_id, index, claim.token, frames=chunk.frames, segment=segment),
        until=lease_until)
    if verdict is None:
        return AttemptResult(Outcome.UNREPORTED, "Redis unreachable at commit", chunk.frames, asdict(times))
    if verdict in (Verdict.OK, Verdict.COMPLETE):
        metrics.chunk_committed(ctx.store, plan.job_id)
        timing = {**{k: round(v, 4) for k, v in times.extra.items()},
                  "commit_s": round(time.perf_counter() - before, 4), "peak_rss": peak_rss_bytes(),
                  "inference": f"{times.backend}/{times.precision}", "inference_choice": times.choice,
                  "stages": {k: round(getattr(times, k), 4) for k in
                             ("mel_s", "encoder_s", "unet_s", "prepare_s", "composite_s", "encode_s")}}
        marker = CommitMarker(plan.job_id, index, chunk.frames, claim.attempt, ctx.process.id, segment.key,
                              segment.size, segment.sha256, time.time(), timing, segment.hls_key, segment.hls_size,
                              segment.hls_sha256)
        try:
            with_retries(lambda: files.put_commit_marker(marker), f"commit marker of chunk {index}")
        except ServiceError as exc:  # Redis has the commit; only a rebuild would render it again
            log.warning("chunk %s:%s committed, but its marker is not in storage: %s", plan.job_id, index, exc)
    if verdict == Verdict.COMPLETE:
        ctx.enqueue_finalize(plan.job_id, priority)
    if verdict in (Verdict.OK, Verdict.COMPLETE) and segment.hls_key:
        _advance_playlist(ctx, files)
    outcome = {Verdict.OK: Outcome.COMMITTED, Verdict.COMPLETE: Outcome.COMMITTED,
               Verdict.DUPLICATE: Outcome.DUPLICATE}.get(verdict, Outcome.STALE)
    return AttemptResult(outcome, verdict.value, chunk.frames, asdict(times))
