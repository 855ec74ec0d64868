"""Planning a job: submission in, ``Plan`` out. Pure: no I/O, no clock, no randomness.

The frame count comes from the audio's length alone (``L + 2``, PIPELINE.md), so a job is fully
known before any model runs. Chunks are ``chunk_frames`` long (a multiple of the GOP, so every
chunk starts on a keyframe); the last one takes what is left.
"""

from __future__ import annotations

from common.features import frame_count
from common.options import RenderOptions
from common.plan import AssetRef, AudioRef, Chunk, Plan
from common.storage import output_key, segment_key


def chunk_ranges(total_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """``[start, stop)`` frame ranges covering ``total_frames`` in order."""
    return [(start, min(start + chunk_frames, total_frames))
            for start in range(0, total_frames, chunk_frames)]


def plan_job(*, job_id: str, avatar: AssetRef, avatar_name: str, encoder: AssetRef,
             generator: AssetRef, audio: AudioRef, options: RenderOptions) -> Plan:
    """The plan of a job rendering ``audio`` onto ``avatar`` with the given models and options."""
    total = frame_count(audio.n_samples)
    chunks = tuple(Chunk(i, start, stop, segment_key(job_id, i))
                   for i, (start, stop) in enumerate(chunk_ranges(total, options.chunk_frames)))
    return Plan(job_id=job_id, avatar=avatar, avatar_name=avatar_name, encoder=encoder,
                generator=generator, audio=audio, frame_count=total, chunks=chunks,
                options=options, output_key=output_key(job_id))
