"""HLS for a job in progress: one media segment per chunk, and the EVENT playlist that lists them.

A chunk's H.264 segment (``worker.encode``) already starts on an IDR frame and has closed GOPs, so
it becomes an HLS media segment by a remux: its video packets are copied with their timestamps
moved to the job's timeline, and the AAC packets that the plan encoded once for its time span
(an *audio piece*, written by ``scheduler.audiotrack``) are added. Nothing is re-encoded, so the
frames a viewer sees while the job runs are exactly those of the stitched MP4.

Why MPEG-TS and not fragmented MP4: a TS segment is self-contained (no init segment to publish,
version or keep in step with the playlist), every HLS player and FFmpeg's ``hls`` demuxer read it,
and each segment can be muxed on its own as soon as its chunk is done. fMP4 would mainly save TS's
packetisation overhead (188-byte packets and PES headers: a few percent at real video bit rates);
for preview segments that is not worth an init segment and a second kind of file.

MPEG-TS clocks are unsigned, and a segment's first packets lie before its chunk's start: the AAC
encoder's priming frame sits before 0 (1024 samples: 23 ms at 44.1 kHz, 64 ms at 16 kHz) and
x264's B-frame reordering starts decode times two frames early. So every timestamp is the job's
time plus the constant ``TS_OFFSET_S``, the same in every segment: players take continuity from
the clock, and they start their timeline at the first segment's earliest time, so the offset
never shows. TS has no edit list, so the priming frame is presented just before the first video
frame: the sound before time 0 that the MP4's edit list hides. It is kept because the AAC decoder
needs it to decode the first real samples (the frames overlap).

The audio piece format (little-endian; written by ``write_audio_piece``, read by
``read_audio_piece``) exists because no container keeps exact, absolute, possibly negative sample
timestamps through PyAV without edit lists or a 90 kHz clock getting in the way::

    header  16 bytes  b"LFAP", u8 version (1), u8 channels, u16 zero, u32 sample rate, u32 count
    packet  16 bytes  i64 pts in samples on the job's timeline, u32 duration in samples, u32 size
            + size    one ADTS frame (7-byte header, no CRC, then the raw AAC access unit)

The playlist side is plain text: ``media_playlist`` writes an EVENT playlist (segments are only
ever appended while the job runs, ``#EXT-X-ENDLIST`` once it is done) and
``parse_media_playlist`` reads one back strictly, for tests and for the API server.
"""

from __future__ import annotations

import heapq
import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av

from lipfarm.common import defaults
from lipfarm.common.fileio import file_sha256

TS_OFFSET_S = 10  # seconds added to every timestamp; above any priming or reorder delay
HLS_VERSION = 3  # the first version with decimal EXTINF durations; nothing newer is used

_PIECE_MAGIC = b"LFAP"
_PIECE_VERSION = 1
_PIECE_HEADER = struct.Struct("<4sBBHII")
_PIECE_PACKET = struct.Struct("<qII")
# ISO 14496-3 sampling frequency indices: an ADTS header can only name these rates.
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


# --- Audio pieces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PiecePacket:
    """One AAC access unit on the job's timeline (``pts`` and ``duration`` in samples)."""

    pts: int
    duration: int
    data: bytes


@dataclass(frozen=True)
class AudioPieceData:
    """An audio piece as read back: the packets hold ADTS frames."""

    sample_rate: int
    channels: int
    packets: tuple[PiecePacket, ...]


