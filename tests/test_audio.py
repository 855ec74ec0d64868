"""Decoding any common audio file to 16 kHz mono float32, and the errors for unusable files."""

from __future__ import annotations

import io
import time

import av
import librosa
import numpy as np
import pytest
import soundfile

from lipfarm.common.audio import (ArrayPcm, FilePcm, MIN_SAMPLES_16K, check_audio, load_16k, max_samples_16k,
                          normalise_to_16k, probe_audio)
from lipfarm.common.errors import AudioError
from tests.media import tone, write_audio
from tests.media import long_silence_ogg


@pytest.mark.parametrize("rate, channels, subtype, suffix", [
    (16000, 1, "PCM_16", "wav"),
    (44100, 2, "PCM_16", "wav"),
    (48000, 1, "PCM_24", "flac"),
    (22050, 2, "FLOAT", "wav"),
])
def test_lossless_files_load_exactly_as_librosa(tmp_path, rate, channels, subtype, suffix):
    path = tmp_path / f"in.{suffix}"
    soundfile.write(path, tone(1.3, rate, channels=channels).T, rate, subtype=subtype)
    ours = load_16k(path)
    theirs, _ = librosa.load(path, sr=16000)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("codec, suffix, container, rate, channels", [
    ("libmp3lame", "mp3", "mp3", 44100, 2),
    ("libopus", "ogg", "ogg", 48000, 1),
    ("vorbis", "ogg", "ogg", 44100, 2),
    ("aac", "m4a", "mp4", 44100, 2),
    ("aac", "mp4", "mp4", 48000, 1),
    ("aac", "mov", "mov", 32000, 2),
])
def test_lossy_containers_decode_to_the_same_signal(tmp_path, codec, suffix, container, rate, channels):
    source = tone(2.0, rate, channels=channels)
    path = write_audio(tmp_path / f"in.{suffix}", source, rate, codec, container=container,
                       with_video=suffix in ("mp4", "mov"))
    ours = load_16k(path)
    expected = librosa.resample(source.mean(axis=0), orig_sr=rate, target_sr=16000)
    assert abs(ours.size - expected.size) < 0.1 * 16000  # encoder delay and padding differ per codec
    best = max(np.corrcoef(ours[lag:lag + 16000], expected[:16000])[0, 1] for lag in range(0, 1200, 8))
    assert best > 0.9


def test_stereo_is_the_mean_of_the_channels(tmp_path):
    stereo = tone(1.0, 16000, channels=2)
    soundfile.write(tmp_path / "s.wav", stereo.T, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_16k(tmp_path / "s.wav"), np.mean(stereo, axis=0))


def test_probe_reports_stream_facts(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(1.5, 44100, channels=2).T, 44100)
    info = probe_audio(tmp_path / "a.wav")
    assert (info.sample_rate_hz, info.channels, info.codec) == (44100, 2, "pcm_s16le")
    assert info.duration_s == pytest.approx(1.5, abs=1e-3)


def test_normalise_streams_to_a_sink_and_counts_samples(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(3.0, 48000).T, 48000)
    sink = io.BytesIO()
    n = normalise_to_16k(tmp_path / "a.wav", sink)
    assert n == 48000 and len(sink.getvalue()) == 4 * n


def test_pcm_sources_read_ranges_with_zero_padding(tmp_path):
    samples = np.arange(10, dtype=np.float32)
    (tmp_path / "x.f32").write_bytes(samples.astype("<f4").tobytes())
    for source in (ArrayPcm(samples), FilePcm(tmp_path / "x.f32")):
        assert source.n_samples == 10
        np.testing.assert_array_equal(source.read(-2, 3), [0, 0, 0, 1, 2])
        np.testing.assert_array_equal(source.read(8, 12), [8, 9, 0, 0])
        np.testing.assert_array_equal(source.read(11, 13), [0, 0])


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav: file not found"):
        load_16k(tmp_path / "nope.wav")


def test_text_file_is_not_audio(tmp_path):
    (tmp_path / "notes.txt").write_text("these are not samples\n" * 20)
    with pytest.raises(AudioError, match="notes.txt: no audio stream: not an audio file"):
        load_16k(tmp_path / "notes.txt")


