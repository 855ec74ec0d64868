"""The finalizer: check every chunk, join the segments, mux the audio, publish the output.

One finalizer works on a job at a time: it holds the job's finalize lease, with a token, renewed
from a thread like a chunk attempt's. A second message for the job is skipped while the lease is
alive; a finalizer that died is replaced when its lease runs out, or at once when its process is
known dead on this host.

Every segment is checked against what its commit recorded (size and SHA-256) as it is fetched. A
segment that is missing or damaged is never published: its chunk is reopened (queued to render
again, the job back to rendering) and the finalizer steps down; the next completing commit queues
a new one. Segments are fetched one at a time and deleted once copied, so the finalizer's disk use
is one segment plus the output. The output is uploaded only after ``stitch`` has checked it, and is
removed again if the job was cancelled meanwhile: a cancelled job never publishes anything.

A worker shutting down (``common.shutdown``) hands the job back between segments: the lease is
released with the reason and the finalizer queued again, so the next worker takes over at once.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lipfarm.common import metrics, shutdown
from lipfarm.common.messages import EnqueueJob, EnqueueRender
from lipfarm.common.config import Settings
from lipfarm.common.scratch import scratch_dir
from lipfarm.job.endings import close_job
from lipfarm.common.errors import LipfarmError, ServiceError
from lipfarm.common.retry import with_retries
from lipfarm.job.holds import hold_reached
from lipfarm.common.identity import WorkerProcess, is_dead_here
from lipfarm.job.jobfiles import JobFiles
from lipfarm.job.keepalive import KeepAlive
from lipfarm.common.plan import Plan
from lipfarm.job.playlist import listed_segment_keys
from lipfarm.job.segments import BadSegment, check_segment, reopen
from lipfarm.common.state import ChunkRecord, ChunkState, Claim, JobState, StateStore, Verdict
from lipfarm.scheduler.stitch import Segment, stitch

log = logging.getLogger(__name__)


class SegmentsFailedCheck(Exception):
    """Segments that are missing or do not match their commit: their chunks must be rendered again."""

    def __init__(self, bad: list[BadSegment]) -> None:
        super().__init__(", ".join(f"chunk {b.index}: {b.problem}" for b in bad))
        self.bad = bad


@dataclass
class Finalizer:
    """What a finalize task needs from the process it runs in."""

    store: StateStore
    settings: Settings
    process: WorkerProcess
    enqueue_render: EnqueueRender
    enqueue_finalize: EnqueueJob | None = None  # to queue a handed-back job again


def finalize_job(job_id: str, *, ctx: Finalizer, files: JobFiles) -> str:
    """Finalize ``job_id``; returns what happened, for the task's result. A worker shutting down
    takes nothing (``ShuttingDown``: the task puts the message back) and hands back what it holds."""
    shutdown.check()
    claim = _take(ctx, job_id)
    if not claim.ok:
        return f"skipped: {claim.detail}"
    settings, store = ctx.settings, ctx.store
    beat = KeepAlive(lambda: store.beat_finalizer(job_id, claim.token, lease_s=settings.lease_s),
                     interval_s=settings.heartbeat_interval_s, name=f"{job_id}:finalize")
    with shutdown.Busy(), beat:
        try:
            while not beat.lost and hold_reached(settings, f"{job_id}.finalize"):
                time.sleep(0.05)
                shutdown.check()
            return _finalize(ctx, files, claim)
        except shutdown.ShuttingDown:
            return _hand_back(ctx, job_id, claim)


def _hand_back(ctx: Finalizer, job_id: str, claim: Claim) -> str:
    """Give the finalize lease up and queue the finalizer again (the one message for the job)."""
    reason = shutdown.reason(ctx.process.id)
    if ctx.store.release_finalizer(job_id, claim.token, outcome="released",
                                   reason=reason) == Verdict.OK and ctx.enqueue_finalize is not None:
        ctx.enqueue_finalize(job_id, ctx.store.job(job_id).priority)
    log.warning("job %s finalize attempt %s: %s", job_id, claim.attempt, reason)
    return f"released: {reason}"


def _take(ctx: Finalizer, job_id: str) -> Claim:
    """Take the job's finalize lease; if a finalizer whose process died on this host holds it, take over."""
    process, settings = ctx.process, ctx.settings
    claim = ctx.store.take_finalizer(job_id, worker=process.id, worker_started=process.started,
                                     lease_s=settings.lease_s)
    if claim.verdict == Verdict.SKIP and claim.owner and is_dead_here(claim.owner, claim.owner_started):
        log.warning("job %s: its finalizer %s died; taking over", job_id, claim.owner)
        claim = ctx.store.take_finalizer(job_id, worker=process.id, worker_started=process.started, lease_s=settings.lease_s, take_over=claim.owner_token)
    return claim