def adts_frame(audio_specific_config: bytes, payload: bytes) -> bytes:
    """``payload`` (a raw AAC access unit) behind the ADTS header its stream's config describes.

    ADTS makes every frame self-describing, so MPEG-TS muxers and players need no extradata.
    """
    if len(audio_specific_config) < 2:
        raise ValueError("AAC AudioSpecificConfig is missing or too short")
    bits = int.from_bytes(audio_specific_config[:2], "big")
    object_type, rate_index, channel_config = bits >> 11, (bits >> 7) & 0xF, (bits >> 3) & 0xF
    if not 1 <= object_type <= 4:
        raise ValueError(f"AAC object type {object_type} cannot be carried in ADTS")
    if rate_index >= len(_AAC_RATES):
        raise ValueError("AAC sample rate has no ADTS index")
    if not 1 <= channel_config <= 7:
        raise ValueError(f"AAC channel configuration {channel_config} cannot be carried in ADTS")
    length = 7 + len(payload)
    if length >= 1 << 13:
        raise ValueError(f"AAC frame of {len(payload)} bytes is too long for ADTS")
    header = ((0xFFF << 44) | (1 << 40)  # sync word, MPEG-4, layer 0, no CRC
              | ((object_type - 1) << 38) | (rate_index << 34) | (channel_config << 30)
              | (length << 13) | (0x7FF << 2))  # buffer fullness 0x7FF: variable bit rate
    return header.to_bytes(7, "big") + payload


def write_audio_piece(path: Path, *, sample_rate: int, channels: int, audio_specific_config: bytes,
                      packets: Iterable[PiecePacket]) -> int:
    """Write raw AAC ``packets`` as an audio piece (see the module docstring); returns their count."""
    frames = [(p, adts_frame(audio_specific_config, p.data)) for p in packets]
    with open(path, "wb") as sink:
        sink.write(_PIECE_HEADER.pack(_PIECE_MAGIC, _PIECE_VERSION, channels, 0, sample_rate, len(frames)))
        for packet, frame in frames:
            sink.write(_PIECE_PACKET.pack(packet.pts, packet.duration, len(frame)))
            sink.write(frame)
    return len(frames)


def read_audio_piece(path: Path) -> AudioPieceData:
    """Read an audio piece; raises ``ValueError`` if it is not a complete one."""
    data = Path(path).read_bytes()
    if len(data) < _PIECE_HEADER.size:
        raise ValueError(f"{path}: too short for an audio piece")
    magic, version, channels, _, rate, count = _PIECE_HEADER.unpack_from(data)
    if magic != _PIECE_MAGIC or version != _PIECE_VERSION:
        raise ValueError(f"{path}: not an audio piece (version {_PIECE_VERSION})")
    packets, at = [], _PIECE_HEADER.size
    for _ in range(count):
        if at + _PIECE_PACKET.size > len(data):
            raise ValueError(f"{path}: truncated after {len(packets)} of {count} packets")
        pts, duration, size = _PIECE_PACKET.unpack_from(data, at)
        at += _PIECE_PACKET.size
        if at + size > len(data):
            raise ValueError(f"{path}: truncated after {len(packets)} of {count} packets")
        packets.append(PiecePacket(pts, duration, data[at:at + size]))
        at += size
    if at != len(data):
        raise ValueError(f"{path}: {len(data) - at} bytes after the last packet")
    return AudioPieceData(rate, channels, tuple(packets))


# --- Media segments ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentInfo:
    """What ``mux_hls_segment`` wrote: the EXTINF duration is ``duration_s``."""

    path: Path
    frames: int
    duration_s: float
    audio_packets: int
    bytes: int
    sha256: str


def mux_hls_segment(video_segment: Path, start_frame: int, audio_piece: Path, out: Path) -> SegmentInfo:
    """Remux the chunk segment starting at ``start_frame`` and its audio piece into the TS ``out``."""
    piece = read_audio_piece(audio_piece)
    with av.open(str(video_segment)) as source:
        if not source.streams.video or source.streams.video[0].codec_context.name != "h264":
            raise ValueError(f"{video_segment}: no H.264 video stream")
        # mpegts_copyts: write the timestamps as given; they are already positive.
        with av.open(str(out), "w", format="mpegts", container_options={"mpegts_copyts": "1"}) as ts:
            video = ts.add_stream_from_template(source.streams.video[0])
            audio = ts.add_mux_stream("aac", rate=piece.sample_rate)
            frames = 0
            for packet in _interleaved(_video_packets(source, video, start_frame),
                                       _audio_packets(piece, audio)):
                if packet.stream is video:
                    if frames == 0 and not packet.is_keyframe:
                        raise ValueError(f"{video_segment}: does not start on a keyframe")
                    frames += 1
                ts.mux(packet)
    if frames == 0:
        raise ValueError(f"{video_segment}: no video frames")
    return SegmentInfo(Path(out), frames, frames / defaults.FPS, len(piece.packets),
                       Path(out).stat().st_size, file_sha256(out))


