"""The farm with real parts: Redis, SeaweedFS (S3) on loopback, and two Celery worker processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from common import celery_app
from common.config import load_settings
from common.demo.speech import write_wav
from common.errors import NotFoundError
from common.jobstate import ChunkState, JobState
from common.options import RenderOptions
from common.services import storage_for
from scheduler.cli import main
from scheduler.local import render_local
from scheduler.reconcile import Enqueue, reconcile
from scheduler.submit import submit_job
from tests.farm import TEST_PREFIX, SeaweedS3, Workers, farm_env
from tests.media import video_frames, video_info

pytestmark = pytest.mark.slow
FARM_DB = 14
BUCKET = "lipfarm-test"
CHUNK = RenderOptions(chunk_frames=25)
# The clip: 4.1 s = 65600 samples -> 329 mel frames -> 99 windows -> 101 frames: 5 chunks of <= 25.
CLIP_FRAMES, CLIP_CHUNKS = 101, 5


def _clean_db() -> None:
    redis.Redis(db=FARM_DB).flushdb()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def farm(tmp_path_factory, home, demo, s3):
    """Two workers, state and broker in Redis DB 14, jobs on S3 unless a submission says otherwise.

    The farm's settings are in this process's environment for the module, so CLI calls see them.
    """
    _clean_db()
    env = farm_env(home, f"s3://{BUCKET}/farm", s3, LIPFARM_BROKER_URL=f"redis://127.0.0.1:6379/{FARM_DB}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = load_settings()
        celery_app.configure(celery_app.app, settings)
        workers = Workers(env, tmp_path_factory.mktemp("workers"), count=2).start()
        try:
            yield settings, workers
        finally:
            workers.stop()
            _clean_db()


@pytest.fixture(scope="module")
def clip(tmp_path_factory, speech_16k) -> Path:
    """4.1 s of the demo speech (CLIP_FRAMES frames)."""
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    write_wav(path, speech_16k[int(0.3 * 16000):int(4.4 * 16000)])
    return path


def _submit(settings, demo, audio, **kw):
    return submit_job(settings, avatar="demo", audio=audio, encoder=demo.encoder, generator=demo.generator,
                      options=kw.pop("options", CHUNK), **kw)


def _download(settings, status, dest: Path) -> Path:
    storage_for(settings).get_file(status.output_key, dest)
    return dest


@pytest.fixture(scope="module")
def s3_job(farm, demo, clip, tmp_path_factory):
    """One job run to completion on S3, its status sampled while it ran."""
    settings, _ = farm
    handle = _submit(settings, demo, clip)
    samples = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        samples.append(handle.status())
        if samples[-1].state.terminal:
            break
        time.sleep(0.25)
    output = _download(settings, samples[-1], tmp_path_factory.mktemp("s3out") / "output.mp4")
    return handle, samples, output


def test_a_job_of_four_chunks_completes_on_s3(s3_job, settings, demo, demo_avatar, clip, tmp_path):
    handle, samples, output = s3_job
    final = samples[-1]
    assert final.state == JobState.DONE, final.reason
    assert final.frames_total == final.frames_done == CLIP_FRAMES
    assert final.chunks == {"committed": CLIP_CHUNKS}
    assert final.output_location.startswith("http://127.0.0.1:")  # a presigned URL
    info = video_info(output)
    assert info["frames"] == CLIP_FRAMES and info["rate"] == 25
    assert abs(info["audio_s"] - 4.1) <= 1 / 25
    local = render_local(avatar=demo_avatar, audio=clip, out=tmp_path / "local.mp4", encoder=demo.encoder,
                         generator=demo.generator, options=CHUNK, settings=settings, show_progress=False)
    for i, (a, b) in enumerate(zip(video_frames(output, "yuv420p"), video_frames(local.output, "yuv420p"))):
        np.testing.assert_array_equal(a, b, err_msg=f"frame {i}")


def test_chunks_ran_in_parallel_in_two_worker_processes(s3_job):
    _, samples, _ = s3_job
    assert len(samples[-1].workers) == 2
    assert max(s.chunks.get("running", 0) for s in samples) == 2


def test_status_reports_true_numbers_while_running(s3_job):
    _, samples, _ = s3_job
    done = [s.frames_done for s in samples]
    assert done == sorted(done) and done[-1] == CLIP_FRAMES  # monotonic, and all frames at the end
    assert any(0 < d < CLIP_FRAMES for d in done)  # seen mid-way
    for s in samples:
        if s.frames_total:
            assert sum(s.chunks.values()) == CLIP_CHUNKS and s.frames_done <= s.frames_total
        assert s.elapsed_s >= 0
    assert any(s.eta_s is not None and s.eta_s > 0 for s in samples if s.state == JobState.RENDERING)


def test_the_same_job_through_local_storage_gives_the_same_output(s3_job, farm, demo, clip, tmp_path):
    local_settings = load_settings({**os.environ, "LIPFARM_STORAGE_URL": str(tmp_path / "storage")})
    handle = _submit(local_settings, demo, clip)
    status = handle.wait(timeout_s=300)
    assert status.output_location == str(tmp_path / "storage" / status.output_key)
    a = video_frames(Path(status.output_location), "yuv420p")
    b = video_frames(s3_job[2], "yuv420p")
    assert len(a) == len(b) == CLIP_FRAMES and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_cancel_mid_job_publishes_nothing_and_stops_the_workers(farm, demo, speech_16k, tmp_path):
    settings, _ = farm
    audio = tmp_path / "long.wav"
    write_wav(audio, speech_16k)  # 249 frames, 10 chunks
    handle = _submit(settings, demo, audio)
    _until(lambda: handle.status().frames_done >= 30)
    assert main(["cancel", handle.job_id]) == 0
    stopped_by = time.monotonic() + 20
    while time.monotonic() < stopped_by and handle.status().chunks.get("running", 0):
        time.sleep(0.2)
    status = handle.status()
    assert status.state == JobState.CANCELLED
    assert status.chunks.get("running", 0) == 0 and status.chunks.get("queued", 0) == 0
    assert status.chunks.get("committed", 0) < 10
    committed = status.chunks.get("committed", 0)
    time.sleep(3)
    assert handle.status().chunks.get("committed", 0) == committed  # nothing commits afterwards
    assert not storage_for(settings).exists(f"jobs/{handle.job_id}/output.mp4")
    inspector = celery_app.app.control.inspect(timeout=2)
    active = [t for tasks in (inspector.active() or {}).values() for t in tasks
              if t.get("kwargs", {}).get("job_id") == handle.job_id]
    assert active == []


def _until(condition, timeout_s=120.0, poll_s=0.05):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll_s)


def test_high_priority_chunks_run_before_queued_low_ones(farm, demo, speech_16k, tmp_path):
    settings, _ = farm
    low_audio, high_audio = tmp_path / "low.wav", tmp_path / "high.wav"
    write_wav(low_audio, speech_16k[:int(6.2 * 16000)])  # 154 frames: 7 chunks
    write_wav(high_audio, speech_16k[:int(2.1 * 16000)])  # 2 chunks
    low = _submit(settings, demo, low_audio, priority="low")
    _until(lambda: low.status().chunks.get("running", 0) == 2)  # both workers busy with the low job
    high = _submit(settings, demo, high_audio, priority="high")
    _until(lambda: high.status().state not in (JobState.QUEUED, JobState.PLANNING))
    time.sleep(0.2)  # its chunks are queued right after the state changes
    queued_at = time.time()
    high.wait(timeout_s=300)
    low.wait(timeout_s=300)
    starts = lambda h, n: [float(c["started_at"]) for c in h.store.chunks(h.job_id, n)]  # noqa: E731
    high_starts = starts(high, 2)
    later_low = [t for t in starts(low, 7) if t > queued_at]
    assert later_low, "the low job should still have had chunks queued when the high one arrived"
    assert max(high_starts) < min(later_low)


def test_a_killed_worker_process_loses_nothing(farm, demo, clip):
    settings, workers = farm
    handle = _submit(settings, demo, clip)
    _until(lambda: handle.status().chunks.get("running", 0) > 0)
    time.sleep(1.0)
    for pid in workers.children():
        os.kill(pid, signal.SIGKILL)  # both render processes die mid-chunk
    enqueue = Enqueue(celery_app.enqueue_plan, celery_app.enqueue_render, celery_app.enqueue_finalize)
    store = handle.store
    lost = {i for i, c in enumerate(store.chunks(handle.job_id, CLIP_CHUNKS)) if c["state"] == ChunkState.RUNNING}
    # No waiting for the leases to run out: the reconciler is told the time at which they have.
    report = reconcile(store=store, storage=storage_for(settings), settings=settings,
                       now=time.time() + settings.lease_s + 1, enqueue=enqueue)
    assert lost and {f"{handle.job_id}:{i}" for i in lost} <= set(report.requeued)
    status = handle.wait(timeout_s=300)
    assert status.frames_done == CLIP_FRAMES
    chunks = store.chunks(handle.job_id, CLIP_CHUNKS)
    assert all(int(chunks[i]["attempt"]) >= 2 for i in lost)
    assert all("lease expired" in chunks[i]["reason"] or chunks[i]["state"] == "committed" for i in lost)


def test_unfinished_jobs_are_rebuilt_from_storage_after_redis_loses_its_data(farm, demo, speech_16k, tmp_path):
    settings, _ = farm
    audio = tmp_path / "rebuild.wav"
    write_wav(audio, speech_16k[:int(6.2 * 16000)])  # 99200 samples: 497 mel, 152 windows, 154 frames
    handle = _submit(settings, demo, audio)
    _until(lambda: handle.status().chunks.get("committed", 0) >= 2)
    _clean_db()  # Redis loses everything: job state, queues, unacked messages
    with pytest.raises(NotFoundError):
        handle.status()
    enqueue = Enqueue(celery_app.enqueue_plan, celery_app.enqueue_render, celery_app.enqueue_finalize)
    report = reconcile(store=handle.store, storage=storage_for(settings), settings=settings, now=time.time(),
                       enqueue=enqueue, rebuild=True)
    assert handle.job_id in report.rebuilt
    status = handle.wait(timeout_s=300)
    assert status.frames_done == status.frames_total == 154
    assert info_frames(_download(settings, status, tmp_path / "rebuilt.mp4")) == 154


def info_frames(path: Path) -> int:
    return video_info(path)["frames"]


def _queues_empty() -> bool:
    client = redis.Redis(db=FARM_DB)
    return all(client.llen(name) == 0 for name in client.scan_iter("jobs*"))


def test_bad_submissions_queue_nothing(farm, s3, demo, clip, tmp_path, capsys, monkeypatch):
    base = ["submit", "--avatar", "demo", "--audio", str(clip), "--encoder", str(demo.encoder),
            "--generator", str(demo.generator)]
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    cases = [
        ({}, ["submit", "--avatar", "nobody", "--audio", str(clip)], 4, "unknown avatar 'nobody'"),
        ({}, [*base[:4], str(tmp_path / "bad.wav"), *base[5:]], 2, "bad.wav"),
        ({"LIPFARM_BROKER_URL": "redis://127.0.0.1:1/0"}, base, 5, "cannot reach Redis at redis://127.0.0.1:1/0"),
        ({"LIPFARM_STORAGE_URL": "s3://no-such-bucket/x"}, base, 5,
         f"bucket 'no-such-bucket' at {s3.endpoint} does not exist"),
        ({"LIPFARM_S3_SECRET_ACCESS_KEY": "wrong"}, base, 5,
         f"S3 refused the credentials for bucket '{BUCKET}' at {s3.endpoint}"),
        ({}, ["status", "no-such-job"], 4, "unknown job 'no-such-job'"),
        ({}, ["cancel", "no-such-job"], 4, "unknown job 'no-such-job'"),
    ]
    store = redis.Redis(db=FARM_DB, decode_responses=True)
    jobs_before = store.zcard(f"{TEST_PREFIX}:jobs")
    for overrides, args, code, text in cases:
        with monkeypatch.context() as patch:
            for name, value in overrides.items():
                patch.setenv(name, value)
            started = time.monotonic()
            got = main(args)
            elapsed = time.monotonic() - started
        err = capsys.readouterr().err.strip().splitlines()
        assert got == code and len(err) == 1 and text in err[0], (args, got, err)
        assert elapsed < 15, (args, elapsed)  # an unreachable service is reported, not waited on
    assert store.zcard(f"{TEST_PREFIX}:jobs") == jobs_before
    assert _queues_empty()
