"""Rendering on one machine with no broker: plan -> render chunks -> finalize, as the farm does.

The job's files live in a LocalStorage under ``<home>/work/<job id>/`` with the farm's layout;
chunks are rendered by ``render_chunk`` in this process (one worker) or in a pool of processes
(several), and the finalizer's ``stitch`` joins them. The output is written to a temporary file
beside ``--out`` and renamed into place only once it has passed its checks, so a failed or
interrupted render never leaves a partial file at ``--out``.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import secrets
import shutil
import tempfile
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from common.audio import normalise_to_16k, probe_audio
from common.avatar import Avatar
from common.config import Settings
from common.errors import InputError
from common.models import inspect_encoder, inspect_generator
from common.options import RenderOptions
from common.plan import AssetRef, AudioRef, Plan
from common.storage import LocalStorage, avatar_key, input_key, model_key, pcm_key, plan_key
from scheduler.plan import plan_job
from scheduler.stitch import Segment, StitchReport, stitch
from worker.assets import resolve_chunk
from worker.render import StageTimes, render_chunk
from worker.templates import TemplateCache


@dataclass
class RenderResult:
    output: Path
    frames: int
    wall_s: float
    audio_s: float
    stitch_s: float
    stages: StageTimes = field(default_factory=StageTimes)
    report: StitchReport | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s else 0.0


def new_job_id() -> str:
    """A time-ordered, unique job id such as ``20261124-130501-3fa9c2``."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def check_output_path(out: Path) -> None:
    if out.is_dir():
        raise InputError("output path is a directory", path=out)
    if not out.parent.is_dir():
        raise InputError("output directory does not exist", path=out.parent)
    if not os.access(out.parent, os.W_OK):
        raise InputError("output directory is not writable", path=out.parent)


def prepare_audio(audio: Path, storage, job_id: str) -> AudioRef:
    """Normalise the input to 16 kHz float32 PCM in the job's storage; checks it is usable audio."""
    probe_audio(audio)
    target = storage.local_path(pcm_key(job_id))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as sink:
        n_samples = normalise_to_16k(audio, sink)
    return AudioRef(input_key(job_id, audio.name), pcm_key(job_id), n_samples,
                    input_path=str(audio.resolve()), pcm_path=str(target))


def local_plan(job_id: str, avatar: Avatar, audio_ref: AudioRef, encoder: Path, generator: Path,
               options: RenderOptions) -> Plan:
    enc, gen = inspect_encoder(encoder), inspect_generator(generator)
    return plan_job(job_id=job_id,
                    avatar=AssetRef(avatar.content_hash, avatar_key(avatar.content_hash), str(avatar.root)),
                    avatar_name=avatar.name,
                    encoder=AssetRef(enc.sha256, model_key(enc.sha256), str(Path(encoder).resolve())),
                    generator=AssetRef(gen.sha256, model_key(gen.sha256), str(Path(generator).resolve())),
                    audio=audio_ref, options=options)


# --- The process pool's side --------------------------------------------------------------------

_POOL: dict = {}


def _pool_init(progress_queue, threads: int, template_frames: int) -> None:
    _POOL.update(progress=progress_queue, threads=threads, templates=TemplateCache(template_frames))


def _render_one(plan_json: str, index: int, root: str) -> StageTimes:
    plan = Plan.from_json(plan_json)
    report = _POOL["progress"].put
    return _render_chunk_local(plan, index, LocalStorage(root), _POOL["threads"], _POOL["templates"],
                               lambda done: report((index, done)))


def _render_chunk_local(plan: Plan, index: int, storage: LocalStorage, threads: int,
                        templates: TemplateCache, progress: Callable[[int], None]) -> StageTimes:
    chunk = plan.chunks[index]
    final = storage.local_path(chunk.segment_key)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.stem + ".partial.mp4")
    work = resolve_chunk(plan, chunk, storage=storage, cache=None, output=partial)
    times = render_chunk(work, threads=threads, templates=templates, progress=progress)
    os.replace(partial, final)
    return times


