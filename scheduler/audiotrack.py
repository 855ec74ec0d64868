"""The job's audio, encoded to AAC once at plan time: an M4A for the finalizer, pieces for HLS.

The output's audio is the user's original audio (not the 16 kHz copy the features use), decoded by
PyAV from whatever container it came in and encoded with FFmpeg's native AAC encoder at its own
sample rate; mono stays mono and anything wider becomes stereo, as the reference does. Encoding it
once, before any chunk renders, gives every consumer the same packets: the finalizer stream-copies
the M4A into the output (``scheduler.stitch``), and each chunk's HLS segment takes the packets of
its time span (``common.hls``), so a preview and the final file carry identical sound and neither
needs an encoder.

Priming: the AAC encoder emits one frame of 1024 priming samples first, so its packets start at
pts -1024 and its last packet is shortened to the input's true end. The MP4 muxer turns both into
an edit list, so the M4A's duration is the input's. The pieces keep those same absolute
timestamps (the priming packet goes to the first piece), so the pieces join without a gap.

Which piece a packet belongs to: the chunk whose span ``[start/25, stop/25)`` holds the packet's
midpoint (the first piece also takes everything before 0, the last everything after its start).
By midpoint rather than start, a prefix of the pieces ends within half an AAC frame of its video
(12 ms at 44.1 kHz, 32 ms at 16 kHz) where the start would allow a whole frame, 64 ms at 16 kHz,
more than a video frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np

from lipfarm.common import defaults
from lipfarm.common.audio import probe_audio
from lipfarm.common.errors import AudioError
from lipfarm.common.hls import PiecePacket, write_audio_piece


@dataclass(frozen=True)
class AudioPiece:
    """The AAC packets of one chunk's span, in the ``common.hls`` piece format."""

    path: Path
    start_frame: int
    stop_frame: int
    packets: int


@dataclass(frozen=True)
class AudioTrack:
    """What ``encode_audio_track`` wrote. ``duration_s`` is the track's, from the samples it encoded:
    the input's, or the length a sync mode fitted it to."""

    m4a: Path
    sample_rate: int
    layout: str
    samples: int
    duration_s: float
    pieces: tuple[AudioPiece, ...]


def encode_audio_track(source: Path, out_m4a: Path, *, bitrate_bps: int,
                       chunk_spans: list[tuple[int, int]], pieces_dir: Path,
                       on_piece: Callable[[AudioPiece], None] | None = None,
                       fit_samples: int = 0) -> AudioTrack:
    """Encode ``source``'s audio to AAC once: ``out_m4a``, and one piece per chunk in ``pieces_dir``.

    ``chunk_spans`` are the chunks' ``(start_frame, stop_frame)`` in order, contiguous from frame 0;
    with none, only the M4A is written. ``on_piece`` sees each piece as soon as it is complete (the
    encoder runs front to back, so the first chunks' pieces are ready at once: a planner uploads them
    while the rest is encoded). ``fit_samples`` (the plan's ``AudioRef.fit_samples``, 16 kHz
    samples; 0: the input's own length) is the track's length where the job's sync mode changes it:
    the input is cut there, or followed by silence up to it. Raises ``AudioError`` for audio that
    cannot be read or encoded.
    """
    source, out_m4a, pieces_dir = Path(source), Path(out_m4a), Path(pieces_dir)
    spans = _checked_spans(chunk_spans)
    info = probe_audio(source)
    layout = "mono" if info.channels == 1 else "stereo"
    with av.open(str(out_m4a), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        rate = aac_rate(info.sample_rate_hz)
        stream = out.add_stream("aac", rate=rate, layout=layout)
        stream.bit_rate = bitrate_bps
        # the fitted length at the track's rate, rounded to the nearest sample
        target = (fit_samples * rate + defaults.SAMPLE_RATE_HZ // 2) // defaults.SAMPLE_RATE_HZ if fit_samples else None
        encoder = _Encoder(source, stream, target)
        pieces = _PieceWriter(pieces_dir, spans, rate, 1 if layout == "mono" else 2, on_piece)
        for packet in encoder.packets():
            pieces.add(_piece_packet(packet, rate), stream.codec_context.extradata)
            out.mux(packet)
        if encoder.samples == 0:
            raise AudioError("contains no audio samples", path=source)
        written = pieces.close()
    return AudioTrack(out_m4a, rate, layout, encoder.samples, encoder.samples / rate, written)


def aac_rate(input_rate: int) -> int:
    """The AAC track's sample rate: the input's own, but at least 32 kHz. An AAC frame is 1024
    samples, and the last one's padding (which an MP4 edit list trims, but an HLS segment cannot)
    must stay within a video frame: 21 ms at 48 kHz, 64 ms at 16 kHz (too long)."""
    return input_rate if input_rate >= defaults.AAC_MIN_RATE_HZ else defaults.AAC_LOW_RATE_TARGET_HZ


def _checked_spans(chunk_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans = [(int(start), int(stop)) for start, stop in chunk_spans]
    expected = 0
    for start, stop in spans:
        if start != expected or stop <= start:
            raise ValueError(f"chunk spans must be contiguous from frame 0 and non-empty: {spans}")
        expected = stop
    return spans


class _Encoder:
    """Decodes the source and yields its AAC packets; counts the samples it encodes as it goes.
    With a ``target`` (samples at the track's rate), the input is cut there or padded with silence."""

    def __init__(self, source: Path, stream, target: int | None = None) -> None:
        self.source, self.stream, self.target = source, stream, target
        self.samples = 0

    def packets(self) -> Iterator[av.Packet]:
        stream = self.stream
        # The encoder takes frames of exactly frame_size samples (1024), the last one shorter.
        frame_size = stream.codec_context.frame_size or 1024
        resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate, frame_size=frame_size)
        frames = self._resampled(resampler)
        if self.target is not None:
            frames = _fitted(frames, self.target, frame_size, stream.layout.name, stream.rate)
        for frame in frames:
            yield from self._encode([frame])
        yield from self._encode([None])

    def _resampled(self, resampler) -> Iterator[av.AudioFrame]:
        with av.open(str(self.source)) as container:
            try:
                for frame in container.decode(audio=0):
                    frame.pts = None  # the resampler restamps; the count in _encode is the clock
                    yield from resampler.resample(frame)
            except av.FFmpegError as exc:
                raise AudioError(f"cannot decode audio ({exc})", path=self.source) from None
        yield from resampler.resample(None)

    def _encode(self, frames) -> Iterator[av.Packet]:
        for frame in frames:
            if frame is not None:
                frame.pts = self.samples
                self.samples += frame.samples
            try:
                packets = self.stream.encode(frame)
            except av.FFmpegError as exc:
                raise AudioError(f"cannot encode AAC at {self.stream.rate} Hz ({exc})",
                                 path=self.source) from None
            yield from packets


def _fitted(frames: Iterator[av.AudioFrame], target: int, frame_size: int, layout: str,
            rate: int) -> Iterator[av.AudioFrame]:
    """``frames`` (full frames of ``frame_size``, the last one shorter) cut at ``target`` samples, or
    followed by silence up to it. The last frame is held back until the next one comes, so the
    silence joins it: the encoder is only ever given full frames before its last."""
    done, held = 0, None
    for frame in frames:
        if held is not None:
            yield held
            done += held.samples
        held = frame
        if done + held.samples >= target:
            break  # the cut falls in this frame: the rest of the input is not read
    if held is None:
        return  # no audio at all: the caller says so; silence alone is not the user's audio
    tail = held.to_ndarray()[:, :target - done]
    tail = np.concatenate([tail, np.zeros((tail.shape[0], target - done - tail.shape[1]), tail.dtype)], axis=1)
    for start in range(0, tail.shape[1], frame_size):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tail[:, start:start + frame_size]),
                                           format="fltp", layout=layout)
        frame.sample_rate = rate
        yield frame


