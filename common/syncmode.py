"""Sync modes: how a job's output frames map onto its avatar's template frames, and its length.

One job's audio gives ``L + 2`` frames (docs/contract.md §1); its avatar has ``N`` template frames.
A sync mode decides which template frame each output frame shows, and whether the output keeps the
audio's length, stops at the template's end or is padded to it:

| mode      | output frames ``F``        | template of output frame ``i``                      | audio          |
| --------- | -------------------------- | --------------------------------------------------- | -------------- |
| bounce    | ``L + 2``                  | 1, 2, .., N-1, N-2, .., 1, 0, 1, .. (period 2(N-1)) | as given       |
| loop      | ``L + 2``                  | ``i mod N``                                         | as given       |
| cut_off   | ``min(L + 2, N)``          | ``i``                                               | cut to ``F/25`` s |
| silence   | ``max(L + 2, N)``          | ``i`` when ``F <= N``, else bounce's                | padded with silence so that ``F = N`` when shorter |
| remap     | ``L + 2``                  | ``round(i (N - 1) / (F - 1))``, halves up           | as given       |

Everything here is arithmetic over integers with no I/O, so a chunk computes its own frames'
templates from ``(mode, i, N, F)`` alone, and the planner the frame count and audio length.
"""

from __future__ import annotations

import numpy as np

from lipfarm.common import defaults
from lipfarm.common.errors import InputError
from lipfarm.common.timeline import frame_count

SYNC_MODES = ("bounce", "loop", "cut_off", "silence", "remap")
LENGTH_MODES = ("cut_off", "silence")  # the modes whose output length depends on the template's

# 16 kHz samples of one 25 fps video frame: 640.
SAMPLES_PER_FRAME = defaults.SAMPLE_RATE_HZ // defaults.FPS


def check_sync_mode(mode: object) -> str:
    """``mode`` if it is a known sync mode, else an ``InputError`` naming ``sync_mode``."""
    if not isinstance(mode, str) or mode not in SYNC_MODES:
        raise InputError("not a known sync mode", field="sync_mode", expected=" | ".join(SYNC_MODES),
                         found=mode if isinstance(mode, str) else repr(mode))
    return mode


def template_index(mode: str, i: int, n_template: int, n_frames: int) -> int:
    """The template frame that output frame ``i`` of ``n_frames`` shows, in ``mode``, for an avatar
    of ``n_template`` frames (see the module's table). Raises ``ValueError`` for ``i`` outside the
    output or a template of fewer than 2 frames."""
    if n_template < 2:
        raise ValueError("a template needs at least 2 frames")
    if not 0 <= i < n_frames:
        raise ValueError(f"frame {i} is outside the output's {n_frames} frames")
    if mode == "bounce" or (mode == "silence" and n_frames > n_template):
        period = 2 * (n_template - 1)
        phase = (i + 1) % period
        return phase if phase <= n_template - 1 else period - phase
    if mode == "loop":
        return i % n_template
    if mode in ("cut_off", "silence"):
        if n_frames > n_template:
            raise ValueError(f"{mode}: {n_frames} frames is more than the template's {n_template}")
        return i
    if mode == "remap":
        if n_frames == 1:
            return 0
        # round(i (N - 1) / (F - 1)), halves rounded up, in integers
        return (2 * i * (n_template - 1) + n_frames - 1) // (2 * (n_frames - 1))
    raise ValueError(f"unknown sync mode {mode!r}")


def template_indices(mode: str, start: int, stop: int, n_template: int, n_frames: int) -> np.ndarray:
    """``template_index`` of output frames ``[start, stop)``, as an int64 array (a chunk's walk)."""
    return np.array([template_index(mode, i, n_template, n_frames) for i in range(start, stop)], dtype=np.int64)


def output_frames(mode: str, audio_frames: int, n_template: int) -> int:
    """The output's frame count ``F`` for audio of ``audio_frames`` (``L + 2``) frames."""
    if mode == "cut_off":
        return min(audio_frames, n_template)
    if mode == "silence":
        return max(audio_frames, n_template)
    return audio_frames


def samples_for_frames(frames: int) -> int:
    """The fewest 16 kHz samples whose audio gives ``frames`` output frames (``frame_count``).

    ``frame_count`` grows by 0 or 1 per 200 samples (one mel frame), so every count from 4 is met.
    """
    if frames < 4:
        raise ValueError(f"no audio gives {frames} frames (at least one window: 4 frames)")
    # near the inverse of L = int((T - 16) / 80 * 25) + 2, then walked to the exact (float) rule
    mel = defaults.WINDOW_MEL_FRAMES + (frames - 4) * defaults.MEL_FRAMES_PER_SECOND // defaults.FPS
    n = (mel - 1) * defaults.HOP_SAMPLES
    while frame_count(n) < frames:
        n += defaults.HOP_SAMPLES
    shortest = (defaults.WINDOW_MEL_FRAMES - 1) * defaults.HOP_SAMPLES  # one window's worth
    while n - defaults.HOP_SAMPLES >= shortest and frame_count(n - defaults.HOP_SAMPLES) >= frames:
        n -= defaults.HOP_SAMPLES
    return n


def audio_fit_samples(mode: str, n_samples: int, n_template: int) -> int:
    """The output audio's length in 16 kHz samples where ``mode`` changes it, else 0 (as given).

    ``cut_off`` cuts the audio to its video, ``F`` frames of 640 samples, whether or not frames were
    dropped (``L + 2`` frames end 27.5 to 80 ms before their audio): its sound ends with its last
    frame. ``silence`` pads audio that gives fewer than ``N`` frames with
    silence, to the shortest length that gives exactly ``N``; longer audio is kept as given.
    """
    audio_frames = frame_count(n_samples)
    if mode == "cut_off":
        return output_frames(mode, audio_frames, n_template) * SAMPLES_PER_FRAME
    if mode == "silence" and audio_frames < n_template:
        return samples_for_frames(n_template)
    return 0
