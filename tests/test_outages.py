"""Redis outages injected for real: a Redis server of the test's own, stopped, restarted, flushed.

Defects 2, 6 and 7 of issue 8: the reconcile loop died on the first connection error and never came
back; it rebuilt from storage only on its first pass; a short outage failed every chunk in flight.
"""

from __future__ import annotations

import time

import pytest

from lipfarm.common import celery_app, services
from lipfarm.common.config import load_settings
from lipfarm.common.identity import new_job_id
from lipfarm.common.options import RenderOptions
from lipfarm.common.state import JobRecord, JobState, StateStore
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.processes import LipfarmProcess
from lipfarm.scheduler.submit import submit_job
from tests.farm import Holds, Workers, farm_env, until
from tests.hosts import RedisServer, require_redis_server

pytestmark = pytest.mark.slow
OUTAGE_S = 10


@pytest.fixture()
def redis_server(tmp_path):
    require_redis_server()
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.kill()


@pytest.fixture()
def env(home, redis_server, tmp_path):
    """Settings of a farm on the test's Redis, in this process's environment for the test."""
    values = farm_env(home, str(tmp_path / "storage"), None, LIPFARM_BROKER_URL=redis_server.url(),
                      LIPFARM_RECONCILE_INTERVAL_S="1", LIPFARM_HOLD_DIR=str(tmp_path / "holds"))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        celery_app.configure(celery_app.app, load_settings())
        yield values
    celery_app.configure(celery_app.app, load_settings())
    services.reset()


def _reconciler(env: dict, tmp_path, *args: str) -> LipfarmProcess:
    return LipfarmProcess(["reconcile", "--loop", *args], env=env, log=tmp_path / "reconcile.log",
                          ready_text=b"reconciling every").start().wait_ready(timeout_s=60)


def _expired_chunk(store: StateStore, job_id: str) -> None:
    """A rendering job whose one chunk's attempt stopped beating long ago (its worker died)."""
    now = time.time()
    store.create_job(JobRecord(job_id=job_id, state=JobState.QUEUED, priority="normal", avatar="demo",
                               audio="a.wav", storage_url="file:///nowhere", created_at=now, updated_at=now))
    store.start_planning(job_id, now=now)
    store.start_rendering(job_id, [(0, 25)], output_key="out", now=now)
    assert store.claim(job_id, 0, worker="elsewhere:1", now=now - 100, lease_s=20, max_attempts=3).ok


def test_the_reconcile_loop_rides_out_a_redis_outage(env, redis_server, tmp_path):
    """Defect 2: `lipfarm reconcile --loop` died on the first Redis connection error."""
    settings = load_settings()
    reconciler = _reconciler(env, tmp_path)
    try:
        redis_server.stop()
        time.sleep(OUTAGE_S)  # the outage itself: the loop must live through it
        redis_server.restart()
        store = StateStore.connect(settings.redis_url, settings.key_prefix)
        _expired_chunk(store, "after-the-outage")
        attempts = until(lambda: [a for a in store.attempts("after-the-outage", 0) if a.outcome],
                         timeout_s=60, what="the expired attempt to be requeued")
        assert attempts[0].outcome == "requeued" and "lease expired" in attempts[0].reason
        assert reconciler.running()
        log = reconciler.log.read_text()
        assert "reconcile pass failed, trying again" in log and "cannot reach Redis" in log
        assert "Traceback" not in log
    finally:
        reconciler.stop()


def test_the_reconcile_loop_rebuilds_whenever_redis_loses_its_data(env, redis_server, demo, speech_16k, tmp_path):
    """Defect 6: `reconcile --loop --rebuild` rebuilt from storage on its first pass only."""
    settings = load_settings()
    reconciler = _reconciler(env, tmp_path, "--rebuild")
    try:
        store = StateStore.connect(settings.redis_url, settings.key_prefix)
        until(lambda: store.generation() is not None, what="the first pass")
        audio = tmp_path / "clip.wav"
        write_wav(audio, speech_16k[:int(1.5 * 16000)])
        handle = submit_job(settings, avatar="demo", audio=audio, encoder=demo.encoder, generator=demo.generator,
                            options=RenderOptions(chunk_frames=25))  # no worker: it waits to be planned
        redis_server.client().flushall()  # Redis loses everything while the loop runs
        until(lambda: store.exists(handle.job_id), timeout_s=60, what="the job to be rebuilt")
        assert store.job(handle.job_id).state == JobState.QUEUED and store.job(handle.job_id).rebuilt_at
    finally:
        reconciler.stop()


def test_a_short_redis_outage_costs_no_attempt(env, redis_server, demo, speech_16k, tmp_path):
    """Defect 7: the per-batch ownership check had no error handling; a blip failed every chunk in flight."""
    settings = load_settings()
    holds = Holds(tmp_path / "holds")
    workers = Workers(env, tmp_path / "workers", count=1).start()
    try:
        audio = tmp_path / "clip.wav"
        write_wav(audio, speech_16k[:int(1.5 * 16000)])  # 36 frames: chunks of 25 and 11
        job_id = new_job_id()
        holds.hold(job_id, 0, after_frames=5)
        handle = submit_job(settings, avatar="demo", audio=audio, encoder=demo.encoder, generator=demo.generator,
                            options=RenderOptions(chunk_frames=25), job_id=job_id)
        until(lambda: any(c.index == 0 and c.frames_done >= 5 for c in handle.store.chunks(job_id)),
              what="the chunk held mid-render")
        redis_server.stop()
        time.sleep(5)  # an outage shorter than the lease (15 s here)
        holds.release(job_id)  # the render goes on while Redis is down
        time.sleep(2)
        redis_server.restart()
        final = handle.wait(timeout_s=120, poll_s=0.2)
        assert final.state == JobState.DONE and final.frames_done == final.frames_total
        attempts = handle.store.attempts(job_id, 0)
        assert [a.outcome for a in attempts] == ["committed"]  # the chunk kept its one attempt
    finally:
        workers.stop()
