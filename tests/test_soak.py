"""Soak: ten jobs at once while the farm is knocked about, every output checked frame for frame.

Faults, injected for real at random moments (the seed is printed, so a failure can be replayed):
render workers and render processes killed with SIGKILL and restarted, the planning/finalizing
worker killed once, Redis stopped and restarted once (with its append-only file, as a production
Redis restarts), and one committed segment corrupted before its job is finalized. Every job must
complete, every output must equal an undisturbed render of its audio, and no chunk may have two
attempts that count as committed. The test prints the faults injected and the chunks rendered again.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lipfarm.common import celery_app, services
from lipfarm.common.config import load_settings
from lipfarm.common.errors import ServiceError
from lipfarm.common.identity import new_job_id
from lipfarm.common.options import RenderOptions
from lipfarm.common.state import JobState
from lipfarm.common.storage import open_storage
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.local import render_local
from lipfarm.scheduler.submit import submit_job
from tests.farm import Holds, Workers, farm_env, until
from tests.hosts import RedisServer, require_redis_server
from tests.media import video_frames

pytestmark = pytest.mark.slow
JOBS = 10
CLIP_SECONDS = (1.5, 2.1, 3.1)  # 36, 51 and 76 frames: 2 to 4 chunks of 25


def test_ten_jobs_survive_kills_a_redis_restart_and_a_corrupted_segment(home, settings, demo, demo_avatar,
                                                                          speech_16k, tmp_path, capsys):
    require_redis_server()
    seed = int(os.environ.get("LIPFARM_SOAK_SEED", time.time()))
    rng = random.Random(seed)
    clips = []
    for i, seconds in enumerate(CLIP_SECONDS):
        clips.append(tmp_path / f"clip{i}.wav")
        write_wav(clips[-1], speech_16k[int(0.5 * 16000):int((0.5 + seconds) * 16000)])
    expected = {clip: _reference(settings, demo, demo_avatar, clip, tmp_path) for clip in clips}
    holds = Holds(tmp_path / "holds")
    faults: list[str] = []
    with RedisServer(tmp_path / "redis", appendonly=True) as redis_server:
        env = farm_env(home, str(tmp_path / "storage"), None, LIPFARM_BROKER_URL=redis_server.url(),
                       LIPFARM_LEASE_S="5", LIPFARM_HEARTBEAT_INTERVAL_S="1", LIPFARM_RECONCILE_INTERVAL_S="1",
                       LIPFARM_HOLD_DIR=str(holds.folder), LIPFARM_MAX_ATTEMPTS="5")
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            job_settings = load_settings()
            celery_app.configure(celery_app.app, job_settings)
            workers = Workers(env, tmp_path / "workers", count=2).start()
            try:
                handles = _run(job_settings, demo, clips, holds, workers, redis_server, rng, faults)
            finally:
                workers.stop()
                holds.release()
            celery_app.configure(celery_app.app, load_settings())
            services.reset()
            storage = open_storage(job_settings.storage_url, job_settings)
            rerun = _check(handles, expected, storage, tmp_path)
    with capsys.disabled():
        print(f"\nsoak (seed {seed}): faults injected: {'; '.join(faults)}")
        print(f"soak: chunks rendered again: {', '.join(rerun) or 'none'}")


def _reference(settings, demo, demo_avatar, clip: Path, tmp_path: Path) -> list[np.ndarray]:
    out = tmp_path / f"reference-{clip.stem}.mp4"
    render_local(avatar=demo_avatar, audio=clip, out=out, encoder=demo.encoder, generator=demo.generator,
                 options=RenderOptions(chunk_frames=25), settings=settings, show_progress=False)
    return video_frames(out, "yuv420p")


def _run(settings, demo, clips, holds, workers, redis_server, rng, faults) -> list:
    corrupted_job = new_job_id()
    holds.hold(corrupted_job, 3)  # its last chunk waits until a committed segment has been damaged
    handles = []
    for n in range(JOBS):
        clip = clips[2] if n == 0 else rng.choice(clips)
        handle = submit_job(settings, avatar="demo", audio=clip, encoder=demo.encoder, generator=demo.generator,
                            options=RenderOptions(chunk_frames=25), job_id=corrupted_job if n == 0 else None)
        handles.append((handle, clip))
    stop = threading.Event()
    chaos = threading.Thread(target=_chaos, args=(workers, redis_server, rng, faults, stop), daemon=True)
    chaos.start()
    try:
        _corrupt_a_segment(handles[0][0], holds, settings, faults)
        for handle, _ in handles:
            until(lambda h=handle: _through_outages(lambda: h.status().state.terminal), timeout_s=600,
                  what=f"job {handle.job_id}")
    finally:
        stop.set()
        chaos.join()
    return handles


def _chaos(workers, redis_server, rng, faults, stop: threading.Event) -> None:
    """Kill and restart workers at random moments; restart Redis once, halfway."""
    restarted_redis = False
    started = time.monotonic()
    while not stop.wait(rng.uniform(2.0, 5.0)):
        if not restarted_redis and time.monotonic() - started > 12:
            redis_server.stop()
            time.sleep(2)
            redis_server.restart()
            faults.append("Redis stopped for 2 s and restarted")
            restarted_redis = True
            continue
        victim = rng.choice(["render worker", "render process", "render process", "jobs worker"])
        if victim == "render process":
            pids = workers.children()
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                faults.append("a render process killed (SIGKILL)")
            continue
        process = rng.choice(workers.render) if victim == "render worker" else workers.jobs
        process.kill()
        faults.append(f"a {victim} killed (SIGKILL) and restarted")
        process.start().wait_ready()


def _corrupt_a_segment(handle, holds, settings, faults) -> None:
    """Flip 300 bytes in the middle of one committed segment of the first job, before it finalizes."""
    chunk = until(lambda: _through_outages(lambda: next((c for c in handle.store.chunks(handle.job_id)
                                                         if c.state == "committed"), None)),
                  timeout_s=300, what="a committed chunk of the first job")
    path = open_storage(settings.storage_url, settings).local_path(chunk.segment_key)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 300] = bytes(b ^ 0xFF for b in data[middle:middle + 300])
    path.write_bytes(bytes(data))
    faults.append(f"chunk {chunk.index} of job {handle.job_id}: 300 bytes of its segment flipped")
    holds.release(handle.job_id)


def _through_outages(read):
    """``read()``, or None while the injected Redis restart makes it fail: the test polls again."""
    try:
        return read()
    except ServiceError:
        return None


def _check(handles, expected, storage, tmp_path) -> list[str]:
    rerun = []
    for handle, clip in handles:
        status = handle.status()
        assert status.state == JobState.DONE, (handle.job_id, status.reason)
        output = tmp_path / f"{handle.job_id}.mp4"
        storage.get_file(status.output_key, output)
        frames = video_frames(output, "yuv420p")
        assert len(frames) == len(expected[clip]), handle.job_id
        for i, (a, b) in enumerate(zip(frames, expected[clip])):
            np.testing.assert_array_equal(a, b, err_msg=f"job {handle.job_id} frame {i}")
        for chunk in handle.store.chunks(handle.job_id):
            attempts = handle.store.attempts(handle.job_id, chunk.index)
            assert sum(a.outcome == "committed" for a in attempts) == 1, (handle.job_id, chunk.index, attempts)
            if len(attempts) > 1:
                rerun.append(f"{handle.job_id}:{chunk.index} ({', '.join(a.outcome or 'running' for a in attempts)})")
    return rerun
