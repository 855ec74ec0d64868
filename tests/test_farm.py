"""The farm with real parts: Redis, SeaweedFS (S3) on loopback, and Celery worker processes.

Two render workers (one render process each) and one planning/finalizing worker, as a farm is
deployed. Tests assert on recorded facts (each chunk's attempt log: who rendered it, when it started
and ended, how), and pause chunks with hold files where they need a job caught mid-render.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from lipfarm.common import celery_app
from lipfarm.common.config import load_settings
from lipfarm.common.errors import NotFoundError
from lipfarm.common.identity import new_job_id
from lipfarm.common.options import RenderOptions
from lipfarm.common.state import JobState
from lipfarm.common.storage import open_storage
from lipfarm.demo.speech import write_wav
from lipfarm.cli import main
from lipfarm.scheduler.local import render_local
from lipfarm.scheduler.reconcile import Enqueue, reconcile
from lipfarm.scheduler.submit import submit_job
from tests.farm import farm_env, redis_client, REDIS_DB, redis_url, running_farm, SeaweedS3, TEST_PREFIX, until
from tests.media import video_frames, video_info

pytestmark = pytest.mark.slow
FARM_DB = REDIS_DB["farm"]
BUCKET = "lipfarm-test"
CHUNK = RenderOptions(chunk_frames=25)
# The clip: 4.1 s = 65600 samples -> 329 mel frames -> 99 windows -> 101 frames: 5 chunks of <= 25.
CLIP_FRAMES, CLIP_CHUNKS = 101, 5


def _clean_db() -> None:
    redis_client(FARM_DB).flushdb()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def farm(tmp_path_factory, home, demo, s3, holds):
    """The workers, state and broker in Redis DB 14, jobs on S3 unless a submission says otherwise.

    The farm's settings are in this process's environment for the module, so CLI calls see them;
    the environment and the Celery app's configuration are restored afterwards.
    """
    _clean_db()
    env = farm_env(home, f"s3://{BUCKET}/farm", s3, LIPFARM_BROKER_URL=redis_url(FARM_DB),
                   LIPFARM_HOLD_DIR=str(holds.folder))
    with running_farm(env, tmp_path_factory.mktemp("workers"), holds, _clean_db) as running:
        yield running


def _submit(settings, demo, audio, **kw):
    return submit_job(settings, avatar="demo", audio=audio, encoder=demo.encoder, generator=demo.generator,
                      options=kw.pop("options", CHUNK), **kw)


def _download(settings, status, dest: Path) -> Path:
    open_storage(settings.storage_url, settings).get_file(status.output_key, dest)
    return dest


def _attempts(handle, chunks: int) -> list[list]:
    return [handle.store.attempts(handle.job_id, i) for i in range(chunks)]


@pytest.fixture(scope="module")
def s3_job(farm, demo, clip, tmp_path_factory):
    """One job run to completion on S3."""
    settings, _ = farm
    handle = _submit(settings, demo, clip)
    status = handle.wait(timeout_s=300, poll_s=0.2)
    output = _download(settings, status, tmp_path_factory.mktemp("s3out") / "output.mp4")
    return handle, status, output


def test_a_job_of_five_chunks_completes_on_s3(s3_job, settings, demo, demo_avatar, clip, tmp_path):
    handle, final, output = s3_job
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


def test_chunks_ran_at_the_same_time_in_two_worker_processes(s3_job):
    handle, _, _ = s3_job
    attempts = [a for chunk in _attempts(handle, CLIP_CHUNKS) for a in chunk]
    assert all(a.outcome == "committed" for a in attempts) and len(attempts) == CLIP_CHUNKS
    assert len({a.worker for a in attempts}) == 2
    overlapping = [(a, b) for a in attempts for b in attempts
                   if a.worker != b.worker and a.started_at < b.ended_at and b.started_at < a.ended_at]
    assert overlapping, [(a.worker, a.started_at, a.ended_at) for a in attempts]


def test_status_reports_true_numbers_while_running(farm, holds, demo, clip):
    settings, _ = farm
    job_id = new_job_id()
    holds.hold(job_id, 0, 1, after_frames=10)
    handle = _submit(settings, demo, clip, job_id=job_id)

    def held():
        chunks = [c for c in handle.store.chunks(job_id) if c.frames_done >= 10]
        return chunks if len(chunks) == 2 else None

    chunks = until(held, what="two chunks held after 10 frames")
    status = handle.status()
    assert status.state == JobState.RENDERING and status.frames_total == CLIP_FRAMES
    assert status.chunks == {"running": 2, "queued": 3}
    assert status.frames_done == sum(c.frames_done for c in chunks) and 20 <= status.frames_done < CLIP_FRAMES
    assert status.eta_s is not None and status.eta_s > 0 and status.elapsed_s > 0
    assert len(status.workers) == 2
    holds.release(job_id)
    final = handle.wait(timeout_s=300, poll_s=0.2)
    assert final.frames_done == final.frames_total == CLIP_FRAMES and final.chunks == {"committed": CLIP_CHUNKS}


def test_the_same_job_through_local_storage_gives_the_same_output(s3_job, farm, demo, clip, tmp_path):
    local_settings = load_settings({**os.environ, "LIPFARM_STORAGE_URL": str(tmp_path / "storage")})
    handle = _submit(local_settings, demo, clip)
    status = handle.wait(timeout_s=300)
    assert status.output_location == str(tmp_path / "storage" / status.output_key)
    a = video_frames(Path(status.output_location), "yuv420p")
    b = video_frames(s3_job[2], "yuv420p")
    assert len(a) == len(b) == CLIP_FRAMES and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_cancel_mid_job_publishes_nothing_and_stops_the_workers(farm, holds, demo, speech_16k, tmp_path):
    settings, _ = farm
    audio = tmp_path / "long.wav"
    write_wav(audio, speech_16k)  # 249 frames, 10 chunks
    job_id = new_job_id()
    holds.hold(job_id, *range(10), after_frames=10)
    handle = _submit(settings, demo, audio, job_id=job_id)
    until(lambda: sum(c.frames_done >= 10 for c in handle.store.chunks(job_id)) == 2, what="two held chunks")
    cancelled_at = time.time()
    assert main(["cancel", job_id]) == 0
    holds.release(job_id)
    attempts = until(lambda: (a := [x for chunk in _attempts(handle, 10) for x in chunk])
                     and all(x.ended_at for x in a) and a, what="the running attempts to end")
    assert len(attempts) == 2 and {a.outcome for a in attempts} == {"stopped"}
    assert all(a.ended_at >= cancelled_at for a in attempts)
    status = handle.status()
    assert status.state == JobState.CANCELLED and status.chunks == {"cancelled": 10}
    assert not open_storage(settings.storage_url, settings).exists(f"jobs/{job_id}/output.mp4")
    until(lambda: not _active_tasks(job_id), timeout_s=30, what="the workers to drop the job's tasks")


def _active_tasks(job_id: str) -> list:
    """The tasks of ``job_id`` the workers are running now, as Celery reports them."""
    inspector = celery_app.app.control.inspect(timeout=2)
    # a lane's slot names no job until it is bound: with nothing else running, any render is this job's
    return [t for tasks in (inspector.active() or {}).values() for t in tasks
            if t.get("kwargs", {}).get("job_id") in (job_id, None) and t.get("name") == celery_app.TASK_RENDER]


def test_high_priority_chunks_run_before_queued_low_ones(farm, holds, demo, speech_16k, tmp_path):
    settings, _ = farm
    low_audio, high_audio = tmp_path / "low.wav", tmp_path / "high.wav"
    write_wav(low_audio, speech_16k[:int(6.2 * 16000)])  # 154 frames: 7 chunks
    write_wav(high_audio, speech_16k[:int(2.1 * 16000)])  # 2 chunks
    low_id = new_job_id()
    holds.hold(low_id, 0, 1)  # both render workers busy with the low job
    low = _submit(settings, demo, low_audio, priority="low", job_id=low_id)
    until(lambda: low.status().chunks.get("running") == 2, what="both workers on the low job")
    high = _submit(settings, demo, high_audio, priority="high")
    until(lambda: high.status().state == JobState.RENDERING, what="the high job planned")
    holds.release(low_id)
    high.wait(timeout_s=300)
    low.wait(timeout_s=300)
    high_starts = [a.started_at for chunk in _attempts(high, 2) for a in chunk]
    waiting_low_starts = [a.started_at for chunk in _attempts(low, 7)[2:] for a in chunk]
    assert len(high_starts) == 2 and len(waiting_low_starts) == 5
    assert max(high_starts) < min(waiting_low_starts)


def test_a_short_job_sent_behind_a_long_one_shares_the_workers(farm, holds, demo, speech_16k, tmp_path):
    """Fair share with real workers: the short job's chunks are bound to the next slots the workers
    take, not queued behind the eight chunks the long job still has waiting (first come, first served)."""
    settings, _ = farm
    long_audio, short_audio = tmp_path / "long.wav", tmp_path / "short.wav"
    write_wav(long_audio, speech_16k)  # 249 frames: 10 chunks
    write_wav(short_audio, speech_16k[:int(2.1 * 16000)])  # 2 chunks
    long_id = new_job_id()
    holds.hold(long_id, 0, 1)  # both render workers busy with the long job, 8 of its chunks waiting
    long = _submit(settings, demo, long_audio, job_id=long_id)
    until(lambda: long.status().chunks.get("running") == 2, what="both workers on the long job")
    short = _submit(settings, demo, short_audio)
    until(lambda: short.status().state == JobState.RENDERING, what="the short job planned")
    holds.release(long_id)
    assert short.wait(timeout_s=300).state == JobState.DONE
    assert long.wait(timeout_s=300).state == JobState.DONE
    short_starts = [a.started_at for chunk in _attempts(short, 2) for a in chunk]
    waiting_long_starts = [a.started_at for chunk in _attempts(long, 10)[2:] for a in chunk]
    assert len(short_starts) == 2 and len(waiting_long_starts) == 8
    # round robin: at most one long chunk for each short one (and a tie the older job wins)
    assert sum(start < max(short_starts) for start in waiting_long_starts) <= 3


def test_killed_render_processes_lose_nothing(farm, holds, demo, clip):
    """Both render processes die mid-chunk; the workers take their chunks back on their own (their
    processes are gone on this host), and the job completes with every frame."""
    settings, workers = farm
    job_id = new_job_id()
    holds.hold(job_id, 0, 1, after_frames=5)
    handle = _submit(settings, demo, clip, job_id=job_id)
    until(lambda: sum(c.frames_done >= 5 for c in handle.store.chunks(job_id)) == 2, what="two held chunks")
    holds.release(job_id)
    for pid in workers.children():
        os.kill(pid, signal.SIGKILL)  # both render processes die mid-chunk
    status = handle.wait(timeout_s=300)
    assert status.frames_done == CLIP_FRAMES
    for chunk in _attempts(handle, 2):
        assert [a.outcome for a in chunk] == ["requeued", "committed"]
        assert "died" in chunk[0].reason and chunk[1].worker != chunk[0].worker  # a new process


def test_unfinished_jobs_are_rebuilt_from_storage_after_redis_loses_its_data(farm, holds, demo, speech_16k,
                                                                              tmp_path):
    settings, _ = farm
    audio = tmp_path / "rebuild.wav"
    write_wav(audio, speech_16k[:int(6.2 * 16000)])  # 99200 samples: 497 mel, 152 windows, 154 frames
    job_id = new_job_id()
    holds.hold(job_id, 2, 3)
    handle = _submit(settings, demo, audio, job_id=job_id)
    until(lambda: handle.status().chunks == {"committed": 2, "running": 2, "queued": 3},
          what="chunks 0 and 1 committed, 2 and 3 held")
    _clean_db()  # Redis loses everything: job state, queues, unacked messages
    with pytest.raises(NotFoundError):
        handle.status()
    enqueue = Enqueue(celery_app.enqueue_plan, celery_app.enqueue_render, celery_app.enqueue_finalize)
    reconcile(store=handle.store, storage=open_storage(settings.storage_url, settings), settings=settings,
              enqueue=enqueue, rebuild=True)
    # this pass or a worker's own (they see Redis empty too, and take the rebuild lock first) restores it
    until(lambda: handle.store.exists(job_id), what="the job rebuilt from storage")
    holds.release(job_id)
    status = handle.wait(timeout_s=300)
    assert status.frames_done == status.frames_total == 154
    assert info_frames(_download(settings, status, tmp_path / "rebuilt.mp4")) == 154
    attempts = _attempts(handle, 7)
    assert attempts[0] == attempts[1] == []  # restored as committed from their markers: not rendered again
    assert all(len(a) == 1 and a[0].outcome == "committed" for a in attempts[2:])


def test_a_job_redis_lost_part_of_is_repaired_from_storage(farm, holds, demo, speech_16k, tmp_path):
    """Some of a running job's keys vanish (its entry in the active set, two chunk records): the
    recovery pass restores the job from storage as a rebuild would, and it completes."""
    settings, _ = farm
    audio = tmp_path / "partial.wav"
    write_wav(audio, speech_16k[:int(6.2 * 16000)])  # 154 frames, 7 chunks
    job_id = new_job_id()
    holds.hold(job_id, 2, 3)
    handle = _submit(settings, demo, audio, job_id=job_id)
    until(lambda: handle.status().chunks == {"committed": 2, "running": 2, "queued": 3},
          what="chunks 0 and 1 committed, 2 and 3 held")
    client = redis_client(FARM_DB)
    client.srem(f"{TEST_PREFIX}:jobs:active", job_id)
    client.delete(f"{TEST_PREFIX}:chunk:{job_id}:4", f"{TEST_PREFIX}:chunk:{job_id}:5")
    client.delete(f"{TEST_PREFIX}:repair:turn")  # the workers' next recovery pass may look at once
    until(lambda: client.sismember(f"{TEST_PREFIX}:jobs:active", job_id)
          and client.exists(*[f"{TEST_PREFIX}:chunk:{job_id}:{i}" for i in range(7)]) == 7,
          what="the workers' recovery pass to restore the job")
    holds.release(job_id)
    status = handle.wait(timeout_s=300)
    assert status.state == JobState.DONE and status.frames_done == status.frames_total == 154
    assert info_frames(_download(settings, status, tmp_path / "repaired.mp4")) == 154
    attempts = _attempts(handle, 7)
    assert attempts[0] == attempts[1] == []  # restored as committed from their markers: not rendered again


def info_frames(path: Path) -> int:
    return video_info(path)["frames"]


def _queues_empty() -> bool:
    client = redis_client(FARM_DB)
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
    store = redis_client(FARM_DB, decode_responses=True)
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


def test_storage_down_mid_job_is_ridden_out(farm, s3, holds, demo, clip, s3_job, tmp_path):
    """S3 stops answering while chunks render; uploads are retried, and the job completes once it is back."""
    settings, _ = farm
    job_id = new_job_id()
    holds.hold(job_id, 0, 1, after_frames=5)
    handle = _submit(settings, demo, clip, job_id=job_id)
    until(lambda: sum(c.frames_done >= 5 for c in handle.store.chunks(job_id)) == 2, what="two held chunks")
    s3.stop()
    holds.release(job_id)
    until(lambda: any(a.ended_at for a in handle.store.attempts(job_id, 0) + handle.store.attempts(job_id, 1)),
          what="an attempt to give up on storage")
    s3.restart()
    status = handle.wait(timeout_s=300, poll_s=0.2)
    failed = [a for i in (0, 1) for a in handle.store.attempts(job_id, i) if a.outcome == "requeued"]
    assert failed and all(f"jobs/{job_id}/chunks/" in a.reason for a in failed)  # names the segment's key
    got = video_frames(_download(settings, status, tmp_path / "after-outage.mp4"), "yuv420p")
    expected = video_frames(s3_job[2], "yuv420p")
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_cancel_twice_says_the_job_already_ended(farm, holds, demo, clip, capsys):
    settings, _ = farm
    job_id = new_job_id()
    holds.hold(job_id, 0)
    _submit(settings, demo, clip, job_id=job_id)
    assert main(["cancel", job_id]) == 0
    assert f"job {job_id} cancelled" in capsys.readouterr().out
    assert main(["cancel", job_id]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id} already ended: cancelled"
    holds.release(job_id)


def test_a_cancelled_job_resumes_and_a_done_one_refuses(farm, holds, demo, clip, s3_job, capsys, tmp_path):
    settings, _ = farm
    job_id = new_job_id()
    holds.hold(job_id, 2, 3)
    handle = _submit(settings, demo, clip, job_id=job_id)
    until(lambda: handle.status().chunks.get("committed") == 2 and handle.status().chunks.get("running") == 2,
          what="two chunks committed, two held")
    assert main(["cancel", job_id]) == 0
    holds.release(job_id)
    assert main(["resume", job_id]) == 0
    assert capsys.readouterr().out.strip().endswith(f"job {job_id} resumed: 3 chunks queued again")
    status = handle.wait(timeout_s=300)
    assert status.frames_done == CLIP_FRAMES and status.reason == ""
    assert [len(a) for a in _attempts(handle, CLIP_CHUNKS)][:2] == [1, 1]  # committed chunks were kept
    got = video_frames(_download(settings, status, tmp_path / "resumed.mp4"), "yuv420p")
    assert all(np.array_equal(a, b) for a, b in zip(got, video_frames(s3_job[2], "yuv420p")))
    assert main(["resume", job_id]) == 2
    assert f"job {job_id} is done: there is nothing to resume" in capsys.readouterr().err
