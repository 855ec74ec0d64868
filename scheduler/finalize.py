"""The finalizer: check every chunk, join the segments, mux the audio, publish the output.

One finalizer works on a job at a time (its finalize lease in the state store); a second message
for the same job is a no-op. Segments are fetched one at a time and deleted once copied, so the
finalizer's disk use is one segment plus the output. The output is uploaded only after ``stitch``
has checked it, and is removed again if the job was cancelled meanwhile: a cancelled job never
publishes anything.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Iterator

from common import defaults
from common.errors import LipfarmError
from common.jobfiles import JobFiles
from common.plan import Plan
from common.state import ChunkState, JobState, StateStore
from scheduler.stitch import Segment, stitch


def finalize_job(job_id: str, *, store: StateStore, files: JobFiles, worker: str) -> str:
    """Finalize ``job_id``; returns what happened, for the task's result."""
    if not store.take_finalize_lease(job_id, worker=worker, lease_s=defaults.FINALIZE_LEASE_S):
        return "skipped: another finalizer holds the job"
    try:
        return _finalize(job_id, store=store, files=files)
    finally:
        store.release_finalize_lease(job_id)


def _finalize(job_id: str, *, store: StateStore, files: JobFiles) -> str:
    if not store.start_finalizing(job_id, now=time.time()):
        return f"skipped: job is {store.job(job_id).state.value}"
    try:
        plan = files.plan()
        missing = [c.index for c in store.chunks(job_id, len(plan.chunks)) if c.state != ChunkState.COMMITTED]
        if missing:
            return _fail(store, files, f"chunks not committed at finalize: {missing[:10]}")
        with tempfile.TemporaryDirectory(prefix="lipfarm-finalize-") as temp:
            output = _stitched(files, plan, Path(temp))
            if store.job(job_id).state != JobState.FINALIZING:
                return "stopped: job cancelled while finalizing"
            files.storage.put_file(plan.output_key, output)
    except LipfarmError as exc:
        return _fail(store, files, str(exc))
    except Exception as exc:  # a bug or a broken file: fail the job rather than loop on it
        return _fail(store, files, f"finalize error: {type(exc).__name__}: {exc}")
    location = files.storage.location(plan.output_key)
    if not store.finish(job_id, JobState.DONE, now=time.time(), output_location=location):
        files.storage.delete(plan.output_key)  # cancelled during the upload: publish nothing
        return "stopped: job cancelled while publishing"
    return f"done: {location}"


def _stitched(files: JobFiles, plan: Plan, folder: Path) -> Path:
    audio = folder / ("input" + Path(plan.audio.input_key).suffix)
    files.storage.get_file(plan.audio.input_key, audio)
    output = folder / "output.mp4"
    stitch(_segments(files, plan, folder), audio, output, expected_frames=plan.frame_count,
           audio_bitrate_bps=plan.options.audio_bitrate_bps)
    return output


def _segments(files: JobFiles, plan: Plan, folder: Path) -> Iterator[Segment]:
    for chunk in plan.chunks:
        path = folder / f"{chunk.index:05d}.mp4"
        files.storage.get_file(chunk.segment_key, path)
        yield Segment(path, chunk.start_frame, chunk.frames)
        path.unlink(missing_ok=True)


def _fail(store: StateStore, files: JobFiles, reason: str) -> str:
    store.finish(files.job_id, JobState.FAILED, now=time.time(), reason=reason)
    files.put_ended(JobState.FAILED.value, reason)
    return f"failed: {reason}"
