"""The reference script's arithmetic, written out plainly, for tests to compare against.

These follow SyncTalk_2D's inference script (audio features and compositing) as docs/contract.md
describes it, with librosa and scipy doing what they do there.
"""

from __future__ import annotations

import cv2
import librosa
import numpy as np
from scipy import signal


def reference_mel(wav: np.ndarray) -> np.ndarray:
    """``[T_mel, 80]`` float32: lfilter pre-emphasis, librosa STFT, Slaney mel, dB, normalise."""
    stft = librosa.stft(y=signal.lfilter([1, -0.97], [1], wav), n_fft=800, hop_length=200, win_length=800)
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(np.exp(-5 * np.log(10)), np.dot(basis, np.abs(stft)))) - 20
    return np.clip((2 * 4.0) * ((db - -100) / (--100)) - 4.0, -4.0, 4.0).T.astype(np.float32)  # noqa: B002 (verbatim)


def reference_windows(mel: np.ndarray) -> np.ndarray:
    """``[L, 1, 80, 16]``: the AudDataset crop of each encoder window."""
    count = int((mel.shape[0] - 16) / 80.0 * float(25)) + 2
    windows = []
    for k in range(count):
        start = int(80.0 * (k / float(25)))
        end = start + 16
        if end > mel.shape[0]:
            end = mel.shape[0]
            start = end - 16
        windows.append(mel[start:end].T[None])
    return np.stack(windows)


def reference_audio_inputs(embeddings: np.ndarray) -> np.ndarray:
    """``[L + 2, 32, 16, 16]``: first/last row padding, zero-padded 16-row windows, reshaped."""
    feats = np.concatenate([embeddings[:1], embeddings, embeddings[-1:]])
    out = []
    for index in range(feats.shape[0]):
        left, right = index - 8, index + 8
        pad_left = max(0, -left)
        pad_right = max(0, right - feats.shape[0])
        rows = feats[max(0, left):min(right, feats.shape[0])]
        rows = np.concatenate([np.zeros((pad_left, rows.shape[1]), np.float32), rows,
                               np.zeros((pad_right, rows.shape[1]), np.float32)])
        out.append(rows.reshape(32, 16, 16))
    return np.stack(out)


def reference_composite(frame: np.ndarray, rect, generated: np.ndarray, roi: int = 320) -> np.ndarray:
    """The reference's compositing of one generated ``[3, R, R]`` into a BGR frame (a new array)."""
    img = frame.copy()
    x1, y1, x2, y2 = rect
    crop = img[y1:y2, x1:x2]
    h, w = crop.shape[:2]
    side = roi + 8
    crop = cv2.resize(crop, (side, side), interpolation=cv2.INTER_CUBIC)
    crop_ori = crop.copy()
    pred = generated.transpose(1, 2, 0) * 255
    crop_ori[4:roi + 4, 4:roi + 4] = np.array(pred, dtype=np.uint8)
    img[y1:y2, x1:x2] = cv2.resize(crop_ori, (w, h), interpolation=cv2.INTER_CUBIC)
    return img


def reference_visual_input(frame: np.ndarray, rect, roi: int = 320) -> np.ndarray:
    """The reference's ``[6, R, R]`` float32 input: ROI / 255 and the masked ROI / 255."""
    x1, y1, x2, y2 = rect
    side = roi + 8
    crop = cv2.resize(frame[y1:y2, x1:x2], (side, side), interpolation=cv2.INTER_CUBIC)
    real = crop[4:roi + 4, 4:roi + 4].copy()
    masked = cv2.rectangle(real.copy(), (5, 5, roi - 10, roi - 15), (0, 0, 0), -1)
    both = np.concatenate([real.transpose(2, 0, 1).astype(np.float32) / 255.0,
                           masked.transpose(2, 0, 1).astype(np.float32) / 255.0])
    return both.astype(np.float32)


def reference_pingpong(count: int, n_templates: int) -> list[int]:
    """The reference loop's template index for output frames 0 .. count-1."""
    out, index, step = [], 0, 0
    last = n_templates - 1
    for _ in range(count):
        if index > last - 1:
            step = -1
        if index < 1:
            step = 1
        index += step
        out.append(index)
    return out
