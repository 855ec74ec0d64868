"""The Wav2Lip mel spectrogram of any range of mel frames.

The arithmetic follows the reference script step for step (``scipy.signal.lfilter`` pre-emphasis in
float64, ``librosa.stft`` with a periodic Hann window and constant centre padding, librosa's Slaney
filter bank, dB against a 1e-5 floor, ``clip(0.08 S + 4, -4, 4)``) and casts to float32 last, as the
reference does when it builds encoder windows. It needs numpy only: the window and the filter bank
are scipy's and librosa's formulas written out (bit-identical, checked by the tests), because
importing scipy.signal and librosa (numba) costs most of a second of a render's cold start.

Frames are always computed in blocks aligned to multiples of ``MEL_BLOCK_FRAMES``. A range request
computes the blocks that cover it and slices, so the frames of any range are bit-identical to the
same frames of a whole-track computation: no BLAS blocking or FFT batching can differ between them.
"""

from __future__ import annotations

import functools

import numpy as np

from lipfarm.common import defaults
from lipfarm.common.audio import PcmSource
from lipfarm.common.timeline import mel_frame_count

N_BINS = defaults.N_FFT // 2 + 1
_PAD = defaults.N_FFT // 2  # centred frames: frame t is centred on sample t * hop


@functools.cache
def mel_basis() -> np.ndarray:
    """librosa's Slaney mel filter bank ``[80, 401]``, float32 values held as float64.

    ``librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)`` (htk=False,
    norm="slaney", dtype float32) written out in numpy, operation for operation, so that the float32
    values are bit-identical (tests/test_features.py checks them against librosa) without importing
    librosa, and numba behind it, on the render path.
    """
    return _slaney_mel_basis(sr=defaults.SAMPLE_RATE_HZ, n_fft=defaults.N_FFT, n_mels=defaults.N_MELS,
                             fmin=defaults.MEL_FMIN_HZ, fmax=defaults.MEL_FMAX_HZ).astype(np.float64)


def _hz_to_mel(frequencies: np.ndarray) -> np.ndarray:
    """librosa's ``hz_to_mel(htk=False)``: linear below 1 kHz, logarithmic above."""
    frequencies = np.asanyarray(frequencies)
    f_min, f_sp = 0.0, 200.0 / 3
    mels = (frequencies - f_min) / f_sp
    min_log_hz = 1000.0
    min_log_mel = (min_log_hz - f_min) / f_sp
    logstep = np.log(6.4) / 27.0
    if frequencies.ndim:
        log_t = frequencies >= min_log_hz
        mels[log_t] = min_log_mel + np.log(frequencies[log_t] / min_log_hz) / logstep
    elif frequencies >= min_log_hz:
        mels = min_log_mel + np.log(frequencies / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """librosa's ``mel_to_hz(htk=False)``, the inverse of ``_hz_to_mel``."""
    mels = np.asanyarray(mels)
    f_min, f_sp = 0.0, 200.0 / 3
    freqs = f_min + f_sp * mels
    min_log_hz = 1000.0
    min_log_mel = (min_log_hz - f_min) / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    return freqs


def _slaney_mel_basis(*, sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa 0.10/0.11's ``filters.mel`` for ``htk=False, norm="slaney", dtype=float32``."""
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]
    return weights


@functools.cache
def stft_window() -> np.ndarray:
    """The periodic Hann window of ``N_FFT`` samples, as librosa.stft takes it from scipy.

    ``scipy.signal.get_window("hann", N_FFT, fftbins=True)`` written out in numpy with scipy's
    arithmetic (``general_cosine`` with ``[0.5, 0.5]`` on ``N_FFT + 1`` points, the last dropped),
    bit-identical (tests/test_features.py checks it) without importing scipy.signal on the render path.
    """
    m = defaults.N_FFT + 1  # periodic: one point more, then truncated
    fac = np.linspace(-np.pi, np.pi, m, dtype=np.float64)
    window = np.zeros(m, dtype=np.float64)
    for k, a in enumerate(np.asarray([0.5, 1.0 - 0.5], dtype=np.float64)):
        window += a * np.cos(k * fac)
    return window[:-1]


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


def mel_block(pcm: PcmSource, block: int, n_frames: int) -> np.ndarray:
    """Mel frames ``[block * MEL_BLOCK_FRAMES, +MEL_BLOCK_FRAMES)`` (fewer at the end) of a track of
    ``n_frames`` mel frames: float32 ``[frames, 80]``, the unit every range is computed in."""
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
    joined = np.concatenate([mel_block(pcm, b, n_frames) for b in blocks])
    offset = blocks[0] * size
    return joined[start - offset:stop - offset]
