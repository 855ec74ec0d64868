"""``lipfarm bench --farm``: farm throughput per worker count, scaling, and per-chunk overhead.

For each worker count ``W`` a real ``lipfarm worker --concurrency W`` process is started (W render
processes, one inference thread each) against the broker's Redis server in a database of its own,
with local storage in a temporary directory. A warm-up job of W chunks loads models and prepares
template frames in every render process; then a timed job of the same frames for every ``W`` runs
from submission to published output:

- ``farm_fps[W]``: frames / (submit -> done), planning and finalizing included;
- ``scaling``: ``farm_fps[2] / farm_fps[1]``. The worker counts alternate for ``rounds`` rounds; each
  round's ratio comes from its adjacent runs, and the median round is reported;
- ``chunk_overhead_s``: per chunk of the timed jobs, the time spent outside rendering (claim,
  plan and asset lookup, segment upload, commit), from each chunk's commit marker, and its share of
  a 250-frame chunk at the measured render speed. Model warm-up and avatar fetch happen once per
  render process, in the warm-up job: ``cold_start_s`` reports them;
- ``inference_scaling``: the ceiling the machine puts on ``scaling``: W processes running the UNet
  alone (one thread each, fp32, at the same moment) over one. Cores that share a physical core,
  caches, memory bandwidth or a power budget give less than W times one; the farm cannot beat it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from statistics import mean

import numpy as np
import redis

from lipfarm.common.audio import load_16k
from lipfarm.common import defaults
from lipfarm.common.config import Settings, load_settings
from lipfarm.common.errors import ServiceError
from lipfarm.common.options import RenderOptions
from lipfarm.job.jobfiles import JobFiles
from lipfarm.common.storage import LocalStorage
from lipfarm.demo.assets import ensure_demo_assets
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.processes import LipfarmProcess
from lipfarm.scheduler.submit import submit_job

BENCH_PREFIX = "lipfarm-bench"


def _bench_redis_url(broker_url: str, db: int) -> str:
    base = broker_url.rsplit("/", 1)[0] if broker_url.count("/") >= 3 else broker_url
    return f"{base}/{db}"


def _claim_database(url: str) -> redis.Redis:
    """The benchmark's Redis database: empty, or left by an earlier benchmark (its marker key)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    marker = f"{BENCH_PREFIX}:owner"
    try:
        if client.dbsize() and not client.exists(marker):
            raise ServiceError(f"Redis database {url} is not empty: the farm benchmark flushes its "
                               "database, so give it an unused one with --farm-redis-db")
        client.flushdb()
        client.set(marker, "lipfarm bench --farm")
    except redis.RedisError as exc:
        raise ServiceError(f"cannot reach Redis at {url} ({exc})") from None
    return client


def bench_database(settings: Settings, db: int) -> tuple[str, redis.Redis]:
    """The URL of the benchmarks' Redis database on the broker's server, claimed (see above)."""
    url = _bench_redis_url(settings.broker_url, db)
    return url, _claim_database(url)


def release_database(client: redis.Redis) -> None:
    """Empty the benchmarks' database, leaving the marker that says it is theirs."""
    client.flushdb()
    client.set(f"{BENCH_PREFIX}:owner", "lipfarm bench")


def repeated_speech(source: Path, path: Path, seconds: float) -> Path:
    """``seconds`` of the demo speech, repeated, as a 16 kHz WAV file."""
    speech = load_16k(source)
    samples = np.tile(speech, int(np.ceil(seconds * defaults.SAMPLE_RATE_HZ / speech.size)))[:int(seconds * defaults.SAMPLE_RATE_HZ)]
    write_wav(path, samples)
    return path


def _run_job(settings: Settings, demo, audio: Path, chunk_frames: int) -> tuple[float, object]:
    started = time.perf_counter()
    handle = submit_job(settings, avatar=demo.avatar_name, audio=audio, encoder=demo.encoder,
                        generator=demo.generator, options=RenderOptions(chunk_frames=chunk_frames, fast_start=False))
    status = handle.wait(timeout_s=3600)
    return time.perf_counter() - started, status


def _chunk_timings(storage: LocalStorage, job_id: str, chunks: int) -> list[dict]:
    files = JobFiles(storage, job_id)
    return [files.commit_marker(i).timing for i in range(chunks)]


