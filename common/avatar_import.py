"""Import the avatar layouts users already have into lipfarm avatar packages.

- SyncTalk_2D training dataset: ``full_body_img/{i}.jpg`` and ``landmarks/{i}.lms`` (110 ``x y`` lines),
  both numbered from 0; the crop rect of each frame comes from the landmark rule. Found in user data
  too: frames numbered from 1 (extracted with ffmpeg's ``%d``) beside landmarks numbered from 0, as
  many of each; frame ``k`` then goes with landmarks ``k - 1``, the package rule. Any other pair of
  numberings (both from 1, frames from 0 and landmarks from 1, different counts) cannot be paired
  with certainty and is refused, naming both. The pairing used is recorded in the avatar's
  ``source["pairing"]``.
- Pre-cut package: ``full_body_img/{k}.jpg`` numbered from 1 and ``crop_rectangles.json`` (at the
  root or in ``cache/``) keyed from ``"0"``: image ``k`` goes with rect ``k - 1``. Extra folders such
  packages carry (``rois_320/``, ``model_inputs/``, ``aud_ave.npy``) are not needed and not copied.

Everything is checked before anything is written: frames numbered without gaps, every frame
decodable and of one size, a rect for every frame, every rect inside the frame.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lipfarm.common.avatar import (LANDMARK_POINTS, Avatar, check_rect, decode_image, rect_from_landmarks,
                           write_avatar)
from lipfarm.common.errors import AvatarError

_IMAGE = re.compile(r"^(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
_LANDMARKS = re.compile(r"^(\d+)\.lms$")
DATASET = "synctalk_dataset"
PACKAGE = "package"


def detect_layout(path: Path) -> str:
    """``DATASET`` or ``PACKAGE``, or ``AvatarError`` naming what is missing."""
    if not path.is_dir():
        raise AvatarError("not a directory", path=path)
    if not (path / "full_body_img").is_dir():
        raise AvatarError("no full_body_img/ folder: not a SyncTalk_2D dataset or package", path=path)
    if (path / "landmarks").is_dir():
        return DATASET
    if _rects_file(path) is not None:
        return PACKAGE
    raise AvatarError("has full_body_img/ but neither landmarks/ nor crop_rectangles.json", path=path)


def _rects_file(path: Path) -> Path | None:
    for candidate in (path / "crop_rectangles.json", path / "cache" / "crop_rectangles.json"):
        if candidate.is_file():
            return candidate
    return None


def numbered_images(folder: Path, first: int) -> list[Path]:
    """Images ``{first}..{first + n - 1}.jpg`` of ``folder`` in order; errors on gaps or none."""
    found = _numbered_frames(folder)
    if min(found) != first:
        raise AvatarError("frames must be numbered from the layout's first index", path=folder,
                          expected=f"first frame {first}", found=f"first frame {min(found)}")
    return [found[i] for i in sorted(found)]


def _numbered(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    """The files of ``folder`` whose names match ``pattern``, by their number."""
    found = {}
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match:
            found[int(match.group(1))] = entry
    return found


def _numbered_frames(folder: Path) -> dict[int, Path]:
    """The numbered images of ``folder``: at least one, numbered without gaps."""
    found = _numbered(folder, _IMAGE)
    if not found:
        raise AvatarError("no numbered images (like 0.jpg)", path=folder)
    missing = sorted(set(range(min(found), max(found) + 1)) - set(found))
    if missing:
        raise AvatarError("frame numbers have gaps", path=folder,
                          expected=f"{min(found)}..{max(found)} without gaps", found=f"missing {missing[:5]}")
    return found


def _numbered_landmarks(folder: Path) -> dict[int, Path]:
    """The ``.lms`` files of ``folder``: at least one, numbered without gaps."""
    found = _numbered(folder, _LANDMARKS)
    if not found:
        raise AvatarError("no numbered landmark files (like 0.lms)", path=folder)
    missing = sorted(set(range(min(found), max(found) + 1)) - set(found))
    if missing:
        raise AvatarError("landmark file missing", path=folder / f"{missing[0]}.lms",
                          expected=f"{min(found)}..{max(found)} without gaps", found=f"missing {missing[:5]}")
    return found


def pair_dataset(path: Path) -> tuple[list[Path], list[Path], str]:
    """A dataset's frames and the landmark file of each, in order, and that pairing in words.

    Frames and landmarks both from 0 pair by number; frames from 1 with landmarks from 0 pair frame
    ``k`` with landmarks ``k - 1``. Anything else is refused: guessing would shift every crop rect.
    """
    frames = _numbered_frames(path / "full_body_img")
    landmarks = _numbered_landmarks(path / "landmarks")
    shift = min(frames) - min(landmarks)
    if len(frames) != len(landmarks) or min(landmarks) != 0 or shift not in (0, 1):
        expected = "both from 0, or frames from 1 and landmarks from 0"
        if len(frames) != len(landmarks):
            expected += ", one landmark file per frame"
        raise AvatarError(f"full_body_img numbered {_span(frames)} and landmarks numbered {_span(landmarks)}: "
                          "cannot tell which frame goes with which landmarks", path=path, expected=expected)
    ordered = sorted(frames)
    suffix = frames[ordered[0]].suffix
    pairing = f"full_body_img/{{k}}{suffix} with landmarks/{{k{'-1' if shift else ''}}}.lms"
    return [frames[k] for k in ordered], [landmarks[k - shift] for k in ordered], pairing


def _span(found: dict[int, Path]) -> str:
    return f"{min(found)}..{max(found)}"


def read_landmarks(path: Path) -> np.ndarray:
    """A ``.lms`` file as float32 ``[110, 2]``."""
    if not path.is_file():
        raise AvatarError("landmark file missing", path=path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            rows.append([float(parts[0]), float(parts[1])])
        except (ValueError, IndexError):
            raise AvatarError("not an 'x y' pair", path=path, field=f"line {number}",
                              found=repr(line)) from None
    if len(rows) != LANDMARK_POINTS:
        raise AvatarError("wrong number of landmark points", path=path,
                          expected=LANDMARK_POINTS, found=len(rows))
    return np.asarray(rows, dtype=np.float32)


def _frame_size(frames: list[Path]) -> tuple[int, int]:
    """Decode every frame (so nothing broken is imported); all must share one size."""
    height, width = decode_image(frames[0]).shape[:2]
    for frame in frames[1:]:
        shape = decode_image(frame).shape[:2]
        if shape != (height, width):
            raise AvatarError("frame size differs from the first frame's", path=frame,
                              expected=f"{width}x{height}", found=f"{shape[1]}x{shape[0]}")
    return width, height


def _dataset_rects(landmarks: list[Path], width: int, height: int) -> list[tuple[int, ...]]:
    rects = []
    for lms_path in landmarks:
        rect = rect_from_landmarks(read_landmarks(lms_path))
        rects.append(check_rect(rect, width, height, path=lms_path, field="rect from landmarks 1, 31, 52"))
    return rects


def _package_rects(path: Path, n_frames: int, width: int, height: int) -> list[tuple[int, ...]]:
    rects_path = _rects_file(path)
    try:
        table = json.loads(rects_path.read_text())
    except (OSError, ValueError) as exc:
        raise AvatarError(f"unreadable JSON ({exc})", path=rects_path) from None
    rects = []
    for i in range(n_frames):  # image i + 1 goes with key "i"
        entry = table.get(str(i)) if isinstance(table, dict) else None
        if not isinstance(entry, dict) or "rect" not in entry:
            raise AvatarError(f"no rect for image {i + 1}.jpg", path=rects_path, field=f'"{i}".rect')
        rect = entry["rect"]
        if isinstance(rect, list) and all(isinstance(v, (int, float)) and float(v).is_integer() for v in rect):
            rect = [int(v) for v in rect]
        rects.append(check_rect(rect, width, height, path=rects_path, field=f'"{i}".rect'))
    return rects


def import_avatar(path: str | Path, dest: str | Path, *, name: str, replace: bool = False) -> Avatar:
    """Import the layout at ``path`` as avatar ``name`` into the package directory ``dest``."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == DATASET:
        frames, landmarks, pairing = pair_dataset(path)
    else:
        frames = numbered_images(path / "full_body_img", 1)
        rects_name = _rects_file(path).relative_to(path).as_posix()
        pairing = f'full_body_img/{{k}}{frames[0].suffix} with {rects_name} key "{{k-1}}"'
    width, height = _frame_size(frames)
    if layout == DATASET:
        rects = _dataset_rects(landmarks, width, height)
    else:
        rects = _package_rects(path, len(frames), width, height)
    source = {"layout": layout, "path": str(path.resolve()), "pairing": pairing}
    return write_avatar(dest, name=name, frames=frames, rects=rects, width=width, height=height,
                        source=source, replace=replace)
