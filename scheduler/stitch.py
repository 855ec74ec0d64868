"""The finalizer's work: join chunk segments by stream copy, mux the original audio once, check.

Segments are H.264 with identical settings, each starting on an IDR frame, so they concatenate
without re-encoding: packets are copied with their timestamps shifted by the chunk's start. The
original audio (not the 16 kHz copy used for features) is decoded and encoded to AAC once, at its
own sample rate, as the reference does; its packets are written segment by segment alongside the
video so the muxer never holds more than one segment's worth. The result is checked before anyone
sees it: frame count, and audio and video durations against the input's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import av

from common import defaults
from common.errors import AudioError, JobFailedError


@dataclass(frozen=True)
class Segment:
    """A chunk's segment file, where its frames start, and how many frames the plan gave it."""

    path: Path
    start_frame: int
    frames: int


@dataclass(frozen=True)
class StitchReport:
    frames: int
    video_s: float
    audio_s: float
    input_audio_s: float


def _audio_packets(audio_path: Path, stream) -> Iterator[tuple[float, av.Packet]]:
    """Yield ``(end time in s, AAC packet)`` as the original audio is decoded and encoded."""
    resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate,
                                  frame_size=stream.codec_context.frame_size or 1024)
    encoded = 0

    def encode(frames) -> Iterator[tuple[float, av.Packet]]:
        nonlocal encoded
        for frame in frames:
            if frame is not None:
                frame.pts = encoded
                encoded += frame.samples
            for packet in stream.encode(frame):
                yield encoded / stream.rate, packet

    with av.open(str(audio_path)) as source:
        try:
            for frame in source.decode(audio=0):
                frame.pts = None
                yield from encode(resampler.resample(frame))
        except av.FFmpegError as exc:
            raise AudioError(f"cannot decode audio ({exc})", path=audio_path) from None
    yield from encode(resampler.resample(None))
    yield from encode([None])


def _input_audio(audio_path: Path) -> tuple[int, str, float]:
    """Sample rate, output layout (mono or stereo) and duration in s of the input's audio."""
    with av.open(str(audio_path)) as source:
        stream = source.streams.audio[0]
        rate = stream.codec_context.sample_rate
        layout = "mono" if stream.codec_context.channels == 1 else "stereo"
        samples = sum(frame.samples for frame in source.decode(audio=0))
    return rate, layout, samples / rate


def stitch(segments: Iterable[Segment], audio_path: Path, out_path: Path, *, expected_frames: int,
           audio_bitrate_bps: int = defaults.AUDIO_BITRATE_BPS,
           progress: Callable[[int], None] | None = None) -> StitchReport:
    """Join the segments, in order, with the audio of ``audio_path`` into ``out_path``.

    ``segments`` is consumed once, in order, so it may fetch each file just in time (the
    finalizer's downloads). Raises ``JobFailedError`` if a segment does not have its planned
    frames or the result does not have the planned frames and durations.
    """
    rate, layout, input_s = _input_audio(audio_path)
    ordered = iter(segments)
    first = next(ordered)
    with av.open(str(out_path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        with av.open(str(first.path)) as template:
            video = out.add_stream_from_template(template.streams.video[0])
        audio = out.add_stream("aac", rate=rate, layout=layout)
        audio.bit_rate = audio_bitrate_bps
        packets = _audio_packets(audio_path, audio)
        pending = next(packets, None)
        copier = _VideoCopier(video, out)
        frames = 0
        for segment in itertools.chain([first], ordered):
            if segment.start_frame != frames:
                raise JobFailedError(f"segment {segment.path.name} starts at frame {segment.start_frame}, "
                                     f"expected {frames}")
            copied = copier.copy(segment.path, segment.start_frame)
            if copied != segment.frames:
                raise JobFailedError(f"segment {segment.path.name} has {copied} frames, "
                                     f"planned {segment.frames}")
            frames += copied
            while pending is not None and pending[0] <= frames / defaults.FPS:
                out.mux(pending[1])
                pending = next(packets, None)
            if progress is not None:
                progress(frames)
        while pending is not None:
            out.mux(pending[1])
            pending = next(packets, None)
    return _verify(out_path, expected_frames, input_s)


class _VideoCopier:
    """Copies segments' packets into the output with continuous timestamps.

    Presentation times move by the chunk's start. Decode times continue from the previous segment's
    last one: x264 delays decode times by the B-frame reorder depth, which is shorter in a segment
    of one or two frames (a job's last chunk can be), and a gap in decode times would stretch the
    track's duration. Joining only ever lengthens a segment's delay, so pts >= dts still holds.
    """

    def __init__(self, video, out) -> None:
        self.video, self.out = video, out
        self.last_dts: int | None = None

    def copy(self, path: Path, start_frame: int) -> int:
        frames = 0
        with av.open(str(path)) as segment:
            stream = segment.streams.video[0]
            pts_shift = int(Fraction(start_frame, defaults.FPS) / stream.time_base)
            frame_ticks = int(Fraction(1, defaults.FPS) / stream.time_base)
            dts_shift = None
            for packet in segment.demux(stream):
                if not packet.size:
                    continue
                if dts_shift is None:
                    dts_shift = pts_shift if self.last_dts is None else self.last_dts + frame_ticks - packet.dts
                packet.pts += pts_shift
                packet.dts += dts_shift
                if packet.pts < packet.dts:
                    raise JobFailedError(f"segment {path.name}: cannot join (pts {packet.pts} < dts {packet.dts})")
                self.last_dts = packet.dts
                packet.stream = self.video
                self.out.mux(packet)
                frames += 1
        return frames


def _verify(path: Path, expected_frames: int, input_s: float) -> StitchReport:
    with av.open(str(path)) as result:
        video, audio = result.streams.video[0], result.streams.audio[0]
        frames = sum(1 for packet in result.demux(video) if packet.size)
        # The container's duration honours the edit list that hides the AAC encoder's priming
        # samples, which is what players play.
        audio_s = float(audio.duration * audio.time_base) if audio.duration else 0.0
    video_s = frames / defaults.FPS
    frame_s = 1.0 / defaults.FPS
    if frames != expected_frames:
        raise JobFailedError(f"stitched video has {frames} frames, planned {expected_frames}")
    if abs(audio_s - input_s) > frame_s:
        raise JobFailedError(f"stitched audio lasts {audio_s:.3f} s, the input {input_s:.3f} s")
    # L + 2 frames of 40 ms end 27.5 to 80 ms before the audio does (PIPELINE.md section 1).
    if not -frame_s <= input_s - video_s <= 2 * frame_s + 1e-6:
        raise JobFailedError(f"video lasts {video_s:.3f} s for {input_s:.3f} s of audio")
    return StitchReport(frames, video_s, audio_s, input_s)
