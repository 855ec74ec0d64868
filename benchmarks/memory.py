"""``lipfarm bench --memory``: a worker's peak memory must not grow with the job's length.

For a 1-minute and a 30-minute job (the demo speech repeated), each role a worker plays runs in a
fresh process, whose peak resident memory (``ru_maxrss``) is then that role's alone:

- ``plan``: decode and normalise the whole audio, plan the job;
- ``render``: render three chunks, from the start, the middle and the end of the timeline, in one
  process as a worker would (models, template cache and all);
- ``finalize``: join every segment of the job and mux its whole audio. Rendering all of a
  30-minute job takes over an hour on two cores, so chunks that were not rendered are filled with
  links to rendered segments of the same length: the joiner copies packets either way.

``ratio`` is the 30-minute peak over the 1-minute peak, per role and overall.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lipfarm.common.avatar import AvatarStore
from lipfarm.common.config import Settings
from lipfarm.common.options import RenderOptions
from lipfarm.common.plan import Plan
from lipfarm.common.storage import LocalStorage
from lipfarm.common.sysinfo import peak_rss_bytes
from lipfarm.benchmarks.farm import repeated_speech
from lipfarm.demo.assets import ensure_demo_assets


def _peak_mb() -> float:
    return peak_rss_bytes() / 2**20


def _plan_role(settings: Settings, audio: str, root: str, job_id: str) -> tuple[str, float]:
    from lipfarm.scheduler.local import local_plan, prepare_audio

    demo = ensure_demo_assets(settings)
    storage = LocalStorage(root)
    avatar = AvatarStore(settings.avatars_dir).get(demo.avatar_name)
    audio_ref = prepare_audio(Path(audio), storage, job_id)
    plan = local_plan(job_id, avatar, audio_ref, demo.encoder, demo.generator, RenderOptions())
    return plan.to_json(), _peak_mb()


def _render_role(plan_json: str, root: str, indices: list[int], threads: int, template_frames: int) -> float:
    from lipfarm.scheduler.local import render_chunk_local

    plan, storage = Plan.from_json(plan_json), LocalStorage(root)
    for index in indices:
        render_chunk_local(plan, index, storage, threads=threads, template_frames=template_frames)
    return _peak_mb()


def _finalize_role(plan_json: str, root: str, audio: str, rendered: list[int]) -> tuple[int, float]:
    from lipfarm.scheduler.local import local_segment
    from lipfarm.scheduler.stitch import Segment, stitch

    plan, storage = Plan.from_json(plan_json), LocalStorage(root)
    by_length = {plan.chunks[i].frames: local_segment(plan, i, storage) for i in rendered}
    segments = [Segment(local_segment(plan, c.index, storage) if c.index in rendered else by_length[c.frames],
                        c.start_frame, c.frames) for c in plan.chunks]
    report = stitch(segments, Path(audio), Path(root) / "output.mp4", expected_frames=plan.frame_count)
    return report.frames, _peak_mb()


def _in_fresh_process(function, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def measure_job(settings: Settings, minutes: float, folder: Path, threads: int) -> dict:
    demo = ensure_demo_assets(settings)
    audio = repeated_speech(demo.audio, folder / f"{minutes:g}min.wav", minutes * 60)
    root = folder / f"job-{minutes:g}min"
    plan_json, plan_mb = _in_fresh_process(_plan_role, settings, str(audio), str(root), f"mem{minutes:g}")
    plan = Plan.from_json(plan_json)
    last = len(plan.chunks) - 1
    rendered = sorted({0, last // 2, last})
    render_mb = _in_fresh_process(_render_role, plan_json, str(root), rendered, threads,
                                  settings.template_cache_frames)
    frames, finalize_mb = _in_fresh_process(_finalize_role, plan_json, str(root), str(audio), rendered)
    return {"audio_s": minutes * 60, "frames": frames, "chunks": len(plan.chunks), "rendered_chunks": rendered,
            "peak_rss_mb": {"plan": round(plan_mb, 1), "render": round(render_mb, 1),
                            "finalize": round(finalize_mb, 1)}}


def run_memory_bench(settings: Settings, *, threads: int, minutes: tuple[float, float] = (1, 30)) -> dict:
    """Peak memory per role for a short and a long job; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="lipfarm-bench-memory-") as temp:
        short, long = (measure_job(settings, m, Path(temp), threads) for m in minutes)
    ratio = {role: round(long["peak_rss_mb"][role] / short["peak_rss_mb"][role], 4) for role in short["peak_rss_mb"]}
    ratio["worker"] = round(max(long["peak_rss_mb"].values()) / max(short["peak_rss_mb"].values()), 4)
    return {f"{minutes[0]:g}min": short, f"{minutes[1]:g}min": long, "ratio": ratio}

