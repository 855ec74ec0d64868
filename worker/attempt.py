"""One attempt at one chunk on a farm worker: claim, render, upload, commit.

``run_attempt`` is what the Celery render task calls (and what tests call directly). It owns the
chunk only while its token is current: a heartbeat thread renews the lease, the render checks
ownership before every batch and stops if the job was cancelled or the chunk reassigned, and the
commit is refused to any attempt but the current one. ``classify`` sorts what went wrong:

- bad input (a model, avatar or audio that cannot work): the chunk and its job fail at once, with
  the message as the reason;
- anything else (storage down, a crash): the attempt fails and the chunk is requeued while it has
  attempts left, then the job fails with the last reason;
- the job cancelled or the chunk reassigned: the attempt stops;
- a worker shutting down releases the chunk (requeued, the attempt not counted).
"""

from __future__ import annotations

import functools
import logging
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from common.config import Settings
from common.errors import CancelledError, InputError, LipfarmError
from common.jobfiles import CommitMarker, JobFiles
from common.plan import Plan
from common.state import Claim, StateStore, Verdict
from common.storage import Storage
from common.sysinfo import peak_rss_bytes
from worker.assets import AssetCache, resolve_chunk
from worker.render import StageTimes, render_chunk
from worker.templates import TemplateCache

log = logging.getLogger(__name__)


@dataclass
class FarmContext:
    """What a worker process keeps across chunks (made once per process, after fork)."""

    settings: Settings
    store: StateStore
    storage_at: Callable[[str], Storage]  # a job's storage, from the URL in its record
    cache: AssetCache
    templates: TemplateCache
    worker_id: str
    enqueue_render: Callable[[str, int, str], None]
    enqueue_finalize: Callable[[str, str], None]


class Outcome(str, Enum):
    """How an attempt ended, as the task reports it."""

    COMMITTED = "committed"
    DUPLICATE = "duplicate"  # the chunk was committed already
    SKIPPED = "skipped"  # not claimed: running elsewhere, job ended, ...
    REQUEUED = "requeued"  # failed, and queued again for another attempt
    FAILED = "failed"  # failed, and so did its job
    STOPPED = "stopped"  # the job was cancelled or the chunk reassigned
    STALE = "stale"  # this attempt had lost the chunk by the time it reported


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


class Heartbeat:
    """Renews an attempt's lease from a thread while in its ``with`` block, and tells the render
    when to stop (``should_stop``, polled before every batch)."""

    def __init__(self, ctx: FarmContext, job_id: str, index: int, token: str, frames: int,
                 report: Callable[[int, int], None] | None) -> None:
        self.ctx, self.job_id, self.index, self.token = ctx, job_id, index, token
        self.frames, self.report = frames, report
        self.frames_done = 0
        self.verdict = Verdict.OK
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lipfarm-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def progress(self, frames_done: int) -> None:
        self.frames_done = frames_done

    def should_stop(self) -> bool:
        """A cheap Redis read, so a cancel stops the render at the next batch."""
        self._check_ownership()
        while self.verdict == Verdict.OK and self._held():
            time.sleep(0.05)
            self._check_ownership()
        return self.verdict != Verdict.OK

    def _check_ownership(self) -> None:
        if self.verdict == Verdict.OK and not self.ctx.store.is_current(self.job_id, self.index, self.token):
            self.verdict = Verdict.LOST

    def _held(self) -> bool:
        """Whether a hold file pauses this chunk now (``LIPFARM_HOLD_DIR``; debugging and tests)."""
        if not self.ctx.settings.hold_dir:
            return False
        hold = Path(self.ctx.settings.hold_dir) / f"{self.job_id}.{self.index}.hold"
        try:
            after = hold.read_text().strip()
        except OSError:
            return False
        return self.frames_done >= int(after or 0)

    def _beat(self) -> None:
        settings = self.ctx.settings
        verdict = self.ctx.store.beat(self.job_id, self.index, self.token, now=time.time(),
                                      lease_s=settings.lease_s, frames_done=self.frames_done,
                                      peak_rss=peak_rss_bytes())
        if verdict != Verdict.OK:
            self.verdict = verdict
        if self.report is not None:
            self.report(self.frames_done, self.frames)

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_interval_s):
            try:
                self._beat()
            except Exception as exc:  # Redis hiccup: the lease has slack; keep rendering
                log.warning("heartbeat of %s:%s failed: %s", self.job_id, self.index, exc)


@dataclass(frozen=True)
class Failure:
    """What went wrong in an attempt, as the state store records it."""

    reason: str
    retryable: bool


def classify(exc: BaseException) -> Failure:
    """Bad input fails the job at once; anything else may be retried (see the module docstring)."""
    reason = str(exc) if isinstance(exc, LipfarmError) else f"{type(exc).__name__}: {exc}"
    return Failure(reason, retryable=not isinstance(exc, InputError))


