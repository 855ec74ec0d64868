"""A drawn demo avatar: a 1280x720 talking-head template with 110 landmarks that follow it.

The face is defined once as 110 canonical landmarks in the SyncTalk_2D layout (jaw 0-32, brows
33-50, nose 51-65, eyes 66-89, outer lips 90-101, inner lips 102-109), in units of half the face
width with the nose bridge (point 52) at the origin. Each frame moves the head by a small
similarity transform (sway, nod, tilt, breathing scale) and draws every shape from the moved
points, so the landmarks follow the drawing exactly. The mouth is drawn closed: opening it is the
generator's job. The result is written in the SyncTalk_2D dataset layout, which users have too.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 1280, 720
FRAMES = 125  # 5 s at 25 fps
FACE_HALF_WIDTH_PX = 96.0
NOSE_BRIDGE_PX = (640.0, 300.0)
_SHIFT = 4  # sub-pixel drawing: coordinates in 1/16 px
_SKIN = (120, 160, 215)
_LIPS = (105, 100, 185)


def _arc(x0, x1, y, bulge, n, power=1.0):
    t = np.linspace(0.0, 1.0, n)
    return np.c_[x0 + (x1 - x0) * t, y - bulge * np.sin(np.pi * t) ** power]


def _eye(cx: float, outer_sign: float, openness: float) -> np.ndarray:
    """Eye contour (8 points from the outer corner, over the top, then below) and 4 iris points."""
    a = np.linspace(0.0, 2 * np.pi, 9)[:-1]
    contour = np.c_[cx + outer_sign * 0.17 * np.cos(a), -0.25 - 0.065 * openness * np.sin(a)]
    iris = np.c_[cx + np.array([0.0, -0.01, -0.05, 0.05]), np.full(4, -0.25)]
    return np.concatenate([contour, iris])


def canonical_landmarks(blink: float = 0.0) -> np.ndarray:
    """The 110 canonical points ``[110, 2]`` (x right, y down); ``blink`` in [0, 1] closes the eyes."""
    a = np.pi * np.arange(33) / 32
    jaw = np.c_[-np.cos(a), -0.3 + 1.75 * np.sin(a) ** 1.3]
    brow_left = np.concatenate([_arc(-0.85, -0.3, -0.45, 0.13, 5), _arc(-0.32, -0.74, -0.36, 0.1, 6)[1:5]])
    brow_right = brow_left * [-1, 1]
    nose = np.array([[0, 0.17], [0, 0], [0, -0.17], [0, -0.34], [-0.2, -0.27], [-0.2, 0.11],
                     [-0.28, 0.26], [-0.22, 0.36], [-0.14, 0.31], [0, 0.37], [0.14, 0.31],
                     [0.22, 0.36], [0.28, 0.26], [0.2, 0.11], [0.2, -0.27]])
    openness = 1.0 - blink
    eyes = np.concatenate([_eye(-0.52, -1, openness), _eye(0.52, 1, openness)])
    t = np.linspace(np.pi, -np.pi, 13)[:-1]  # outer lips from the left corner, over the top
    outer = np.c_[0.34 * np.cos(t), 0.77 - 0.17 * np.sin(t) * np.where(np.sin(t) > 0, 0.75, 1.15)]
    outer[3, 1] += 0.03  # the dip of the cupid's bow
    inner_top = np.c_[np.linspace(-0.3, 0.3, 5), np.full(5, 0.775) - 0.012 * np.sin(np.linspace(0, np.pi, 5))]
    inner_bottom = np.c_[np.linspace(0.2, -0.2, 3), np.full(3, 0.79)]
    points = np.concatenate([jaw, brow_left, brow_right, nose, eyes, outer, inner_top, inner_bottom])
    assert points.shape == (110, 2)
    return points


def head_pose(frame: int) -> tuple[float, float, float, float]:
    """(dx px, dy px, tilt radians, scale) of ``frame``: slow sway, nod and breathing."""
    t = frame / 25.0
    dx = 7 * np.sin(2 * np.pi * t / 4.1) + 2 * np.sin(2 * np.pi * t / 1.7)
    dy = 3 * np.sin(2 * np.pi * t / 3.3 + 1.0)
    tilt = np.deg2rad(1.6) * np.sin(2 * np.pi * t / 5.0)
    scale = 1.0 + 0.015 * np.sin(2 * np.pi * t / 4.7)
    return dx, dy, tilt, scale


def to_pixels(points: np.ndarray, frame: int) -> np.ndarray:
    """Canonical points to pixel coordinates of ``frame``."""
    dx, dy, tilt, scale = head_pose(frame)
    c, s = np.cos(tilt), np.sin(tilt)
    rotated = points @ np.array([[c, s], [-s, c]])
    return rotated * FACE_HALF_WIDTH_PX * scale + np.array(NOSE_BRIDGE_PX) + [dx, dy]


def _poly(image, points, colour, *, closed=True, thickness=-1):
    fixed = np.round(points * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)
    if thickness < 0:
        cv2.fillPoly(image, [fixed], colour, cv2.LINE_AA, _SHIFT)
    else:
        cv2.polylines(image, [fixed], closed, colour, thickness, cv2.LINE_AA, _SHIFT)


def _background() -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    image = ((1 - ramp) * np.array([92, 74, 58]) + ramp * np.array([52, 42, 36])).astype(np.uint8)
    image = np.repeat(image, WIDTH, axis=1)
    cv2.rectangle(image, (90, 80), (330, 420), (120, 112, 98), -1)  # a window
    cv2.rectangle(image, (100, 90), (320, 410), (170, 160, 140), -1)
    cv2.line(image, (210, 90), (210, 410), (120, 112, 98), 6)
    cv2.circle(image, (1080, 520), 120, (60, 90, 60), -1)  # a plant
    cv2.rectangle(image, (1030, 600), (1130, 720), (40, 50, 80), -1)
    return image


def draw_frame(frame: int, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image (BGR) and landmarks (``[110, 2]`` px) of ``frame``."""
    blink = 1.0 if frame % 75 in (40, 41) else (0.5 if frame % 75 in (39, 42) else 0.0)
    canon = canonical_landmarks(blink)
    lms = to_pixels(canon, frame)
    image = background.copy()
    body = to_pixels(np.array([[-2.9, 3.6], [-2.2, 2.2], [-0.5, 1.8], [0.5, 1.8], [2.2, 2.2],
                               [2.9, 3.6]]), frame) * [1, 1] + [0, 40]
    _poly(image, np.r_[body, [[body[-1, 0], HEIGHT + 5], [body[0, 0], HEIGHT + 5]]], (110, 70, 50))
    _poly(image, to_pixels(np.array([[-0.45, 1.0], [0.45, 1.0], [0.5, 2.1], [-0.5, 2.1]]), frame),
          tuple(int(c * 0.85) for c in _SKIN))
    skull = to_pixels(np.c_[np.cos(np.linspace(0, np.pi, 40)), -0.3 - 1.15 * np.sin(np.linspace(0, np.pi, 40))], frame)
    _poly(image, np.r_[lms[0:33], skull], _SKIN)
    for side in (0, 32):
        ear = lms[side] + [(-1 if side == 0 else 1) * 8, 18]
        cv2.ellipse(image, tuple(np.round(ear).astype(int)), (10, 22), 0, 0, 360, _SKIN, -1, cv2.LINE_AA)
    hair = to_pixels(np.c_[1.05 * np.cos(np.linspace(0, np.pi, 40)),
                           -0.55 - 1.0 * np.sin(np.linspace(0, np.pi, 40))], frame)
    _poly(image, hair, (40, 45, 60))
    _draw_features(image, lms)
    return image, lms


