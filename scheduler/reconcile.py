"""Recovery as an explicit pass: ``reconcile(now=...)`` (rq's registry cleanup, Flamenco's timeouts).

Run periodically (``lipfarm reconcile --loop``, or the beat schedule of ``lipfarm worker --beat``):

1. attempts whose lease expired (their worker died or stalled) go back to the queue with the
   reason, or fail their chunk and job when the chunk is out of attempts;
2. jobs that will not move on by themselves get the message they lack (``Stall``): a finalizer
   for a complete job whose finalize message was lost or whose finalizer died, a plan for a job
   whose plan message or planner was lost;
3. with ``rebuild``, unfinished jobs missing from Redis (which may lose its data) are restored from
   their files in storage: the submission, the plan and the chunks' commit markers.

The state store finds what is stuck; this module decides what to queue. Nothing here sleeps or
reads the clock: ``now`` is a parameter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

from common.config import Settings
from common.jobfiles import JobFiles
from common.state import JobRecord, Stall, StateStore, Verdict
from common.storage import Storage
from common.storage.layout import submitted_job_ids

log = logging.getLogger(__name__)


@dataclass
class Enqueue:
    """How the reconciler queues work (Celery in a farm, a recorder in tests)."""

    plan: Callable[[str, str], None]  # (job id, priority)
    render: Callable[[str, int, str, str], None]  # (job id, chunk, priority, frames label)
    finalize: Callable[[str, str], None]  # (job id, priority)


@dataclass
class ReconcileReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    finalizers: list[str] = field(default_factory=list)
    replanned: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)


def reconcile(*, store: StateStore, storage: Storage, settings: Settings, now: float,
              enqueue: Enqueue, rebuild: bool = False,
              storage_at: Callable[[str], Storage] | None = None) -> ReconcileReport:
    """One recovery pass; see the module docstring.

    ``storage`` is where ``rebuild`` looks for jobs; ``storage_at`` opens a job's own storage by the
    URL in its record (default: ``storage`` for every job).
    """
    report = ReconcileReport()
    if rebuild:
        _rebuild(store, storage, now, enqueue, report)
    _expired_leases(store, storage_at or (lambda url: storage), settings, now, enqueue, report)
    _stalled_jobs(store, settings, now, enqueue, report)
    for kind, items in report.__dict__.items():
        if items:
            log.info("reconcile %s: %s", kind, ", ".join(items))
    return report


def _expired_leases(store: StateStore, storage_at: Callable[[str], Storage], settings: Settings,
                    now: float, enqueue: Enqueue, report: ReconcileReport) -> None:
    for job_id, index in store.expired_leases(now):
        verdict = store.requeue(job_id, index, now=now, reason="lease expired: worker lost or stalled",
                                max_attempts=settings.max_attempts)
        if verdict == Verdict.REQUEUED:
            job, chunk = store.job(job_id), store.chunk(job_id, index)
            enqueue.render(job_id, index, job.priority, chunk.frames_label)
            report.requeued.append(f"{job_id}:{index}")
        elif verdict == Verdict.FAILED:
            job = store.job(job_id)
            JobFiles(storage_at(job.storage_url), job_id).put_ended(job.state.value, job.reason)
            report.failed.append(f"{job_id}:{index}")


def _stalled_jobs(store: StateStore, settings: Settings, now: float, enqueue: Enqueue,
                  report: ReconcileReport) -> None:
    for stalled in store.stalled_jobs(now=now, grace_s=2 * settings.lease_s):
        job = stalled.job
        if stalled.stall == Stall.PLAN_LOST:
            enqueue.plan(job.job_id, job.priority)  # planning repeats safely
            report.replanned.append(job.job_id)
            continue
        if stalled.stall == Stall.FINALIZER_NOT_QUEUED:
            store.mark_finalizer_enqueued(job.job_id, now=now)
        enqueue.finalize(job.job_id, job.priority)
        report.finalizers.append(job.job_id)


def _rebuild(store: StateStore, storage: Storage, now: float, enqueue: Enqueue,
             report: ReconcileReport) -> None:
    for job_id in submitted_job_ids(storage.list("jobs/")):
        files = JobFiles(storage, job_id)
        if store.exists(job_id) or files.ended():
            continue
        _rebuild_job(store, files, now, enqueue)
        report.rebuilt.append(job_id)


def _rebuild_job(store: StateStore, files: JobFiles, now: float, enqueue: Enqueue) -> None:
    submission = files.submission()
    record = replace(JobRecord.queued(submission, files.storage.url, now=now), rebuilt_at=now)
    if not files.has_plan():
        store.create_job(record)
        enqueue.plan(files.job_id, submission.priority)
        return
    plan = files.plan()
    if files.has_output(plan):
        store.restore_done_job(record, output_location=files.storage.location(plan.output_key), now=now)
        return
    committed = files.committed(plan)
    ranges = [(c.start_frame, c.stop_frame) for c in plan.chunks]
    store.restore_job(replace(record, output_key=plan.output_key), ranges,
                      committed={i: m.frames for i, m in committed.items()}, now=now)
    for chunk in plan.chunks:
        if chunk.index not in committed:
            enqueue.render(files.job_id, chunk.index, submission.priority, chunk.frames_label)
    if len(committed) == len(plan.chunks):
        store.mark_finalizer_enqueued(files.job_id, now=now)
        enqueue.finalize(files.job_id, submission.priority)