def _timed_run(count: int, env: dict, temp: Path, bench_settings: Settings, demo, timed_audio: Path,
               chunk_frames: int, storage: LocalStorage) -> dict:
    """Start ``count`` render processes, warm them up, time one job; returns its figures."""
    worker = LipfarmProcess.worker({**env, "LIPFARM_WORKER_CONCURRENCY": str(count)}, temp / f"worker{count}.log",
                                   "--concurrency", str(count), "--hostname", f"bench{count}@%h").start().wait_ready()
    try:
        warm_audio = repeated_speech(demo.audio, temp / f"warm{count}.wav", count * chunk_frames / 25)
        _, warm = _run_job(bench_settings, demo, warm_audio, chunk_frames)
        seconds, status = _run_job(bench_settings, demo, timed_audio, chunk_frames)
    finally:
        worker.stop()
    return {"fps": status.frames_total / seconds, "frames": status.frames_total,
            "timing": _chunk_timings(storage, status.job_id, -(-status.frames_total // chunk_frames)),
            "warm_timing": _chunk_timings(storage, warm.job_id, -(-warm.frames_total // chunk_frames))}


def run_farm_bench(settings: Settings, *, worker_counts: list[int], frames: int = 500,
                   chunk_frames: int = 125, redis_db: int = 15, rounds: int = 2) -> dict:
    """Farm figures for each worker count; see the module docstring."""
    demo = ensure_demo_assets(settings)
    url = _bench_redis_url(settings.broker_url, redis_db)
    client = _claim_database(url)
    runs: dict[int, list[dict]] = {count: [] for count in worker_counts}
    with tempfile.TemporaryDirectory(prefix="lipfarm-bench-farm-") as temp_dir:
        temp = Path(temp_dir)
        timed_audio = repeated_speech(demo.audio, temp / "timed.wav", frames / 25)
        env = {"LIPFARM_HOME": str(settings.home), "LIPFARM_BROKER_URL": url, "LIPFARM_REDIS_URL": url,
               "LIPFARM_KEY_PREFIX": BENCH_PREFIX, "LIPFARM_STORAGE_URL": str(temp / "storage"),
               "LIPFARM_CACHE_DIR": str(temp / "cache"), "LIPFARM_INFERENCE_THREADS": "1"}
        bench_settings = load_settings({**os.environ, **env})
        from lipfarm.common import celery_app

        celery_app.configure(celery_app.app, bench_settings)
        storage = LocalStorage(temp / "storage")
        try:
            for _ in range(rounds):
                for count in worker_counts:
                    runs[count].append(_timed_run(count, env, temp, bench_settings, demo, timed_audio,
                                                  chunk_frames, storage))
        finally:
            client.flushdb()
            client.set(f"{BENCH_PREFIX}:owner", "lipfarm bench --farm")
    figures = _farm_figures(runs, chunk_frames, rounds)
    if 1 in worker_counts and 2 in worker_counts:
        ceiling = {count: inference_only_fps(str(demo.generator), count) for count in (1, 2)}
        figures["inference_only_fps"] = {str(c): round(v, 3) for c, v in ceiling.items()}
        figures["inference_scaling"] = round(ceiling[2] / ceiling[1], 4)
    return figures


def inference_only_fps(generator: str, processes: int, seconds: float = 10.0) -> float:
    """Frames/s of ``processes`` processes running the UNet alone at once, one thread each."""
    import multiprocessing

    start = time.time() + 15  # after every process has loaded its session and run a warm-up
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        frames = pool.starmap(_unet_frames_between, [(generator, start, seconds)] * processes)
    return sum(frames) / seconds


def _unet_frames_between(generator: str, start: float, seconds: float) -> int:
    from lipfarm.common.models import inspect_generator
    from lipfarm.common.runtime import open_runner

    spec = inspect_generator(generator)
    run = open_runner(spec, backend="cpu", precision="fp32", threads=1)
    rng = np.random.default_rng(0)
    feeds = {spec.visual_input: rng.random((1, 6, spec.roi_px, spec.roi_px), dtype=np.float32),
             spec.audio_input: rng.random((1, *defaults.AUDIO_INPUT_SHAPE), dtype=np.float32)}
    run(feeds)
    time.sleep(max(0.0, start - time.time()))
    frames = 0
    while True:
        run(feeds)
        if time.time() > start + seconds:
            return frames  # only frames finished inside the window count
        frames += 1


def _render_fps(count_runs: list[dict], chunk_frames: int) -> float:
    """The median render speed of one process over the timed chunks of ``count_runs``."""
    return float(np.median([chunk_frames / t["render_s"] for run in count_runs for t in run["timing"]]))


def _farm_figures(runs: dict[int, list[dict]], chunk_frames: int, rounds: int) -> dict:
    timings = [t for count_runs in runs.values() for run in count_runs for t in run["timing"]]
    render_fps = float(np.median([chunk_frames / t["render_s"] for t in timings]))
    overhead = mean(t["fetch_s"] + t["upload_s"] + t["commit_s"] for t in timings)
    figures = {"frames": next(iter(runs.values()))[0]["frames"], "chunk_frames": chunk_frames,
               "rounds": rounds,
               "farm_fps": {str(c): round(float(np.median([r["fps"] for r in rs])), 3) for c, rs in runs.items()},
               "farm_fps_rounds": {str(c): [round(r["fps"], 3) for r in rs] for c, rs in runs.items()},
               "render_fps_per_process": round(render_fps, 3),
               "chunk_overhead_s": round(overhead, 4),
               "chunk_overhead_share_of_250_frames": round(overhead / (250 / render_fps), 5),
               # against the warm render speed of the same worker count: one process renders
               # faster alone (its helper threads have the other core) than beside another
               "cold_start_s": {str(c): round(float(max(
                   t["fetch_s"] + t["render_s"] - chunk_frames / _render_fps(rs, chunk_frames)
                   for r in rs for t in r["warm_timing"])), 3) for c, rs in runs.items()}}
    if 1 in runs and 2 in runs:
        ratios = sorted(b["fps"] / a["fps"] for a, b in zip(runs[1], runs[2]))
        figures["scaling"] = round(ratios[len(ratios) // 2], 4)
        figures["scaling_rounds"] = [round(x, 4) for x in ratios]
    return figures
