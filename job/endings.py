"""What follows a job's end: its end is recorded in storage, beside its files, its HLS
playlist is closed (``#EXT-X-ENDLIST``), and its webhook, if it has one, is queued (``common.webhooks``).

Ends are made in Redis (by a worker whose chunk ran out of attempts, by the finalizer, by a cancel)
and put in the state store's outbox of ends not yet recorded. Whoever ends a job closes it at once
(``close_job``); the reconciler closes whatever is left in the outbox (``close_jobs``), so a crash
between the two steps loses nothing. A rebuild after Redis lost its data then restores an ended job
exactly as it ended, instead of running it again.
"""

from __future__ import annotations

import logging
from typing import Callable

from lipfarm.job import webhooks
from lipfarm.common.errors import LipfarmError, NotFoundError
from lipfarm.job.jobfiles import JobFiles
from lipfarm.job.playlist import advance_playlist
from lipfarm.common.messages import EnqueueRender
from lipfarm.common.state import JobRecord, Move, StateStore, Verdict
from lipfarm.common.storage import Storage

log = logging.getLogger(__name__)


def close_job(store: StateStore, storage: Storage, job_id: str, *,
              enqueue_webhook: webhooks.Enqueue | None = None) -> bool:
    """Close job ``job_id``, which has ended: its playlist ends, its end is recorded in ``storage``
    and its webhook event queued (once per end). False (left in the outbox, for the next recovery
    pass) if that failed."""
    files = JobFiles(storage, job_id)
    try:
        advance_playlist(store, files)
        files.put_ended(store.snapshot(job_id))
        webhooks.queue_event(store, files, enqueue=enqueue_webhook)
    except NotFoundError:
        pass  # gone from Redis too: nothing left to record
    except LipfarmError as exc:
        log.warning("cannot record the end of job %s yet: %s", job_id, exc)
        return False
    store.mark_recorded(job_id)
    return True


def close_jobs(store: StateStore, storage_at: Callable[[str], Storage]) -> list[str]:
    """Close every ended job still in the outbox; returns those closed."""
    closed = []
    for job_id in store.unrecorded_job_ids():
        try:
            storage = storage_at(store.job(job_id).storage_url)
        except NotFoundError:
            store.mark_recorded(job_id)
            continue
        if close_job(store, storage, job_id):
            closed.append(job_id)
    return closed


def follow_move(store: StateStore, storage_at: Callable[[str], Storage], job: JobRecord, index: int, move: Move,
                enqueue_render: EnqueueRender, label: str = "") -> None:
    """What a chunk's move leads to: requeued, its next attempt is queued (after its retry delay);
    failed, the job ended with it and its end is recorded (``close_job``). Other moves need nothing."""
    if move.verdict == Verdict.REQUEUED:
        enqueue_render(job.job_id, index, job.priority, label, move.delay_s)
    elif move.verdict == Verdict.FAILED:
        close_job(store, storage_at(job.storage_url), job.job_id)
