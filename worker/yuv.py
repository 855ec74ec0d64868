"""BGR to I420 (YUV 4:2:0 planar), BT.709 limited range.

The encoder takes YUV, and converting a whole 1280x720 frame per output frame would cost more than
the compositing itself. This conversion is local: Y depends on one pixel and each U/V sample on one
aligned 2x2 block (``cv2.transform`` applies the matrix per pixel and rounds). So a template frame
is converted once, and each output frame converts only the even-aligned region around its crop
rect, written over a copy of the template's planes: exactly the conversion of the whole composited
frame.

Why not OpenCV's ``COLOR_BGR2YUV_I420``: it produces full-range BT.601, while H.264 players assume
limited range (and BT.709 for HD) unless told otherwise; we write limited-range BT.709 and tag the
stream so.
"""

from __future__ import annotations

import cv2
import numpy as np

_KR, _KB = 0.2126, 0.0722
_KG = 1.0 - _KR - _KB
# Rows map (B, G, R, 1) to limited-range Y, and the sum of a 2x2 block to Cb, Cr.
_Y_MATRIX = np.array([[_KB * 219 / 255, _KG * 219 / 255, _KR * 219 / 255, 16.0]])
_CB = np.array([1 - _KB, -_KG, -_KR]) * 224 / 255 / (2 * (1 - _KB))
_CR = np.array([-_KB, -_KG, 1 - _KR]) * 224 / 255 / (2 * (1 - _KR))
_UV_MATRIX = np.array([[*(_CB / 4), 128.0], [*(_CR / 4), 128.0]])


def i420_size(width: int, height: int) -> tuple[int, int]:
    """Shape ``(rows, width)`` of an I420 image stored as one array, as OpenCV and PyAV use."""
    return height * 3 // 2, width


def bgr_to_i420_planes(bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y ``[h, w]``, U and V ``[h/2, w/2]`` uint8 of an even-sized BGR uint8 image ``[h, w, 3]``.

    Each U/V sample converts the exact sum of its 2x2 block and is rounded once.
    """
    height, width = bgr.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"I420 needs even sides, got {width}x{height}")
    y = cv2.transform(bgr, _Y_MATRIX).reshape(height, width)
    sums = bgr[0::2, 0::2].astype(np.uint16)
    sums += bgr[1::2, 0::2]
    sums += bgr[0::2, 1::2]
    sums += bgr[1::2, 1::2]
    uv = cv2.transform(sums, _UV_MATRIX)
    return y, uv[..., 0].astype(np.uint8), uv[..., 1].astype(np.uint8)


def bgr_to_i420(bgr: np.ndarray) -> np.ndarray:
    """A whole even-sized BGR frame as one I420 array ``[h * 3 / 2, w]``."""
    height, width = bgr.shape[:2]
    y, u, v = bgr_to_i420_planes(bgr)
    out = np.empty(i420_size(width, height), np.uint8)
    out[:height] = y
    chroma = out[height:].reshape(-1)
    chroma[:u.size] = u.reshape(-1)
    chroma[u.size:] = v.reshape(-1)
    return out


def i420_planes(i420: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y, U and V planes of an I420 array."""
    quarter = (height // 2) * (width // 2)
    chroma = i420[height:].reshape(-1)
    return (i420[:height], chroma[:quarter].reshape(height // 2, width // 2),
            chroma[quarter:].reshape(height // 2, width // 2))


def even_bounds(rect: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The smallest region with even corners that contains ``rect``: the 2x2 blocks it touches."""
    x1, y1, x2, y2 = rect
    return x1 & ~1, y1 & ~1, (x2 + 1) & ~1, (y2 + 1) & ~1


def write_region(planes: tuple[np.ndarray, np.ndarray, np.ndarray], region_bgr: np.ndarray,
                 origin: tuple[int, int]) -> None:
    """Convert an even-aligned BGR region and write it into I420 ``planes`` at ``origin`` (x, y)."""
    x0, y0 = origin
    if x0 % 2 or y0 % 2:
        raise ValueError(f"region origin must be even, got {origin}")
    ry, ru, rv = bgr_to_i420_planes(region_bgr)
    y, u, v = planes
    h, w = ry.shape
    y[y0:y0 + h, x0:x0 + w] = ry
    u[y0 // 2:(y0 + h) // 2, x0 // 2:(x0 + w) // 2] = ru
    v[y0 // 2:(y0 + h) // 2, x0 // 2:(x0 + w) // 2] = rv
