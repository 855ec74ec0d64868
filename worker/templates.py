"""Template frames prepared once and kept warm: decoded, converted and cropped.

For each template frame a render needs three things that do not depend on the audio: its I420
planes (the output frame starts as a copy of them), the BGR of the even-aligned region around its
rect (compositing writes there), and its bicubic crop (the UNet's input and the composite's ring).
The ping-pong walk revisits templates over and over, so they are prepared on first use and kept in
a bounded LRU cache per worker process: memory does not grow with the job's length.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from lipfarm.common.avatar import Avatar
from lipfarm.worker.roi import bicubic_crop
from lipfarm.worker.yuv import bgr_to_i420, even_bounds


@dataclass(frozen=True)
class PreparedTemplate:
    """One template frame, ready for rendering."""

    i420: np.ndarray  # [h * 3 / 2, w] uint8: the whole frame
    crop: np.ndarray  # [R + 8, R + 8, 3] uint8: bicubic crop of the rect
    region: np.ndarray  # [rh, rw, 3] uint8: BGR of the even-aligned neighbourhood of the rect
    origin: tuple[int, int]  # (x, y) of ``region`` in the frame
    rect: tuple[int, int, int, int]

    @property
    def nbytes(self) -> int:
        return self.i420.nbytes + self.crop.nbytes + self.region.nbytes


def prepare_template(frame: np.ndarray, rect: tuple[int, int, int, int], *, crop_side: int) -> PreparedTemplate:
    """Prepare a decoded BGR template frame for rendering."""
    x0, y0, x1, y1 = even_bounds(rect)
    crop = bicubic_crop(frame, rect, side=crop_side)
    return PreparedTemplate(bgr_to_i420(frame), crop, frame[y0:y1, x0:x1].copy(), (x0, y0), rect)


class TemplateCache:
    """A bounded, thread-safe LRU of prepared templates, keyed by avatar (folder and hash), crop side and
    index: a template is read from the files of the avatar asked for, never from a copy elsewhere."""

    def __init__(self, capacity_frames: int) -> None:
        self.capacity = capacity_frames
        self._items: OrderedDict[tuple, PreparedTemplate] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, avatar: Avatar, index: int, *, crop_side: int) -> PreparedTemplate:
        key = (str(avatar.root), avatar.content_hash, crop_side, index)
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item
        item = prepare_template(avatar.read_frame(index), avatar.rects[index], crop_side=crop_side)
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item


@functools.cache
def process_templates(capacity_frames: int) -> TemplateCache:
    """This process's template cache, kept for its life like its model sessions: a farm worker
    reuses templates across chunks, and so does a program that renders several times."""
    return TemplateCache(capacity_frames)
