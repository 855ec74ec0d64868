"""What follows a job's end: its end is recorded in storage, beside its files.

Ends are made in Redis (by a worker whose chunk ran out of attempts, by the finalizer, by a cancel)
and put in the state store's outbox of ends not yet recorded. Whoever ends a job records it at once
(``record_end``); the reconciler records whatever is left in the outbox (``record_ends``), so a
crash between the two steps loses nothing. A rebuild after Redis lost its data then restores an
ended job exactly as it ended, instead of running it again.
"""

from __future__ import annotations

import logging
from typing import Callable

from common.errors import LipfarmError, NotFoundError
from common.jobfiles import JobFiles
from common.state import StateStore
from common.storage import Storage

log = logging.getLogger(__name__)


def record_end(store: StateStore, storage: Storage, job_id: str) -> bool:
    """Record job ``job_id``'s end in ``storage``; False (left in the outbox) if that failed."""
    try:
        JobFiles(storage, job_id).put_ended(store.snapshot(job_id))
    except NotFoundError:
        pass  # gone from Redis too: nothing left to record
    except LipfarmError as exc:
        log.warning("cannot record the end of job %s yet: %s", job_id, exc)
        return False
    store.mark_recorded(job_id)
    return True


def record_ends(store: StateStore, storage_at: Callable[[str], Storage]) -> list[str]:
    """Record every end still in the outbox; returns the jobs recorded."""
    recorded = []
    for job_id in store.unrecorded_job_ids():
        try:
            storage = storage_at(store.job(job_id).storage_url)
        except NotFoundError:
            store.mark_recorded(job_id)
            continue
        if record_end(store, storage, job_id):
            recorded.append(job_id)
    return recorded
