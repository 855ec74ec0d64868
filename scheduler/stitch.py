"""The finalizer's work: join chunk segments and the job's AAC track by stream copy, then check.

Segments are H.264 with identical settings, each starting on an IDR frame, so they concatenate
without re-encoding: packets are copied with their timestamps shifted by the chunk's start. The
audio was encoded to AAC once, at plan time (``scheduler.audiotrack``: the original audio, not the
16 kHz copy used for features, at its own sample rate, as the reference does), so the finalizer
only copies its packets too: the output then carries the very packets the HLS preview played, and
the finalizer needs no encoder. They are written segment by segment alongside the video so the
muxer never holds more than one segment's worth. The result is checked before anyone sees it:
frame count, and audio and video durations against the input's.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av

from lipfarm.common import defaults
from lipfarm.common.errors import JobFailedError
from lipfarm.scheduler.audiotrack import encode_audio_track


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


def _aac_packets(source, stream) -> Iterator[tuple[float, av.Packet]]:
    """Yield ``(end time in s, packet)`` of the pre-encoded track, moved to the output's ``stream``."""
    track = source.streams.audio[0]
    for packet in source.demux(track):
        if not packet.size:
            continue
        end_s = float((packet.pts + packet.duration) * packet.time_base)
        packet.stream = stream
        yield end_s, packet


def _open_track(audio_path: Path):
    """The pre-encoded M4A, checked to hold one AAC track (what ``encode_audio_track`` writes)."""
    try:
        source = av.open(str(audio_path))
    except av.FFmpegError as exc:
        raise JobFailedError(f"cannot open the job's audio track {audio_path.name} ({exc})") from None
    if len(source.streams) != 1 or not source.streams.audio or source.streams.audio[0].codec_context.name != "aac":
        source.close()
        raise JobFailedError(f"{audio_path.name} is not a pre-encoded AAC track; pass the original "
                             "audio without input_audio_s to have it encoded")
    return source


def stitch(segments: Iterable[Segment], audio_path: Path, out_path: Path, *, expected_frames: int,
           input_audio_s: float | None = None, audio_bitrate_bps: int = defaults.AUDIO_BITRATE_BPS,
           audio_fit_samples: int = 0) -> StitchReport:
    """Join the segments, in order, with the job's audio into ``out_path``.

    With ``input_audio_s`` (the original input's duration in s, ``AudioTrack.duration_s``),
    ``audio_path`` is the job's pre-encoded track, the M4A of ``scheduler.audiotrack.
    encode_audio_track``, and its packets are copied as they are. Without it, ``audio_path`` is the
    original input, encoded first by ``encode_audio_track`` into a temporary M4A beside
    ``out_path``: the way for callers that do not yet encode the track at plan time, and the same
    output byte for byte; ``audio_fit_samples`` is then the plan's ``AudioRef.fit_samples``, the
    length a sync mode cuts or pads the audio to (0: as given). ``audio_bitrate_bps`` is the track's
    AAC bit rate: the encoder's target when it encodes here, and the peak bit rate the output
    declares in both cases.

    ``segments`` is consumed once, in order, so it may fetch each file just in time (the
    finalizer's downloads). Raises ``JobFailedError`` if a segment does not have its planned
    frames or the result does not have the planned frames and durations.
    """
    out_path = Path(out_path)
    if input_audio_s is not None:
        return _stitch(segments, Path(audio_path), out_path, expected_frames, input_audio_s,
                       audio_bitrate_bps)
    with tempfile.TemporaryDirectory(prefix=".audio-", dir=out_path.parent) as temp:
        track = encode_audio_track(Path(audio_path), Path(temp) / "audio.m4a", bitrate_bps=audio_bitrate_bps,
                                   chunk_spans=[], pieces_dir=Path(temp), fit_samples=audio_fit_samples)
        return _stitch(segments, track.m4a, out_path, expected_frames, track.duration_s,
                       audio_bitrate_bps)


def _stitch(segments: Iterable[Segment], track_path: Path, out_path: Path, expected_frames: int,
            input_s: float, bitrate_bps: int) -> StitchReport:
    ordered = iter(segments)
    first = next(ordered)
    with _open_track(track_path) as source, \
            av.open(str(out_path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        with av.open(str(first.path)) as template:
            video = out.add_stream_from_template(template.streams.video[0])
        audio = out.add_stream_from_template(source.streams.audio[0])
        # The MP4 muxer declares max(this, the measured average) as the track's peak bit rate; a
        # copied stream would only know the average, the encoder knew its target.
        audio.codec_context.bit_rate = bitrate_bps
        packets = _aac_packets(source, audio)
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
            # The audio that ends within the video so far, so the muxer holds one segment at most.
            while pending is not None and pending[0] <= frames / defaults.FPS:
                out.mux(pending[1])
                pending = next(packets, None)
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
    # L + 2 frames of 40 ms end 27.5 to 80 ms before the audio does (docs/contract.md §1); audio a
    # sync mode padded keeps this, and audio it cut ends with the video (common.syncmode).
    if not -frame_s <= input_s - video_s <= 2 * frame_s + 1e-6:
        raise JobFailedError(f"video lasts {video_s:.3f} s for {input_s:.3f} s of audio")
    return StitchReport(frames, video_s, audio_s, input_s)
