"""The job's AAC track encoded once, HLS segments and playlists, and the stitch that copies the track.

A synthetic job of three chunks (50, 50 and 27 frames at 320x240) with audio at 44.1 kHz stereo
(AAC in M4A), 48 kHz mono (WAV) and 16 kHz mono (FLAC). The chunks' own frames, decoded from their
MP4 segments, are the reference for every decode here.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import m3u8
import numpy as np
import pytest

from lipfarm.common.hls import (TS_OFFSET_S, SegmentInfo, media_playlist, mux_hls_segment, parse_media_playlist,
                        read_audio_piece)
from lipfarm.common.options import RenderOptions
from lipfarm.scheduler.audiotrack import aac_rate, AudioTrack, encode_audio_track
from lipfarm.scheduler.stitch import Segment, stitch
from tests.browser import serve_folder
from tests.media import Decoded, decode_streams, tone, write_audio
from lipfarm.worker.encode import SegmentWriter

ROOT = Path(__file__).resolve().parents[1]
HLS_JS = ROOT / "api" / "static" / "vendor" / "hls.min.js"
CHROMIUM = Path("/usr/bin/chromium")
FPS = 25
FRAME_S = 1 / FPS
CHUNKS = [(0, 50), (50, 100), (100, 127)]
AUDIO_S = 5.1  # 127 frames last 5.08 s; the planner's rule wants audio 0 to 80 ms longer
AUDIO_CASES = {  # name: (rate, channels, codec, container file name)
    "44k-stereo-aac": (44100, 2, "aac", "voice.m4a"),
    "48k-mono-wav": (48000, 1, "pcm_s16le", "voice.wav"),
    "16k-mono-flac": (16000, 1, "flac", "voice.flac"),
}


# --- The synthetic job --------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    folder: Path
    segments: list[Segment]
    frames: list[list[np.ndarray]]  # per chunk, yuv420p, decoded from its segment


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Job:
    folder = tmp_path_factory.mktemp("hls-job")
    rng = np.random.default_rng(7)
    options = RenderOptions(chunk_frames=50)
    segments, frames = [], []
    for index, (start, stop) in enumerate(CHUNKS):
        path = folder / f"chunk{index}.mp4"
        with SegmentWriter(path, width=320, height=240, options=options) as writer:
            for frame in range(start, stop):
                y, u, v = writer.planes()
                gradient = (np.arange(320)[None, :] + 2 * np.arange(240)[:, None] + 7 * frame) % 256
                y[:] = np.clip(gradient + rng.integers(-12, 12, gradient.shape), 0, 255)
                u[:], v[:] = (13 * frame) % 256, 255 - (5 * frame) % 256
                writer.submit()
        segments.append(Segment(path, start, stop - start))
        frames.append(_video_frames(path))
    return Job(folder, segments, frames)


@dataclass(frozen=True)
class Rendition:
    name: str
    rate: int  # the AAC track's rate (``aac_rate`` of the source's: at least 32 kHz)
    source: Path
    track: AudioTrack
    ts: list[Path]
    infos: list[SegmentInfo]
    stitched: Path


@pytest.fixture(scope="module", params=list(AUDIO_CASES))
def rendition(request, job, tmp_path_factory) -> Rendition:
    rate, channels, codec, name = AUDIO_CASES[request.param]
    folder = tmp_path_factory.mktemp(f"hls-{request.param}")
    source = write_audio(folder / name, tone(AUDIO_S, rate, channels=channels), rate, codec)
    track = encode_audio_track(source, folder / "audio.m4a", bitrate_bps=96_000, chunk_spans=CHUNKS,
                               pieces_dir=folder / "pieces")
    ts, infos = [], []
    for segment, piece in zip(job.segments, track.pieces):
        infos.append(mux_hls_segment(segment.path, segment.start_frame, piece.path,
                                     folder / f"{segment.start_frame:06d}.ts"))
        ts.append(infos[-1].path)
    stitched = folder / "stitched.mp4"
    stitch(job.segments, track.m4a, stitched, expected_frames=CHUNKS[-1][1],
           input_audio_s=track.duration_s, audio_bitrate_bps=96_000)
    return Rendition(request.param, aac_rate(rate), source, track, ts, infos, stitched)


def _video_frames(source) -> list[np.ndarray]:
    with av.open(source) as container:
        return [frame.to_ndarray(format="yuv420p") for frame in container.decode(video=0)]


def _decode_listed(playlist: Path) -> Decoded:
    """Decode the segments a playlist lists, joined as one TS stream, as a player buffers them."""
    segments, _ = parse_media_playlist(playlist.read_text())
    data = b"".join((playlist.parent / uri).read_bytes() for uri, _ in segments)
    with av.open(io.BytesIO(data), format="mpegts") as container:
        return decode_streams(container)


def _write_playlist(path: Path, ts: list[Path], infos, *, ended: bool) -> Path:
    text = media_playlist([(p.name, info.duration_s) for p, info in zip(ts, infos)], ended=ended)
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)  # a server never serves half a playlist
    return path


# --- Segments and their decode -------------------------------------------------------------------


@pytest.mark.parametrize("listed", [1, 2])
def test_listed_prefix_decodes_to_its_chunks_frames_and_audio(rendition, job, listed):
    playlist = _write_playlist(rendition.ts[0].parent / f"live-{listed}.m3u8", rendition.ts[:listed],
                               rendition.infos[:listed], ended=False)
    decoded = _decode_listed(playlist)
    expected = [frame for chunk in job.frames[:listed] for frame in chunk]
    assert len(decoded.frames) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(decoded.frames, expected))
    # On the job's timeline (TS clocks carry a constant offset): audio covers the video's span.
    video_end = CHUNKS[listed - 1][1] / FPS
    assert decoded.video_start_s == pytest.approx(TS_OFFSET_S)
    assert decoded.audio_start_s <= decoded.video_start_s  # the priming frame comes first
    assert abs(decoded.audio_end_s - TS_OFFSET_S - video_end) <= FRAME_S


def test_segment_info_and_clock(rendition):
    for (start, stop), info in zip(CHUNKS, rendition.infos):
        assert info.frames == stop - start and info.duration_s == pytest.approx((stop - start) / FPS)
        assert info.bytes == info.path.stat().st_size and len(info.sha256) == 64
        with av.open(str(info.path)) as container:
            video = container.streams.video[0]
            first = next(p for p in container.demux(video) if p.size)
            assert first.is_keyframe
            assert first.pts * video.time_base == Fraction(start, FPS) + TS_OFFSET_S


def test_whole_rendition_matches_the_stitched_mp4(rendition, job):
    playlist = _write_playlist(rendition.ts[0].parent / "done.m3u8", rendition.ts, rendition.infos, ended=True)
    # FFmpeg's own HLS demuxer reads the playlist and its segments from the local files.
    with av.open(str(playlist), options={"protocol_whitelist": "file,crypto,data"}) as container:
        assert container.format.name == "hls"
        hls = decode_streams(container)
    with av.open(str(rendition.stitched)) as container:
        mp4 = decode_streams(container)
        audio = container.streams.audio[0]
        mp4_audio_s = float(audio.duration * audio.time_base)
    assert len(hls.frames) == len(mp4.frames) == CHUNKS[-1][1]
    assert all(np.array_equal(a, b) for a, b in zip(hls.frames, mp4.frames))
    assert all(np.array_equal(a, b) for a, b in zip(mp4.frames, (f for c in job.frames for f in c)))
    assert abs((hls.audio_end_s - hls.video_start_s) - mp4_audio_s) <= FRAME_S
    # The same packets through the same decoder: once the MP4's edit list has dropped the priming
    # frame that TS plays before 0, the sound is sample for sample the same.
    priming = round((hls.video_start_s - hls.audio_start_s) * rendition.rate)
    assert priming == 1024
    n = mp4.samples.shape[1]
    assert np.array_equal(hls.samples[:, priming:priming + n], mp4.samples)


def test_stitched_video_is_bit_for_bit_the_segments(rendition, job):
    with av.open(str(rendition.stitched)) as container:
        video = container.streams.video[0]
        stitched = [(bytes(p), p.pts * video.time_base, p.dts) for p in container.demux(video) if p.size]
    expected = []
    for segment in job.segments:
        with av.open(str(segment.path)) as container:
            stream = container.streams.video[0]
            expected += [(bytes(p), p.pts * stream.time_base + Fraction(segment.start_frame, FPS))
                         for p in container.demux(stream) if p.size]
    assert [(data, pts) for data, pts, _ in stitched] == expected
    dts = [d for _, _, d in stitched]
    assert dts == sorted(set(dts))


def test_stitched_audio_lasts_the_input(rendition):
    with av.open(str(rendition.source)) as container:
        source_rate = container.streams.audio[0].rate
        input_samples = sum(frame.samples for frame in container.decode(audio=0)) * rendition.rate // source_rate
    assert abs(rendition.track.samples - input_samples) <= rendition.rate // source_rate
    with av.open(str(rendition.stitched)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac" and audio.rate == rendition.rate
        container_s = float(audio.duration * audio.time_base)
        decoded = sum(frame.samples for frame in container.decode(audio))
    assert abs(container_s - input_samples / rendition.rate) <= FRAME_S
    assert abs(decoded / rendition.rate - input_samples / rendition.rate) <= FRAME_S


def test_stitch_from_the_original_audio_gives_the_same_file(rendition, job, tmp_path):
    """Callers that still pass the original input get the track encoded for them: same bytes."""
    out = tmp_path / "legacy.mp4"
    report = stitch(job.segments, rendition.source, out, expected_frames=CHUNKS[-1][1],
                    audio_bitrate_bps=96_000)
    assert out.read_bytes() == rendition.stitched.read_bytes()
    assert report.input_audio_s == pytest.approx(rendition.track.duration_s)
    assert [p.name for p in tmp_path.iterdir()] == ["legacy.mp4"]  # its temporary M4A is gone


# --- One encode, pieces that join ---------------------------------------------------------------


def test_track_layout_and_pieces(rendition):
    rate, channels, _, _ = AUDIO_CASES[rendition.name]
    track = rendition.track
    assert (track.sample_rate, track.layout) == (aac_rate(rate), "mono" if channels == 1 else "stereo")
    assert track.sample_rate >= 32000  # an AAC frame ends within a video frame (16 kHz: 48 kHz)
    # Decoded AAC input (the M4A case) keeps its encoder's end padding: a few ms more.
    assert track.duration_s == pytest.approx(AUDIO_S, abs=FRAME_S)
    assert [(p.start_frame, p.stop_frame) for p in track.pieces] == CHUNKS
    assert [len(read_audio_piece(p.path).packets) for p in track.pieces] == [p.packets for p in track.pieces]
    with av.open(str(track.m4a)) as container:
        audio = container.streams.audio[0]
        assert abs(float(audio.duration * audio.time_base) - track.duration_s) <= FRAME_S


def test_pieces_hold_the_m4a_packets_with_no_gap(rendition):
    """The pieces are the M4A's packets (behind ADTS headers), contiguous across every join."""
    with av.open(str(rendition.track.m4a)) as container:
        stream = container.streams.audio[0]
        m4a = [(int(p.pts * stream.time_base * rendition.rate), int(p.duration * stream.time_base * rendition.rate),
                bytes(p)) for p in container.demux(stream) if p.size]
    pieces = [read_audio_piece(p.path) for p in rendition.track.pieces]
    joined = [(p.pts, p.duration, p.data[7:]) for piece in pieces for p in piece.packets]
    assert joined == m4a
    assert joined[0][0] == -1024  # the encoder's priming frame, in the first piece
    for (pts, duration, _), (next_pts, _, _) in zip(joined, joined[1:]):
        assert next_pts == pts + duration
    for (start, stop), piece in zip(CHUNKS, pieces):
        for packet in piece.packets:  # each packet belongs where its midpoint lies
            middle = Fraction(2 * packet.pts + packet.duration, 2 * rendition.rate)
            assert start == 0 or middle >= Fraction(start, FPS)
            assert stop == CHUNKS[-1][1] or middle < Fraction(stop, FPS)


