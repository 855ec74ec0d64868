"""Any common audio file to 16 kHz mono float32, and sample-range readers over the result.

PyAV (FFmpeg's libraries) decodes every container users bring: wav, flac, mp3, ogg, and the audio
track of m4a/mp4/mov. Mixing and resampling then follow ``librosa.load`` exactly (the reference
script's loader): a float32 mean over channels, then soxr at its 'HQ' quality. soxr runs as a
stream, which gives bit-identical samples to librosa's one-shot call while an hour of 48 kHz audio
never sits in memory at once.

The 16 kHz result is stored once per job as raw little-endian float32 (``.f32``). Chunks read only
the sample ranges they need from it through a ``PcmSource``.

Audio is bounded in length (``LIPFARM_MAX_AUDIO_S``, 4 hours by default) because size on disk says
little about it: a few kilobytes of Opus silence decode to hours, i.e. gigabytes of PCM in storage
and a plan of hundreds of thousands of frames. ``check_audio`` refuses, at submission, a file whose
container says it is too long; ``normalise_to_16k`` counts what it decodes and stops as soon as the
count passes the bound, so a file that lies about its length is refused after decoding at most the
bound's worth of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

import av
import numpy as np
import soxr

from lipfarm.common import defaults
from lipfarm.common.errors import AudioError

# One encoder window needs 16 mel frames, i.e. 1 + floor(n / 200) >= 16.
MIN_SAMPLES_16K = (defaults.WINDOW_MEL_FRAMES - 1) * defaults.HOP_SAMPLES
MAX_AUDIO_ENV = "LIPFARM_MAX_AUDIO_S"  # the setting that bounds audio length (common.config)


def max_samples_16k(max_audio_s: float | None) -> int | None:
    """The bound ``max_audio_s`` seconds as 16 kHz samples for ``normalise_to_16k``; None or 0: none."""
    if not max_audio_s or max_audio_s <= 0:
        return None
    return int(round(max_audio_s * defaults.SAMPLE_RATE_HZ))


def _too_long(path, limit_s: float, found: str) -> AudioError:
    return AudioError("audio is longer than the maximum", path=path,
                      expected=f"at most {limit_s:g} s ({MAX_AUDIO_ENV})", found=found)


@dataclass(frozen=True)
class AudioInfo:
    """What a probe of an audio file found."""

    path: str
    codec: str
    sample_rate_hz: int
    channels: int
    duration_s: float | None


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise AudioError("file not found", path=path)
    if path.is_dir():
        raise AudioError("is a directory, not an audio file", path=path)
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise AudioError(f"not a readable media file ({_reason(exc)})", path=path) from None
    if not container.streams.audio:
        container.close()
        raise AudioError("no audio stream: not an audio file, or a video without sound", path=path)
    return container


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def probe_audio(path: str | Path) -> AudioInfo:
    """Open ``path`` and describe its first audio stream, without decoding it."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.audio[0]
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        return AudioInfo(str(path), stream.codec_context.name, stream.codec_context.sample_rate,
                         stream.codec_context.channels, duration)


def check_audio(path: str | Path, *, max_s: float | None = None) -> AudioInfo:
    """Probe ``path`` and refuse audio whose container says it is too short for one encoder window,
    or longer than ``max_s`` seconds (``LIPFARM_MAX_AUDIO_S``; None or 0: no bound).

    A cheap check at submission; the decode at planning checks the real length again.
    """
    info = probe_audio(path)
    if info.duration_s is not None and info.duration_s * defaults.SAMPLE_RATE_HZ < MIN_SAMPLES_16K:
        raise AudioError("audio is too short for one encoder window", path=path,
                         expected=f">= {MIN_SAMPLES_16K / defaults.SAMPLE_RATE_HZ:.4f} s",
                         found=f"{info.duration_s:.4f} s")
    if max_s and max_s > 0 and info.duration_s is not None and info.duration_s > max_s:
        raise _too_long(path, max_s, f"{info.duration_s:.1f} s, as its container says")
    return info


