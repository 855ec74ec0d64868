"""One attempt at one chunk on a farm worker: claim, render, upload, commit.

``run_attempt`` is what the Celery render task calls (and what tests call directly). It owns the
chunk only while its token is current: a heartbeat thread renews the lease, the render checks
ownership before every batch and stops if the job was cancelled or the chunk reassigned, and the
commit is refused to any attempt but the current one. Errors are sorted into three kinds:

- bad input (a model, avatar or audio that cannot work): the chunk and its job fail at once, with
  the message as the reason;
- anything else (storage down, a crash): the attempt fails and the chunk is requeued while it has
  attempts left, then the job fails with the last reason;
- a worker shutting down releases the chunk (requeued, the attempt not counted).
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from common.config import Settings
from common.errors import CancelledError, InputError, LipfarmError
from common.jobstate import StateStore
from common.plan import Plan
from common.sysinfo import peak_rss_bytes
from common.storage import Storage, commit_key, plan_key
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


@dataclass
class AttemptResult:
    status: str  # committed | duplicate | skipped | requeued | failed | stopped | released | stale
    detail: str = ""
    frames: int = 0
    times: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@functools.lru_cache(maxsize=32)
def _plan(storage: Storage, job_id: str) -> Plan:
    key = plan_key(job_id)
    return Plan.from_json(storage.get_bytes(key).decode(), source=f"{storage.url}/{key}")


class Heartbeat:
    """Renews an attempt's lease from a thread and tells the render when to stop."""

    def __init__(self, ctx: FarmContext, job_id: str, index: int, token: str, frames: int,
                 report: Callable[[int, int], None] | None) -> None:
        self.ctx, self.job_id, self.index, self.token = ctx, job_id, index, token
        self.frames, self.report = frames, report
        self.frames_done = 0
        self.verdict = "ok"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lipfarm-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def progress(self, frames_done: int) -> None:
        self.frames_done = frames_done

    def should_stop(self) -> bool:
        """Polled before every batch: a cheap Redis read, so a cancel stops the render at once."""
        if self.verdict == "ok" and not self.ctx.store.is_current(self.job_id, self.index, self.token):
            self.verdict = "lost or stopped"
        return self.verdict != "ok"

    def _beat(self) -> None:
        settings = self.ctx.settings
        verdict = self.ctx.store.beat(self.job_id, self.index, self.token, now=time.time(),
                                      lease_s=settings.lease_s, frames_done=self.frames_done,
                                      peak_rss=peak_rss_bytes())
        if verdict != "ok":
            self.verdict = verdict
        if self.report is not None:
            self.report(self.frames_done, self.frames)

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_interval_s):
            try:
                self._beat()
            except Exception as exc:  # Redis hiccup: the lease has slack; keep rendering
                log.warning("heartbeat of %s:%s failed: %s", self.job_id, self.index, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_attempt(ctx: FarmContext, job_id: str, index: int, *,
                report: Callable[[int, int], None] | None = None) -> AttemptResult:
    """Claim chunk ``index`` of ``job_id``, render it, upload its segment and commit it."""
    settings = ctx.settings
    started = time.perf_counter()
    claim = ctx.store.claim(job_id, index, worker=ctx.worker_id, now=time.time(),
                            lease_s=settings.lease_s, max_attempts=settings.max_attempts)
    if not claim.ok:
        return AttemptResult("skipped" if claim.status == "skip" else claim.status, claim.detail)
    record = ctx.store.job(job_id)
    priority = record.get("priority", "normal")
    try:
        storage = ctx.storage_at(record["storage_url"])
        plan = _plan(storage, job_id)
        chunk = plan.chunks[index]
        beat = Heartbeat(ctx, job_id, index, claim.token, chunk.frames, report)
        beat.start()
        try:
            with tempfile.TemporaryDirectory(prefix="lipfarm-chunk-") as temp:
                output = Path(temp) / "segment.mp4"
                work = resolve_chunk(plan, chunk, storage=storage, cache=ctx.cache, output=output)
                fetched = time.perf_counter()
                times = render_chunk(work, threads=settings.threads_per_process(), templates=ctx.templates,
                                     progress=beat.progress, should_stop=beat.should_stop)
                beat.stop()
                rendered = time.perf_counter()
                storage.put_file(chunk.segment_key, output)
                times.extra = {"fetch_s": fetched - started, "render_s": rendered - fetched,
                               "upload_s": time.perf_counter() - rendered}
        finally:
            beat.stop()
    except CancelledError as exc:
        verdict = ctx.store.fail(job_id, index, claim.token, reason=str(exc), retryable=True,
                                 now=time.time(), max_attempts=settings.max_attempts)
        return _after_failure(ctx, job_id, index, priority, verdict, "stopped: job cancelled or chunk reassigned")
    except (KeyboardInterrupt, SystemExit):
        if ctx.store.release(job_id, index, claim.token, reason="worker shut down", now=time.time()) == "released":
            ctx.enqueue_render(job_id, index, priority)
        raise
    except Exception as exc:
        retryable = not isinstance(exc, InputError)
        reason = str(exc) if isinstance(exc, LipfarmError) else f"{type(exc).__name__}: {exc}"
        verdict = ctx.store.fail(job_id, index, claim.token, reason=reason, retryable=retryable,
                                 now=time.time(), max_attempts=settings.max_attempts)
        log.warning("chunk %s:%s attempt %s: %s (%s)", job_id, index, claim.attempt, reason, verdict)
        return _after_failure(ctx, job_id, index, priority, verdict, reason)
    return _commit(ctx, storage, plan, index, claim, priority, times)


def _after_failure(ctx: FarmContext, job_id: str, index: int, priority: str, verdict: str,
                   reason: str) -> AttemptResult:
    if verdict == "requeued":
        ctx.enqueue_render(job_id, index, priority)
    return AttemptResult(verdict if verdict in ("requeued", "failed", "stopped") else "stale", reason)


def _commit(ctx: FarmContext, storage: Storage, plan: Plan, index: int, claim, priority: str,
            times: StageTimes) -> AttemptResult:
    chunk = plan.chunks[index]
    before = time.perf_counter()
    verdict = ctx.store.commit(plan.job_id, index, claim.token, frames=chunk.frames, now=time.time())
    if verdict in ("ok", "complete"):
        timing = {**{k: round(v, 4) for k, v in times.extra.items()},
                  "commit_s": round(time.perf_counter() - before, 4), "peak_rss": peak_rss_bytes(),
                  "stages": {k: round(getattr(times, k), 4) for k in
                             ("mel_s", "encoder_s", "unet_s", "prepare_s", "composite_s", "encode_s")}}
        marker = {"job_id": plan.job_id, "chunk": index, "frames": chunk.frames, "attempt": claim.attempt,
                  "worker": ctx.worker_id, "segment_key": chunk.segment_key, "committed_at": time.time(),
                  "timing": timing}
        storage.put_bytes(commit_key(plan.job_id, index), json.dumps(marker).encode())
    if verdict == "complete":
        ctx.enqueue_finalize(plan.job_id, priority)
    status = {"ok": "committed", "complete": "committed", "duplicate": "duplicate"}.get(verdict, "stale")
    return AttemptResult(status, verdict, chunk.frames, asdict(times))
