"""A network partition across hosts: a worker on a second host (a network namespace with a hostname
of its own) loses its link to Redis mid-chunk. Its lease runs out, a worker on the first host takes
the chunk over and commits it; when the link returns the partitioned worker finds it lost the chunk
and stops, and nothing it did reaches the output.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lipfarm.common import celery_app, services
from lipfarm.common.config import load_settings
from lipfarm.common.identity import new_job_id
from lipfarm.common.options import RenderOptions
from lipfarm.common.state import JobState
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.processes import LipfarmProcess
from lipfarm.scheduler.local import render_local
from lipfarm.scheduler.submit import submit_job
from tests.farm import Holds, farm_env, until
from tests.hosts import Host, RedisServer, require_hosts, require_redis_server
from tests.media import video_frames

pytestmark = pytest.mark.slow
LEASE_S = 6


def test_a_partitioned_worker_loses_its_chunk_and_the_output_is_right(home, demo, demo_avatar, settings,
                                                                      speech_16k, tmp_path):
    require_hosts()
    require_redis_server()
    holds = Holds(tmp_path / "holds")
    audio = tmp_path / "clip.wav"
    write_wav(audio, speech_16k[:int(2.1 * 16000)])  # 51 frames: chunks of 25, 25, 1
    with Host() as host, RedisServer(tmp_path / "redis", bind=("127.0.0.1", host.host_ip)) as redis_server:
        env = farm_env(home, str(tmp_path / "storage"), None, LIPFARM_BROKER_URL=redis_server.url(),
                       LIPFARM_LEASE_S=str(LEASE_S), LIPFARM_HEARTBEAT_INTERVAL_S="1",
                       LIPFARM_RECONCILE_INTERVAL_S="1", LIPFARM_HOLD_DIR=str(holds.folder))
        guest_env = {**os.environ, **env, "LIPFARM_BROKER_URL": redis_server.url(host.host_ip)}
        local = [LipfarmProcess.worker(env, tmp_path / "local.log", "--concurrency", "1", "--queues", "render",
                                       "--hostname", "local@test"),
                 LipfarmProcess.worker(env, tmp_path / "jobs.log", "--concurrency", "1", "--queues",
                                       "jobs,finalize", "--hostname", "jobs@test")]
        guest_log = open(tmp_path / "guest.log", "wb")
        lipfarm = str(Path(sys.executable).parent / "lipfarm")
        guest = host.popen([lipfarm, "worker", "--concurrency", "1", "--queues", "render", "--hostname",
                            "guest@test"], env=guest_env, stdout=guest_log, stderr=guest_log)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            job_settings = load_settings()
            celery_app.configure(celery_app.app, job_settings)
            try:
                for process in local:
                    process.start().wait_ready()
                until(lambda: b" ready." in (tmp_path / "guest.log").read_bytes(), what="the guest worker")
                job_id = new_job_id()
                holds.hold(job_id, 0, 1, after_frames=5)
                handle = submit_job(job_settings, avatar="demo", audio=audio, encoder=demo.encoder,
                                    generator=demo.generator, options=RenderOptions(chunk_frames=25), job_id=job_id)
                held = until(lambda: _held(handle, job_id), what="both render workers held mid-chunk")
                partitioned = next(c for c in held if c.worker.startswith(host.hostname + ":"))
                host.cut()  # the second host's link goes dark mid-chunk
                holds.release(job_id)
                status = handle.wait(timeout_s=180, poll_s=0.2)  # finished by the first host alone
                host.restore()
                attempts = handle.store.attempts(job_id, partitioned.index)
                assert [(a.worker.split(":")[0], a.outcome) for a in attempts] == [
                    (host.hostname, "requeued"), (os.uname().nodename, "committed")]
                assert "lease expired" in attempts[0].reason
                chunk = handle.store.chunk(job_id, partitioned.index)
                assert chunk.state == "committed" and chunk.attempt == 2
                # back on the network, the partitioned worker learns it lost the chunk and stops
                until(lambda: b"lost or stopped" in (tmp_path / "guest.log").read_bytes()
                      or b"(stale)" in (tmp_path / "guest.log").read_bytes(),
                      timeout_s=60, what="the partitioned worker to notice")
                assert handle.store.chunk(job_id, partitioned.index).attempt == 2  # nothing it did counted
                assert [a.outcome for a in handle.store.attempts(job_id, partitioned.index)] == [
                    "requeued", "committed"]
            finally:
                guest.kill()
                for process in local:
                    process.stop()
                holds.release()
            celery_app.configure(celery_app.app, load_settings())
            services.reset()
    assert status.state == JobState.DONE and status.frames_done == 51
    out = tmp_path / "reference.mp4"
    render_local(avatar=demo_avatar, audio=audio, out=out, encoder=demo.encoder, generator=demo.generator,
                 options=RenderOptions(chunk_frames=25), settings=settings, show_progress=False)
    output = Path(status.output_location)
    expected, got = video_frames(out, "yuv420p"), video_frames(output, "yuv420p")
    assert len(got) == len(expected) == 51 and all(np.array_equal(a, b) for a, b in zip(got, expected))


def _held(handle, job_id: str):
    chunks = [c for c in handle.store.chunks(job_id) if c.frames_done >= 5]
    return chunks if len(chunks) == 2 else None