def _frame_to_float(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame as float32 ``[channels, samples]``, scaled as libsndfile scales PCM."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    name = frame.format.name.rstrip("p")
    if name == "s16":
        return data.astype(np.float32) / np.float32(32768)
    if name == "s32":
        return data.astype(np.float32) / np.float32(2**31)
    if name == "u8":
        return (data.astype(np.float32) - np.float32(128)) / np.float32(128)
    return data.astype(np.float32, copy=False)


def iter_decoded(path: str | Path) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(samples [channels, n] float32, sample_rate_hz)`` blocks of the first audio stream."""
    path = Path(path)
    with _open(path) as container:
        try:
            for frame in container.decode(audio=0):
                yield _frame_to_float(frame), frame.sample_rate
        except av.FFmpegError as exc:
            raise AudioError(f"cannot decode audio ({_reason(exc)})", path=path) from None


def normalise_to_16k(path: str | Path, sink: BinaryIO, *, max_samples: int | None = None) -> int:
    """Decode ``path``, mix to mono and resample to 16 kHz, writing float32 LE samples to ``sink``.

    Returns the number of samples written. Raises ``AudioError`` for audio that cannot be used,
    including audio too short for one encoder window and, with ``max_samples`` (16 kHz samples;
    ``max_samples_16k`` converts the setting), audio that decodes to more: decoding stops at the
    first block past the bound, before that block is written.
    """
    stream: soxr.ResampleStream | None = None
    in_rate = None
    written = 0
    decoded = 0  # input samples (per channel) decoded so far, at in_rate
    for block, rate in iter_decoded(path):
        if in_rate is None:
            in_rate = rate
            if rate != defaults.SAMPLE_RATE_HZ:
                stream = soxr.ResampleStream(rate, defaults.SAMPLE_RATE_HZ, 1,
                                             dtype="float32", quality="HQ")
        decoded += block.shape[-1]
        if max_samples is not None and decoded * defaults.SAMPLE_RATE_HZ > max_samples * in_rate:
            limit_s = max_samples / defaults.SAMPLE_RATE_HZ
            raise _too_long(path, limit_s, f"it decodes to more than {limit_s:g} s: "
                                           f"decoding stopped at {decoded / in_rate:.2f} s")
        mono = np.mean(block, axis=0)  # librosa.to_mono: float32 mean over channels
        out = mono if stream is None else stream.resample_chunk(mono)
        sink.write(np.ascontiguousarray(out, dtype="<f4").tobytes())
        written += out.size
    if stream is not None:
        tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
        sink.write(np.ascontiguousarray(tail, dtype="<f4").tobytes())
        written += tail.size
    _check_length(path, written)
    return written


def _check_length(path: str | Path, n_samples: int) -> None:
    if n_samples == 0:
        raise AudioError("contains no audio samples", path=path)
    if n_samples < MIN_SAMPLES_16K:
        raise AudioError(
            "audio is too short for one encoder window", path=path,
            expected=f">= {MIN_SAMPLES_16K / defaults.SAMPLE_RATE_HZ:.4f} s",
            found=f"{n_samples / defaults.SAMPLE_RATE_HZ:.4f} s",
        )


def load_16k(path: str | Path) -> np.ndarray:
    """The whole of ``path`` as 16 kHz mono float32 (for tools and tests; renders stream)."""
    import io

    buffer = io.BytesIO()
    normalise_to_16k(path, buffer)
    return np.frombuffer(buffer.getvalue(), dtype="<f4").copy()


class PcmSource(Protocol):
    """16 kHz mono float32 samples readable by range; zeros outside ``[0, n_samples)``."""

    n_samples: int

    def read(self, start: int, stop: int) -> np.ndarray: ...


def zero_padded(n_samples: int, start: int, stop: int, read_inside) -> np.ndarray:
    """Samples ``[start, stop)`` with zeros outside ``[0, n_samples)``; ``read_inside(a, b)`` reads."""
    out = np.zeros(max(0, stop - start), dtype=np.float32)
    a, b = max(start, 0), min(stop, n_samples)
    if b > a:
        out[a - start:b - start] = read_inside(a, b)
    return out


class ArrayPcm:
    """A ``PcmSource`` over samples in memory."""

    def __init__(self, samples: np.ndarray) -> None:
        self.samples = np.asarray(samples, dtype=np.float32)
        self.n_samples = int(self.samples.size)

    def read(self, start: int, stop: int) -> np.ndarray:
        return zero_padded(self.n_samples, start, stop, lambda a, b: self.samples[a:b])


class FilePcm:
    """A ``PcmSource`` over a raw float32 LE file; reads only the requested range."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        if size % 4:
            raise AudioError("is not raw float32 audio", path=self.path,
                             expected="a size divisible by 4", found=f"{size} bytes")
        self.n_samples = size // 4

    def _read_inside(self, a: int, b: int) -> np.ndarray:
        with self.path.open("rb") as handle:
            handle.seek(4 * a)
            return np.frombuffer(handle.read(4 * (b - a)), dtype="<f4")

    def read(self, start: int, stop: int) -> np.ndarray:
        return zero_padded(self.n_samples, start, stop, self._read_inside)


class StoragePcm:
    """A ``PcmSource`` over a float32 PCM object in storage; reads only the ranges asked for."""

    def __init__(self, storage, key: str, n_samples: int) -> None:
        self.storage, self.key, self.n_samples = storage, key, n_samples

    def _read_inside(self, a: int, b: int) -> np.ndarray:
        return np.frombuffer(self.storage.read_range(self.key, 4 * a, 4 * b), dtype="<f4")

    def read(self, start: int, stop: int) -> np.ndarray:
        return zero_padded(self.n_samples, start, stop, self._read_inside)


class SilencePadded:
    """A ``PcmSource`` followed by silence up to ``n_samples``: the audio as a sync mode that pads it
    plans it (``common.syncmode``), with nothing written. Its source already reads zeros past its end."""

    def __init__(self, source: PcmSource, n_samples: int) -> None:
        self.source, self.n_samples = source, n_samples

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.source.read(start, stop)
