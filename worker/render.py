"""Rendering one chunk: audio features, batched inference, compositing, segment encoding.

``render_chunk`` is the one function every mode calls: the local renderer's process pool, the
Celery render task and the benchmark. Three stages overlap, joined by bounded queues:

    prepare thread     templates (cached) -> UNet visual inputs, in reused batch buffers
    calling thread     batched UNet inference (ONNX Runtime / OpenVINO release the GIL)
    composite thread   generated ROI -> composited frame -> YUV region -> x264

Inference never waits for the others while they keep up, and the queues bound memory to a few
batches whatever the chunk's length. Audio features are computed by the calling thread as the
batches reach them (``AudioFeatures``: 64 encoder windows at a time, each once), just before it
waits for each batch's visual inputs: the first UNet batch waits for one block of features, not
the whole chunk's, and that block is computed while the prepare thread makes the first templates.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from lipfarm.common import defaults
from lipfarm.common.audio import PcmSource
from lipfarm.common.avatar import Avatar
from lipfarm.common.errors import CancelledError, InputError, ModelError
from lipfarm.common.features import AudioFeatures
from lipfarm.common.models import EncoderSpec, GeneratorSpec
from lipfarm.common.options import RenderOptions
from lipfarm.common.autoselect import choose_runtime
from lipfarm.common.runtime import open_runner, run_encoder
from lipfarm.common.syncmode import template_indices
from lipfarm.worker.compose import generated_to_crop, paste_into_region
from lipfarm.worker.encode import SegmentWriter
from lipfarm.worker.roi import crop_side, fill_visual_input
from lipfarm.worker.templates import TemplateCache
from lipfarm.worker.yuv import i420_planes, write_region


@dataclass(frozen=True)
class ChunkWork:
    """A chunk to render, with every input resolved to something local."""

    avatar: Avatar
    encoder: EncoderSpec
    generator: GeneratorSpec
    pcm: PcmSource
    start_frame: int
    stop_frame: int
    frame_count: int  # the job's: a sync mode's walk over the template may depend on it
    options: RenderOptions
    output: Path


@dataclass
class StageTimes:
    """Seconds per stage in one chunk. Inference and mel are wall seconds of the calling thread;
    prepare, composite and encode are the CPU seconds of their threads (what they cost, excluding
    the time they wait for a core at low priority). Stages overlap: they add up to more than wall."""

    frames: int = 0
    mel_s: float = 0.0
    encoder_s: float = 0.0
    unet_s: float = 0.0
    prepare_s: float = 0.0
    composite_s: float = 0.0
    encode_s: float = 0.0
    starved_s: float = 0.0  # inference waiting for prepared inputs
    blocked_s: float = 0.0  # inference waiting for the composite stage to take its outputs
    wall_s: float = 0.0
    backend: str = ""
    precision: str = ""
    choice: str = ""  # why this backend and precision (common.autoselect)
    extra: dict = field(default_factory=dict)

    def add(self, other: "StageTimes") -> None:
        for name in ("frames", "mel_s", "encoder_s", "unet_s", "prepare_s", "composite_s",
                     "encode_s", "starved_s", "blocked_s", "wall_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def check_chunk(work: ChunkWork) -> None:
    """Guard clauses run before anything is reserved or written."""
    if not 0 <= work.start_frame < work.stop_frame <= work.frame_count:
        raise InputError("empty or negative frame range, or one past the job's end", field="frames",
                         found=f"[{work.start_frame}, {work.stop_frame}) of {work.frame_count}")
    if not work.output.parent.is_dir():
        raise InputError("output directory does not exist", path=work.output.parent)


def render_chunk(work: ChunkWork, *, threads: int, templates: TemplateCache,
                 progress: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> StageTimes:
    """Render frames ``[start_frame, stop_frame)`` of a job into the H.264 segment ``work.output``.

    ``progress(frames_done)`` is called after each batch; ``should_stop()`` is polled before each
    batch and a true answer raises ``CancelledError`` (the partial segment is removed).
    """
    check_chunk(work)
    started = time.perf_counter()
    cv2.setNumThreads(1)  # OpenCV's own pool would fight inference for the same cores
    options = work.options
    choice = choose_runtime(options, work.generator, threads=threads,  # "auto": measured once per machine
                            sample=functools.partial(_sample_inputs, work, templates, threads))
    backend = choice.backend
    runner_args = dict(backend=backend, precision=choice.precision, threads=threads)
    times = StageTimes(frames=work.stop_frame - work.start_frame, backend=backend, precision=choice.precision,
                       choice=choice.reason)

    def timed_encoder(windows: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = encoder(windows)
        times.encoder_s += time.perf_counter() - t
        return out

    features = AudioFeatures(work.pcm, timed_encoder)
    if work.stop_frame > features.n_frames:
        raise ValueError(f"frame range [{work.start_frame}, {work.stop_frame}) is outside [0, {features.n_frames})")

    def audio(frames: range) -> np.ndarray:
        """The UNet audio inputs of chunk frames ``frames``; their mel and encoder blocks as needed."""
        t, spent = time.perf_counter(), times.encoder_s
        out = features(work.start_frame + frames.start, work.start_frame + frames.stop)
        times.mel_s += time.perf_counter() - t - (times.encoder_s - spent)
        return out

    # The UNet's session is opened in a thread of its own: the first UNet batch needs it only after
    # the encoder's session and the first block of audio features, made meanwhile in this thread.
    generator = _Opening(lambda: open_runner(work.generator, **runner_args))
    encoder = run_encoder(open_runner(work.encoder, **runner_args), work.encoder)
    _StagePipeline(work, generator, audio, times, templates, batch=options.unet_batch(backend)).run(
        progress, should_stop)
    times.wall_s = time.perf_counter() - started
    return times


def _sample_inputs(work: ChunkWork, templates: TemplateCache, threads: int, frames: int) -> dict[str, np.ndarray]:
    """The generator's inputs for the chunk's first ``frames`` frames (audio through the exact fp32
    encoder): what ``--precision auto`` measures candidates on, the job's own frames and speech."""
    spec = work.generator
    frames = min(frames, work.stop_frame - work.start_frame)
    exact = open_runner(work.encoder, backend="cpu", precision="fp32", threads=threads)
    audio = AudioFeatures(work.pcm, run_encoder(exact, work.encoder))(work.start_frame, work.start_frame + frames)
    indices = template_indices(work.options.sync_mode, work.start_frame, work.start_frame + frames,
                               work.avatar.frame_count, work.frame_count)
    visual = np.empty((frames, 6, spec.roi_px, spec.roi_px), np.float32)
    for j in range(frames):
        template = templates.get(work.avatar, int(indices[j]), crop_side=crop_side(spec.roi_px))
        fill_visual_input(template.crop, roi_px=spec.roi_px, out=visual[j])
    return {spec.visual_input: visual, spec.audio_input: audio}


