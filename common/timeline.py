"""The audio timeline in integers: samples -> mel frames -> encoder windows -> video frames.

Kept apart from the audio and feature kernels so that planning (``common.plan``) is arithmetic
alone and imports no audio stack. The rules are the reference's (docs/contract.md §1).
"""

from __future__ import annotations

from lipfarm.common import defaults


def mel_frame_count(n_samples: int) -> int:
    """Mel frames of ``n_samples`` of 16 kHz audio: ``1 + n_samples // 200``."""
    return 1 + n_samples // defaults.HOP_SAMPLES


def window_count(n_mel_frames: int) -> int:
    """Encoder windows ``L`` of a track of ``n_mel_frames`` (the reference's float arithmetic)."""
    if n_mel_frames < defaults.WINDOW_MEL_FRAMES:
        raise ValueError(f"{n_mel_frames} mel frames is fewer than one window")
    span = (n_mel_frames - defaults.WINDOW_MEL_FRAMES) / float(defaults.MEL_FRAMES_PER_SECOND)
    return int(span * float(defaults.FPS)) + 2


def frame_count(n_samples: int) -> int:
    """Output video frames of ``n_samples`` of 16 kHz audio: ``L + 2``."""
    return window_count(mel_frame_count(n_samples)) + 2