def _finalize(ctx: Finalizer, files: JobFiles, claim: Claim) -> str:
    store, job_id = ctx.store, files.job_id
    started = time.perf_counter()
    try:
        plan = files.plan()
        chunks = store.chunks(job_id, len(plan.chunks))
        with scratch_dir("lipfarm-finalize-", ctx.settings.temp_dir) as temp:
            output = _stitched(files, plan, chunks, temp)
            if store.job(job_id).state != JobState.FINALIZING:
                return "stopped: job cancelled while finalizing"
            shutdown.check()
            with_retries(lambda: files.storage.put_file(plan.output_key, output), f"upload of {plan.output_key}")
    except shutdown.ShuttingDown:
        raise
    except SegmentsFailedCheck as failed:
        return _reopen(ctx, files, claim, failed)
    except Exception as exc:
        if not _retryable(exc):
            return _fail(store, files, f"finalize error: {type(exc).__name__}: {exc}"
                         if not isinstance(exc, LipfarmError) else str(exc))
        return _retry_later(store, files, claim, exc)
    location = files.storage.location(plan.output_key)
    if store.finish_done(job_id, claim.token, output_location=location) != Verdict.OK:
        files.storage.delete(plan.output_key)  # cancelled (or replaced) during the upload: publish nothing
        return "stopped: job cancelled while publishing"
    metrics.job_published(store, job_id, finalize_s=time.perf_counter() - started,
                          last_commit_at=max((c.committed_at for c in chunks if c.committed_at), default=None))
    close_job(store, files.storage, job_id)
    _delete_unused_segments(files, chunks)
    return f"done: {location}"


def _delete_unused_segments(files: JobFiles, chunks: list[ChunkRecord]) -> None:
    """Segments of attempts that did not commit go; what a viewer may still fetch stays (committed
    segments, and every HLS segment the playlist ever listed). Best effort: the job is done already."""
    try:
        keep = ({c.segment_key for c in chunks} | {c.hls_key for c in chunks if c.hls_key}
                | listed_segment_keys(files))
        files.delete_unused_segments(keep=keep)
    except LipfarmError as exc:
        log.warning("job %s: unused segments not deleted (%s)", files.job_id, exc)


def _stitched(files: JobFiles, plan: Plan, chunks: list[ChunkRecord], folder: Path) -> Path:
    not_committed = [c.index for c in chunks if c.state != ChunkState.COMMITTED]
    if not_committed or len(chunks) != len(plan.chunks):
        raise LipfarmError(f"chunks not committed at finalize: {not_committed[:10]}")
    output = folder / "output.mp4"
    audio, audio_s = _audio(files, plan, folder)
    stitch(_checked_segments(files, chunks, folder), audio, output, expected_frames=plan.frame_count,
           input_audio_s=audio_s, audio_bitrate_bps=plan.options.audio_bitrate_bps,
           audio_fit_samples=plan.audio.fit_samples)
    return output


def _audio(files: JobFiles, plan: Plan, folder: Path) -> tuple[Path, float | None]:
    """The AAC track the planner encoded, to copy; the original (to encode here) if it never got
    that far. With the original's duration to check the output's audio against."""
    if plan.audio.track_key and files.storage.exists(plan.audio.track_key):
        track = folder / "audio.m4a"
        files.storage.get_file(plan.audio.track_key, track)
        return track, plan.audio.duration_s
    original = folder / ("input" + Path(plan.audio.input_key).suffix)
    files.storage.get_file(plan.audio.input_key, original)
    return original, None


def _checked_segments(files: JobFiles, chunks: list[ChunkRecord], folder: Path) -> Iterator[Segment]:
    """Each committed segment, fetched and checked against its commit. After the first bad one the
    rest are still checked (none is yielded), so one pass finds every chunk to render again."""
    bad: list[BadSegment] = []
    for chunk in chunks:
        shutdown.check()
        path = folder / f"{chunk.index:05d}.mp4"
        problem = check_segment(files.storage, chunk.segment_key, chunk.segment_size, chunk.segment_sha256, path)
        if problem:
            bad.append(BadSegment(chunk.index, chunk.segment_key, problem))
        elif not bad:
            yield Segment(path, chunk.start_frame, chunk.frames)
        path.unlink(missing_ok=True)
    if bad:
        raise SegmentsFailedCheck(bad)


def _reopen(ctx: Finalizer, files: JobFiles, claim: Claim, failed: SegmentsFailedCheck) -> str:
    store, job_id = ctx.store, files.job_id
    if reopen(store, files, failed.bad, enqueue_render=ctx.enqueue_render, max_reopens=ctx.settings.max_attempts):
        close_job(store, files.storage, job_id)
    store.release_finalizer(job_id, claim.token, outcome="reopened", reason=str(failed))
    return f"reopened: {failed}"


# A disk (the work folder's, or the storage's) out of space or quota: space comes back, a bug does not.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _retryable(exc: BaseException) -> bool:
    """Whether publication may succeed later: a full disk anywhere in the cause chain, or a service
    (storage, Redis) that did not answer. A bug or a broken file is not: it fails the job."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return True
        if isinstance(seen, ServiceError) or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry_later(store: StateStore, files: JobFiles, claim: Claim, exc: BaseException) -> str:
    """Step down without failing the job: it stays finalizing with no finalizer, and the recovery
    pass queues another (each pass, ``LIPFARM_RECONCILE_INTERVAL_S``) until publication succeeds."""
    reason = f"publication failed, to be retried: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    log.warning("job %s: %s", files.job_id, reason)
    store.release_finalizer(files.job_id, claim.token, outcome="retry", reason=reason)
    return f"retrying: {reason}"


def _fail(store: StateStore, files: JobFiles, reason: str) -> str:
    store.finish(files.job_id, JobState.FAILED, reason=reason)
    close_job(store, files.storage, files.job_id)
    return f"failed: {reason}"
