"""Test helpers: write audio in any container, read videos back."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_audio(path: Path, samples: np.ndarray, rate: int, codec: str, *, container: str | None = None,
                with_video: bool = False) -> Path:
    """Encode float samples ``[channels, n]`` (or ``[n]``) in [-1, 1] into ``path`` with PyAV."""
    samples = np.atleast_2d(np.asarray(samples, np.float32))
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format=container) as out:
        if with_video:
            video = out.add_stream("libx264", rate=25)
            video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}
        resampler = av.AudioResampler(format=stream.codec_context.format, layout=layout, rate=rate,
                                      frame_size=stream.codec_context.frame_size or 1024)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        if with_video:
            seconds = samples.shape[1] / rate
            for i in range(int(seconds * 25)):
                image = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
                image.pts = i
                for packet in video.encode(image):
                    out.mux(packet)
            for packet in video.encode(None):
                out.mux(packet)
        for part in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(part):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def tone(seconds: float, rate: int, *, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A voiced-like test signal ``[channels, n]``: harmonics with a wobbling envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    mono = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 910), 1))
    mono *= 0.3 * (0.55 + 0.45 * np.sin(2 * np.pi * 3.7 * t))
    signal = np.stack([mono * (1 - 0.3 * c) for c in range(channels)])
    return (signal + 0.01 * rng.standard_normal(signal.shape)).astype(np.float32)


def video_frames(path: Path, fmt: str = "bgr24") -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format=fmt) for frame in container.decode(video=0)]


def video_info(path: Path) -> dict:
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        keyframes = [i for i, p in enumerate(p for p in container.demux(video) if p.size) if p.is_keyframe]
        return {"frames": video.frames, "rate": video.average_rate, "width": video.width,
                "height": video.height, "keyframes": keyframes,
                "audio_s": float(audio.duration * audio.time_base), "audio_rate": audio.rate}


@dataclass(frozen=True)
class Decoded:
    frames: list[np.ndarray]
    video_start_s: float  # presentation time of the first frame
    audio_start_s: float
    audio_end_s: float  # end of the last decoded audio frame
    samples: np.ndarray  # [channels, n]


def decode_streams(container) -> Decoded:
    """Every video frame (yuv420p) and audio frame of an open container, with their times."""
    frames, video_times, audio_blocks, audio_times = [], [], [], []
    for frame in container.decode(container.streams.video[0], container.streams.audio[0]):
        if isinstance(frame, av.VideoFrame):
            frames.append(frame.to_ndarray(format="yuv420p"))
            video_times.append(float(frame.time))
        else:
            audio_blocks.append(frame.to_ndarray())
            audio_times.append((float(frame.time), float(frame.time) + frame.samples / frame.sample_rate))
    return Decoded(frames, min(video_times), audio_times[0][0], audio_times[-1][1],
                   np.concatenate(audio_blocks, axis=1))


def short_avatar(settings, demo_avatar, frames: int):
    """An avatar of the demo avatar's first ``frames`` frames, named ``demo-<frames>``: a template
    short audio runs past (sync modes)."""
    from lipfarm.common.avatar import AvatarStore, write_avatar

    name = f"demo-{frames}"
    return write_avatar(AvatarStore(settings.avatars_dir).path(name), name=name,
                        frames=[demo_avatar.frame_path(i) for i in range(frames)], rects=demo_avatar.rects[:frames],
                        width=demo_avatar.width, height=demo_avatar.height, source={"layout": "test"}, replace=True)


def long_silence_ogg(path, seconds: float, *, frame_ms: int = 60):
    """An Opus/Ogg file of ``seconds`` of silence: a few megabytes for hours of audio, made in about
    a second by encoding a little silence once and muxing its packets again and again (an Opus
    packet of silence decodes to silence wherever it stands)."""
    rate, frame = 48000, 48 * frame_ms
    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = 6000
        stream.codec_context.options = {"frame_duration": str(frame_ms)}
        packets = []
        for i in range(20):
            block = av.AudioFrame.from_ndarray(np.zeros((1, frame), np.float32), format="flt", layout="mono")
            block.sample_rate, block.pts, block.time_base = rate, i * frame, Fraction(1, rate)
            packets += stream.encode(block)
        steady = packets[5:10]
        for i in range(int(seconds * 1000 / frame_ms)):
            packet = av.Packet(bytes(steady[i % len(steady)]))
            packet.pts = packet.dts = i * frame
            packet.duration, packet.time_base, packet.stream = frame, Fraction(1, rate), stream
            out.mux(packet)
    return path
