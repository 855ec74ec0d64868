"""Recovery as an explicit pass: ``reconcile(now=...)`` (rq's registry cleanup, Flamenco's timeouts).

Run periodically (``lipfarm reconcile --loop``, or the beat schedule of ``lipfarm worker --beat``):

1. attempts whose lease expired (their worker died or stalled) go back to the queue with the
   reason, or fail their chunk and job when the chunk is out of attempts;
2. jobs whose chunks are all committed but whose finalizer was lost get it queued again, as do
   jobs left finalizing by a finalizer that died; jobs whose plan message was lost are re-planned;
3. with ``rebuild``, unfinished jobs missing from Redis (which may lose its data) are restored from
   the manifests in storage: the submission, the plan and the chunks' commit markers.

Nothing here sleeps or reads the clock: ``now`` is a parameter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from common.config import Settings
from common.errors import NotFoundError
from common.jobstate import ChunkState, JobState, StateStore
from common.plan import Plan
from common.storage import Storage, commit_key, plan_key
from scheduler.finalize import record_terminal, terminal_key
from scheduler.submit import Submission, submission_key

log = logging.getLogger(__name__)


@dataclass
class Enqueue:
    plan: Callable[[str, str], None]
    render: Callable[[str, int, str, str], None]
    finalize: Callable[[str, str], None]


@dataclass
class ReconcileReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    finalizers: list[str] = field(default_factory=list)
    replanned: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)


def _expired_leases(store: StateStore, storage_at: Callable[[str], Storage], settings: Settings,
                    now: float, enqueue: Enqueue, report: ReconcileReport) -> None:
    for job_id, index in store.expired_leases(now):
        verdict = store.requeue(job_id, index, now=now, reason="lease expired: worker lost or stalled",
                                max_attempts=settings.max_attempts)
        if verdict == "requeued":
            chunk = store.chunks(job_id, index + 1)[index]
            enqueue.render(job_id, index, store.job(job_id).get("priority", "normal"),
                           f"{chunk.get('start_frame')}-{int(chunk.get('stop_frame', 0)) - 1}")
            report.requeued.append(f"{job_id}:{index}")
        elif verdict == "failed":
            record = store.job(job_id)
            record_terminal(storage_at(record["storage_url"]), job_id, "failed", record.get("reason", ""))
            report.failed.append(f"{job_id}:{index}")


def _stalled_jobs(store: StateStore, settings: Settings, now: float, enqueue: Enqueue,
                  report: ReconcileReport) -> None:
    grace = 2 * settings.lease_s
    for job_id in store.active_job_ids():
        try:
            record = store.job(job_id)
        except NotFoundError:
            continue
        state, priority = record["state"], record.get("priority", "normal")
        updated = float(record.get("updated_at", record["created_at"]))
        if state == JobState.RENDERING:
            complete = int(record.get("chunks_committed", 0)) == int(record.get("chunks_total", -1))
            enqueued_at = float(record.get("finalize_enqueued_at", 0) or 0)
            if complete and (not enqueued_at or now - enqueued_at > grace):
                store.redis.hset(store.keys.job(job_id), "finalize_enqueued_at", repr(now))
                enqueue.finalize(job_id, priority)
                report.finalizers.append(job_id)
        elif state == JobState.FINALIZING and not store.redis.exists(store.keys.finalize_lease(job_id)):
            if now - updated > grace:
                enqueue.finalize(job_id, priority)
                report.finalizers.append(job_id)
        elif state in (JobState.QUEUED, JobState.PLANNING) and now - updated > grace:
            enqueue.plan(job_id, priority)  # its planner died or its message was lost: planning repeats safely
            report.replanned.append(job_id)


def _rebuild(store: StateStore, storage: Storage, now: float, enqueue: Enqueue,
             report: ReconcileReport) -> None:
    job_ids = sorted({key.split("/")[1] for key in storage.list("jobs/") if key.endswith("/job.json")})
    for job_id in job_ids:
        if store.redis.exists(store.keys.job(job_id)) or storage.exists(terminal_key(job_id)):
            continue
        submission = Submission.from_json(storage.get_bytes(submission_key(job_id)).decode())
        record = {"priority": submission.priority, "avatar": submission.avatar_name,
                  "audio": submission.audio_name, "storage_url": storage.url,
                  "options": submission.options.to_dict(), "rebuilt_at": repr(now)}
        store.create_job(job_id, record, now=submission.submitted_at)
        if not storage.exists(plan_key(job_id)):
            enqueue.plan(job_id, submission.priority)
            report.rebuilt.append(job_id)
            continue
        plan = Plan.from_json(storage.get_bytes(plan_key(job_id)).decode())
        if storage.exists(plan.output_key):
            store.move_job(job_id, JobState.PLANNING, now=now)
            store.move_job(job_id, JobState.RENDERING, now=now)
            store.move_job(job_id, JobState.FINALIZING, now=now)
            store.move_job(job_id, JobState.DONE, now=now, output_location=storage.location(plan.output_key))
            report.rebuilt.append(job_id)
            continue
        committed = {c.index for c in plan.chunks if storage.exists(commit_key(job_id, c.index))}
        _restore_chunks(store, plan, committed, now)
        for chunk in plan.chunks:
            if chunk.index not in committed:
                enqueue.render(job_id, chunk.index, submission.priority,
                               f"{chunk.start_frame}-{chunk.stop_frame - 1}")
        if len(committed) == len(plan.chunks):
            store.redis.hset(store.keys.job(job_id), "finalize_enqueued_at", repr(now))
            enqueue.finalize(job_id, submission.priority)
        report.rebuilt.append(job_id)


def _restore_chunks(store: StateStore, plan: Plan, committed: set[int], now: float) -> None:
    job_id = plan.job_id
    store.add_chunks(job_id, [(c.start_frame, c.stop_frame) for c in plan.chunks], now=now)
    with store.redis.pipeline() as pipe:
        for chunk in plan.chunks:
            if chunk.index in committed:
                pipe.hset(store.keys.chunk(job_id, chunk.index),
                          mapping={"state": ChunkState.COMMITTED.value, "frames_done": chunk.frames,
                                   "reason": "restored from its commit marker"})
        pipe.hset(store.keys.job(job_id), mapping={
            "chunks_committed": len(committed),
            "frames_committed": sum(c.frames for c in plan.chunks if c.index in committed)})
        pipe.execute()
    store.move_job(job_id, JobState.PLANNING, now=now)
    store.move_job(job_id, JobState.RENDERING, now=now, output_key=plan.output_key)


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
    for kind in ("requeued", "failed", "finalizers", "replanned", "rebuilt"):
        if getattr(report, kind):
            log.info("reconcile %s: %s", kind, ", ".join(getattr(report, kind)))
    return report