# --- The calling side ---------------------------------------------------------------------------


class _Progress:
    """Frames done per chunk, summed into one bar (a tqdm bar, or nothing)."""

    def __init__(self, total: int, show: bool) -> None:
        self.done: dict[int, int] = {}
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="frame", desc="render", dynamic_ncols=True)

    def update(self, index: int, done: int) -> None:
        before = sum(self.done.values())
        self.done[index] = max(done, self.done.get(index, 0))
        if self.bar is not None:
            self.bar.update(sum(self.done.values()) - before)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _render_chunks(plan: Plan, storage: LocalStorage, *, workers: int, threads: int,
                   template_frames: int, progress: _Progress,
                   templates: TemplateCache | None) -> StageTimes:
    total = StageTimes(backend="")
    if workers <= 1:
        templates = templates if templates is not None else TemplateCache(template_frames)
        for chunk in plan.chunks:
            times = _render_chunk_local(plan, chunk.index, storage, threads, templates,
                                        lambda done, i=chunk.index: progress.update(i, done))
            total.add(times)
            total.backend = times.backend
        return total
    context = multiprocessing.get_context("spawn")  # ONNX Runtime sessions are not fork-safe
    messages = context.Queue()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_pool_init,
                             initargs=(messages, threads, template_frames)) as pool:
        pending = {pool.submit(_render_one, plan.to_json(), c.index, str(storage.root)) for c in plan.chunks}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                _drain(messages, progress)
                for future in finished:
                    times = future.result()  # re-raises a chunk's error here
                    total.add(times)
                    total.backend = times.backend
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        _drain(messages, progress)
    return total


def _drain(messages, progress: _Progress) -> None:
    while True:
        try:
            index, done = messages.get_nowait()
        except queue.Empty:
            return
        progress.update(index, done)


def render_local(*, avatar: Avatar, audio: Path, out: Path, encoder: Path, generator: Path,
                 options: RenderOptions, settings: Settings, workers: int = 1,
                 show_progress: bool = True, keep_work: bool = False,
                 templates: TemplateCache | None = None) -> RenderResult:
    """Render ``audio`` onto ``avatar`` into the MP4 ``out``; see the module docstring.

    ``templates`` lets a caller that renders repeatedly in one process (the benchmark) keep
    prepared template frames warm between renders, as a farm worker does between chunks.
    """
    started = time.perf_counter()
    out, audio = Path(out), Path(audio)
    check_output_path(out)
    inspect_encoder(encoder), inspect_generator(generator)  # model errors before any work
    if workers < 1:
        raise InputError("at least one worker is needed", field="workers", found=workers)
    job_id = new_job_id()
    storage = LocalStorage(settings.work_dir / job_id)
    partial = None
    try:
        audio_ref = prepare_audio(audio, storage, job_id)
        audio_s = time.perf_counter() - started
        plan = local_plan(job_id, avatar, audio_ref, encoder, generator, options)
        storage.put_bytes(plan_key(job_id), plan.to_json().encode())
        threads = settings.threads_per_process(workers)
        bar = _Progress(plan.frame_count, show_progress)
        try:
            stages = _render_chunks(plan, storage, workers=workers, threads=threads,
                                    template_frames=settings.template_cache_frames, progress=bar,
                                    templates=templates)
        finally:
            bar.close()
        t = time.perf_counter()
        handle, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial.mp4", dir=out.parent)
        os.close(handle)
        segments = [Segment(storage.local_path(c.segment_key), c.start_frame, c.frames) for c in plan.chunks]
        report = stitch(segments, audio, Path(partial), expected_frames=plan.frame_count,
                        audio_bitrate_bps=options.audio_bitrate_bps)
        os.replace(partial, out)
        partial = None
        return RenderResult(out, plan.frame_count, time.perf_counter() - started, audio_s,
                            time.perf_counter() - t, stages, report)
    finally:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        if not keep_work:
            shutil.rmtree(storage.root, ignore_errors=True)
