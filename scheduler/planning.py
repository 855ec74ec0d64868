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

from common.audio import max_samples_16k, normalise_to_16k
from common.endings import record_end
from common.errors import LipfarmError
from common.jobfiles import JobFiles
from common.plan import AudioRef, Plan, plan_job
from common.state import JobState, StateStore
from common.storage.layout import pcm_key

log = logging.getLogger(__name__)

# enqueue_render(job id, chunk index, priority, frames label, delay in s)
EnqueueRender = Callable[[str, int, str, str, float], None]


def _decode_and_plan(files: JobFiles, *, max_audio_s: float) -> Plan:
    """Decode the uploaded audio to 16 kHz PCM in storage, and plan the job from its length.

    Audio that decodes to more than ``max_audio_s`` is refused as soon as decoding passes it (a
    small file may hold hours of silence), before anything is written to storage."""
    submission = files.submission()
    with tempfile.TemporaryDirectory(prefix="lipfarm-plan-") as temp:
        original = Path(temp) / submission.audio_name
        files.storage.get_file(submission.audio_key, original)
        pcm = Path(temp) / "audio_16k.f32"
        with open(pcm, "wb") as sink:
            n_samples = normalise_to_16k(original, sink, max_samples=max_samples_16k(max_audio_s))
        files.storage.put_file(pcm_key(files.job_id), pcm)
    plan = plan_job(submission, AudioRef(submission.audio_key, pcm_key(files.job_id), n_samples))
    files.put_plan(plan)
    return plan


def plan_submitted_job(job_id: str, *, store: StateStore, files: JobFiles, enqueue_render: EnqueueRender,
                       max_audio_s: float = 0.0) -> str:
    """Plan job ``job_id`` and queue its chunks; returns what happened, for the task's result."""
    if not store.start_planning(job_id, now=time.time()):
        return f"skipped: job is {store.job(job_id).state.value}"
    try:
        plan = files.plan() if files.has_plan() else _decode_and_plan(files, max_audio_s=max_audio_s)
    except LipfarmError as exc:
        store.finish(job_id, JobState.FAILED, now=time.time(), reason=str(exc))
        record_end(store, files.storage, job_id)
        return f"failed: {exc}"
    ranges = [(c.start_frame, c.stop_frame) for c in plan.chunks]
    if not store.start_rendering(job_id, ranges, output_key=plan.output_key, now=time.time()):
        return f"stopped: job is {store.job(job_id).state.value}"
    priority = store.job(job_id).priority
    for chunk in plan.chunks:
        enqueue_render(job_id, chunk.index, priority, chunk.frames_label, 0.0)
    log.info("job %s planned: %d frames in %d chunks", job_id, plan.frame_count, len(plan.chunks))
    return f"planned {plan.frame_count} frames in {len(plan.chunks)} chunks"
