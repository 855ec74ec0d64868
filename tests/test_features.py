"""The mel spectrogram and the per-frame audio inputs, against the reference's formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lipfarm.common.audio import ArrayPcm, load_16k
from lipfarm.common.features import AudioFeatures, audio_inputs, embeddings, window_start
from lipfarm.common.timeline import frame_count, window_count
from lipfarm.common.mel import _slaney_mel_basis, mel_basis, mel_spectrogram, stft_window
from lipfarm.common.timeline import mel_frame_count
from lipfarm.common.models import inspect_encoder
from lipfarm.common.runtime import open_runner, run_encoder
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


def test_stft_window_is_scipys_periodic_hann_bit_for_bit():
    from scipy.signal import get_window

    ours = stft_window()
    theirs = get_window("hann", 800, fftbins=True)
    assert ours.dtype == theirs.dtype == np.float64
    assert ours.tobytes() == theirs.tobytes()


def test_mel_basis_is_librosas_bit_for_bit():
    import librosa

    theirs = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    ours = _slaney_mel_basis(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape == (80, 401)
    assert ours.tobytes() == theirs.tobytes()
    np.testing.assert_array_equal(mel_basis(), theirs.astype(np.float64))
    # the same formula on other parameters (both sides of the 1 kHz knee, other sizes)
    for sr, n_fft, n_mels, fmin, fmax in [(22050, 2048, 128, 0.0, 11025.0), (16000, 512, 40, 0, 8000),
                                          (44100, 4096, 256, 20.0, 20000.0), (16000, 800, 80, 1500.0, 7600.0)]:
        assert _slaney_mel_basis(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).tobytes() == \
            librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).tobytes()


def test_mel_imports_neither_scipy_nor_librosa():
    """The render path's features need numpy only (importing them costs most of a cold start)."""
    import subprocess
    import sys

    code = ("import sys\nfrom lipfarm.common.audio import ArrayPcm\nfrom lipfarm.common.mel import mel_spectrogram\n"
            "import numpy as np\nmel_spectrogram(ArrayPcm(np.zeros(16000, np.float32)), start=0, stop=81)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'librosa', 'numba')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.stdout.strip() == "[]"


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


class CountingEncoder:
    """``toy_encoder``, recording the batch size of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        self.batches.append(len(windows))
        return toy_encoder(windows)


def test_progressive_features_equal_the_whole_for_every_range():
    wav = tone(3.3, 16000, seed=2)[0]
    pcm = ArrayPcm(wav)
    total = frame_count(wav.size)
    whole = audio_inputs(pcm, toy_encoder, start=0, stop=total)
    ranges = [(a, b) for a in range(total) for b in range(a + 1, total + 1)]
    for a, b in ranges:  # each range on its own
        np.testing.assert_array_equal(AudioFeatures(pcm, toy_encoder)(a, b), whole[a:b])
    shared = AudioFeatures(pcm, toy_encoder)  # one object, asked in any order (blocks dropped and remade)
    for i in np.random.default_rng(4).permutation(len(ranges)):
        a, b = ranges[i]
        np.testing.assert_array_equal(shared(a, b), whole[a:b], err_msg=f"[{a}, {b})")


@pytest.mark.parametrize("seconds", [0.25, 3.3, 9.0])
@pytest.mark.parametrize("batch", [1, 3, 8, 25, 64, 1000])
def test_batches_in_order_get_the_whole_and_encode_each_block_once(seconds, batch):
    wav = tone(seconds, 16000, seed=6)[0]
    pcm = ArrayPcm(wav)
    total = frame_count(wav.size)
    whole_encoder, encoder = CountingEncoder(), CountingEncoder()
    whole = audio_inputs(pcm, whole_encoder, start=0, stop=total)
    features = AudioFeatures(pcm, encoder)
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        np.testing.assert_array_equal(features(start, stop), whole[start:stop])
    assert encoder.batches == whole_encoder.batches  # the same 64-window batches, each once
    assert features.encoded_batches == -(-window_count(mel_frame_count(wav.size)) // 64)


def test_the_first_frames_need_only_the_first_block():
    wav = tone(60.0, 16000, seed=8)[0]
    reads = []

    class CountingPcm(ArrayPcm):
        def read(self, start, stop):
            reads.append((start, stop))
            return super().read(start, stop)

    encoder = CountingEncoder()
    features = AudioFeatures(CountingPcm(wav), encoder)
    first = features(0, 1)
    assert encoder.batches == [64]  # windows 0-63 of 1499, not the whole track's
    assert sum(stop - start for start, stop in reads) < 4 * 16000  # one block of mel frames: 3.2 s
    np.testing.assert_array_equal(first, audio_inputs(ArrayPcm(wav), toy_encoder, start=0, stop=1))
    features(1, 58)  # frame i reads padded rows up to i + 7, window i + 6: 63 at most, the first block
    assert encoder.batches == [64]
    features(58, 59)  # window 64: the second block
    assert encoder.batches == [64, 64]


def test_features_keep_a_few_blocks_only():
    wav = tone(130.0, 16000, seed=9)[0]
    features = AudioFeatures(ArrayPcm(wav), toy_encoder)
    most = 0
    for start in range(0, features.n_frames, 25):
        features(start, min(start + 25, features.n_frames))
        most = max(most, len(features._emb), len(features._mel))
    assert most <= 3


def test_features_reject_ranges_outside_the_track():
    features = AudioFeatures(ArrayPcm(np.zeros(16000, np.float32)), toy_encoder)
    with pytest.raises(ValueError):
        features(0, features.n_frames + 1)
    with pytest.raises(ValueError):
        features(-1, 3)
    with pytest.raises(ValueError):
        features(5, 5)


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
