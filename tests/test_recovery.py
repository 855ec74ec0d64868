"""Recovery with faults injected for real: processes killed with SIGKILL, files corrupted, Redis
data lost. Each test is a defect the farm once had (issue 8); each asserts on recorded facts.

The farm here runs with short leases (a few seconds), so recoveries that wait for a lease to
expire stay quick; tests/test_recovery_defaults.py measures the waits at the default settings.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from lipfarm.common import celery_app
from lipfarm.common.avatar import AvatarStore, write_avatar
from lipfarm.common.config import load_settings
from lipfarm.common.identity import new_job_id
from lipfarm.common.options import RenderOptions
from lipfarm.common.storage.layout import audio_track_key
from lipfarm.common.state import JobState
from lipfarm.common.storage import open_storage
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.local import render_local
from lipfarm.scheduler.reconcile import Enqueue, reconcile
from lipfarm.scheduler.submit import submit_job
from tests.farm import (broker_messages, farm_env, redis_client, REDIS_DB, redis_url, running_farm,
                        fill_disk, stop_like_kubelet, tmpfs, until)
from tests.media import video_frames

pytestmark = pytest.mark.slow
DB = REDIS_DB["recovery"]
CHUNK = RenderOptions(chunk_frames=25)
CLIP_FRAMES, CLIP_CHUNKS = 101, 5  # 4.1 s of speech


def _flush() -> None:
    redis_client(DB).flushdb()


@pytest.fixture(scope="module")
def farm(tmp_path_factory, home, demo, holds):
    """Two render workers and a jobs/finalize worker, local storage, leases of 6 s."""
    _flush()
    storage = tmp_path_factory.mktemp("storage")
    env = farm_env(home, str(storage), None, LIPFARM_BROKER_URL=redis_url(DB),
                   LIPFARM_HOLD_DIR=str(holds.folder), LIPFARM_LEASE_S="6", LIPFARM_HEARTBEAT_INTERVAL_S="1",
                   LIPFARM_RECONCILE_INTERVAL_S="1", LIPFARM_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    with running_farm(env, tmp_path_factory.mktemp("workers"), holds, _flush) as running:
        yield running


@pytest.fixture(scope="module")
def clip_frames(tmp_path_factory, settings, demo, demo_avatar, clip) -> list[np.ndarray]:
    """The clip rendered locally, undisturbed: what every farm output must equal."""
    out = tmp_path_factory.mktemp("reference") / "clip.mp4"
    render_local(avatar=demo_avatar, audio=clip, out=out, encoder=demo.encoder, generator=demo.generator,
                 options=CHUNK, settings=settings, show_progress=False)
    return video_frames(out, "yuv420p")


def _submit(settings, demo, audio, *, avatar="demo", **kw):
    return submit_job(settings, avatar=avatar, audio=audio, encoder=demo.encoder, generator=demo.generator,
                      options=kw.pop("options", CHUNK), **kw)


def _output_frames(settings, status, tmp_path) -> list[np.ndarray]:
    dest = tmp_path / f"{status.job_id}.mp4"
    open_storage(settings.storage_url, settings).get_file(status.output_key, dest)
    return video_frames(dest, "yuv420p")


def _assert_frames_equal(got, expected) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(a, b, err_msg=f"frame {i}")


def _pid(worker_id: str) -> int:
    return int(worker_id.split(":")[1])


def _status_facts(status) -> dict:
    """A status as a user reads it, without the clock-dependent figures."""
    return {k: v for k, v in status.to_dict().items() if k not in ("elapsed_s", "eta_s")}


def test_a_killed_finalizer_is_replaced_within_the_lease(farm, holds, demo, clip, clip_frames, tmp_path):
    """Defect 1: the finalize lease was a fixed hour; a killed finalizer blocked its job that long."""
    settings, workers = farm
    job_id = new_job_id()
    holds.hold(job_id, "finalize")
    handle = _submit(settings, demo, clip, job_id=job_id)
    until(lambda: handle.status().state == JobState.FINALIZING, what="the finalizer to start")
    finalizer = until(lambda: [a for a in handle.store.finalize_attempts(job_id) if not a.ended_at],
                      what="the finalizer's attempt")[0]
    killed_at = time.time()
    os.kill(_pid(finalizer.worker), signal.SIGKILL)
    holds.release(job_id)
    status = handle.wait(timeout_s=120, poll_s=0.2)
    assert status.finished_at - killed_at < settings.lease_s
    attempts = handle.store.finalize_attempts(job_id)
    assert [a.outcome for a in attempts] == ["expired", "done"]
    _assert_frames_equal(_output_frames(settings, status, tmp_path), clip_frames)


def test_a_corrupted_segment_is_rendered_again_not_published(farm, holds, demo, clip, clip_frames, tmp_path):
    """Defect 4: 300 flipped bytes in a committed segment gave a 'done' job with damaged frames."""
    settings, _ = farm
    job_id = new_job_id()
    holds.hold(job_id, CLIP_CHUNKS - 1)
    handle = _submit(settings, demo, clip, job_id=job_id)
    until(lambda: handle.status().chunks.get("committed") == CLIP_CHUNKS - 1, what="four committed chunks")
    storage = open_storage(settings.storage_url, settings)
    marker = json.loads(storage.get_bytes(f"jobs/{job_id}/chunks/00001.json"))
    segment = storage.local_path(marker["segment_key"])
    data = bytearray(segment.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 300] = bytes(b ^ 0xFF for b in data[middle:middle + 300])
    segment.write_bytes(bytes(data))
    holds.release(job_id)
    status = handle.wait(timeout_s=180, poll_s=0.2)
    _assert_frames_equal(_output_frames(settings, status, tmp_path), clip_frames)
    first, second = handle.store.attempts(job_id, 1)  # rendered again after its segment failed the check
    assert (first.outcome, second.outcome) == ("reopened", "committed")
    assert "failed its check" in first.reason and marker["segment_key"] in first.reason


def _broken_avatar(settings, demo_avatar) -> str:
    """A consistent avatar package (hashes match) whose frame 3 is not an image: bad at its source."""
    frames = [demo_avatar.frame_path(i) for i in range(demo_avatar.frame_count)]
    garbage = settings.home / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg at all")
    frames[3] = garbage
    write_avatar(AvatarStore(settings.avatars_dir).path("broken-source"), name="broken-source", frames=frames,
                 rects=demo_avatar.rects, width=demo_avatar.width, height=demo_avatar.height,
                 source={"layout": "test"}, replace=True)
    return "broken-source"


def test_ended_jobs_are_restored_as_they_ended_after_redis_loses_its_data(farm, holds, demo, demo_avatar, clip):
    """Defect 5: failed jobs were re-run (and published) by a rebuild after Redis lost its data."""
    settings, _ = farm
    failed = _submit(settings, demo, clip, avatar=_broken_avatar(settings, demo_avatar))
    done = _submit(settings, demo, clip)
    cancel_id = new_job_id()
    holds.hold(cancel_id, 0, 1)
    cancelled = _submit(settings, demo, clip, job_id=cancel_id)
    until(lambda: cancelled.status().chunks.get("running") == 2, what="the job to cancel to be rendering")
    assert cancelled.cancel()
    holds.release(cancel_id)
    for handle in (failed, done, cancelled):
        until(lambda h=handle: h.status().state.terminal and not h.status().chunks.get("running"),
              what=f"{handle.job_id} to end")
    before = {h.job_id: _status_facts(h.status()) for h in (failed, done, cancelled)}
    assert before[failed.job_id]["state"] == "failed" and "not a decodable image" in before[failed.job_id]["reason"]
    _flush()
    enqueue = Enqueue(celery_app.enqueue_plan, celery_app.enqueue_render, celery_app.enqueue_finalize)
    reconcile(store=done.store, storage=open_storage(settings.storage_url, settings), settings=settings,
              now=time.time(), enqueue=enqueue, rebuild=True)
    after = {h.job_id: _status_facts(h.status()) for h in (failed, done, cancelled)}
    assert after == before


def test_a_corrupted_cache_file_is_fetched_again_not_blamed_on_the_input(farm, demo, demo_avatar, clip,
                                                                          speech_16k, tmp_path):
    """Defect 8: one undecodable cached frame failed every job with that avatar on that machine."""
    settings, _ = farm
    _submit(settings, demo, clip).wait(timeout_s=120)  # the avatar is now in the workers' cache
    frame = settings.cache_dir / "avatars" / demo_avatar.content_hash / "frames" / "000110.jpg"
    assert frame.is_file()  # a frame the clip never visited: in the cache, not yet in memory
    frame.write_bytes(b"\xff\xd8 broken")
    long_audio = tmp_path / "long.wav"
    write_wav(long_audio, speech_16k)  # 249 frames: the walk reaches frame 110
    handle = _submit(settings, demo, long_audio)
    status = handle.wait(timeout_s=300, poll_s=0.2)
    assert status.state == JobState.DONE
    assert frame.read_bytes()[:2] == b"\xff\xd8" and len(frame.read_bytes()) > 100  # fetched again, whole


@pytest.fixture()
def small_disk(tmp_path):
    """A real filesystem that fills up: a 100 MB tmpfs."""
    with tmpfs(tmp_path / "disk", "100m") as mount:
        yield mount


def test_a_full_disk_is_retried_with_backoff_and_named_by_its_key(farm, holds, demo, clip, clip_frames,
                                                                  small_disk, tmp_path):
    """Defect 9: write errors were retried at once (full renders thrown away) and named a temp file."""
    settings, _ = farm
    job_settings = load_settings({**os.environ, "LIPFARM_STORAGE_URL": str(small_disk / "storage")})
    job_id = new_job_id()
    holds.hold(job_id, 0)
    handle = _submit(job_settings, demo, clip, job_id=job_id, options=RenderOptions(chunk_frames=125))
    until(lambda: handle.status().chunks.get("running") == 1, what="the chunk to start")
    # the planner encodes and uploads the audio after queueing the chunks: the disk fills after that,
    # so it is the chunk's upload that meets it, not the planner's (whose chunk would wait for its audio)
    until(lambda: handle.storage.exists(audio_track_key(job_id)), what="the job's audio track in storage")
    filler = fill_disk(small_disk)
    holds.release(job_id)
    first = until(lambda: [a for a in handle.store.attempts(job_id, 0) if a.ended_at], what="the first attempt")[0]
    assert first.outcome == "requeued"
    assert f"jobs/{job_id}/chunks/00000" in first.reason and "No space left on device" in first.reason
    assert first.ended_at - first.started_at > 3  # uploads were retried with backoff inside the attempt
    filler.unlink()  # the disk has room again: the next attempt succeeds
    status = handle.wait(timeout_s=180, poll_s=0.2)
    attempts = handle.store.attempts(job_id, 0)
    assert [a.outcome for a in attempts] == ["requeued", "committed"]
    assert attempts[1].started_at - attempts[0].ended_at >= 4  # requeued with a backoff, not at once
    _assert_frames_equal(_output_frames(job_settings, status, tmp_path), clip_frames)


def _render_worker_of(workers, chunk):
    return next(w for w in workers.render if int(chunk.worker.split(":")[1]) in w.children())


def _held_at_chunk_0(farm, holds, demo, clip):
    """A job whose chunk 0 pauses after 5 frames: its handle, that chunk and the worker rendering it."""
    settings, workers = farm
    job_id = new_job_id()
    holds.hold(job_id, 0, after_frames=5)
    handle = _submit(settings, demo, clip, job_id=job_id)
    chunk = until(lambda: next((c for c in handle.store.chunks(job_id) if c.index == 0 and c.frames_done >= 5),
                               None), what="chunk 0 held")
    return handle, chunk, _render_worker_of(workers, chunk)


# The grace the deploy files give a worker (deploy/kubernetes/worker.yaml, deploy/compose.yaml): a
# hand-back must fit it many times over, measured here as the kubelet stops a pod.
STOP_BOUND_S = 10.0


def _log_after(worker, offset: int) -> str:
    return worker.log.read_bytes()[offset:].decode(errors="replace")


@pytest.mark.parametrize("group", [False, True], ids=["main-pid", "process-group"])
def test_sigterm_hands_the_chunk_back_at_once(farm, holds, demo, clip, group):
    """The kubelet's stop (SIGTERM to the main pid, SIGKILL after the grace), or SIGTERM to the whole
    process group (``lipfarm cluster down``, a terminal): the held chunk goes back uncharged with its
    reason within seconds, the worker exits cleanly, and one message is left for the chunk."""
    handle, chunk, worker = _held_at_chunk_0(farm, holds, demo, clip)
    job_id, offset = handle.job_id, worker.log.stat().st_size
    stopped_at = time.time()
    try:
        took = stop_like_kubelet(worker, grace_s=60, group=group)
        assert worker.process.returncode == 0
        assert took < STOP_BOUND_S, took
        first = handle.store.attempts(job_id, 0)[0]
        assert (first.worker, first.outcome) == (chunk.worker, "released")
        assert "shutting down (SIGTERM): handed back" in first.reason
        assert first.ended_at - stopped_at < STOP_BOUND_S
        assert "Traceback" not in _log_after(worker, offset)
        assert len(broker_messages(DB, "render", job_id=job_id, chunk=0)) == 1
        print(f"\nSIGTERM to exit: {took:.2f} s; to the hand-back: {first.ended_at - stopped_at:.2f} s")
    finally:
        worker.start().wait_ready()
    holds.release(job_id)
    assert handle.wait(timeout_s=120).state == JobState.DONE
    assert [a.outcome for a in handle.store.attempts(job_id, 0)] == ["released", "committed"]
    assert handle.store.chunk(job_id, 0).spent == 1  # the handed-back attempt was not charged


def test_sigterm_to_the_main_process_hands_a_finalize_back_at_once(farm, holds, demo, clip):
    settings, workers = farm
    job_id = new_job_id()
    holds.hold(job_id, "finalize")
    handle = _submit(settings, demo, clip, job_id=job_id)
    until(lambda: [a for a in handle.store.finalize_attempts(job_id) if not a.ended_at], what="the finalizer")
    worker, offset = workers.jobs, workers.jobs.log.stat().st_size
    try:
        took = stop_like_kubelet(worker, grace_s=60)
        assert worker.process.returncode == 0 and took < STOP_BOUND_S, took
        released = [a for a in handle.store.finalize_attempts(job_id) if a.outcome == "released"]
        assert len(released) == 1 and "shutting down (SIGTERM): handed back" in released[0].reason
        assert "Traceback" not in _log_after(worker, offset)
        assert len(broker_messages(DB, "finalize", job_id=job_id)) == 1
    finally:
        holds.release(job_id)
        worker.start().wait_ready()
    assert handle.wait(timeout_s=120).state == JobState.DONE
    assert [a.outcome for a in handle.store.finalize_attempts(job_id)][-1] == "done"


def test_sigquit_hands_the_chunk_back_without_spending_an_attempt(farm, holds, demo, clip):
    """A cold shutdown (SIGQUIT) stops the render at once; the chunk goes back uncharged."""
    handle, chunk, worker = _held_at_chunk_0(farm, holds, demo, clip)
    job_id = handle.job_id
    os.kill(worker.pid, signal.SIGQUIT)
    try:
        worker.process.wait(timeout=60)
        holds.release(job_id)
        assert handle.wait(timeout_s=120).state == JobState.DONE
        first, second = handle.store.attempts(job_id, 0)
        assert first.outcome in ("released", "requeued") and second.outcome == "committed"
        if first.outcome == "released":
            assert handle.store.chunk(job_id, 0).spent == 1  # the handed-back attempt was not charged
    finally:
        worker.start().wait_ready()


def test_a_chunk_that_keeps_killing_its_worker_fails_the_job_naming_it(farm, holds, demo, clip):
    """A poison chunk: bounded attempts, each after a longer wait, then the job fails with the
    chunk, its frame range and the cause."""
    settings, workers = farm
    job_id = new_job_id()
    holds.hold(job_id, 2, after_frames=5)
    handle = _submit(settings, demo, clip, job_id=job_id)
    for attempt in range(1, settings.max_attempts + 1):
        chunk = until(lambda n=attempt: next((c for c in handle.store.chunks(job_id) if c.index == 2
                                              and c.attempt == n and c.frames_done >= 5), None),
                      timeout_s=60, what=f"attempt {attempt} at chunk 2")
        os.kill(int(chunk.worker.split(":")[1]), signal.SIGKILL)  # the chunk "crashes" its render process
    status = until(lambda: (s := handle.status()).state.terminal and s, timeout_s=60, what="the job to end")
    holds.release(job_id)
    assert status.state == JobState.FAILED
    assert status.reason.startswith("chunk 2 (frames 50-74) failed: attempt 3: worker process")
    assert status.reason.endswith("died (out of attempts)")  # the cause, and why it is final
    attempts = handle.store.attempts(job_id, 2)
    assert len(attempts) == 3
    assert attempts[1].started_at - attempts[0].ended_at < 5  # a lost worker: tried again at once
    assert attempts[2].started_at - attempts[1].ended_at >= 5  # the second time: it waits