def test_corrupt_audio(tmp_path):
    path = tmp_path / "broken.mp3"
    write_audio(path, tone(2.0, 44100), 44100, "libmp3lame", container="mp3")
    data = bytearray(path.read_bytes())
    data[200:] = bytes(len(data) - 200)  # keep the header, zero the frames
    path.write_bytes(bytes(data))
    with pytest.raises(AudioError, match="broken.mp3"):
        load_16k(path)


def test_empty_audio(tmp_path):
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: contains no audio samples"):
        load_16k(tmp_path / "empty.wav")


def test_audio_shorter_than_one_window(tmp_path):
    soundfile.write(tmp_path / "blip.wav", tone(0.05, 16000).T, 16000)
    with pytest.raises(AudioError, match=r"blip.wav: audio is too short .*expected >= 0.1875 s, found 0.0500 s"):
        load_16k(tmp_path / "blip.wav")
    soundfile.write(tmp_path / "just.wav", tone(MIN_SAMPLES_16K / 16000, 16000).T, 16000)
    assert load_16k(tmp_path / "just.wav").size == MIN_SAMPLES_16K


def test_video_without_audio(tmp_path):

    path = tmp_path / "silent.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(AudioError, match="silent.mp4: no audio stream"):
        load_16k(path)


# --- Length bound (LIPFARM_MAX_AUDIO_S) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def three_hours(tmp_path_factory):
    return long_silence_ogg(tmp_path_factory.mktemp("long") / "three_hours.ogg", 3 * 3600)


def test_the_long_file_is_small_and_says_how_long_it_is(three_hours):
    assert three_hours.stat().st_size < 3_000_000  # 3 h, i.e. 691 MB of 16 kHz float32 PCM
    assert probe_audio(three_hours).duration_s == pytest.approx(3 * 3600, abs=1)


def test_submit_probe_refuses_a_container_that_says_it_is_too_long(three_hours):
    with pytest.raises(AudioError, match=r"three_hours.ogg: audio is longer than the maximum "
                                         r"\(expected at most 3600 s \(LIPFARM_MAX_AUDIO_S\), found 10800.0 s"):
        check_audio(three_hours, max_s=3600)
    assert check_audio(three_hours, max_s=4 * 3600).duration_s == pytest.approx(10800, abs=1)
    assert check_audio(three_hours).codec == "opus"  # no bound given: none applied


def test_decoding_stops_as_soon_as_the_bound_is_passed(three_hours, monkeypatch):
    from lipfarm.common import audio as common_audio

    decoded = []
    real = common_audio.iter_decoded

    def counting(path):
        for block, rate in real(path):
            decoded.append(block.shape[-1] / rate)
            yield block, rate

    monkeypatch.setattr(common_audio, "iter_decoded", counting)
    sink = io.BytesIO()
    started = time.monotonic()
    with pytest.raises(AudioError, match=r"three_hours.ogg: audio is longer than the maximum \(expected at most "
                                         r"60 s \(LIPFARM_MAX_AUDIO_S\), found it decodes to more than 60 s: "
                                         r"decoding stopped at 60.0"):
        normalise_to_16k(three_hours, sink, max_samples=max_samples_16k(60))
    assert 60 < sum(decoded) <= 60 + max(decoded)  # one block past the bound, not three hours
    assert len(sink.getvalue()) <= 60 * 16000 * 4  # the block past the bound was not written
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("bound_s, refused", [(2.0, False), (1.99, True), (0, False), (None, False)])
def test_the_bound_is_inclusive_and_zero_means_none(tmp_path, bound_s, refused):
    soundfile.write(tmp_path / "two.wav", tone(2.0, 44100).T, 44100)
    sink = io.BytesIO()
    if refused:
        with pytest.raises(AudioError, match=r"two.wav: .*decodes to more than 1.99 s: decoding stopped at 2.00 s"):
            normalise_to_16k(tmp_path / "two.wav", sink, max_samples=max_samples_16k(bound_s))
    else:
        assert normalise_to_16k(tmp_path / "two.wav", sink, max_samples=max_samples_16k(bound_s)) == 32000
