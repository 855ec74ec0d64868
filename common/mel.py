"""The Wav2Lip mel spectrogram of any range of mel frames.

The arithmetic follows the reference script step for step (``scipy.signal.lfilter`` pre-emphasis in
float64, ``librosa.stft`` with a periodic Hann window and constant centre padding, librosa's Slaney
filter bank, dB against a 1e-5 floor, ``clip(0.08 S + 4, -4, 4)``) and casts to float32 last, as the
reference does when it builds encoder windows.

Frames are always computed in blocks aligned to multiples of ``MEL_BLOCK_FRAMES``. A range request
computes the blocks that cover it and slices, so the frames of any range are bit-identical to the
same frames of a whole-track computation: no BLAS blocking or FFT batching can differ between them.
"""

from __future__ import annotations

import functools

import numpy as np

from common import defaults
from common.audio import PcmSource

N_BINS = defaults.N_FFT // 2 + 1
_PAD = defaults.N_FFT // 2  # centred frames: frame t is centred on sample t * hop


def mel_frame_count(n_samples: int) -> int:
    """Mel frames of ``n_samples`` of 16 kHz audio: ``1 + n_samples // 200``."""
    return 1 + n_samples // defaults.HOP_SAMPLES


@functools.cache
def mel_basis() -> np.ndarray:
    """librosa's Slaney mel filter bank ``[80, 401]``, float32 values held as float64."""
    import librosa

    basis = librosa.filters.mel(sr=defaults.SAMPLE_RATE_HZ, n_fft=defaults.N_FFT,
                                n_mels=defaults.N_MELS, fmin=defaults.MEL_FMIN_HZ,
                                fmax=defaults.MEL_FMAX_HZ)
    return basis.astype(np.float64)


@functools.cache
def stft_window() -> np.ndarray:
    """The periodic Hann window of ``N_FFT`` samples, from scipy as librosa.stft takes it."""
    from scipy.signal import get_window

    return get_window("hann", defaults.N_FFT, fftbins=True)


def preemphasis(x: np.ndarray, *, first_index: int, n_samples: int) -> np.ndarray:
    """``y[n] = x[n] - 0.97 x[n-1]`` over a zero-padded slice, in float64.

    ``x`` holds samples ``[first_index - 1, first_index - 1 + len(x))`` of the track, zeros outside
    ``[0, n_samples)``. Returns ``y`` for ``[first_index, ...)``; positions outside the track are 0,
    as the reference pre-emphasises the track before padding it.
    """
    x64 = x.astype(np.float64)
    y = x64[1:] - defaults.PREEMPHASIS * x64[:-1]
    outside = (np.arange(first_index, first_index + y.size) < 0) | (
        np.arange(first_index, first_index + y.size) >= n_samples)
    y[outside] = 0.0
    return y


def _normalised_db(mel: np.ndarray) -> np.ndarray:
    min_level = np.exp(-5 * np.log(10))  # the reference's spelling of 1e-5, to the last bit
    db = 20 * np.log10(np.maximum(min_level, mel)) - defaults.REF_LEVEL_DB
    return np.clip((2 * 4.0) * ((db + 100.0) / 100.0) - 4.0, -4.0, 4.0)  # the reference: (S - -100) / (--100)


def _mel_block(pcm: PcmSource, block: int, n_frames: int) -> np.ndarray:
    first = block * defaults.MEL_BLOCK_FRAMES
    last = min(first + defaults.MEL_BLOCK_FRAMES, n_frames)
    hop = defaults.HOP_SAMPLES
    start = first * hop - _PAD
    stop = (last - 1) * hop - _PAD + defaults.N_FFT
    y = preemphasis(pcm.read(start - 1, stop), first_index=start, n_samples=pcm.n_samples)
    frames = np.lib.stride_tricks.sliding_window_view(y, defaults.N_FFT)[::hop]
    spectrum = np.abs(np.fft.rfft(frames * stft_window(), axis=-1))
    return _normalised_db(spectrum @ mel_basis().T).astype(np.float32)


def mel_spectrogram(pcm: PcmSource, *, start: int, stop: int) -> np.ndarray:
    """Mel frames ``[start, stop)`` of the whole track in ``pcm``.

    Returns float32 ``[stop - start, 80]`` (time-major), equal to rows ``start:stop`` of the
    whole-track spectrogram. Raises ``ValueError`` for a range outside ``[0, mel_frame_count)``.
    """
    n_frames = mel_frame_count(pcm.n_samples)
    if not 0 <= start < stop <= n_frames:
        raise ValueError(f"mel range [{start}, {stop}) is outside [0, {n_frames})")
    size = defaults.MEL_BLOCK_FRAMES
    blocks = range(start // size, (stop - 1) // size + 1)
    joined = np.concatenate([_mel_block(pcm, b, n_frames) for b in blocks])
    offset = blocks[0] * size
    return joined[start - offset:stop - offset]
