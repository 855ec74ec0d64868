"""The UNet's visual input, built from a template frame (docs/contract.md §3).

Crop the rect, resize it to ``R + 8`` square with bicubic interpolation, take the inner ``R x R``:
that is the ROI (channels 0-2, BGR / 255). The masked copy (channels 3-5) has OpenCV's rectangle
``(5, 5, R - 10, R - 15)`` (x, y, w, h) filled black, leaving a thin border of real pixels.

Pre-rendered ``rois_320/`` and ``model_inputs/`` of some packages are not needed: the crop is cached
per template frame (see ``worker.templates``) and the float input is written into a reused batch
buffer here.
"""

from __future__ import annotations

import cv2
import numpy as np

from lipfarm.common import defaults


def crop_side(roi_px: int) -> int:
    """Side of the bicubic crop a ROI of ``roi_px`` is cut from (328 for 320)."""
    return roi_px + 2 * defaults.ROI_RING_PX


def mask_slices(roi_px: int) -> tuple[slice, slice]:
    """Rows and columns that ``cv2.rectangle(roi, (5, 5, R - 10, R - 15), 0, -1)`` fills."""
    origin = defaults.MASK_ORIGIN_PX
    width, height = roi_px - 10, roi_px - 15
    return slice(origin, origin + height), slice(origin, origin + width)


def bicubic_crop(frame: np.ndarray, rect: tuple[int, int, int, int], *, side: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """The rect of a BGR frame resized to ``side x side`` (bicubic): uint8 ``[side, side, 3]``."""
    x1, y1, x2, y2 = rect
    return cv2.resize(frame[y1:y2, x1:x2], (side, side), dst=out, interpolation=cv2.INTER_CUBIC)


def fill_visual_input(crop: np.ndarray, *, roi_px: int, out: np.ndarray) -> np.ndarray:
    """Write one frame's UNet visual input into ``out`` (float32 ``[6, R, R]``) and return it.

    ``crop`` is the uint8 ``[R + 8, R + 8, 3]`` bicubic crop. Pixels are divided by 255 in float32,
    as the reference divides its float32 image; the masked copy writes only the thin border.
    """
    ring = defaults.ROI_RING_PX
    roi = crop[ring:ring + roi_px, ring:ring + roi_px]
    for channel, plane in enumerate(cv2.split(roi)):
        np.divide(plane, np.float32(255), out=out[channel], dtype=np.float32)
    rows, cols = mask_slices(roi_px)
    real, masked = out[:3], out[3:]
    masked[:, :rows.start] = real[:, :rows.start]
    masked[:, rows.stop:] = real[:, rows.stop:]
    masked[:, rows, :cols.start] = real[:, rows, :cols.start]
    masked[:, rows, cols.stop:] = real[:, rows, cols.stop:]
    masked[:, rows, cols] = 0.0
    return out
