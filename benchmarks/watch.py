"""``lipfarm bench --farm`` (part 2): how soon a viewer can watch a job, and the tail at its end.

A job of ``minutes`` of audio (the demo speech repeated) is submitted to idle workers: one
``lipfarm worker --concurrency 2`` on this machine, as a user would start it, warmed up by a short
job first. The figures come from what the state store records, not from sampling:

- ``first_playable_s``: from submission to the first segment listed in the job's HLS playlist;
- ``half_playable_s``: from submission to the playlist holding half of the job;
- ``tail_s``: from the last chunk's commit to the published MP4 (the finalizer's whole work);

each with the fast start (first chunks of 1, 2 and 4 s) and without it. ``tail_10min_s`` times the
finalizer alone on a 10-minute job whose segments are real ones reused (rendering 10 minutes here
takes longer than a benchmark should): every segment fetched and checked against its hash, joined,
the audio copied, the output checked and published.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from lipfarm.benchmarks.farm import bench_database, release_database, repeated_speech
from lipfarm.common import defaults
from lipfarm.common.audio import MIN_SAMPLES_16K
from lipfarm.common.config import Settings, load_settings
from lipfarm.common.timeline import frame_count
from lipfarm.common.identity import new_job_id, this_process
from lipfarm.job.jobfiles import CommitMarker, JobFiles
from lipfarm.common.options import RenderOptions
from lipfarm.common.plan import fast_start_frames, plan_job
from lipfarm.common.state import JobRecord, JobState, StateStore
from lipfarm.common.storage import LocalStorage
from lipfarm.common.storage.layout import audio_track_key
from lipfarm.demo.assets import ensure_demo_assets
from lipfarm.scheduler.processes import LipfarmProcess
from lipfarm.scheduler.submit import submit_job

BENCH_PREFIX = "lipfarm-bench-watch"


def run_watch_bench(settings: Settings, *, minutes: float = 2.0, tail_minutes: float = 10.0,
                    redis_db: int = 15) -> dict:
    """The time-to-watch figures; see the module docstring."""
    demo = ensure_demo_assets(settings)
    url, client = bench_database(settings, redis_db)
    with tempfile.TemporaryDirectory(prefix="lipfarm-bench-watch-") as temp_dir:
        temp = Path(temp_dir)
        env = {"LIPFARM_HOME": str(settings.home), "LIPFARM_BROKER_URL": url, "LIPFARM_REDIS_URL": url,
               "LIPFARM_KEY_PREFIX": BENCH_PREFIX, "LIPFARM_STORAGE_URL": str(temp / "storage"),
               "LIPFARM_CACHE_DIR": str(temp / "cache")}
        bench_settings = load_settings({**os.environ, **env})
        from lipfarm.common import celery_app

        celery_app.configure(celery_app.app, bench_settings)
        worker = LipfarmProcess.worker(env, temp / "lipfarm.worker.log", "--concurrency", "2", "--hostname",
                                       "watch@bench").start().wait_ready()
        try:
            audio = repeated_speech(demo.audio, temp / "job.wav", minutes * 60)
            _job(bench_settings, demo, repeated_speech(demo.audio, temp / "warm.wav", 8), True)  # warm up
            figures = {"audio_minutes": minutes,
                       "fast_start": _job(bench_settings, demo, audio, True),
                       "uniform": _job(bench_settings, demo, audio, False)}
            figures[f"tail_{tail_minutes:g}min_s"] = _finalizer_tail(bench_settings, demo,
                                                                    figures["fast_start"]["job_id"], temp, tail_minutes)
        finally:
            worker.stop()
            release_database(client)
    return figures


def _job(settings: Settings, demo, audio: Path, fast_start: bool) -> dict:
    handle = submit_job(settings, avatar=demo.avatar_name, audio=audio, encoder=demo.encoder,
                        generator=demo.generator, options=RenderOptions(fast_start=fast_start))
    status = handle.wait(timeout_s=7200)
    job = handle.store.job(handle.job_id)
    last_commit = max(c.committed_at for c in handle.store.chunks(handle.job_id))
    return {"job_id": handle.job_id, "frames": status.frames_total, "chunks": job.chunks_total,
            "first_playable_s": round(job.first_playable_at - job.created_at, 2),
            "half_playable_s": round(job.half_playable_at - job.created_at, 2),
            "tail_s": round(job.finished_at - last_commit, 2),
            "total_s": round(job.finished_at - job.created_at, 2)}


def _samples_for_frames(frames: int) -> int:
    """The fewest 16 kHz samples whose job has exactly ``frames`` frames (``frame_count`` grows with them)."""
    low, high = 0, frames * defaults.SAMPLE_RATE_HZ // defaults.FPS + defaults.SAMPLE_RATE_HZ
    while low < high:
        middle = (low + high) // 2
        if frame_count(max(middle, MIN_SAMPLES_16K)) < frames:
            low = middle + 1
        else:
            high = middle
    if frame_count(low) != frames:
        raise RuntimeError(f"no audio length gives {frames} frames")
    return low


def _finalizer_tail(settings: Settings, demo, source_job: str, temp: Path, minutes: float) -> float:
    """Seconds from the start of the finalizer to the published MP4 of a ``minutes`` job whose chunks
    all committed: the fast start's short chunks and full ones, made of ``source_job``'s segments of
    those lengths, with a real AAC track of the job's length."""
    from lipfarm.scheduler.audiotrack import encode_audio_track
    from lipfarm.scheduler.finalize import Finalizer, finalize_job

    store = StateStore.connect(settings.redis_url, settings.key_prefix)
    storage = LocalStorage(settings.storage_url)
    by_frames = {c.frames: c for c in store.chunks(source_job)}
    options = JobFiles(storage, source_job).submission().options
    first = sum(fast_start_frames(options))  # whole chunks only: every length is one the source job has
    frames = first + options.chunk_frames * ((int(minutes * 60 * defaults.FPS) - first) // options.chunk_frames)
    samples = _samples_for_frames(frames)
    audio = repeated_speech(demo.audio, temp / "tail.wav", samples / defaults.SAMPLE_RATE_HZ)
    job_id = new_job_id()
    files = JobFiles(storage, job_id)
    track = encode_audio_track(audio, temp / "tail.m4a", bitrate_bps=defaults.AUDIO_BITRATE_BPS, chunk_spans=[],
                               pieces_dir=temp)
    source_plan = JobFiles(storage, source_job).plan()
    submission = replace(JobFiles(storage, source_job).submission(), job_id=job_id)
    audio_ref = replace(source_plan.audio, input_key=files.put_input(audio, audio.name),
                        track_key=audio_track_key(job_id), duration_s=track.duration_s)
    plan = plan_job(submission, replace(audio_ref, n_samples=samples))
    storage.put_file(audio_ref.track_key, track.m4a)
    files.put_submission(submission)
    files.put_plan(plan)
    committed = {}
    for chunk in plan.chunks:
        source = by_frames[chunk.frames]
        key = f"jobs/{job_id}/chunks/{chunk.index:05d}-tail.mp4"
        storage.put_file(key, storage.local_path(source.segment_key))
        committed[chunk.index] = asdict(CommitMarker(job_id, chunk.index, chunk.frames, 1, "bench", key,
                                                     source.segment_size, source.segment_sha256, time.time()))
    now = time.time()
    record = JobRecord(job_id=job_id, state=JobState.QUEUED, priority="normal", avatar=plan.avatar_name,
                       audio=audio.name, storage_url=storage.url, created_at=now, updated_at=now,
                       output_key=plan.output_key)
    store.restore_job(record, [(c.start_frame, c.stop_frame) for c in plan.chunks], committed=committed, now=now)
    started = time.time()
    finalize_job(job_id, ctx=Finalizer(store, settings, this_process(), lambda *args, **kw: None), files=files)
    finished = store.job(job_id)
    if finished.state != JobState.DONE:
        raise RuntimeError(f"the tail job did not finish: {finished.state.value}: {finished.reason}")
    return round(finished.finished_at - started, 2)
