"""The lipfarm avatar package: template frames, one crop rect per frame, metadata, a content hash.

Layout on disk (a directory, or the same files in a tar in object storage)::

    avatar.json          {"format": "lipfarm-avatar", "version": 1, "name", "width", "height",
                          "frames": [...], "frame_sha256": [...], "rects": [[x1, y1, x2, y2], ...],
                          "content_hash", "source": {...}}
    frames/000000.jpg    the template frames, byte for byte as imported (no re-encode, so they
    ...                  decode to the very pixels the reference script reads)

The content hash covers the frame bytes, the rects and the frame size, not the name: two imports of
the same data share it, and workers cache avatars by it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from lipfarm.common.errors import AvatarError, NotFoundError
from lipfarm.common.fileio import file_sha256, folder_replaced_atomically

FORMAT = "lipfarm-avatar"
VERSION = 1
MANIFEST = "avatar.json"
LANDMARK_POINTS = 110


@dataclass(frozen=True)
class Avatar:
    """A loaded, validated avatar package."""

    root: Path
    name: str
    width: int
    height: int
    frames: tuple[str, ...]
    rects: tuple[tuple[int, int, int, int], ...]
    content_hash: str
    source: dict
    frame_sha256: tuple[str, ...] = ()

    @property
    def frame_count(self) -> int:
        return len(self.frames)

    def frame_path(self, index: int) -> Path:
        return self.root / self.frames[index]

    def read_frame(self, index: int) -> np.ndarray:
        """Template frame ``index`` as BGR uint8 ``[height, width, 3]``.

        Its bytes are checked against the manifest's hash: a frame damaged after import can decode
        without error to other pixels, and a render must not use them.
        """
        path = self.frame_path(index)
        image, digest = decode_image(path, with_sha256=True)
        if self.frame_sha256 and digest != self.frame_sha256[index]:
            raise AvatarError("frame bytes differ from the manifest's hash", path=path, field=f"frames[{index}]")
        if image.shape[:2] != (self.height, self.width):
            raise AvatarError("frame size differs from the avatar's", path=path,
                              expected=f"{self.width}x{self.height}",
                              found=f"{image.shape[1]}x{image.shape[0]}")
        return image


def decode_image(path: Path, *, with_sha256: bool = False):
    """Decode an image file to BGR as ``cv2.imread`` does, or raise ``AvatarError``; with
    ``with_sha256``, return the image and the SHA-256 of the file's bytes."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        raise AvatarError("frame file missing or unreadable", path=path) from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise AvatarError("not a decodable image", path=path)
    return (image, hashlib.sha256(data).hexdigest()) if with_sha256 else image


def rect_from_landmarks(landmarks: np.ndarray) -> tuple[int, int, int, int]:
    """The SyncTalk_2D crop rule: ``x1 = lms[1].x, x2 = lms[31].x, y1 = lms[52].y, y2 = y1 + x2 - x1``.

    ``landmarks`` is ``[110, 2]`` (x, y); coordinates truncate to int as the reference's int32 cast.
    """
    points = np.asarray(landmarks, dtype=np.float32).astype(np.int32)
    x1, x2, y1 = int(points[1, 0]), int(points[31, 0]), int(points[52, 1])
    return x1, y1, x2, y1 + (x2 - x1)


def check_rect(rect: Sequence[int], width: int, height: int, *, path, field: str) -> tuple[int, ...]:
    """Validate a crop rect against the frame size; returns it as a tuple of 4 ints."""
    if len(rect) != 4 or not all(isinstance(v, (int, np.integer)) for v in rect):
        raise AvatarError("a rect is 4 integers [x1, y1, x2, y2]", path=path, field=field, found=rect)
    x1, y1, x2, y2 = (int(v) for v in rect)
    if x2 <= x1 or y2 <= y1:
        raise AvatarError("rect is empty", path=path, field=field, expected="x1 < x2 and y1 < y2",
                          found=[x1, y1, x2, y2])
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise AvatarError("rect reaches outside the frame", path=path, field=field,
                          expected=f"inside {width}x{height}", found=[x1, y1, x2, y2])
    return x1, y1, x2, y2


def _hash_content(width: int, height: int, rects, frame_sha256: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps({"width": width, "height": height, "rects": [list(r) for r in rects]},
                                       sort_keys=True).encode())
    for frame_hash in frame_sha256:
        digest.update(bytes.fromhex(frame_hash))
    return digest.hexdigest()


