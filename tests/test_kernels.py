"""The numeric kernels: ROI and mask inputs, compositing geometry, the YUV conversion."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from lipfarm.worker.compose import generated_to_crop, paste_into_region
from lipfarm.worker.roi import crop_side, fill_visual_input, mask_slices
from lipfarm.worker.templates import prepare_template
from lipfarm.worker.yuv import bgr_to_i420, bgr_to_i420_planes, even_bounds, i420_planes, write_region
from tests.reference import reference_composite, reference_visual_input

RNG = np.random.default_rng(12)


def _frame(width=1280, height=720):
    base = RNG.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("roi", [320, 160])
def test_mask_is_opencvs_rectangle(roi):
    canvas = np.full((roi, roi), 255, np.uint8)
    cv2.rectangle(canvas, (5, 5, roi - 10, roi - 15), 0, -1)
    mine = np.full((roi, roi), 255, np.uint8)
    rows, cols = mask_slices(roi)
    mine[rows, cols] = 0
    np.testing.assert_array_equal(mine, canvas)


@pytest.mark.parametrize("roi, rect", [(320, (532, 210, 714, 392)), (320, (101, 33, 400, 332)),
                                       (160, (600, 300, 777, 477))])
def test_visual_input_equals_the_reference(roi, rect):
    frame = _frame()
    template = prepare_template(frame, rect, crop_side=crop_side(roi))
    out = np.full((6, roi, roi), np.nan, np.float32)
    fill_visual_input(template.crop, roi_px=roi, out=out)
    np.testing.assert_array_equal(out, reference_visual_input(frame, rect, roi))


def _composite(frame, rect, generated, roi):
    """Our compositing, assembled into a whole BGR frame."""
    template = prepare_template(frame, rect, crop_side=crop_side(roi))
    side = crop_side(roi)
    crop = np.empty((side, side, 3), np.uint8)
    generated_to_crop(generated, template.crop, out=crop,
                      scratch=(np.empty((3, roi, roi), np.float32), np.empty((3, roi, roi), np.uint8)))
    region = np.empty_like(template.region)
    paste_into_region(crop, rect, template.region, template.origin, out=region)
    whole = frame.copy()
    x0, y0 = template.origin
    whole[y0:y0 + region.shape[0], x0:x0 + region.shape[1]] = region
    return whole, crop, template


@pytest.mark.parametrize("roi, rect", [(320, (532, 210, 714, 392)), (320, (533, 211, 715, 393)),
                                       (320, (0, 0, 300, 300)), (320, (980, 420, 1280, 720)),
                                       (160, (10, 500, 190, 680))])
def test_compositing_equals_the_reference(roi, rect):
    frame = _frame()
    generated = RNG.random((3, roi, roi), dtype=np.float32)
    ours, crop, template = _composite(frame, rect, generated, roi)
    np.testing.assert_array_equal(ours, reference_composite(frame, rect, generated, roi))
    x1, y1, x2, y2 = rect
    outside = np.ones(frame.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(ours[outside], frame[outside])  # nothing outside the rect moves
    ring = np.ones(crop.shape[:2], bool)
    ring[4:roi + 4, 4:roi + 4] = False
    np.testing.assert_array_equal(crop[ring], template.crop[ring])  # the ring is the original crop's
    assert np.array_equal(crop[4:roi + 4, 4:roi + 4],
                          (generated.transpose(1, 2, 0) * np.float32(255)).astype(np.uint8))


def test_generated_pixels_truncate():
    roi = 32
    generated = np.full((3, roi, roi), 0.999, np.float32)
    generated[0] = 0.0019  # * 255 = 0.48 -> 0
    crop = np.zeros((roi + 8, roi + 8, 3), np.uint8)
    out = np.empty_like(crop)
    generated_to_crop(generated, crop, out=out,
                      scratch=(np.empty((3, roi, roi), np.float32), np.empty((3, roi, roi), np.uint8)))
    assert out[4, 4].tolist() == [0, 254, 254]


def test_yuv_colours_are_bt709_limited_range():
    expected = {(255, 255, 255): (235, 128, 128), (0, 0, 0): (16, 128, 128),
                (0, 0, 255): (63, 102, 240), (0, 255, 0): (173, 42, 26), (255, 0, 0): (32, 240, 118)}
    for bgr, yuv in expected.items():
        y, u, v = bgr_to_i420_planes(np.full((2, 2, 3), bgr, np.uint8))
        assert (y[0, 0], u[0, 0], v[0, 0]) == yuv


def test_region_conversion_equals_whole_frame_conversion():
    frame = _frame()
    whole = bgr_to_i420(frame)
    for x1, y1, side in itertools.product((0, 1, 531, 532, 1000), (0, 1, 209, 210, 500), (2, 3, 181, 182)):
        x2, y2 = min(1280, x1 + side), min(720, y1 + side)
        ex1, ey1, ex2, ey2 = even_bounds((x1, y1, x2, y2))
        assert ex1 <= x1 and ey1 <= y1 and ex2 >= x2 and ey2 >= y2 and ex2 <= 1280 and ey2 <= 720
        target = np.zeros_like(whole)
        write_region(i420_planes(target, 1280, 720), frame[ey1:ey2, ex1:ex2], (ex1, ey1))
        for mine, full in zip(i420_planes(target, 1280, 720), i420_planes(whole, 1280, 720)):
            scale = 1 if mine.shape == (720, 1280) else 2
            box = (slice(ey1 // scale, ey2 // scale), slice(ex1 // scale, ex2 // scale))
            np.testing.assert_array_equal(mine[box], full[box])


def test_yuv_needs_even_sizes():
    with pytest.raises(ValueError):
        bgr_to_i420_planes(np.zeros((3, 4, 3), np.uint8))
