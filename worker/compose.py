"""Compositing the generated ROI back into the frame (docs/contract.md §4).

1. The generated ``[3, R, R]`` in (0, 1) becomes pixels as ``uint8(out * 255)`` (float32, truncation).
2. It is written into a copy of the frame's bicubic crop at ``[4:R+4, 4:R+4]``; the outer 4-px ring
   keeps the crop's pixels.
3. The crop is resized back to the rect's size (bicubic) and hard-pasted at the rect.

Step 3 writes into a BGR copy of the even-aligned region around the rect rather than into a whole
frame: the YUV conversion (``worker.yuv``) then converts only that region. Every buffer is passed in
by the caller and reused from frame to frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from lipfarm.common import defaults


def generated_to_crop(generated: np.ndarray, crop: np.ndarray, *, out: np.ndarray,
                      scratch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``out`` = ``crop`` with ``uint8(generated * 255)`` in its centre; returns ``out``.

    ``generated``: float32 ``[3, R, R]``; ``crop``, ``out``: uint8 ``[R + 8, R + 8, 3]``;
    ``scratch``: a float32 and a uint8 array, both ``[3, R, R]``.
    """
    roi = generated.shape[1]
    ring = defaults.ROI_RING_PX
    as_float, as_bytes = scratch
    np.multiply(generated, np.float32(255), out=as_float)
    np.copyto(as_bytes, as_float, casting="unsafe")  # truncates toward zero, as uint8() does
    out[:] = crop
    cv2.merge(list(as_bytes), dst=out[ring:ring + roi, ring:ring + roi])
    return out


def paste_into_region(composite_crop: np.ndarray, rect: tuple[int, int, int, int],
                      region: np.ndarray, origin: tuple[int, int], *, out: np.ndarray) -> np.ndarray:
    """``out`` = ``region`` (BGR at ``origin``) with the crop resized to ``rect`` pasted in.

    The region is the even-aligned neighbourhood of ``rect`` in the template frame; pixels of it
    outside the rect keep the template's values.
    """
    x1, y1, x2, y2 = rect
    ox, oy = origin
    out[:] = region
    target = out[y1 - oy:y2 - oy, x1 - ox:x2 - ox]
    cv2.resize(composite_crop, (x2 - x1, y2 - y1), dst=target, interpolation=cv2.INTER_CUBIC)
    return out