def run_attempt(ctx: FarmContext, job_id: str, index: int, *,
                report: Callable[[int, int], None] | None = None) -> AttemptResult:
    """Claim chunk ``index`` of ``job_id``, render it, upload its segment and commit it."""
    settings = ctx.settings
    claim = ctx.store.claim(job_id, index, worker=ctx.worker_id, now=time.time(),
                            lease_s=settings.lease_s, max_attempts=settings.max_attempts)
    if not claim.ok:
        outcome = Outcome.FAILED if claim.verdict == Verdict.FAILED else Outcome.SKIPPED
        return AttemptResult(outcome, claim.detail)
    job = ctx.store.job(job_id)
    try:
        storage = ctx.storage_at(job.storage_url)
        plan = _plan(storage, job_id)
        times = _render_and_upload(ctx, storage, plan, index, claim, report)
    except (KeyboardInterrupt, SystemExit):
        if ctx.store.release(job_id, index, claim.token, reason="worker shut down", now=time.time()) == Verdict.RELEASED:
            ctx.enqueue_render(job_id, index, job.priority)
        raise
    except CancelledError as exc:
        return _failed(ctx, job_id, index, job.priority, claim, Failure(str(exc), retryable=True))
    except Exception as exc:
        return _failed(ctx, job_id, index, job.priority, claim, classify(exc))
    return _commit(ctx, JobFiles(storage, job_id), plan, index, claim, job.priority, times)


def _render_and_upload(ctx: FarmContext, storage: Storage, plan: Plan, index: int, claim: Claim,
                       report: Callable[[int, int], None] | None) -> StageTimes:
    chunk = plan.chunks[index]
    started = time.perf_counter()
    with Heartbeat(ctx, plan.job_id, index, claim.token, chunk.frames, report) as beat, \
            tempfile.TemporaryDirectory(prefix="lipfarm-chunk-") as temp:
        output = Path(temp) / "segment.mp4"
        work = resolve_chunk(plan, chunk, storage=storage, cache=ctx.cache, output=output)
        fetched = time.perf_counter()
        times = render_chunk(work, threads=ctx.settings.threads_per_process(), templates=ctx.templates,
                             progress=beat.progress, should_stop=beat.should_stop)
        rendered = time.perf_counter()
        storage.put_file(chunk.segment_key, output)
    times.extra = {"fetch_s": fetched - started, "render_s": rendered - fetched,
                   "upload_s": time.perf_counter() - rendered}
    return times


def _failed(ctx: FarmContext, job_id: str, index: int, priority: str, claim: Claim,
            failure: Failure) -> AttemptResult:
    verdict = ctx.store.fail(job_id, index, claim.token, reason=failure.reason, retryable=failure.retryable,
                             now=time.time(), max_attempts=ctx.settings.max_attempts)
    log.warning("chunk %s:%s attempt %s: %s (%s)", job_id, index, claim.attempt, failure.reason, verdict.value)
    if verdict == Verdict.REQUEUED:
        ctx.enqueue_render(job_id, index, priority)
    outcome = {Verdict.REQUEUED: Outcome.REQUEUED, Verdict.FAILED: Outcome.FAILED,
               Verdict.STOPPED: Outcome.STOPPED}.get(verdict, Outcome.STALE)
    return AttemptResult(outcome, failure.reason)


def _commit(ctx: FarmContext, files: JobFiles, plan: Plan, index: int, claim: Claim, priority: str,
            times: StageTimes) -> AttemptResult:
    chunk = plan.chunks[index]
    before = time.perf_counter()
    verdict = ctx.store.commit(plan.job_id, index, claim.token, frames=chunk.frames, now=time.time())
    if verdict in (Verdict.OK, Verdict.COMPLETE):
        timing = {**{k: round(v, 4) for k, v in times.extra.items()},
                  "commit_s": round(time.perf_counter() - before, 4), "peak_rss": peak_rss_bytes(),
                  "stages": {k: round(getattr(times, k), 4) for k in
                             ("mel_s", "encoder_s", "unet_s", "prepare_s", "composite_s", "encode_s")}}
        files.put_commit_marker(CommitMarker(plan.job_id, index, chunk.frames, claim.attempt, ctx.worker_id,
                                             chunk.segment_key, time.time(), timing))
    if verdict == Verdict.COMPLETE:
        ctx.enqueue_finalize(plan.job_id, priority)
    outcome = {Verdict.OK: Outcome.COMMITTED, Verdict.COMPLETE: Outcome.COMMITTED,
               Verdict.DUPLICATE: Outcome.DUPLICATE}.get(verdict, Outcome.STALE)
    return AttemptResult(outcome, verdict.value, chunk.frames, asdict(times))