def _ticks(seconds: Fraction, time_base: Fraction) -> int:
    ticks = seconds / time_base
    if ticks.denominator != 1:
        raise ValueError(f"{seconds} s is not a whole number of {time_base} s ticks")
    return int(ticks)


def _video_packets(source, stream, start_frame: int) -> Iterator[tuple[Fraction, av.Packet]]:
    """``(decode time in s, packet)`` with timestamps moved onto the offset job timeline."""
    template = source.streams.video[0]
    shift = _ticks(Fraction(start_frame, defaults.FPS) + TS_OFFSET_S, template.time_base)
    for packet in source.demux(template):
        if not packet.size:
            continue
        packet.pts += shift
        packet.dts += shift
        packet.stream = stream
        yield packet.dts * template.time_base, packet


def _audio_packets(piece: AudioPieceData, stream) -> Iterator[tuple[Fraction, av.Packet]]:
    time_base = Fraction(1, piece.sample_rate)
    shift = TS_OFFSET_S * piece.sample_rate
    for entry in piece.packets:
        packet = av.Packet(entry.data)
        packet.pts = packet.dts = entry.pts + shift
        packet.duration = entry.duration
        packet.time_base = time_base
        packet.is_keyframe = True  # every AAC frame is a random access point
        packet.stream = stream
        yield packet.pts * time_base, packet


def _interleaved(*streams: Iterator[tuple[Fraction, av.Packet]]) -> Iterator[av.Packet]:
    """Packets of all streams in decode-time order, so the muxer buffers nothing."""
    # The stream index and a counter break ties, so packets themselves are never compared.
    tagged = [((time, index, n, packet) for n, (time, packet) in enumerate(stream))
              for index, stream in enumerate(streams)]
    for *_, packet in heapq.merge(*tagged, key=lambda item: item[:3]):
        yield packet


# --- Playlists ---------------------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
    text = f"{seconds:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _check_uri(uri: str) -> None:
    if not uri or uri != uri.strip() or "\n" in uri or "\r" in uri or uri.startswith("#"):
        raise ValueError(f"not a usable segment URI: {uri!r}")


def media_playlist(segments: list[tuple[str, float]], *, ended: bool,
                   target_duration_s: int | None = None) -> str:
    """An HLS EVENT playlist of ``(uri, duration in s)``; ``#EXT-X-ENDLIST`` when ``ended``.

    The target duration is the longest segment rounded up, unless given: a server that knows the
    job's chunk length can give it from the first segment on, so it never changes as segments come.
    """
    durations = []
    for uri, duration in segments:
        _check_uri(uri)
        if not (math.isfinite(duration) and duration > 0):
            raise ValueError(f"segment {uri!r} has duration {duration!r}")
        durations.append(_format_duration(duration))
    longest = max((math.ceil(float(d)) for d in durations), default=None)
    if target_duration_s is None:
        if longest is None:
            raise ValueError("an empty playlist needs target_duration_s")
        target_duration_s = longest
    elif target_duration_s < 1 or (longest is not None and longest > target_duration_s):
        raise ValueError(f"target duration {target_duration_s} s is below the longest segment")
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{HLS_VERSION}", f"#EXT-X-TARGETDURATION:{target_duration_s}",
             "#EXT-X-PLAYLIST-TYPE:EVENT", "#EXT-X-MEDIA-SEQUENCE:0"]
    for (uri, _), duration in zip(segments, durations):
        lines += [f"#EXTINF:{duration},", uri]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def _integer(tag: str, value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"{tag} needs a decimal integer, got {value!r}")
    return int(value)