class _Opening:
    """A runner being opened in a thread of its own: ``result()`` waits for it (or re-raises its
    error). Sessions are cached per process, so after a process's first chunk this returns at once."""

    def __init__(self, open_: Callable[[], object]) -> None:
        self._runner = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._runner = open_()
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, name="lipfarm-open-session", daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._runner


class _Stopped(Exception):
    """Raised inside a stage when another stage failed or the chunk was cancelled."""


def _lower_priority() -> None:
    """Let this thread yield the cores to inference: it then fills inference's idle gaps instead
    of preempting one of its threads, which would stall every parallel section at its barrier."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), defaults.HELPER_THREAD_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


class _StagePipeline:
    """The three stages of one chunk and what joins them: bounded queues, a stop flag, the first
    error of a helper thread, and the stage timings.

    ``free`` holds reusable input buffers, ``ready`` carries prepared batches to inference, ``done``
    carries generated batches to compositing; ``None`` on a queue means "no more".
    """

    def __init__(self, work: ChunkWork, generator, audio: Callable[[range], np.ndarray], times: StageTimes,
                 templates: TemplateCache, *, batch: int) -> None:
        self.work, self.generator, self.audio, self.times, self.templates = work, generator, audio, times, templates
        spec = work.generator
        self.roi, self.side = spec.roi_px, crop_side(spec.roi_px)
        self.n = work.stop_frame - work.start_frame
        self.batches = [range(i, min(i + batch, self.n)) for i in range(0, self.n, batch)]
        self.indices = template_indices(work.options.sync_mode, work.start_frame, work.stop_frame,
                                        work.avatar.frame_count, work.frame_count)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        depth = defaults.PIPELINE_QUEUE_BATCHES
        self.free: queue.Queue = queue.Queue()
        for _ in range(depth + 2):
            self.free.put(np.empty((batch, 6, self.roi, self.roi), np.float32))
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.done: queue.Queue = queue.Queue(maxsize=depth)
        self.encoded = 0

    # --- queue handling that gives up when another stage stopped ---------------------------------

    def _put(self, q: queue.Queue, item) -> None:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _get(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stopped

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        def run() -> None:
            _lower_priority()
            try:
                target()
            except _Stopped:
                pass
            except BaseException as exc:  # handed to the calling thread, which re-raises it
                self.errors.append(exc)
                self.stop.set()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    # --- the stages -------------------------------------------------------------------------------

    def run(self, progress: Callable[[int], None] | None, should_stop: Callable[[], bool] | None) -> None:
        threads = [self._spawn(self._prepare, "lipfarm-prepare"), self._spawn(self._composite, "lipfarm-composite")]
        try:
            self._infer(progress, should_stop)
        except _Stopped:
            pass
        except BaseException:
            self.stop.set()
            raise
        finally:
            for thread in threads:
                thread.join()
        if self.errors:
            raise self.errors[0]
        if self.encoded != self.n:
            raise RuntimeError(f"chunk encoded {self.encoded} frames, expected {self.n}")
        if progress is not None:
            progress(self.n)

    def _prepare(self) -> None:
        avatar, times = self.work.avatar, self.times
        for frames in self.batches:
            buffer = self._get(self.free)
            t = time.thread_time()
            prepared = [self.templates.get(avatar, int(self.indices[f]), crop_side=self.side) for f in frames]
            for j, template in enumerate(prepared):
                fill_visual_input(template.crop, roi_px=self.roi, out=buffer[j])
            times.prepare_s += time.thread_time() - t
            self._put(self.ready, (frames, buffer, prepared))
        self._put(self.ready, None)

    def _infer(self, progress: Callable[[int], None] | None, should_stop: Callable[[], bool] | None) -> None:
        spec, times = self.work.generator, self.times
        for expected in self.batches:
            audio = self.audio(expected)  # meanwhile the prepare thread works on this batch's templates
            if isinstance(self.generator, _Opening):
                self.generator = self.generator.result()
            t = time.perf_counter()
            item = self._get(self.ready)
            times.starved_s += time.perf_counter() - t
            if should_stop is not None and should_stop():
                raise CancelledError("render stopped: the job was cancelled or the chunk reassigned")
            frames, buffer, prepared = item
            if frames != expected:
                raise RuntimeError(f"prepared frames {frames} arrived for batch {expected}")
            t = time.perf_counter()
            (generated,) = self.generator({spec.visual_input: buffer[:len(frames)],
                                           spec.audio_input: audio})
            times.unet_s += time.perf_counter() - t
            if not np.isfinite(generated.sum(dtype=np.float32)):  # one pass; outputs in (0, 1) cannot overflow
                first = self.work.start_frame + frames.start
                raise ModelError("the generator's output holds NaN or infinite values", path=spec.path,
                                 field=f"output '{spec.output_name}'",
                                 found=f"at frames {first}-{first + len(frames) - 1}")
            self.free.put(buffer)
            t = time.perf_counter()
            self._put(self.done, (prepared, generated))
            times.blocked_s += time.perf_counter() - t
            if progress is not None:
                progress(self.encoded)
        self._put(self.done, None)

    def _composite(self) -> None:
        work, times = self.work, self.times
        avatar = work.avatar
        scratch = (np.empty((3, self.roi, self.roi), np.float32), np.empty((3, self.roi, self.roi), np.uint8))
        crop = np.empty((self.side, self.side, 3), np.uint8)
        regions: dict[tuple, np.ndarray] = {}
        with SegmentWriter(work.output, width=avatar.width, height=avatar.height, options=work.options) as writer:
            planes = writer.planes()
            while (item := self._get(self.done)) is not None:
                for template, out in zip(*item):
                    t = time.thread_time()
                    generated_to_crop(out, template.crop, out=crop, scratch=scratch)
                    region = regions.get(template.region.shape)
                    if region is None:
                        region = regions.setdefault(template.region.shape, np.empty_like(template.region))
                    paste_into_region(crop, template.rect, template.region, template.origin, out=region)
                    for view, plane in zip(planes, i420_planes(template.i420, avatar.width, avatar.height)):
                        view[:] = plane
                    write_region(planes, region, template.origin)
                    t2 = time.thread_time()
                    writer.submit()
                    times.composite_s += t2 - t
                    times.encode_s += time.thread_time() - t2
                    self.encoded += 1
            if self.stop.is_set():
                raise _Stopped
            t = time.thread_time()
            writer.close()
            times.encode_s += time.thread_time() - t
