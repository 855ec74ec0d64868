"""``lipfarm bench --recovery``: how long a user waits when something dies, at the default settings.

Real ``lipfarm worker`` processes (two render workers and a planning/finalizing worker, with their
default lease, heartbeat and recovery interval, and no ``lipfarm reconcile``) render real jobs
against the broker's Redis server, in a database of the benchmark's own, with local storage in a
temporary directory. Chunks are paused mid-render with hold files so that each fault lands at a
known place, and each wait is read from the attempt logs (when the next attempt started):

- ``render_process_killed_s``: a render process is killed with SIGKILL mid-chunk (its worker lives);
- ``worker_killed_s``: a whole worker (main process and render process) is killed with SIGKILL while
  another worker on the same machine lives;
- ``machine_lost_s``: a worker that looks like another machine (its own hostname, run with
  ``unshare --uts``; root only) is killed: nothing can see its process is gone, so its lease has to
  run out;
- ``finalizer_killed_s``: the process finalizing a job is killed with SIGKILL: the seconds until a new
  finalizer starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lipfarm.benchmarks.farm import bench_database, release_database, repeated_speech
from lipfarm.common import defaults
from lipfarm.common.config import Settings, load_settings
from lipfarm.common.identity import new_job_id
from lipfarm.common.options import RenderOptions
from lipfarm.demo.assets import ensure_demo_assets
from lipfarm.scheduler.processes import LipfarmProcess
from lipfarm.scheduler.submit import submit_job

BENCH_PREFIX = "lipfarm-bench-recovery"


class _Farm:
    """The benchmark's workers and the helpers its scenarios share."""

    def __init__(self, settings: Settings, env: dict, folder: Path) -> None:
        self.settings, self.env, self.folder = settings, env, folder
        self.holds = folder / "holds"
        self.holds.mkdir()
        self.demo = ensure_demo_assets(settings)
        self.audio = repeated_speech(self.demo.audio, folder / "clip.wav", 2.1)  # 51 frames, 3 chunks
        self.render = [self._worker(f"render{n}", "render") for n in range(2)]
        self.jobs = self._worker("jobs", "jobs,finalize")

    def _worker(self, name: str, queues: str) -> LipfarmProcess:
        return LipfarmProcess.worker(self.env, self.folder / f"{name}.log", "--concurrency", "1", "--queues",
                                     queues, "--hostname", f"{name}@bench")

    def start(self) -> "_Farm":
        for worker in (*self.render, self.jobs):
            worker.start()
        for worker in (*self.render, self.jobs):
            worker.wait_ready()
        return self

    def stop(self) -> None:
        for worker in (*self.render, self.jobs):
            worker.stop()

    def held_job(self, *holds: str, after_frames: int = 5):
        job_id = new_job_id()
        for name in holds:
            (self.holds / f"{job_id}.{name}.hold").write_text(str(after_frames))
        handle = submit_job(self.settings, avatar=self.demo.avatar_name, audio=self.audio,
                            encoder=self.demo.encoder, generator=self.demo.generator,
                            options=RenderOptions(chunk_frames=25), job_id=job_id)
        return handle

    def release(self, handle) -> None:
        for path in self.holds.glob(f"{handle.job_id}.*.hold"):
            path.unlink()


