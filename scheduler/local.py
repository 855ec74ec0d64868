"""Rendering on one machine with no broker: plan -> render chunks -> stitch, as the farm does.

The job's files live in a ``LocalStorage`` under ``<home>/work/<job id>/`` with the farm's layout;
chunks are rendered by ``render_chunk`` in this process (one worker) or in a pool of processes
(several), and the finalizer's ``stitch`` joins them. The output is written to a temporary file
beside ``--out`` and renamed into place only once it has passed its checks, so a failed or
interrupted render never leaves a partial file at ``--out``.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import queue
import shutil
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lipfarm.common import defaults
from lipfarm.common.audio import normalise_to_16k, probe_audio
from lipfarm.common.avatar import Avatar
from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError
from lipfarm.common.fileio import replaced_atomically
from lipfarm.common.identity import new_job_id
from lipfarm.common.models import inspect_encoder, inspect_generator
from lipfarm.common.options import RenderOptions
from lipfarm.common.plan import AssetRef, AudioRef, Plan, Submission, plan_job
from lipfarm.common.storage import LocalStorage
from lipfarm.common.storage.layout import avatar_key, input_key, model_key, pcm_key, segment_key
from lipfarm.scheduler.stitch import Segment, StitchReport, stitch
from lipfarm.worker.assets import resolve_chunk
from lipfarm.worker.render import StageTimes, render_chunk
from lipfarm.worker.templates import process_templates


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


def check_output_path(out: Path) -> None:
    if out.is_dir():
        raise InputError("output path is a directory", path=out)
    if not out.parent.is_dir():
        raise InputError("output directory does not exist", path=out.parent)
    if not os.access(out.parent, os.W_OK):
        raise InputError("output directory is not writable", path=out.parent)


def prepare_audio(audio: Path, storage: LocalStorage, job_id: str, *, max_audio_s: float = 0.0) -> AudioRef:
    """Normalise the input to 16 kHz float32 PCM in the job's storage; checks it is usable audio."""
    probe_audio(audio)
    target = storage.local_path(pcm_key(job_id))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as sink:
        n_samples = normalise_to_16k(audio, sink, max_samples=round(max_audio_s * defaults.SAMPLE_RATE_HZ) or None)
    return AudioRef(input_key(job_id, audio.name), pcm_key(job_id), n_samples,
                    input_path=str(audio.resolve()), pcm_path=str(target))


def local_plan(job_id: str, avatar: Avatar, audio_ref: AudioRef, encoder: Path, generator: Path,
               options: RenderOptions) -> Plan:
    """The plan of a local render: the farm's plan, with every input given by its local path, and no
    fast start (it is for someone watching a job while it renders: a local render has no viewer)."""
    options = dataclasses.replace(options, fast_start=False)
    enc, gen = inspect_encoder(encoder), inspect_generator(generator)
    submission = Submission(
        job_id=job_id, avatar_name=avatar.name,
        avatar=AssetRef(avatar.content_hash, avatar_key(avatar.content_hash), str(avatar.root)),
        encoder=AssetRef(enc.sha256, model_key(enc.sha256), str(Path(encoder).resolve())),
        generator=AssetRef(gen.sha256, model_key(gen.sha256), str(Path(generator).resolve())),
        audio_key=audio_ref.input_key, audio_name=Path(audio_ref.input_key).name, options=options,
        priority=defaults.PRIORITY, submitted_at=0.0, template_frames=avatar.frame_count)
    return plan_job(submission, audio_ref)


# --- The process pool's side --------------------------------------------------------------------

_POOL: dict = {}


def _pool_init(progress_queue, threads: int, template_frames: int) -> None:
    _POOL.update(progress=progress_queue, threads=threads, template_frames=template_frames)


def _render_one(plan_json: str, index: int, root: str) -> StageTimes:
    plan = Plan.from_json(plan_json)
    report = _POOL["progress"].put
    return render_chunk_local(plan, index, LocalStorage(root), threads=_POOL["threads"],
                              template_frames=_POOL["template_frames"],
                              progress=lambda done: report((index, done)))


def local_segment(plan: Plan, index: int, storage: LocalStorage) -> Path:
    """Where a local render keeps chunk ``index``'s segment (one attempt per chunk: "local")."""
    return storage.local_path(segment_key(plan.job_id, index, "local"))


def render_chunk_local(plan: Plan, index: int, storage: LocalStorage, *, threads: int, template_frames: int,
                       progress: Callable[[int], None] | None = None) -> StageTimes:
    """Render one chunk of a local plan into its segment in ``storage`` (appears whole, or not)."""
    chunk = plan.chunks[index]
    with replaced_atomically(local_segment(plan, index, storage), suffix=".mp4") as partial:
        work = resolve_chunk(plan, chunk, storage=storage, cache=None, output=partial)
        return render_chunk(work, threads=threads, templates=process_templates(template_frames),
                            progress=progress)


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


def _render_in_process(plan: Plan, storage: LocalStorage, *, threads: int, template_frames: int,
                       progress: _Progress) -> StageTimes:
    total = StageTimes()
    for chunk in plan.chunks:
        times = render_chunk_local(plan, chunk.index, storage, threads=threads, template_frames=template_frames,
                                   progress=lambda done, i=chunk.index: progress.update(i, done))
        total.add(times)
        total.backend, total.precision, total.choice = times.backend, times.precision, times.choice
    return total


def _render_in_pool(plan: Plan, storage: LocalStorage, *, workers: int, threads: int, template_frames: int,
                    progress: _Progress) -> StageTimes:
    total = StageTimes()
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
                    total.backend, total.precision, total.choice = times.backend, times.precision, times.choice
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
                 show_progress: bool = True) -> RenderResult:
    """Render ``audio`` onto ``avatar`` into the MP4 ``out``; see the module docstring."""
    started = time.perf_counter()
    out, audio = Path(out), Path(audio)
    check_output_path(out)
    # model errors before any work; the plan's and the chunks' checks are then answered from memory
    # (common.models checks each version of a file once per process)
    inspect_encoder(encoder), inspect_generator(generator)
    if workers < 1:
        raise InputError("at least one worker is needed", field="workers", found=workers)
    job_id = new_job_id()
    storage = LocalStorage(settings.work_dir / job_id)
    try:
        plan = local_plan(job_id, avatar, prepare_audio(audio, storage, job_id, max_audio_s=settings.max_audio_s),
                          encoder, generator, options)
        audio_s = time.perf_counter() - started
        bar = _Progress(plan.frame_count, show_progress)
        render = _render_in_process if workers == 1 else functools.partial(_render_in_pool, workers=workers)
        try:
            stages = render(plan, storage, threads=settings.threads_per_process(workers),
                            template_frames=settings.template_cache_frames, progress=bar)
        finally:
            bar.close()
        stitched = time.perf_counter()
        segments = [Segment(local_segment(plan, c.index, storage), c.start_frame, c.frames) for c in plan.chunks]
        with replaced_atomically(out, suffix=".partial.mp4") as partial:
            report = stitch(segments, audio, partial, expected_frames=plan.frame_count,
                            audio_bitrate_bps=options.audio_bitrate_bps, audio_fit_samples=plan.audio.fit_samples)
        return RenderResult(out, plan.frame_count, time.perf_counter() - started, audio_s,
                            time.perf_counter() - stitched, stages, report)
    finally:
        shutil.rmtree(storage.root, ignore_errors=True)
