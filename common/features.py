"""Per-frame audio inputs of the UNet, for any range of output frames.

The rules (docs/contract.md §1): ``L = int((T_mel - 16) / 80 * 25) + 2`` encoder windows; window
``k`` covers mel frames ``[floor(80 k / 25), +16)``, moved back to end at ``T_mel`` if it would run
past it; the ``[L, 512]`` embeddings get their first row prepended and last row appended; output frame
``i`` reads padded rows ``i-8 .. i+7`` (zeros outside), reshaped ``[16, 512] -> [32, 16, 16]``.

``audio_inputs`` computes exactly the windows, and exactly the mel frames, that a frame range needs
(plus batch alignment), so a chunk reads only its stretch of audio and still gets the numbers a
whole-track computation gives: mel frames come in aligned blocks (see ``common.mel``) and encoder
windows run in batches aligned to multiples of 64, the reference's batches. ``AudioFeatures``
computes those blocks and batches as a render's UNet batches first reach them, so inference can
start once the first batch of windows is encoded instead of the whole chunk's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lipfarm.common import defaults
from lipfarm.common.audio import PcmSource
from lipfarm.common.mel import mel_block
from lipfarm.common.timeline import mel_frame_count, window_count

# encode(windows [B, 1, 80, 16] float32) -> embeddings [B, 512] float32
Encoder = Callable[[np.ndarray], np.ndarray]


def window_start(k: int, n_mel_frames: int) -> int:
    """First mel frame of encoder window ``k``."""
    start = defaults.MEL_FRAMES_PER_SECOND * k // defaults.FPS
    return min(start, n_mel_frames - defaults.WINDOW_MEL_FRAMES)


def _window_of_row(rows: np.ndarray, n_windows: int) -> np.ndarray:
    """Encoder window behind each padded feature row (row 0 and row L+1 repeat the ends)."""
    return np.clip(rows - 1, 0, n_windows - 1)


class AudioFeatures:
    """The UNet audio inputs of a track, served for frame ranges as they are asked for.

    Encoder windows are computed in the aligned 64-window batches that ``audio_inputs`` uses, and
    mel frames in aligned blocks (``common.mel``), each kept once computed, so any range's inputs are
    bit-identical to the same frames of ``audio_inputs`` over the whole track. A render asks for its
    batches in order: its first batch needs only the first block or two, and each later block is
    computed when a batch first reaches it. Blocks wholly behind the range last asked for are let go
    (a request going back recomputes them, with the same numbers), so memory stays a few blocks.
    """

    def __init__(self, pcm: PcmSource, encode: Encoder) -> None:
        self.pcm, self.encode = pcm, encode
        self.n_mel = mel_frame_count(pcm.n_samples)
        self.n_windows = window_count(self.n_mel)
        self.n_frames = self.n_windows + 2
        self._mel: dict[int, np.ndarray] = {}  # mel block index -> [<= 256, 80]
        self._emb: dict[int, np.ndarray] = {}  # encoder batch index -> [<= 64, 512]
        self.encoded_batches = 0  # encoder calls so far

    def _mel_frames(self, start: int, stop: int) -> np.ndarray:
        size = defaults.MEL_BLOCK_FRAMES
        blocks = range(start // size, (stop - 1) // size + 1)
        for b in blocks:
            if b not in self._mel:
                self._mel[b] = mel_block(self.pcm, b, self.n_mel)
        joined = self._mel[blocks[0]] if len(blocks) == 1 else np.concatenate([self._mel[b] for b in blocks])
        offset = blocks[0] * size
        return joined[start - offset:stop - offset]

    def _batch(self, b: int) -> np.ndarray:
        """Encoder outputs of windows ``[64 b, 64 (b + 1))`` (fewer at the end), encoded together."""
        emb = self._emb.get(b)
        if emb is None:
            size, width = defaults.ENCODER_BATCH_WINDOWS, defaults.WINDOW_MEL_FRAMES
            k0, k1 = b * size, min(self.n_windows, (b + 1) * size)
            m0 = window_start(k0, self.n_mel)
            mel = self._mel_frames(m0, window_start(k1 - 1, self.n_mel) + width)
            starts = [window_start(k, self.n_mel) - m0 for k in range(k0, k1)]
            windows = np.stack([mel[s:s + width].T for s in starts])[:, None]  # [B, 1, 80, 16]
            emb = np.asarray(self.encode(np.ascontiguousarray(windows)), dtype=np.float32)
            self._emb[b] = emb
            self.encoded_batches += 1
        return emb

    def embeddings(self, first: int, stop: int) -> np.ndarray:
        """Encoder outputs of windows ``[first, stop)``, float32 ``[stop - first, 512]``."""
        if not 0 <= first < stop <= self.n_windows:
            raise ValueError(f"window range [{first}, {stop}) is outside [0, {self.n_windows})")
        size = defaults.ENCODER_BATCH_WINDOWS
        batches = range(first // size, (stop - 1) // size + 1)
        parts = [self._batch(b) for b in batches]
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
        offset = batches[0] * size
        return joined[first - offset:stop - offset]

    def _release_before(self, first_window: int) -> None:
        """Let go of encoder batches, and mel blocks, that only windows before ``first_window`` need."""
        keep = first_window // defaults.ENCODER_BATCH_WINDOWS
        for b in [b for b in self._emb if b < keep]:
            del self._emb[b]
        mel_keep = window_start(keep * defaults.ENCODER_BATCH_WINDOWS, self.n_mel) // defaults.MEL_BLOCK_FRAMES
        for b in [b for b in self._mel if b < mel_keep]:
            del self._mel[b]

    def __call__(self, start: int, stop: int) -> np.ndarray:
        """UNet audio inputs of output frames ``[start, stop)``: float32 ``[stop - start, 32, 16, 16]``,
        equal to the same frames of ``audio_inputs`` over the whole track. Raises ``ValueError`` for
        a range outside ``[0, frame_count)``."""
        n_rows = self.n_frames
        if not 0 <= start < stop <= n_rows:
            raise ValueError(f"frame range [{start}, {stop}) is outside [0, {n_rows})")
        context = defaults.FEATURE_CONTEXT_FRAMES
        row_lo, row_hi = max(0, start - context), min(n_rows, stop + context - 1)
        windows = _window_of_row(np.arange(row_lo, row_hi), self.n_windows)
        self._release_before(int(windows[0]))
        emb = self.embeddings(int(windows[0]), int(windows[-1]) + 1)
        # One table of the rows this range touches, with a zero row last for rows outside the track.
        table = np.concatenate([emb[windows - windows[0]], np.zeros((1, emb.shape[1]), np.float32)])
        rows = np.arange(start, stop)[:, None] + np.arange(-context, context)[None, :]
        inside = (rows >= 0) & (rows < n_rows)
        index = np.where(inside, rows - row_lo, table.shape[0] - 1)
        return table[index].reshape(stop - start, *defaults.AUDIO_INPUT_SHAPE)


def embeddings(pcm: PcmSource, encode: Encoder, *, first: int, stop: int) -> np.ndarray:
    """Encoder outputs of windows ``[first, stop)``, float32 ``[stop - first, 512]``.

    Runs the encoder on the aligned 64-window batches that cover the range.
    """
    return AudioFeatures(pcm, encode).embeddings(first, stop)


def audio_inputs(pcm: PcmSource, encode: Encoder, *, start: int, stop: int) -> np.ndarray:
    """UNet audio inputs of output frames ``[start, stop)``: float32 ``[stop - start, 32, 16, 16]``.

    Equal to the same frames computed over the whole track. Raises ``ValueError`` for a range
    outside ``[0, frame_count)``. (``AudioFeatures`` serves the same numbers range by range.)
    """
    return AudioFeatures(pcm, encode)(start, stop)