def parse_media_playlist(text: str) -> tuple[list[tuple[str, float]], bool]:
    """``(segments as (uri, duration in s), ended)`` of an EVENT playlist as ``media_playlist`` writes.

    Strict: raises ``ValueError`` for a missing header or target duration, an unknown or repeated
    tag, an EXTINF without its URI (or the reverse), a segment longer than the target duration, or
    anything after ``#EXT-X-ENDLIST``. Plain ``#`` comments and blank lines are ignored (RFC 8216).
    """
    lines = text.splitlines()
    if not lines or lines[0] != "#EXTM3U":
        raise ValueError("playlist does not start with #EXTM3U")
    header: dict[str, str] = {}
    segments: list[tuple[str, float]] = []
    pending: float | None = None
    ended = False
    for number, line in enumerate(lines[1:], 2):
        if not line.strip() or (line.startswith("#") and not line.startswith("#EXT")):
            continue
        if ended:
            raise ValueError(f"line {number}: {line!r} after #EXT-X-ENDLIST")
        tag, _, value = line.partition(":")
        if tag == "#EXTINF":
            if pending is not None:
                raise ValueError(f"line {number}: #EXTINF follows #EXTINF without a URI")
            pending = _extinf(number, value)
        elif tag == "#EXT-X-ENDLIST" and not value:
            if pending is not None:
                raise ValueError(f"line {number}: #EXT-X-ENDLIST where a URI was expected")
            ended = True
        elif tag in ("#EXT-X-VERSION", "#EXT-X-TARGETDURATION", "#EXT-X-PLAYLIST-TYPE",
                     "#EXT-X-MEDIA-SEQUENCE"):
            if tag in header or segments or pending is not None:
                raise ValueError(f"line {number}: {tag} repeated or after the first segment")
            header[tag] = value
        elif line.startswith("#"):
            raise ValueError(f"line {number}: unknown or malformed tag {line!r}")
        else:
            if pending is None:
                raise ValueError(f"line {number}: URI {line!r} without #EXTINF")
            _check_uri(line)
            segments.append((line, pending))
            pending = None
    if pending is not None:
        raise ValueError("playlist ends after #EXTINF without a URI")
    _check_header(header, segments)
    return segments, ended


def _extinf(number: int, value: str) -> float:
    duration_text, comma, _title = value.partition(",")
    try:
        duration = float(duration_text)
    except ValueError:
        duration = math.nan
    if not comma or not math.isfinite(duration) or duration <= 0:
        raise ValueError(f"line {number}: malformed #EXTINF:{value}")
    return duration


def _check_header(header: dict[str, str], segments: list[tuple[str, float]]) -> None:
    if header.get("#EXT-X-PLAYLIST-TYPE") != "EVENT":
        raise ValueError("not an EVENT playlist (#EXT-X-PLAYLIST-TYPE:EVENT missing)")
    if "#EXT-X-TARGETDURATION" not in header:
        raise ValueError("#EXT-X-TARGETDURATION missing")
    target = _integer("#EXT-X-TARGETDURATION", header["#EXT-X-TARGETDURATION"])
    if "#EXT-X-VERSION" in header and _integer("#EXT-X-VERSION", header["#EXT-X-VERSION"]) < HLS_VERSION:
        raise ValueError(f"#EXT-X-VERSION below {HLS_VERSION} cannot carry decimal durations")
    # An EVENT playlist only ever appends, so it always lists its segments from the first.
    if _integer("#EXT-X-MEDIA-SEQUENCE", header.get("#EXT-X-MEDIA-SEQUENCE", "0")) != 0:
        raise ValueError("an EVENT playlist must start at media sequence 0")
    for uri, duration in segments:
        if round(duration) > target:  # RFC 8216 section 4.3.3.1
            raise ValueError(f"segment {uri!r} lasts {duration} s, over the target duration {target} s")
