"""The plan task's work: decode the audio, plan the job, queue the chunks, encode the audio once.

1. The uploaded audio is decoded to 16 kHz PCM in storage (features read it by range) and the job
   is planned from its length; ``plan.json`` is written.
2. The chunks are queued (a fast start's first, short chunks at the front of the job's priority).
3. Then the audio is encoded to AAC once: the track the finalizer copies into the output, and one
   piece per chunk that its worker muxes into the chunk's HLS segment. Encoding runs front to back
   and each piece is uploaded as soon as it is complete, so the first chunks never wait for it; a
   worker whose piece is not there yet waits for it.

Safe to run twice (a redelivered message): an existing ``plan.json`` is reused, chunk records are
created only where missing, a job that has moved past planning is left alone, and an audio track
that is missing is encoded again. Duplicate render messages are harmless: a chunk is claimed by one
attempt at a time and committed once.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from lipfarm.common import defaults
from lipfarm.common.messages import EnqueueRender, EnqueueSlots
from lipfarm.common.audio import max_samples_16k, normalise_to_16k
from lipfarm.job.endings import close_job
from lipfarm.common.errors import LipfarmError
from lipfarm.job.jobfiles import JobFiles
from lipfarm.common.plan import AudioRef, Plan, plan_job
from lipfarm.common.state import JobState, StateStore
from lipfarm.common.storage.layout import audio_piece_key, audio_track_key, pcm_key
from lipfarm.scheduler.audiotrack import encode_audio_track

log = logging.getLogger(__name__)



def _decode_and_plan(files: JobFiles, *, max_audio_s: float) -> Plan:
    """Decode the uploaded audio to 16 kHz PCM in storage, and plan the job from its length.

    Audio that decodes to more than ``max_audio_s`` is refused as soon as decoding passes it (a
    small file may hold hours of silence), before anything is written to storage."""
    submission, job_id = files.submission(), files.job_id
    with tempfile.TemporaryDirectory(prefix="lipfarm-plan-") as temp:
        original = Path(temp) / submission.audio_name
        files.storage.get_file(submission.audio_key, original)
        pcm = Path(temp) / "audio_16k.f32"
        with open(pcm, "wb") as sink:
            n_samples = normalise_to_16k(original, sink, max_samples=max_samples_16k(max_audio_s))
        files.storage.put_file(pcm_key(job_id), pcm)
    audio = AudioRef(submission.audio_key, pcm_key(job_id), n_samples, track_key=audio_track_key(job_id),
                     duration_s=n_samples / defaults.SAMPLE_RATE_HZ)
    plan = plan_job(submission, audio)
    files.put_plan(plan)
    return plan


def _encode_audio_track(files: JobFiles, plan: Plan) -> None:
    """Encode the job's audio to AAC once: each chunk's piece uploaded as soon as it is complete,
    then the whole track. Skipped when the track is there already (a planner that ran before)."""
    if files.storage.exists(plan.audio.track_key):
        return
    storage, job_id = files.storage, files.job_id
    with tempfile.TemporaryDirectory(prefix="lipfarm-audio-") as temp:
        original = Path(temp) / Path(plan.audio.input_key).name
        storage.get_file(plan.audio.input_key, original)
        pieces = {(c.start_frame, c.stop_frame): c.index for c in plan.chunks}
        track = encode_audio_track(
            original, Path(temp) / "audio.m4a", bitrate_bps=plan.options.audio_bitrate_bps,
            chunk_spans=list(pieces), pieces_dir=Path(temp) / "pieces", fit_samples=plan.audio.fit_samples,
            on_piece=lambda piece: storage.put_file(
                audio_piece_key(job_id, pieces[(piece.start_frame, piece.stop_frame)]), piece.path))
        storage.put_file(plan.audio.track_key, track.m4a)


def _queue_chunks(store: StateStore, plan: Plan, enqueue_render: EnqueueRender,
                  enqueue_slots: EnqueueSlots | None) -> None:
    """A fast start's short chunks go to the front of the job's priority, each in a message of its
    own; the rest are offered in the job's lane, with one slot message each, so that workers are
    shared between the jobs waiting (``StateStore.claim_next``) rather than first come, first served."""
    job_id, priority, full = plan.job_id, store.job(plan.job_id).priority, plan.options.chunk_frames
    fast = [c for c in plan.chunks if c.frames < full and c.stop_frame < plan.frame_count]
    for chunk in fast:
        enqueue_render(job_id, chunk.index, priority, chunk.frames_label, 0.0, first=True)
    rest = [c for c in plan.chunks if c not in fast]
    if enqueue_slots is None:  # no lanes (a caller that binds every message itself)
        for chunk in rest:
            enqueue_render(job_id, chunk.index, priority, chunk.frames_label, 0.0, first=False)
        return
    enqueue_slots(priority, store.offer(job_id, [c.index for c in rest]))


def plan_submitted_job(job_id: str, *, store: StateStore, files: JobFiles, enqueue_render: EnqueueRender,
                       enqueue_slots: EnqueueSlots | None = None, max_audio_s: float = 0.0) -> str:
    """Plan job ``job_id``, queue its chunks, encode its audio; returns what happened, for the task."""
    if not store.start_planning(job_id):
        return f"skipped: job is {store.job(job_id).state.value}"
    try:
        plan = files.plan() if files.has_plan() else _decode_and_plan(files, max_audio_s=max_audio_s)
    except LipfarmError as exc:
        store.finish(job_id, JobState.FAILED, reason=str(exc))
        close_job(store, files.storage, job_id)
        return f"failed: {exc}"
    ranges = [(c.start_frame, c.stop_frame) for c in plan.chunks]
    if not store.start_rendering(job_id, ranges, output_key=plan.output_key):
        return f"stopped: job is {store.job(job_id).state.value}"
    _queue_chunks(store, plan, enqueue_render, enqueue_slots)
    log.info("job %s planned: %d frames in %d chunks", job_id, plan.frame_count, len(plan.chunks))
    try:
        _encode_audio_track(files, plan)
    except LipfarmError as exc:  # the finalizer encodes the audio itself when the track is missing
        log.warning("job %s: the audio track could not be encoded now: %s", job_id, exc)
    return f"planned {plan.frame_count} frames in {len(plan.chunks)} chunks"
