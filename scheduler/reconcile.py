"""Recovery as an explicit pass: ``reconcile(now=...)`` (rq's registry cleanup, Flamenco's timeouts).

Every ``lipfarm worker`` runs it in a thread (at most one pass per interval across the farm), and
``lipfarm reconcile --loop`` runs it on its own, so recovery does not hang on one process. A pass:

1. records in storage the ends of jobs that ended in Redis (the outbox), so a rebuild restores them
   as they ended;
2. rebuilds from storage when Redis lost its data (its generation marker is gone) or when asked:
   unfinished jobs are restored from their submission, plan and commit markers, ended ones from
   their end records;
3. repairs, once a minute across the farm, jobs whose state Redis lost part of (a record, its
   entry in the active set, some chunk records): restored from storage one by one as a rebuild would;
4. takes back, at once, chunks and finalizers whose process died on this host;
5. requeues attempts whose lease expired (their worker died or stalled elsewhere), or fails their
   chunk and job when out of attempts; queues a new finalizer for a job whose finalizer's lease
   expired;
6. gives jobs that will not move on by themselves the message they lack (``Stall``), and re-queues
   queued chunks whose render message was lost (none waits in the broker, yet they stay queued);
7. re-sends webhook events whose delivery message was lost (their next attempt is long overdue):
   attempts are fenced by number, so a message that was only late finds its attempt made.
8. removes from Redis ended jobs whose end storage holds, ``LIPFARM_JOB_RETENTION_S`` after their
   end (the CLI and the API bring one back from storage when it is asked for).

The state store finds what is stuck; this module decides what to queue. ``reconcile`` never sleeps
and measures time on Redis's clock (a test may pass ``now``); ``run_forever`` is the loop, which logs an outage of Redis, the
broker or storage and carries on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from lipfarm.common import defaults
from lipfarm.common.messages import EnqueueJob, EnqueueRender

from lipfarm.job import webhooks
from lipfarm.common.config import Settings
from lipfarm.job.endings import close_jobs, follow_move
from lipfarm.common.errors import LipfarmError
from lipfarm.common.farm import farm_id
from lipfarm.common.identity import is_dead_here, worker_id
from lipfarm.job.jobfiles import JobFiles
from lipfarm.common.state import Damage, JobRecord, JobState, Stall, StateStore, TokenStore, Verdict
from lipfarm.common.storage import Storage
from lipfarm.common.storage.layout import submitted_job_ids

log = logging.getLogger(__name__)


@dataclass
class Enqueue:
    """How the reconciler queues work (Celery in a farm, a recorder in tests)."""

    plan: EnqueueJob
    render: EnqueueRender
    finalize: EnqueueJob
    waiting_renders: Callable[[], int] = lambda: 0  # render messages waiting in the broker
    # (task name, job id) of plan and finalize messages in the broker, waiting or reserved
    pending: Callable[[], set[tuple[str, str]]] = lambda: set()
    webhook: Callable[[str, str, int, float], None] | None = None  # (job id, event id, attempt, delay s)


@dataclass
class ReconcileReport:
    recorded: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    taken_back: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    finalizers: list[str] = field(default_factory=list)
    replanned: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    webhooks_resent: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # "<job>: <what was lost>", restored from storage
    other_farms: list[str] = field(default_factory=list)  # jobs in the storage another farm submitted: left alone


def reconcile(*, store: StateStore, storage: Storage, settings: Settings, enqueue: Enqueue,
              now: float | None = None, rebuild: bool = False,
              storage_at: Callable[[str], Storage] | None = None) -> ReconcileReport:
    """One recovery pass; see the module docstring.

    ``storage`` is where a rebuild looks for jobs; ``storage_at`` opens a job's own storage by the
    URL in its record (default: ``storage`` for every job). ``rebuild`` forces a rebuild; without
    it one runs only when Redis has lost its data.
    """
    storage_at = storage_at or (lambda url: storage)
    now = store.now() if now is None else now  # Redis's clock: the one every lease was set on
    report = ReconcileReport(recorded=close_jobs(store, storage_at))
    if (rebuild or store.generation() is None) and store.take_rebuild_lock(owner := worker_id(), ttl_s=600):
        try:
            _rebuild(store, storage, settings, now, enqueue, report)
            store.set_generation(now=now)
        finally:
            store.release_rebuild_lock(owner)
    _repair_partial_loss(store, storage, settings, now, enqueue, report)
    _dead_local_owners(store, storage_at, settings, now, enqueue, report)
    _expired_leases(store, storage_at, settings, now, enqueue, report)
    _stalled_jobs(store, settings, now, enqueue, report)
    _lost_render_messages(store, settings, now, enqueue, report)
    _lost_webhook_messages(store, settings, now, enqueue, report)
    if settings.job_retention_s > 0:
        report.forgotten = store.forget_ended(ended_before=now - settings.job_retention_s)
    for kind, items in report.__dict__.items():
        if items:
            log.info("reconcile %s: %s", kind, ", ".join(items))
    return report


def _repair_partial_loss(store: StateStore, storage: Storage, settings: Settings, now: float,
                         enqueue: Enqueue, report: ReconcileReport) -> None:
    """State Redis lost part of is worse than state it lost whole: a job missing from the active set
    is never looked at again, a job without some chunk records never ends. Once a minute across the
    farm, such jobs are found and repaired: put back in the active set, or purged and restored from
    storage one by one, as a full rebuild restores every job."""
    if not store.take_repair_turn(worker_id(), interval_s=defaults.REPAIR_INTERVAL_S):
        return
    for job_id, damage in store.damaged_jobs():
        if damage == Damage.NOT_ACTIVE:
            store.reactivate(job_id)
        else:
            files = JobFiles(storage, job_id)
            try:
                files.submission()  # there, and readable: else the job is left as it is, and said so
                store.purge(job_id)
                _rebuild_job(store, files, settings, now, enqueue, report)
            except LipfarmError as exc:  # one job that cannot be restored must not stop the others
                log.warning("job %s: %s, and it cannot be restored from storage: %s", job_id, damage.value, exc)
                continue
        report.repaired.append(f"{job_id}: {damage.value}")
    for name in TokenStore.of(store).forget_lost():
        log.warning("API token '%s' was lost from Redis: it no longer works; create a new one", name)
        report.repaired.append(f"token {name}: lost")


def _requeued(store: StateStore, storage_at, job_id: str, index: int, move, enqueue: Enqueue,
              report: ReconcileReport, kind: list, reason: str) -> None:
    if move.verdict in (Verdict.REQUEUED, Verdict.FAILED):
        from lipfarm.common import metrics  # here: a worker sets prometheus_client up before importing it

        metrics.attempt_failed(reason, retried=move.verdict == Verdict.REQUEUED)
    if move.verdict in (Verdict.REQUEUED, Verdict.FAILED):
        label = store.chunk(job_id, index).frames_label if move.verdict == Verdict.REQUEUED else ""
        follow_move(store, storage_at, store.job(job_id), index, move, enqueue.render, label)
        (kind if move.verdict == Verdict.REQUEUED else report.failed).append(f"{job_id}:{index}")


def _dead_local_owners(store: StateStore, storage_at, settings: Settings, now: float, enqueue: Enqueue,
                       report: ReconcileReport) -> None:
    for lease in store.leases():
        if not is_dead_here(lease.worker, lease.worker_started):
            continue
        if lease.index is None:
            store.expire_finalizer(lease.job_id, lease.token)
            enqueue.finalize(lease.job_id, store.job(lease.job_id).priority)
            report.taken_back.append(f"{lease.job_id}:finalize")
            continue
        move = store.requeue(lease.job_id, lease.index, now=now, reason=f"worker process {lease.worker} died",
                             max_attempts=settings.max_attempts, dead_token=lease.token)
        _requeued(store, storage_at, lease.job_id, lease.index, move, enqueue, report, report.taken_back, "crash")


def _expired_leases(store: StateStore, storage_at, settings: Settings, now: float, enqueue: Enqueue,
                    report: ReconcileReport) -> None:
    for job_id, index in store.expired_leases(now):
        move = store.requeue(job_id, index, now=now, reason="lease expired: worker lost or stalled",
                             max_attempts=settings.max_attempts)
        _requeued(store, storage_at, job_id, index, move, enqueue, report, report.requeued, "lost")
    pending = None
    for job_id in store.expired_finalizers(now):
        pending = _pending(enqueue) if pending is None else pending
        job = store.job(job_id)
        if _resend_finalizer(store, job, now, settings, pending):
            enqueue.finalize(job_id, job.priority)
            report.finalizers.append(job_id)


def _pending(enqueue: Enqueue) -> set[tuple[str, str]]:
    from lipfarm.common.celery_app import TASK_FINALIZE, TASK_PLAN

    return {(PLAN if task == TASK_PLAN else FINALIZE if task == TASK_FINALIZE else task, job_id)
            for task, job_id in enqueue.pending()}


PLAN, FINALIZE = "plan", "finalize"


def _resend_finalizer(store: StateStore, job: JobRecord, now: float, settings: Settings,
                      pending: set[tuple[str, str]]) -> bool:
    """Whether a job's finalizer is known lost: no finalize message for it in the broker, and
    none sent by a recovery pass within the grace (recorded here, so the next pass does not repeat it)."""
    if (FINALIZE, job.job_id) in pending:
        return False
    if job.finalize_enqueued_at and now - job.finalize_enqueued_at <= 2 * settings.lease_s:
        return False
    store.mark_finalizer_enqueued(job.job_id, now=now)
    return True


def _stalled_jobs(store: StateStore, settings: Settings, now: float, enqueue: Enqueue,
                  report: ReconcileReport) -> None:
    """Jobs that will not move on by themselves get the one message they lack, and only when it is
    known lost: nothing for them waits in the broker or is held by a worker. A job waiting its
    turn behind a long queue is never sent a second message (messages stay proportional to work)."""
    stalled_jobs = store.stalled_jobs(now=now, grace_s=2 * settings.lease_s)
    if not stalled_jobs:
        return
    pending = _pending(enqueue)
    for stalled in stalled_jobs:
        job = stalled.job
        if stalled.stall == Stall.PLAN_LOST:
            if (PLAN, job.job_id) not in pending:
                store.touch(job.job_id, now=now)  # recorded: the next pass waits out the grace again
                enqueue.plan(job.job_id, job.priority)  # planning repeats safely
                report.replanned.append(job.job_id)
            continue
        if _resend_finalizer(store, job, now, settings, pending):
            enqueue.finalize(job.job_id, job.priority)
            report.finalizers.append(job.job_id)


def _lost_render_messages(store: StateStore, settings: Settings, now: float, enqueue: Enqueue,
                          report: ReconcileReport) -> None:
    """Queued chunks with no render message left anywhere (the broker lost it) get a new one.

    Only when no render message waits in the broker at all: then a chunk queued longer than any
    retry delay plus two leases has nothing coming for it. A message that was only late meets a
    chunk already claimed, and is skipped.
    """
    if enqueue.waiting_renders():
        return
    for job, chunk in store.waiting_chunks(now=now, grace_s=2 * settings.lease_s + defaults.RETRY_DELAY_MAX_S):
        enqueue.render(job.job_id, chunk.index, job.priority, chunk.frames_label, 0.0)
        report.resent.append(f"{job.job_id}:{chunk.index}")


def _lost_webhook_messages(store: StateStore, settings: Settings, now: float, enqueue: Enqueue,
                           report: ReconcileReport) -> None:
    """Pending webhook events with no attempt begun long after one was due get their next attempt
    queued again. The grace covers a worker that holds the message, busy with other tasks, for two
    leases; a message that comes after all meets its attempt made and is skipped."""
    if enqueue.webhook is None:
        return
    for job_id, event, attempt in store.overdue_webhooks(now=now, grace_s=2 * settings.lease_s + 60):
        enqueue.webhook(job_id, event, attempt, 0.0)
        report.webhooks_resent.append(f"{job_id}:{attempt}")


def _rebuild(store: StateStore, storage: Storage, settings: Settings, now: float, enqueue: Enqueue,
             report: ReconcileReport) -> None:
    farm = farm_id(store, settings)
    for job_id in submitted_job_ids(storage.list("jobs/")):
        if store.exists(job_id):
            continue
        files = JobFiles(storage, job_id)
        if not _of_farm(files, farm):
            report.other_farms.append(job_id)
            continue
        _rebuild_job(store, files, settings, now, enqueue, report)
        report.rebuilt.append(job_id)


def _of_farm(files: JobFiles, farm: str) -> bool:
    """Whether the job is this farm's to adopt: stamped with its id, or with none (submitted before
    farm ids, or a job.json too broken to tell: the rebuild reports that as before)."""
    try:
        stamped = files.submission().farm_id
    except LipfarmError:
        return True
    return stamped in ("", farm)


def _rebuild_job(store: StateStore, files: JobFiles, settings: Settings, now: float, enqueue: Enqueue,
                 report: ReconcileReport) -> None:
    ended = files.ended()
    if ended is not None:
        store.restore_snapshot(ended)
        # its webhook's delivery state was in Redis too: an event not known to be done goes again
        if enqueue.webhook is not None and webhooks.resend_after_rebuild(
                store, files, retry_s=settings.webhook_retry_s, now=now, enqueue=enqueue.webhook):
            report.webhooks_resent.append(f"{files.job_id}:1")
        return
    submission = files.submission()
    record = replace(JobRecord.queued(submission, files.storage.url, now=now), rebuilt_at=now)
    if not files.has_plan():
        store.create_job(record)
        enqueue.plan(files.job_id, submission.priority)
        return
    plan = files.plan()
    if files.has_output(plan):  # published before end records existed
        store.restore_snapshot({"job": replace(record, state=JobState.DONE, output_key=plan.output_key,
                                               output_location=files.storage.location(plan.output_key),
                                               finished_at=now).to_hash(),
                                "chunks": [], "attempts": [], "finalize_attempts": []})
        return
    committed = {i: asdict(marker) for i, marker in files.committed(plan).items()}
    ranges = [(c.start_frame, c.stop_frame) for c in plan.chunks]
    store.restore_job(replace(record, output_key=plan.output_key), ranges, committed=committed, now=now)
    for chunk in plan.chunks:
        if chunk.index not in committed:
            enqueue.render(files.job_id, chunk.index, submission.priority, chunk.frames_label, 0.0)
    if len(committed) == len(plan.chunks):
        store.mark_finalizer_enqueued(files.job_id, now=now)
        enqueue.finalize(files.job_id, submission.priority)


def check_clock(store: StateStore) -> float:
    """This host's clock against Redis's: logged when off by more than ``CLOCK_DRIFT_WARN_S``, and
    exported. Nothing depends on it (the farm runs on Redis's clock); it tells where to fix NTP."""
    from lipfarm.common import metrics  # here: a worker sets prometheus_client up before importing it

    drift = store.clock_drift()
    metrics.clock_drift(drift)
    if abs(drift) > defaults.CLOCK_DRIFT_WARN_S:
        log.warning("this host's clock is %+.1f s off Redis's (more than %g s): the farm keeps time by Redis, "
                    "but fix this host's clock (NTP)", drift, defaults.CLOCK_DRIFT_WARN_S)
    return drift


def run_forever(connect: Callable[[], tuple[StateStore, Callable[[str], Storage]]], settings: Settings,
                enqueue: Enqueue, *, rebuild_first: bool = False, stop: threading.Event | None = None,
                turn: Callable[[StateStore], bool] | None = None, on_pass=None) -> None:
    """Reconcile every ``settings.reconcile_interval_s`` until ``stop`` is set.

    An outage (Redis, the broker, storage) fails a pass, not the loop: it is logged and the next pass
    tries again, reconnecting. ``turn(store)`` says whether this process's turn has come (workers
    share one pass per interval); ``on_pass(report)`` sees each report.
    """
    stop = stop or threading.Event()
    rebuild, store, storage_at = rebuild_first, None, None
    while not stop.is_set():
        try:
            if store is None:
                store, storage_at = connect()
            check_clock(store)
            if turn is None or turn(store):
                report = reconcile(store=store, storage=storage_at(settings.storage_url), settings=settings,
                                   enqueue=enqueue, rebuild=rebuild, storage_at=storage_at)
                rebuild = False
                if on_pass is not None:
                    on_pass(report)
        except LipfarmError as exc:
            log.warning("reconcile pass failed, trying again in %.0f s: %s", settings.reconcile_interval_s, exc)
        except Exception as exc:  # a bug must not end recovery for the whole farm: log it with its trace
            log.exception("reconcile pass failed: %s", exc)
        stop.wait(settings.reconcile_interval_s)
