"""Per-frame audio inputs of the UNet, for any range of output frames.

The rules (docs/contract.md §1): ``L = int((T_mel - 16) / 80 * 25) + 2`` encoder windows; window
``k`` covers mel frames ``[floor(80 k / 25), +16)``, moved back to end at ``T_mel`` if it would run
past it; the ``[L, 512]`` embeddings get their first row prepended and last row appended; output frame
``i`` reads padded rows ``i-8 .. i+7`` (zeros outside), reshaped ``[16, 512] -> [32, 16, 16]``.

``audio_inputs`` computes exactly the windows, and exactly the mel frames, that a frame range needs
(plus batch alignment), so a chunk reads only its stretch of audio and still gets the numbers a
whole-track computation gives: mel frames come in aligned blocks (see ``common.mel``) and encoder
windows run in batches aligned to multiples of 64, the reference's batches.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from common import defaults
from common.audio import PcmSource
from common.mel import mel_frame_count, mel_spectrogram

# encode(windows [B, 1, 80, 16] float32) -> embeddings [B, 512] float32
Encoder = Callable[[np.ndarray], np.ndarray]


def window_count(n_mel_frames: int) -> int:
    """Encoder windows ``L`` of a track of ``n_mel_frames`` (the reference's float arithmetic)."""
    if n_mel_frames < defaults.WINDOW_MEL_FRAMES:
        raise ValueError(f"{n_mel_frames} mel frames is fewer than one window")
    span = (n_mel_frames - defaults.WINDOW_MEL_FRAMES) / float(defaults.MEL_FRAMES_PER_SECOND)
    return int(span * float(defaults.FPS)) + 2


def frame_count(n_samples: int) -> int:
    """Output video frames of ``n_samples`` of 16 kHz audio: ``L + 2``."""
    return window_count(mel_frame_count(n_samples)) + 2


def window_start(k: int, n_mel_frames: int) -> int:
    """First mel frame of encoder window ``k``."""
    start = defaults.MEL_FRAMES_PER_SECOND * k // defaults.FPS
    return min(start, n_mel_frames - defaults.WINDOW_MEL_FRAMES)


def _window_of_row(rows: np.ndarray, n_windows: int) -> np.ndarray:
    """Encoder window behind each padded feature row (row 0 and row L+1 repeat the ends)."""
    return np.clip(rows - 1, 0, n_windows - 1)


def embeddings(pcm: PcmSource, encode: Encoder, *, first: int, stop: int) -> np.ndarray:
    """Encoder outputs of windows ``[first, stop)``, float32 ``[stop - first, 512]``.

    Runs the encoder on the aligned 64-window batches that cover the range.
    """
    n_mel = mel_frame_count(pcm.n_samples)
    n_windows = window_count(n_mel)
    batch = defaults.ENCODER_BATCH_WINDOWS
    k0 = first // batch * batch
    k1 = min(n_windows, -(-stop // batch) * batch)
    m0 = window_start(k0, n_mel)
    mel = mel_spectrogram(pcm, start=m0, stop=window_start(k1 - 1, n_mel) + defaults.WINDOW_MEL_FRAMES)
    width = defaults.WINDOW_MEL_FRAMES
    outputs = []
    for b0 in range(k0, k1, batch):
        starts = [window_start(k, n_mel) - m0 for k in range(b0, min(b0 + batch, k1))]
        windows = np.stack([mel[s:s + width].T for s in starts])[:, None]  # [B, 1, 80, 16]
        outputs.append(np.asarray(encode(np.ascontiguousarray(windows)), dtype=np.float32))
    joined = np.concatenate(outputs)
    return joined[first - k0:stop - k0]


def audio_inputs(pcm: PcmSource, encode: Encoder, *, start: int, stop: int) -> np.ndarray:
    """UNet audio inputs of output frames ``[start, stop)``: float32 ``[stop - start, 32, 16, 16]``.

    Equal to the same frames computed over the whole track. Raises ``ValueError`` for a range
    outside ``[0, frame_count)``.
    """
    n_windows = window_count(mel_frame_count(pcm.n_samples))
    n_rows = n_windows + 2
    if not 0 <= start < stop <= n_rows:
        raise ValueError(f"frame range [{start}, {stop}) is outside [0, {n_rows})")
    context = defaults.FEATURE_CONTEXT_FRAMES
    row_lo, row_hi = max(0, start - context), min(n_rows, stop + context - 1)
    windows = _window_of_row(np.arange(row_lo, row_hi), n_windows)
    emb = embeddings(pcm, encode, first=int(windows[0]), stop=int(windows[-1]) + 1)
    # One table of the rows this range touches, with a zero row last for rows outside the track.
    table = np.concatenate([emb[windows - windows[0]],
                            np.zeros((1, emb.shape[1]), np.float32)])
    rows = np.arange(start, stop)[:, None] + np.arange(-context, context)[None, :]
    inside = (rows >= 0) & (rows < n_rows)
    index = np.where(inside, rows - row_lo, table.shape[0] - 1)
    return table[index].reshape(stop - start, *defaults.AUDIO_INPUT_SHAPE)
