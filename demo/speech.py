"""Speech-like demo audio made by code: syllables, phrases and pauses.

A source-filter voice: a glottal pulse train (with jitter and a falling pitch per phrase) through
three formant resonators whose targets change per syllable (a, e, i, o, u), under a syllable-rate
loudness envelope (about 4.5 syllables a second), with short fricative bursts and silent pauses
between phrases. Deterministic for a seed. It is not intelligible, but its loudness moves the way
speech does, which is what a lip-sync render must follow.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from lipfarm.common import defaults

# Formant frequencies and bandwidths (Hz) of five vowels, a rough adult voice.
_VOWELS = {
    "a": ((800, 80), (1200, 90), (2500, 120)),
    "e": ((500, 70), (1800, 100), (2500, 120)),
    "i": ((300, 60), (2300, 100), (3000, 120)),
    "o": ((500, 70), (900, 80), (2400, 120)),
    "u": ((350, 60), (800, 80), (2300, 120)),
}


def _resonate(x: np.ndarray, freq: float, bandwidth: float, rate: int) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / rate)
    theta = 2 * np.pi * freq / rate
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([1.0 - r], a, x)


def _syllable(rng: np.random.Generator, f0: float, seconds: float, rate: int) -> np.ndarray:
    n = int(seconds * rate)
    t = np.arange(n) / rate
    pitch = f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t)) * (1 + 0.01 * rng.standard_normal())
    phase = np.cumsum(pitch / rate)
    source = (phase % 1.0) * 2 - 1  # sawtooth: a rich, falling spectrum like glottal pulses
    source = lfilter([1.0], [1.0, -0.9], np.diff(source, prepend=source[0]))
    vowel = _VOWELS[rng.choice(list(_VOWELS))]
    voiced = sum(_resonate(source, f, b, rate) * g for (f, b), g in zip(vowel, (1.0, 0.6, 0.3)))
    attack = int(0.4 * n)
    envelope = np.concatenate([np.sin(np.linspace(0, np.pi / 2, attack)) ** 2,
                               np.cos(np.linspace(0, np.pi / 2, n - attack)) ** 2])
    return voiced * envelope * rng.uniform(0.5, 1.0)


def _fricative(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    n = int(seconds * rate)
    noise = _resonate(rng.standard_normal(n), rng.uniform(3500, 5500), 1500, rate)
    return noise * np.hanning(n) * 0.15


def demo_speech(seconds: float = 10.0, *, seed: int = 7, rate: int = defaults.SAMPLE_RATE_HZ) -> np.ndarray:
    """Speech-like float32 mono samples in [-1, 1] of ``seconds`` length, at ``rate`` Hz."""
    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    out = np.zeros(total)
    pos = int(0.4 * rate)  # start after a short silence, as a recording does
    while pos < total - rate // 2:
        syllables = int(rng.integers(3, 9))
        f0 = rng.uniform(115, 150)
        for k in range(syllables):
            if rng.random() < 0.35:
                burst = _fricative(rng, rng.uniform(0.05, 0.1), rate)
                end = min(total, pos + burst.size)
                out[pos:end] += burst[:end - pos]
                pos = end
            syl = _syllable(rng, f0 * (1 - 0.04 * k), rng.uniform(0.15, 0.26), rate)
            end = min(total, pos + syl.size)
            out[pos:end] += syl[:end - pos]
            pos = end + int(rng.uniform(0.0, 0.05) * rate)
        pos += int(rng.uniform(0.3, 0.8) * rate)  # a pause between phrases
    out += rng.standard_normal(total) * 10 ** (-70 / 20)  # a quiet room
    return (out / np.abs(out).max() * 10 ** (-3 / 20)).astype(np.float32)


def write_wav(path: str | Path, samples: np.ndarray, rate: int = defaults.SAMPLE_RATE_HZ) -> None:
    """Write mono float samples as a 16-bit PCM WAV file."""
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(pcm.tobytes())