def _piece_packet(packet: av.Packet, rate: int) -> PiecePacket:
    """The packet's timing in samples, taken before muxing (which rescales it in place)."""
    pts, duration = (Fraction(value) * packet.time_base * rate for value in (packet.pts, packet.duration))
    if pts.denominator != 1 or duration.denominator != 1:
        raise AudioError(f"AAC packet at {float(pts / rate):.6f} s is not on a sample boundary")
    return PiecePacket(int(pts), int(duration), bytes(packet))


class _PieceWriter:
    """Groups packets, which arrive in time order, into one piece file per chunk span."""

    def __init__(self, folder: Path, spans: list[tuple[int, int]], rate: int, channels: int,
                 on_piece: Callable[[AudioPiece], None] | None = None) -> None:
        self.folder, self.spans, self.rate, self.channels = folder, spans, rate, channels
        self.on_piece = on_piece
        self.buffer: list[PiecePacket] = []
        self.written: list[AudioPiece] = []
        self.config: bytes | None = None
        if spans:
            folder.mkdir(parents=True, exist_ok=True)

    def _belongs_later(self, packet: PiecePacket) -> bool:
        index = len(self.written)
        if index >= len(self.spans) - 1:
            return False  # the last piece takes everything after its start
        # midpoint (pts + duration / 2) / rate >= stop / FPS, in integers
        return (2 * packet.pts + packet.duration) * defaults.FPS >= 2 * self.spans[index][1] * self.rate

    def add(self, packet: PiecePacket, config: bytes) -> None:
        if not self.spans:
            return
        self.config = config
        while self._belongs_later(packet):
            self._flush()
        self.buffer.append(packet)

    def _flush(self) -> None:
        index = len(self.written)
        start, stop = self.spans[index]
        path = self.folder / f"{index:05d}.lfap"
        count = write_audio_piece(path, sample_rate=self.rate, channels=self.channels,
                                  audio_specific_config=self.config or b"", packets=self.buffer)
        self.written.append(AudioPiece(path, start, stop, count))
        self.buffer = []
        if self.on_piece is not None:
            self.on_piece(self.written[-1])

    def close(self) -> tuple[AudioPiece, ...]:
        while len(self.written) < len(self.spans):
            self._flush()
        return tuple(self.written)