def load_avatar(root: str | Path, *, verify_frames: bool = False) -> Avatar:
    """Load and validate the avatar package at ``root``.

    Checks the manifest's fields, that every frame file exists and every rect lies inside the frame;
    ``verify_frames`` also re-hashes the frame bytes against the manifest.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise AvatarError("not a lipfarm avatar (no avatar.json)", path=root)
    try:
        meta = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise AvatarError(f"unreadable manifest ({exc})", path=manifest_path) from None
    _check_manifest(meta, manifest_path)
    width, height = meta["width"], meta["height"]
    rects = tuple(check_rect(r, width, height, path=manifest_path, field=f"rects[{i}]")
                  for i, r in enumerate(meta["rects"]))
    for i, name in enumerate(meta["frames"]):
        if not (root / name).is_file():
            raise AvatarError("frame file missing", path=root / name, field=f"frames[{i}]")
    if verify_frames:
        for i, name in enumerate(meta["frames"]):
            if file_sha256(root / name) != meta["frame_sha256"][i]:
                raise AvatarError("frame bytes differ from the manifest's hash", path=root / name)
    return Avatar(root, meta["name"], width, height, tuple(meta["frames"]), rects,
                  meta["content_hash"], meta.get("source", {}), tuple(meta["frame_sha256"]))


def _check_manifest(meta: dict, path: Path) -> None:
    if meta.get("format") != FORMAT:
        raise AvatarError("not a lipfarm avatar manifest", path=path, field="format",
                          expected=FORMAT, found=meta.get("format"))
    if meta.get("version") != VERSION:
        raise AvatarError("unsupported avatar format version", path=path, field="version",
                          expected=VERSION, found=meta.get("version"))
    for key in ("name", "width", "height", "frames", "frame_sha256", "rects", "content_hash"):
        if key not in meta:
            raise AvatarError("missing field", path=path, field=key)
    n = len(meta["frames"])
    if n < 2:
        raise AvatarError("an avatar needs at least 2 frames for its ping-pong walk", path=path,
                          field="frames", expected=">= 2", found=n)
    for key in ("rects", "frame_sha256"):
        if len(meta[key]) != n:
            raise AvatarError("one entry per frame is needed", path=path, field=key,
                              expected=n, found=len(meta[key]))


def write_avatar(dest: str | Path, *, name: str, frames: Sequence[Path], rects: Sequence[Sequence[int]],
                 width: int, height: int, source: dict, replace: bool = False) -> Avatar:
    """Write an avatar package to ``dest`` atomically (a temporary sibling renamed into place)."""
    dest = Path(dest)
    if dest.exists() and not replace:
        raise AvatarError("an avatar of this name exists (use --force to replace it)", path=dest)
    with folder_replaced_atomically(dest, replace=True) as staging:
        (staging / "frames").mkdir()
        names, hashes = [], []
        for i, frame in enumerate(frames):
            rel = f"frames/{i:06d}{frame.suffix.lower()}"
            shutil.copyfile(frame, staging / rel)
            names.append(rel)
            hashes.append(file_sha256(staging / rel))
        rect_lists = [list(map(int, r)) for r in rects]
        meta = {"format": FORMAT, "version": VERSION, "name": name, "width": width, "height": height,
                "frames": names, "frame_sha256": hashes, "rects": rect_lists,
                "content_hash": _hash_content(width, height, rect_lists, hashes), "source": source}
        (staging / MANIFEST).write_text(json.dumps(meta, indent=1))
        load_avatar(staging)
    return load_avatar(dest)


class AvatarStore:
    """The local avatar directory: ``<home>/avatars/<name>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        if (not name or "/" in name or name.startswith(".") or name != name.strip() or len(name) > 128
                or not name.isprintable()):
            raise AvatarError("invalid avatar name", field="name",
                              expected="a plain name of at most 128 printable characters, without '/' or a leading '.'",
                              found=repr(name))
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def get(self, name: str) -> Avatar:
        path = self.path(name)
        if not (path / MANIFEST).is_file():
            known = ", ".join(self.names()) or "none"
            raise NotFoundError(f"unknown avatar '{name}' in {self.root} (known: {known})")
        return load_avatar(path)


def pack_avatar(avatar: Avatar, dest: Path) -> Path:
    """The avatar package as an uncompressed tar (frames are JPEG/PNG already): what storage keeps."""
    with tarfile.open(dest, "w") as tar:
        tar.add(avatar.root / MANIFEST, arcname=MANIFEST)
        for name in avatar.frames:
            tar.add(avatar.root / name, arcname=name)
    return dest
