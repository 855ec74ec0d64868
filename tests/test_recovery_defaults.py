"""Recovery at the default settings: how long a user waits when a render process or a whole worker
dies, with no `lipfarm reconcile` running (defect 3 of issue 8).

Only the workers run here, with the default lease, heartbeat and reconcile interval. A killed
render process's chunk must be claimed again within 30 s; so must the chunk of a whole worker that
died while another worker lives. Times are read from the attempt log (recorded facts), not sampled.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from lipfarm.common import celery_app, defaults, services
from lipfarm.common.config import load_settings
from lipfarm.common.identity import new_job_id
from lipfarm.common.options import RenderOptions
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.submit import submit_job
from tests.farm import farm_env, redis_client, REDIS_DB, redis_url, until, Workers

pytestmark = pytest.mark.slow
DB = REDIS_DB["recovery-defaults"]
RECLAIMED_WITHIN_S = 30


@pytest.fixture(scope="module")
def farm(tmp_path_factory, home, demo, holds):
    redis_client(DB).flushdb()
    env = farm_env(home, str(tmp_path_factory.mktemp("storage")), None,
                   LIPFARM_BROKER_URL=redis_url(DB), LIPFARM_HOLD_DIR=str(holds.folder))
    for name in ("LIPFARM_LEASE_S", "LIPFARM_HEARTBEAT_INTERVAL_S", "LIPFARM_RECONCILE_INTERVAL_S"):
        env.pop(name, None)  # the defaults, as a user runs them
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        for name in ("LIPFARM_LEASE_S", "LIPFARM_HEARTBEAT_INTERVAL_S", "LIPFARM_RECONCILE_INTERVAL_S"):
            patch.delenv(name, raising=False)
        settings = load_settings()
        assert settings.lease_s == defaults.LEASE_S
        celery_app.configure(celery_app.app, settings)
        workers = Workers(env, tmp_path_factory.mktemp("workers"), count=2).start()
        try:
            yield settings, workers
        finally:
            workers.stop()
            holds.release()
            redis_client(DB).flushdb()
    celery_app.configure(celery_app.app, load_settings())
    services.reset()


def _held_job(settings, demo, holds, speech_16k, tmp_path):
    audio = tmp_path / "clip.wav"
    write_wav(audio, speech_16k[:int(2.1 * 16000)])  # 51 frames: chunks of 25, 25 and 1
    job_id = new_job_id()
    holds.hold(job_id, 0, 1, after_frames=5)
    handle = submit_job(settings, avatar="demo", audio=audio, encoder=demo.encoder, generator=demo.generator,
                        options=RenderOptions(chunk_frames=25), job_id=job_id)
    until(lambda: sum(c.frames_done >= 5 for c in handle.store.chunks(job_id)) == 2, what="two held chunks")
    return handle


def _reclaim_delay(handle, index: int, killed_at: float) -> float:
    attempts = until(lambda: (a := handle.store.attempts(handle.job_id, index)) and len(a) >= 2 and a,
                     timeout_s=120, what=f"chunk {index} to be claimed again")
    return attempts[1].started_at - killed_at


def test_a_killed_render_process_is_replaced_within_30_s(farm, holds, demo, speech_16k, tmp_path):
    settings, _ = farm
    handle = _held_job(settings, demo, holds, speech_16k, tmp_path)
    victim = handle.store.chunk(handle.job_id, 0)
    killed_at = time.time()
    os.kill(int(victim.worker.split(":")[1]), signal.SIGKILL)
    holds.release(handle.job_id)
    delay = _reclaim_delay(handle, 0, killed_at)
    assert delay < RECLAIMED_WITHIN_S, delay
    final = handle.wait(timeout_s=120)
    assert final.frames_done == final.frames_total == 51


def test_a_killed_worker_is_replaced_within_30_s_by_another(farm, holds, demo, speech_16k, tmp_path):
    settings, workers = farm
    handle = _held_job(settings, demo, holds, speech_16k, tmp_path)
    victim = handle.store.chunk(handle.job_id, 0)
    dead = next(w for w in workers.render if int(victim.worker.split(":")[1]) in w.children())
    killed_at = time.time()
    dead.kill()  # the worker and its render process, at once: no warm shutdown, nothing handed back
    holds.release(handle.job_id)
    try:
        delay = _reclaim_delay(handle, 0, killed_at)
        assert delay < RECLAIMED_WITHIN_S, delay
        final = handle.wait(timeout_s=120)
        assert final.frames_done == final.frames_total == 51
    finally:
        dead.start().wait_ready()
