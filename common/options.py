"""``RenderOptions``: what decides a job's output, fixed when it is planned.

Built once at the edge (CLI, API), validated here, stored in the plan and sent with every chunk,
so all chunks of a job render and encode alike wherever they run. Settings that change only speed
on one machine (threads, caches) are worker settings (``common.config``), not options.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from lipfarm.common import defaults
from lipfarm.common.errors import InputError
from lipfarm.common.runtime import BACKENDS, PRECISION_CHOICES
from lipfarm.common.syncmode import check_sync_mode

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow")


# What each RenderOptions field means, in one line: the CLI's flag help and the API's field description.
OPTION_HELP = {
    "chunk_frames": "frames per chunk (a multiple of --gop-frames)",
    "gop_frames": "keyframe interval in frames; chunks start on keyframes",
    "batch_frames": (f"UNet batch size in frames; 0 picks by backend ({defaults.UNET_BATCH_FRAMES_CPU} on CPUs, "
                     f"{defaults.UNET_BATCH_FRAMES_GPU} on GPUs)"),
    "precision": ("inference precision: fp32 (exact), bf16 (OpenVINO CPU), fp16 (CUDA), or auto (the fastest "
                  "measured here within LIPFARM_AUTO_MIN_PSNR_DB of fp32)"),
    "backend": "inference backend: auto, cpu, openvino, cuda",
    "video_qp": "H.264 constant quantiser, 0 (lossless) to 51; lower is better quality",
    "x264_preset": "x264 speed preset",
    "x264_threads": "x264 threads per chunk encode (part of the bitstream: fixed per job)",
    "audio_bitrate_bps": "AAC bitrate of the output's audio",
    "fast_start": "cut the first chunks short (1 s, 2 s, 4 s) so the job is watchable within seconds",
    "sync_mode": ("how the video fits the template: bounce (back and forth), loop, cut_off (end at the "
                  "template's last frame), silence (pad the audio to the whole template), remap (stretch it)"),
}

@dataclass(frozen=True)
class RenderOptions:
    """Options of one render. Units are in the names; see ``common.defaults`` for the defaults."""

    chunk_frames: int = defaults.CHUNK_FRAMES
    gop_frames: int = defaults.GOP_FRAMES
    batch_frames: int = defaults.UNET_BATCH_FRAMES
    precision: str = defaults.PRECISION
    backend: str = defaults.BACKEND
    video_qp: int = defaults.VIDEO_QP
    x264_preset: str = defaults.X264_PRESET
    x264_threads: int = defaults.X264_THREADS
    audio_bitrate_bps: int = defaults.AUDIO_BITRATE_BPS
    fast_start: bool = defaults.FAST_START
    sync_mode: str = defaults.SYNC_MODE  # absent from plans made before sync modes: they read as bounce

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise InputError("must be an integer", field=spec.name, found=repr(value))
            if spec.type == "bool" and not isinstance(value, bool):
                raise InputError("must be true or false", field=spec.name, found=repr(value))
        _at_least("gop_frames", self.gop_frames, 1)
        _at_least("chunk_frames", self.chunk_frames, self.gop_frames)
        if self.chunk_frames % self.gop_frames:
            raise InputError("chunks must start on keyframes: a multiple of gop_frames is needed",
                             field="chunk_frames", expected=f"a multiple of {self.gop_frames}",
                             found=self.chunk_frames)
        _at_least("batch_frames", self.batch_frames, 0)
        _at_least("x264_threads", self.x264_threads, 1)
        if not 0 <= self.video_qp <= 51:
            raise InputError("out of range", field="video_qp", expected="0..51", found=self.video_qp)
        _one_of("precision", self.precision, PRECISION_CHOICES)
        _one_of("backend", self.backend, BACKENDS)
        _one_of("x264_preset", self.x264_preset, X264_PRESETS)
        check_sync_mode(self.sync_mode)
        if not 16_000 <= self.audio_bitrate_bps <= 512_000:
            raise InputError("out of range", field="audio_bitrate_bps", expected="16000..512000",
                             found=self.audio_bitrate_bps)

    def unet_batch(self, backend: str) -> int:
        """The UNet batch on ``backend``: the option, or the backend's default when it is 0."""
        if self.batch_frames:
            return self.batch_frames
        return defaults.UNET_BATCH_FRAMES_GPU if backend == "cuda" else defaults.UNET_BATCH_FRAMES_CPU

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RenderOptions":
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError("unknown render options", field=", ".join(unknown))
        return cls(**data)


def _at_least(field: str, value: int, low: int) -> None:
    if value < low:
        raise InputError("too small", field=field, expected=f">= {low}", found=value)


def _one_of(field: str, value: str, allowed) -> None:
    if value not in allowed:
        raise InputError("not a known value", field=field, expected=" | ".join(allowed), found=value)
