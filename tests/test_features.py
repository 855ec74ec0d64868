"""The mel spectrogram and the per-frame audio inputs, against the reference's formulas."""

from __future__ import annotations

import numpy as np
import pytest

from common.audio import ArrayPcm, load_16k
from common.features import audio_inputs, embeddings, frame_count, window_count, window_start
from common.mel import mel_frame_count, mel_spectrogram
from common.models import inspect_encoder
from common.runtime import open_runner, run_encoder
from tests.media import tone
from tests.reference import reference_audio_inputs, reference_mel, reference_windows

_W = np.random.default_rng(5).standard_normal((80 * 16, 512)).astype(np.float32) / 40


def toy_encoder(windows: np.ndarray) -> np.ndarray:
    """A cheap deterministic stand-in for the ONNX encoder: ``[B, 1, 80, 16] -> [B, 512]``, >= 0."""
    return np.maximum(windows.reshape(len(windows), -1) @ _W, 0.0)


@pytest.mark.parametrize("n_samples", [3000, 3001, 3199, 3200, 16000, 16123, 44100, 160_000])
def test_mel_equals_the_reference_bit_for_bit(n_samples):
    wav = tone(n_samples / 16000 + 0.01, 16000, seed=n_samples)[0, :n_samples]
    ours = mel_spectrogram(ArrayPcm(wav), start=0, stop=mel_frame_count(n_samples))
    np.testing.assert_array_equal(ours, reference_mel(wav))


def test_mel_of_real_speech_equals_the_reference(sanders):
    wav = load_16k(sanders / "audio" / "talk_hb.wav")
    ours = mel_spectrogram(ArrayPcm(wav), start=0, stop=mel_frame_count(wav.size))
    assert ours.shape == (3591, 80)  # the fixture's README: 3591 mel frames
    np.testing.assert_array_equal(ours, reference_mel(wav))


def test_mel_ranges_equal_the_whole():
    wav = tone(9.0, 16000, seed=3)[0]
    pcm = ArrayPcm(wav)
    total = mel_frame_count(wav.size)
    whole = mel_spectrogram(pcm, start=0, stop=total)
    edges = [0, 1, 15, 16, 255, 256, 257, 511, 512, 600, total - 1, total]
    for a in edges:
        for b in edges:
            if a < b:
                np.testing.assert_array_equal(mel_spectrogram(pcm, start=a, stop=b), whole[a:b])


def test_mel_rejects_ranges_outside_the_track():
    pcm = ArrayPcm(np.zeros(16000, np.float32))
    with pytest.raises(ValueError):
        mel_spectrogram(pcm, start=0, stop=mel_frame_count(16000) + 1)


@pytest.mark.parametrize("n_mel", [16, 17, 19, 20, 96, 100, 3591, 100_003])
def test_window_rules_match_the_reference(n_mel):
    count = window_count(n_mel)
    assert count == int((n_mel - 16) / 80.0 * float(25)) + 2
    for k in range(count):
        start = int(80.0 * (k / float(25)))
        if start + 16 > n_mel:
            start = n_mel - 16
        assert window_start(k, n_mel) == start


def test_frame_counts():
    assert frame_count(718_147) == 1121  # the fixture's README: 1119 windows, 1121 frames
    assert frame_count(3000) == 4  # exactly 16 mel frames: 2 windows, 4 frames
    with pytest.raises(ValueError):
        window_count(15)


@pytest.mark.parametrize("seconds", [0.1875, 0.25, 1.0, 4.37])
def test_audio_inputs_equal_the_reference_construction(seconds):
    wav = tone(seconds, 16000, seed=11)[0]
    mel = reference_mel(wav)
    windows = reference_windows(mel)
    emb = np.concatenate([toy_encoder(windows[i:i + 64]) for i in range(0, len(windows), 64)])
    expected = reference_audio_inputs(emb)
    ours = audio_inputs(ArrayPcm(wav), toy_encoder, start=0, stop=frame_count(wav.size))
    assert ours.shape == (frame_count(wav.size), 32, 16, 16)
    np.testing.assert_array_equal(ours, expected)


def test_every_range_equals_the_slice_of_the_whole():
    wav = tone(3.3, 16000, seed=2)[0]
    pcm = ArrayPcm(wav)
    total = frame_count(wav.size)
    whole = audio_inputs(pcm, toy_encoder, start=0, stop=total)
    for a in range(total):
        for b in range(a + 1, total + 1):
            np.testing.assert_array_equal(audio_inputs(pcm, toy_encoder, start=a, stop=b), whole[a:b])


def test_ranges_of_a_long_track_read_only_their_audio():
    wav = tone(130.0, 16000, seed=9)[0]
    reads = []

    class CountingPcm(ArrayPcm):
        def read(self, start, stop):
            reads.append((start, stop))
            return super().read(start, stop)

    pcm = CountingPcm(wav)
    total = frame_count(wav.size)
    whole = audio_inputs(ArrayPcm(wav), toy_encoder, start=0, stop=total)
    a, b = 2000, 2250  # 10 s in the middle
    np.testing.assert_array_equal(audio_inputs(pcm, toy_encoder, start=a, stop=b), whole[a:b])
    read = sum(stop - start for start, stop in reads)
    assert read < 20 * 16000  # 10 s of frames, plus context and block/batch alignment


def test_onnx_encoder_ranges_equal_the_whole(demo, speech_16k):
    spec = inspect_encoder(demo.encoder)
    encode = run_encoder(open_runner(spec, backend="cpu", precision="fp32", threads=1), spec)
    pcm = ArrayPcm(speech_16k)
    total = frame_count(pcm.n_samples)
    whole = audio_inputs(pcm, encode, start=0, stop=total)
    for a, b in [(0, 1), (0, 8), (0, 25), (7, 33), (100, 175), (total - 8, total), (total - 1, total),
                 (total - 30, total)]:
        np.testing.assert_array_equal(audio_inputs(pcm, encode, start=a, stop=b), whole[a:b])


def test_embeddings_are_relu_outputs(demo, speech_16k):
    spec = inspect_encoder(demo.encoder)
    encode = run_encoder(open_runner(spec, backend="cpu", precision="fp32", threads=1), spec)
    emb = embeddings(ArrayPcm(speech_16k), encode, first=0, stop=70)
    assert emb.shape == (70, 512) and emb.min() >= 0.0