def _until(condition, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("the farm did not get there in time")
        time.sleep(0.05)
    return result


def _held_chunk(handle, index: int):
    return _until(lambda: next((c for c in handle.store.chunks(handle.job_id)
                                if c.index == index and c.frames_done >= 5), None))


def _next_attempt_after(handle, index: int, killed_at: float) -> float:
    attempts = _until(lambda: (a := handle.store.attempts(handle.job_id, index)) and len(a) >= 2 and a)
    return round(attempts[1].started_at - killed_at, 2)


def _render_process_killed(farm: _Farm) -> float:
    handle = farm.held_job("0")
    chunk = _held_chunk(handle, 0)
    killed_at = time.time()
    os.kill(int(chunk.worker.split(":")[1]), signal.SIGKILL)
    farm.release(handle)
    delay = _next_attempt_after(handle, 0, killed_at)
    handle.wait(timeout_s=300)
    return delay


def _worker_killed(farm: _Farm) -> float:
    handle = farm.held_job("0")
    chunk = _held_chunk(handle, 0)
    victim = next(w for w in farm.render if int(chunk.worker.split(":")[1]) in w.children())
    killed_at = time.time()
    victim.kill()
    farm.release(handle)
    try:
        delay = _next_attempt_after(handle, 0, killed_at)
        handle.wait(timeout_s=300)
    finally:
        victim.start().wait_ready()
    return delay


def _machine_lost(farm: _Farm) -> float | None:
    """A worker with a hostname of its own is killed; None where it cannot be run (not root)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return None
    lipfarm = str(Path(sys.executable).parent / "lipfarm")
    with open(farm.folder / "other-host.log", "wb") as log:
        other = subprocess.Popen([unshare, "--uts", "/bin/sh", "-c", 'hostname lipfarm-other-host && exec "$@"', "sh",
                                  lipfarm, "worker", "--concurrency", "1", "--queues", "render", "--hostname",
                                  "other@bench"], env={**os.environ, **farm.env}, stdout=log, stderr=log,
                                 start_new_session=True)
    try:
        _until(lambda: b" ready." in (farm.folder / "other-host.log").read_bytes())
        for worker in farm.render:  # the local workers are busy with another job: the other host takes ours
            os.kill(worker.pid, signal.SIGSTOP)
        handle = farm.held_job("0")
        chunk = _held_chunk(handle, 0)
        for worker in farm.render:
            os.kill(worker.pid, signal.SIGCONT)
        if not chunk.worker.startswith("lipfarm-other-host:"):
            raise RuntimeError(f"the chunk went to {chunk.worker}, not to the other host")
        killed_at = time.time()
        os.killpg(other.pid, signal.SIGKILL)
        farm.release(handle)
        delay = _next_attempt_after(handle, 0, killed_at)
        handle.wait(timeout_s=300)
        return delay
    finally:
        if other.poll() is None:
            os.killpg(other.pid, signal.SIGKILL)
        other.wait()


def _finalizer_killed(farm: _Farm) -> float:
    handle = farm.held_job("finalize", after_frames=0)
    first = _until(lambda: [a for a in handle.store.finalize_attempts(handle.job_id) if not a.ended_at])[0]
    killed_at = time.time()
    os.kill(int(first.worker.split(":")[1]), signal.SIGKILL)
    farm.release(handle)
    attempts = _until(lambda: (a := handle.store.finalize_attempts(handle.job_id)) and len(a) >= 2 and a)
    handle.wait(timeout_s=300)
    return round(attempts[1].started_at - killed_at, 2)


def run_recovery_bench(settings: Settings, *, redis_db: int = 15) -> dict:
    """The recovery waits at the default settings; see the module docstring."""
    url, client = bench_database(settings, redis_db)
    with tempfile.TemporaryDirectory(prefix="lipfarm-bench-recovery-") as temp:
        folder = Path(temp)
        env = {"LIPFARM_HOME": str(settings.home), "LIPFARM_BROKER_URL": url, "LIPFARM_REDIS_URL": url,
               "LIPFARM_KEY_PREFIX": BENCH_PREFIX, "LIPFARM_STORAGE_URL": str(folder / "storage"),
               "LIPFARM_CACHE_DIR": str(folder / "cache"), "LIPFARM_INFERENCE_THREADS": "1",
               "LIPFARM_HOLD_DIR": str(folder / "holds")}
        for name in ("LIPFARM_LEASE_S", "LIPFARM_HEARTBEAT_INTERVAL_S", "LIPFARM_RECONCILE_INTERVAL_S"):
            os.environ.pop(name, None)  # the defaults, as a user runs them
        bench_settings = load_settings({**os.environ, **env})
        from lipfarm.common import celery_app

        celery_app.configure(celery_app.app, bench_settings)
        farm = _Farm(bench_settings, env, folder).start()
        try:
            figures = {"render_process_killed_s": _render_process_killed(farm),
                       "worker_killed_s": _worker_killed(farm),
                       "machine_lost_s": _machine_lost(farm),
                       "finalizer_killed_s": _finalizer_killed(farm)}
        finally:
            farm.stop()
            release_database(client)
    return {**figures, "settings": {"lease_s": bench_settings.lease_s,
                                    "heartbeat_interval_s": bench_settings.heartbeat_interval_s,
                                    "reconcile_interval_s": bench_settings.reconcile_interval_s,
                                    "retry_delay_s": defaults.RETRY_DELAY_S}}
