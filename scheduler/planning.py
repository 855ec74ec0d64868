"""The plan task's work: normalise the audio, plan the job, store the plan, queue the chunks.

Safe to run twice (a redelivered message): an existing ``plan.json`` is reused, chunk records are
created only where missing, and a job that has moved past planning is left alone. Duplicate render
messages are harmless: a chunk is claimed by one attempt at a time and committed once.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

from common.audio import normalise_to_16k
from common.errors import LipfarmError, NotFoundError
from common.jobstate import JobState, StateStore
from common.plan import AudioRef, Plan
from common.storage import Storage, pcm_key, plan_key
from scheduler.finalize import record_terminal
from scheduler.plan import plan_job
from scheduler.submit import Submission, submission_key

log = logging.getLogger(__name__)


def _load_or_make_plan(storage: Storage, submission: Submission) -> Plan:
    job_id = submission.job_id
    try:
        return Plan.from_json(storage.get_bytes(plan_key(job_id)).decode())
    except NotFoundError:
        pass
    with tempfile.TemporaryDirectory(prefix="lipfarm-plan-") as temp:
        original = Path(temp) / submission.audio_name
        storage.get_file(submission.audio_key, original)
        pcm = Path(temp) / "audio_16k.f32"
        with open(pcm, "wb") as sink:
            n_samples = normalise_to_16k(original, sink)
        storage.put_file(pcm_key(job_id), pcm)
    plan = plan_job(job_id=job_id, avatar=submission.avatar, avatar_name=submission.avatar_name,
                    encoder=submission.encoder, generator=submission.generator,
                    audio=AudioRef(submission.audio_key, pcm_key(job_id), n_samples),
                    options=submission.options)
    storage.put_bytes(plan_key(job_id), plan.to_json().encode())
    return plan


def plan_submitted_job(job_id: str, *, store: StateStore, storage: Storage,
                       enqueue_render: Callable[[str, int, str, str], None]) -> str:
    """Plan job ``job_id`` and queue its chunks; returns what happened, for the task's result."""
    if not store.move_job(job_id, JobState.PLANNING, now=time.time()):
        return f"skipped: job is {store.job(job_id)['state']}"
    try:
        submission = Submission.from_json(storage.get_bytes(submission_key(job_id)).decode())
        plan = _load_or_make_plan(storage, submission)
    except LipfarmError as exc:
        store.move_job(job_id, JobState.FAILED, now=time.time(), reason=str(exc))
        record_terminal(storage, job_id, "failed", str(exc))
        return f"failed: {exc}"
    store.add_chunks(job_id, [(c.start_frame, c.stop_frame) for c in plan.chunks], now=time.time())
    if not store.move_job(job_id, JobState.RENDERING, now=time.time(), output_key=plan.output_key):
        return f"stopped: job is {store.job(job_id)['state']}"
    for chunk in plan.chunks:
        enqueue_render(job_id, chunk.index, submission.priority,
                       f"{chunk.start_frame}-{chunk.stop_frame - 1}")
    log.info("job %s planned: %d frames in %d chunks", job_id, plan.frame_count, len(plan.chunks))
    return f"planned {plan.frame_count} frames in {len(plan.chunks)} chunks"
