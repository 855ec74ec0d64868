"""The finalizer: check every chunk, join the segments, mux the audio, publish the output.

One finalizer works on a job at a time (a lease in Redis); a second message for the same job is a
no-op. Segments are fetched one at a time and deleted once copied, so the finalizer's disk use is
one segment plus the output. The output is uploaded only after ``stitch`` has checked it, and is
removed again if the job was cancelled meanwhile: a cancelled job never publishes anything.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

from common.errors import LipfarmError
from common.jobstate import ChunkState, JobState, StateStore
from common.plan import Plan
from common.storage import Storage, plan_key
from scheduler.stitch import Segment, stitch

FINALIZE_LEASE_S = 3600


def terminal_key(job_id: str) -> str:
    return f"jobs/{job_id}/ended.json"


def record_terminal(storage: Storage, job_id: str, state: str, reason: str) -> None:
    """A durable note that a job ended without output, so a rebuild from storage leaves it alone."""
    try:
        storage.put_bytes(terminal_key(job_id), json.dumps({"state": state, "reason": reason,
                                                            "at": time.time()}).encode())
    except LipfarmError:  # best effort: Redis already has the state
        pass


def _segments(storage: Storage, plan: Plan, folder: Path) -> Iterator[Segment]:
    for chunk in plan.chunks:
        path = folder / f"{chunk.index:05d}.mp4"
        storage.get_file(chunk.segment_key, path)
        yield Segment(path, chunk.start_frame, chunk.frames)
        path.unlink(missing_ok=True)


def finalize_job(job_id: str, *, store: StateStore, storage: Storage, worker: str) -> str:
    """Finalize ``job_id``; returns what happened, for the task's result."""
    lease = store.keys.finalize_lease(job_id)
    if not store.redis.set(lease, worker, nx=True, ex=FINALIZE_LEASE_S):
        return "skipped: another finalizer holds the job"
    try:
        return _finalize(job_id, store=store, storage=storage)
    finally:
        store.redis.delete(lease)


def _fail(store: StateStore, storage: Storage, job_id: str, reason: str) -> str:
    store.move_job(job_id, JobState.FAILED, now=time.time(), reason=reason)
    record_terminal(storage, job_id, "failed", reason)
    return f"failed: {reason}"


def _finalize(job_id: str, *, store: StateStore, storage: Storage) -> str:
    record = store.job(job_id)
    if record["state"] != JobState.FINALIZING and not store.move_job(job_id, JobState.FINALIZING, now=time.time()):
        return f"skipped: job is {store.job(job_id)['state']}"
    try:
        plan = Plan.from_json(storage.get_bytes(plan_key(job_id)).decode())
        states = [c.get("state") for c in store.chunks(job_id, len(plan.chunks))]
        missing = [i for i, state in enumerate(states) if state != ChunkState.COMMITTED]
        if missing:
            return _fail(store, storage, job_id, f"chunks not committed at finalize: {missing[:10]}")
        with tempfile.TemporaryDirectory(prefix="lipfarm-finalize-") as temp:
            folder = Path(temp)
            audio = folder / ("input" + Path(plan.audio.input_key).suffix)
            storage.get_file(plan.audio.input_key, audio)
            output = folder / "output.mp4"
            stitch(_segments(storage, plan, folder), audio, output, expected_frames=plan.frame_count,
                   audio_bitrate_bps=plan.options.audio_bitrate_bps)
            if store.job(job_id)["state"] != JobState.FINALIZING:
                return "stopped: job cancelled while finalizing"
            storage.put_file(plan.output_key, output)
    except LipfarmError as exc:
        return _fail(store, storage, job_id, str(exc))
    except Exception as exc:  # a bug or a broken file: fail the job rather than loop on it
        return _fail(store, storage, job_id, f"finalize error: {type(exc).__name__}: {exc}")
    location = storage.location(plan.output_key)
    if not store.move_job(job_id, JobState.DONE, now=time.time(), output_location=location):
        storage.delete(plan.output_key)  # cancelled during the upload: publish nothing
        return "stopped: job cancelled while publishing"
    return f"done: {location}"