def test_ts_audio_clock_is_continuous_across_segments(rendition):
    """Read back from the segments, each AAC frame starts where the previous one ended."""
    starts = []
    for path in rendition.ts:
        with av.open(str(path)) as container:
            audio = container.streams.audio[0]
            for packet in container.demux(audio):
                if packet.size:  # 90 kHz ticks back to samples: exact, the error is under 0.5 tick
                    starts.append(round(packet.pts * audio.time_base * rendition.rate) - TS_OFFSET_S * rendition.rate)
    assert starts[0] == -1024
    assert all(b - a == 1024 for a, b in zip(starts, starts[1:]))
    assert len(starts) == sum(p.packets for p in rendition.track.pieces)


def test_chunk_spans_are_checked(tmp_path):
    source = write_audio(tmp_path / "a.wav", tone(1.0, 16000), 16000, "pcm_s16le")
    for spans in ([(0, 50), (60, 70)], [(5, 50)], [(0, 0)]):
        with pytest.raises(ValueError, match="contiguous"):
            encode_audio_track(source, tmp_path / "a.m4a", bitrate_bps=64_000, chunk_spans=spans,
                               pieces_dir=tmp_path / "pieces")


def test_broken_pieces_are_rejected(rendition, tmp_path):
    data = rendition.track.pieces[0].path.read_bytes()
    for name, broken in {"short": data[:10], "magic": b"XXXX" + data[4:], "truncated": data[:-5],
                         "trailing": data + b"\0"}.items():
        path = tmp_path / f"{name}.lfap"
        path.write_bytes(broken)
        with pytest.raises(ValueError):
            read_audio_piece(path)