def _draw_features(image: np.ndarray, lms: np.ndarray) -> None:
    for brow in (lms[33:42], lms[42:51]):
        _poly(image, brow, (45, 50, 70))
    for eye in (lms[66:78], lms[78:90]):
        _poly(image, eye[:8], (235, 238, 240))
        centre = eye[8]
        radius = max(1.0, min(9.0, np.ptp(eye[:8, 1]) * 0.55))
        cv2.circle(image, tuple(np.round(centre * 16).astype(int)), int(radius * 16), (50, 80, 110), -1, cv2.LINE_AA, 4)
        cv2.circle(image, tuple(np.round(centre * 16).astype(int)), int(radius * 8), (20, 20, 20), -1, cv2.LINE_AA, 4)
        _poly(image, eye[:8], (70, 95, 140), thickness=2)
    _poly(image, lms[[54, 53, 52, 51]], (95, 130, 185), closed=False, thickness=2)
    _poly(image, lms[56:65], (80, 110, 170), closed=False, thickness=2)
    _poly(image, lms[90:102], _LIPS)
    _poly(image, lms[102:107], (60, 55, 120), closed=False, thickness=2)


def write_dataset(dest: str | Path, frames: int = FRAMES) -> Path:
    """Write the demo avatar as a SyncTalk_2D dataset (``full_body_img/``, ``landmarks/``)."""
    dest = Path(dest)
    (dest / "full_body_img").mkdir(parents=True, exist_ok=True)
    (dest / "landmarks").mkdir(parents=True, exist_ok=True)
    background = _background()
    for i in range(frames):
        image, lms = draw_frame(i, background)
        cv2.imwrite(str(dest / "full_body_img" / f"{i}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        (dest / "landmarks" / f"{i}.lms").write_text("".join(f"{x:.2f} {y:.2f}\n" for x, y in lms))
    return dest
