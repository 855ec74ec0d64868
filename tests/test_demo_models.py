"""The demo generator's designed behaviour: the face passes through, the mouth opens with loudness."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from lipfarm.demo.models import MOUTH_CENTER, logit_fit, mouth_template
from tests.reference import reference_visual_input


def _bf16(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, np.float32).copy().view(np.uint32)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).view(np.float32)


def test_the_logit_fit_returns_every_uint8_level_even_in_bf16():
    fit = logit_fit()
    levels = np.arange(256) / 255.0
    as_pixels = lambda z: (1 / (1 + np.exp(-z.astype(np.float32))) * np.float32(255)).astype(np.uint8)  # noqa: E731
    assert np.array_equal(as_pixels(fit(levels)), np.arange(256))
    rounded = (fit.offset + fit.linear * _bf16(levels)
               + _bf16(np.maximum(_bf16(fit.left)[None] - _bf16(levels)[:, None], 0)) @ _bf16(fit.left_slopes)
               + _bf16(np.maximum(_bf16(levels)[:, None] - _bf16(fit.right)[None], 0)) @ _bf16(fit.right_slopes))
    assert np.abs(as_pixels(rounded).astype(int) - np.arange(256)).max() <= 1


@pytest.fixture(scope="module")
def generator(demo):
    return ort.InferenceSession(str(demo.generator), providers=["CPUExecutionProvider"])


def _frames(demo_avatar):
    return [(demo_avatar.read_frame(i), demo_avatar.rects[i]) for i in (0, 40, 90)]


def _audio(loudness: float) -> np.ndarray:
    audio = np.zeros((1, 32, 16, 16), np.float32)
    for channel in (12, 14, 16):
        audio[0, channel] = mouth_template() * loudness
    return audio


def _generate(generator, frame, rect, loudness):
    visual = reference_visual_input(frame, rect)[None]
    (out,) = generator.run(None, {"input": visual, "audio": _audio(loudness)})
    roi = (visual[0, :3].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return (out[0].transpose(1, 2, 0) * np.float32(255)).astype(np.uint8), roi


def test_in_silence_the_generated_roi_is_the_input_roi(generator, demo_avatar):
    for frame, rect in _frames(demo_avatar):
        generated, roi = _generate(generator, frame, rect, 0.0)
        assert np.array_equal(generated, roi)


def test_loudness_opens_the_mouth_and_nothing_else(generator, demo_avatar):
    cx, cy = int(MOUTH_CENTER[0] * 320), int(MOUTH_CENTER[1] * 320)
    for frame, rect in _frames(demo_avatar):
        changed = {}
        for loudness in (0.5, 0.8, 1.0):
            generated, roi = _generate(generator, frame, rect, loudness)
            diff = np.abs(generated.astype(int) - roi).max(axis=2) > 10
            ys, xs = np.nonzero(diff)
            changed[loudness] = diff.sum()
            if diff.any():
                assert abs(xs.mean() - cx) < 20 and abs(ys.mean() - cy) < 40  # around the mouth
                assert xs.min() > 60 and xs.max() < 260 and ys.min() > 60 and ys.max() < 220
        assert changed[0.5] == 0 < changed[0.8] < changed[1.0]  # closed below the threshold, then wider