# --- Playlists ----------------------------------------------------------------------------------

SEGMENTS = [("000000.ts", 2.0), ("000050.ts", 2.0),
            ("https://s3.example/jobs/1/000100.ts?X-Amz-Signature=ab%2F&X-Amz-Expires=600", 1.08)]


@pytest.mark.parametrize("ended", [False, True])
def test_playlist_round_trips_through_both_parsers(ended):
    text = media_playlist(SEGMENTS, ended=ended)
    assert text.startswith("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n"
                           "#EXT-X-PLAYLIST-TYPE:EVENT\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:2.0,\n000000.ts\n")
    assert text.endswith("#EXT-X-ENDLIST\n") == ended and text.count("#EXT-X-ENDLIST") == int(ended)
    assert parse_media_playlist(text) == (SEGMENTS, ended)
    parsed = m3u8.loads(text)
    assert parsed.playlist_type == "event" and parsed.is_endlist == ended
    assert parsed.target_duration == 2 and parsed.media_sequence == 0 and parsed.version == 3
    assert [(s.uri, s.duration) for s in parsed.segments] == SEGMENTS


def test_playlist_target_duration():
    assert "#EXT-X-TARGETDURATION:3\n" in media_playlist([("a.ts", 2.04)], ended=False)
    assert "#EXT-X-TARGETDURATION:10\n" in media_playlist([("a.ts", 2.0)], ended=False, target_duration_s=10)
    empty = media_playlist([], ended=False, target_duration_s=10)
    assert parse_media_playlist(empty) == ([], False) and m3u8.loads(empty).segments == []
    for segments, target in (([("a.ts", 10.4)], 9), ([], None)):
        with pytest.raises(ValueError):
            media_playlist(segments, ended=False, target_duration_s=target)


@pytest.mark.parametrize("segments", [[("", 1.0)], [("a\nb.ts", 1.0)], [("#a.ts", 1.0)],
                                      [("a.ts", 0.0)], [("a.ts", -1.0)], [("a.ts", math.nan)]])
def test_playlist_refuses_bad_segments(segments):
    with pytest.raises(ValueError):
        media_playlist(segments, ended=True)


GOOD = media_playlist(SEGMENTS[:2], ended=True)
MALFORMED = {
    "empty": "",
    "no header": GOOD.replace("#EXTM3U\n", ""),
    "no target": GOOD.replace("#EXT-X-TARGETDURATION:2\n", ""),
    "target not integer": GOOD.replace("TARGETDURATION:2", "TARGETDURATION:2.5"),
    "segment over target": GOOD.replace("#EXTINF:2.0,", "#EXTINF:3.0,", 1),
    "not event": GOOD.replace("EVENT", "VOD"),
    "no type": GOOD.replace("#EXT-X-PLAYLIST-TYPE:EVENT\n", ""),
    "sequence not 0": GOOD.replace("MEDIA-SEQUENCE:0", "MEDIA-SEQUENCE:3"),
    "old version": GOOD.replace("VERSION:3", "VERSION:2"),
    "repeated tag": GOOD.replace("#EXT-X-VERSION:3\n", "#EXT-X-VERSION:3\n#EXT-X-VERSION:3\n"),
    "unknown tag": GOOD.replace("#EXT-X-ENDLIST", "#EXT-X-DISCONTINUITY\n#EXT-X-ENDLIST"),
    "extinf no comma": GOOD.replace("#EXTINF:2.0,", "#EXTINF:2.0", 1),
    "extinf not a number": GOOD.replace("#EXTINF:2.0,", "#EXTINF:two,", 1),
    "extinf negative": GOOD.replace("#EXTINF:2.0,", "#EXTINF:-2.0,", 1),
    "uri without extinf": GOOD.replace("#EXTINF:2.0,\n000000.ts\n", "000000.ts\n"),
    "extinf without uri": GOOD.replace("#EXT-X-ENDLIST", "#EXTINF:1.0,\n#EXT-X-ENDLIST"),
    "extinf at the end": media_playlist(SEGMENTS[:1], ended=False) + "#EXTINF:1.0,\n",
    "after endlist": GOOD + "#EXTINF:1.0,\nc.ts\n",
    "header after segment": GOOD.replace("#EXT-X-ENDLIST", "#EXT-X-TARGETDURATION:2\n#EXT-X-ENDLIST"),
    "endlist with value": GOOD.replace("#EXT-X-ENDLIST", "#EXT-X-ENDLIST:1"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_parser_rejects_malformed_playlists(name):
    with pytest.raises(ValueError):
        parse_media_playlist(MALFORMED[name])


def test_parser_ignores_comments_and_blank_lines():
    text = GOOD.replace("#EXTINF:2.0,\n000050.ts", "# a comment\n\n#EXTINF:2.0,\n000050.ts")
    assert parse_media_playlist(text) == (SEGMENTS[:2], True)


# --- hls.js in a browser ------------------------------------------------------------------------

PAGE = """<!doctype html>
<meta charset="utf-8">
<video id="video" muted playsinline></video>
<script src="hls.min.js"></script>
<script>
  // What the test reads back: hls.js errors, and each playlist load as [live, segments listed].
  window.report = {errors: [], loads: [], supported: Hls.isSupported()};
  const video = document.getElementById("video");
  const hls = new Hls();
  hls.on(Hls.Events.ERROR, (event, data) => report.errors.push(`${data.details} fatal=${data.fatal}`));
  hls.on(Hls.Events.LEVEL_LOADED, (event, data) =>
    report.loads.push([data.details.live, data.details.fragments.length]));
  hls.on(Hls.Events.MANIFEST_PARSED, () => video.play());
  hls.loadSource("live.m3u8");
  hls.attachMedia(video);
</script>
"""


@pytest.mark.slow
@pytest.mark.parametrize("rendition", ["44k-stereo-aac"], indirect=True)  # one case is enough here
def test_hls_js_plays_the_event_playlist_while_it_grows(rendition, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM} (Debian package `chromium`)")
    sync_api = pytest.importorskip("playwright.sync_api")
    site = tmp_path / "site"
    site.mkdir()
    (site / "hls.min.js").write_bytes(HLS_JS.read_bytes())
    (site / "index.html").write_text(PAGE)
    for path in rendition.ts:
        (site / path.name).write_bytes(path.read_bytes())
    playlist, ts, infos = site / "live.m3u8", rendition.ts, rendition.infos
    _write_playlist(playlist, ts[:1], infos[:1], ended=False)
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
    with serve_folder(site) as base, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(base + "/index.html")
            assert page.evaluate("report.supported"), "hls.js: MediaSource with H.264/AAC unsupported"
            played = "() => document.getElementById('video').currentTime > {}"
            listed = "() => report.loads.some(([live, n]) => n === {})"
            try:
                page.wait_for_function(played.format(0), timeout=60_000)
                _write_playlist(playlist, ts[:2], infos[:2], ended=False)  # the next chunk is done
                page.wait_for_function(listed.format(2), timeout=60_000)
                _write_playlist(playlist, ts, infos, ended=True)  # the last chunk: the job is done
                page.wait_for_function(listed.format(3), timeout=60_000)
                page.wait_for_function(played.format(infos[0].duration_s + 0.5), timeout=60_000)
            except sync_api.TimeoutError:
                state = page.evaluate("({report, time: document.getElementById('video').currentTime, "
                                      "error: document.getElementById('video').error?.message})")
                pytest.fail(f"playback stalled: {state}")
            report = page.evaluate("report")
        finally:
            browser.close()
    # Loaded as a live playlist of 1, then 2 segments, then ended with all 3; played into the 2nd.
    loads = [load for i, load in enumerate(report["loads"]) if i == 0 or load != report["loads"][i - 1]]
    assert loads == [[True, 1], [True, 2], [False, 3]], report
    # hls.js may report (non-fatal) that it jumped the 80 ms start gap its remux leaves before the
    # first frame (x264's B-frame decode delay); anything fatal would have stopped playback.
    assert not [e for e in report["errors"] if "fatal=true" in e], report["errors"]
