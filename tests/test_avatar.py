"""Avatar packages, the two importers and the rect rule (the ping-pong walk: test_syncmode)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from lipfarm.common.avatar import AvatarStore, load_avatar, rect_from_landmarks
from lipfarm.common.avatar_import import import_avatar, read_landmarks
from lipfarm.common.errors import AvatarError, NotFoundError


def test_rect_rule_on_sample_landmarks():
    lms = np.zeros((110, 2), np.float32)
    lms[1] = (100.7, 50.0)
    lms[31] = (300.2, 60.0)
    lms[52] = (200.0, 120.9)
    assert rect_from_landmarks(lms) == (100, 120, 300, 320)  # truncated like the int32 cast


def test_rect_rule_on_real_landmarks(sanders):
    lms = read_landmarks(sanders / "synctalk_dataset" / "landmarks" / "0.lms")
    assert rect_from_landmarks(lms) == (532, 210, 714, 392)


def test_both_layouts_import_to_the_same_avatar(sanders, tmp_path):
    dataset = import_avatar(sanders / "synctalk_dataset", tmp_path / "a", name="a")
    package = import_avatar(sanders / "package", tmp_path / "b", name="b")
    rects = json.loads((sanders / "package" / "cache" / "crop_rectangles.json").read_text())
    assert dataset.frame_count == package.frame_count == 40
    assert dataset.rects[0] == (532, 210, 714, 392) == tuple(rects["0"]["rect"])
    assert dataset.rects == package.rects
    assert dataset.content_hash == package.content_hash
    for i in range(40):
        original = cv2.imread(str(sanders / "synctalk_dataset" / "full_body_img" / f"{i}.jpg"))
        np.testing.assert_array_equal(package.read_frame(i), original)
        np.testing.assert_array_equal(dataset.read_frame(i), original)
    assert dataset.source["layout"] == "synctalk_dataset" and package.source["layout"] == "package"


def _renumber(folder, start, keep=None):
    """Renumber ``folder``'s files ``0..n-1`` from ``start``; keep only the first ``keep`` of them."""
    files = sorted(folder.iterdir(), key=lambda f: int(f.stem))
    for extra in files[keep:] if keep is not None else []:
        extra.unlink()
    for i, f in reversed(list(enumerate(files[:keep]))):
        f.rename(f.with_name(f"{i + start}{f.suffix}"))


def test_frames_from_1_with_landmarks_from_0_import_like_the_package(sanders, tmp_path):
    """ffmpeg's %d numbers extracted frames from 1; the landmarks of frame k are then k - 1."""
    one_based = tmp_path / "one_based"
    shutil.copytree(sanders / "synctalk_dataset", one_based)
    _renumber(one_based / "full_body_img", 1)
    assert sorted(int(f.stem) for f in (one_based / "full_body_img").iterdir()) == list(range(1, 41))
    shifted = import_avatar(one_based, tmp_path / "c", name="c")
    dataset = import_avatar(sanders / "synctalk_dataset", tmp_path / "a", name="a")
    package = import_avatar(sanders / "package", tmp_path / "b", name="b")
    assert shifted.content_hash == dataset.content_hash == package.content_hash
    assert shifted.rects == dataset.rects and shifted.rects[0] == (532, 210, 714, 392)
    assert shifted.source["pairing"] == "full_body_img/{k}.jpg with landmarks/{k-1}.lms"
    assert dataset.source["pairing"] == "full_body_img/{k}.jpg with landmarks/{k}.lms"
    assert package.source["pairing"] == 'full_body_img/{k}.jpg with cache/crop_rectangles.json key "{k-1}"'


def test_real_dataset_with_both_numbered_from_1_is_refused(sanders, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(sanders / "synctalk_dataset", root)
    _renumber(root / "full_body_img", 1)
    _renumber(root / "landmarks", 1)
    (tmp_path / "store").mkdir()
    with pytest.raises(AvatarError) as caught:
        import_avatar(root, tmp_path / "store" / "x", name="x")
    assert str(caught.value) == (
        f"{root}: full_body_img numbered 1..40 and landmarks numbered 1..40: cannot tell which frame goes "
        "with which landmarks (expected both from 0, or frames from 1 and landmarks from 0)")
    assert list((tmp_path / "store").iterdir()) == []


def test_frame_k_goes_with_landmarks_k_minus_1(tmp_path):
    root = _small_dataset(tmp_path / "ds", n=3)
    for i in range(3):  # a different rect per landmark file
        lms = read_landmarks(root / "landmarks" / f"{i}.lms")
        lms[52, 1] += i
        (root / "landmarks" / f"{i}.lms").write_text("".join(f"{x} {y}\n" for x, y in lms))
    _renumber(root / "full_body_img", 1)
    avatar = import_avatar(root, tmp_path / "out", name="s")
    assert [r[1] for r in avatar.rects] == [12, 13, 14]  # landmarks 0, 1, 2
    for i in range(3):  # with images 1, 2, 3
        assert (avatar.root / avatar.frames[i]).read_bytes() == (root / "full_body_img" / f"{i + 1}.jpg").read_bytes()
    assert avatar.source["pairing"] == "full_body_img/{k}.jpg with landmarks/{k-1}.lms"


@pytest.mark.parametrize("frames_from, frames_kept, lms_from, lms_kept, numberings, expected", [
    (1, 3, 1, 3, "1..3 and landmarks numbered 1..3", "both from 0, or frames from 1 and landmarks from 0"),
    (0, 3, 1, 3, "0..2 and landmarks numbered 1..3", "both from 0, or frames from 1 and landmarks from 0"),
    (2, 3, 0, 3, "2..4 and landmarks numbered 0..2", "both from 0, or frames from 1 and landmarks from 0"),
    (1, 3, 0, 2, "1..3 and landmarks numbered 0..1",
     "both from 0, or frames from 1 and landmarks from 0, one landmark file per frame"),
    (0, 2, 0, 3, "0..1 and landmarks numbered 0..2",
     "both from 0, or frames from 1 and landmarks from 0, one landmark file per frame"),
])
def test_ambiguous_numberings_are_refused_naming_both(tmp_path, frames_from, frames_kept, lms_from, lms_kept,
                                                      numberings, expected):
    root = _small_dataset(tmp_path / "ds", n=3)
    _renumber(root / "full_body_img", frames_from, frames_kept)
    _renumber(root / "landmarks", lms_from, lms_kept)
    (tmp_path / "store").mkdir()
    with pytest.raises(AvatarError) as caught:
        import_avatar(root, tmp_path / "store" / "x", name="x")
    assert str(caught.value) == (f"{root}: full_body_img numbered {numberings}: cannot tell which frame goes "
                                 f"with which landmarks (expected {expected})")
    assert list((tmp_path / "store").iterdir()) == []


def _small_dataset(root, n=3, size=(64, 48)):
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    for i in range(n):
        image = np.full((size[1], size[0], 3), 40 * i, np.uint8)
        cv2.imwrite(str(root / "full_body_img" / f"{i}.jpg"), image)
        lms = np.full((110, 2), 10.0)
        lms[1], lms[31], lms[52] = (10, 10), (30, 10), (10, 12)
        (root / "landmarks" / f"{i}.lms").write_text("".join(f"{x} {y}\n" for x, y in lms))
    return root


def _small_package(root, n=3):
    (root / "full_body_img").mkdir(parents=True)
    rects = {}
    for k in range(1, n + 1):
        cv2.imwrite(str(root / "full_body_img" / f"{k}.jpg"), np.full((48, 64, 3), 9 * k, np.uint8))
        rects[str(k - 1)] = {"rect": [4, 4, 36, 36]}
    (root / "crop_rectangles.json").write_text(json.dumps(rects))
    return root


def test_package_image_k_goes_with_rect_k_minus_1(tmp_path):
    root = _small_package(tmp_path / "pkg")
    table = json.loads((root / "crop_rectangles.json").read_text())
    table["2"]["rect"] = [8, 8, 40, 40]
    (root / "crop_rectangles.json").write_text(json.dumps(table))
    avatar = import_avatar(root, tmp_path / "out", name="p")
    assert avatar.rects[2] == (8, 8, 40, 40)
    assert avatar.read_frame(2)[0, 0, 0] == cv2.imread(str(root / "full_body_img" / "3.jpg"))[0, 0, 0]


def test_missing_frame_is_named(tmp_path):
    root = _small_dataset(tmp_path / "ds", n=4)
    (root / "full_body_img" / "2.jpg").unlink()
    with pytest.raises(AvatarError, match=r"full_body_img: frame numbers have gaps .*missing \[2\]"):
        import_avatar(root, tmp_path / "out", name="x")


def test_missing_landmarks_are_named(tmp_path):
    root = _small_dataset(tmp_path / "ds")
    (root / "landmarks" / "1.lms").unlink()
    with pytest.raises(AvatarError, match=r"landmarks/1.lms: landmark file missing"):
        import_avatar(root, tmp_path / "out", name="x")


def test_wrong_landmark_count(tmp_path):
    root = _small_dataset(tmp_path / "ds")
    (root / "landmarks" / "0.lms").write_text("1 2\n3 4\n")
    with pytest.raises(AvatarError, match=r"0.lms: wrong number of landmark points \(expected 110, found 2\)"):
        import_avatar(root, tmp_path / "out", name="x")


def test_rect_outside_the_frame(tmp_path):
    root = _small_package(tmp_path / "pkg")
    table = json.loads((root / "crop_rectangles.json").read_text())
    table["1"]["rect"] = [40, 10, 90, 60]
    (root / "crop_rectangles.json").write_text(json.dumps(table))
    with pytest.raises(AvatarError, match=r'crop_rectangles.json: "1".rect: rect reaches outside the frame '
                                          r'\(expected inside 64x48, found \[40, 10, 90, 60\]\)'):
        import_avatar(root, tmp_path / "out", name="x")


def test_missing_rect_key(tmp_path):
    root = _small_package(tmp_path / "pkg")
    table = json.loads((root / "crop_rectangles.json").read_text())
    del table["2"]
    (root / "crop_rectangles.json").write_text(json.dumps(table))
    with pytest.raises(AvatarError, match=r'no rect for image 3.jpg'):
        import_avatar(root, tmp_path / "out", name="x")


def test_undecodable_frame(tmp_path):
    root = _small_dataset(tmp_path / "ds")
    (root / "full_body_img" / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(AvatarError, match=r"1.jpg: not a decodable image"):
        import_avatar(root, tmp_path / "out", name="x")


def test_not_a_known_layout(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(AvatarError, match="no full_body_img/ folder"):
        import_avatar(tmp_path / "random", tmp_path / "out", name="x")


@pytest.mark.parametrize("fails", ["while checking", "while writing"])
def test_failed_import_leaves_nothing(tmp_path, monkeypatch, fails):
    root = _small_dataset(tmp_path / "ds")
    store = tmp_path / "store"
    store.mkdir()  # as a user's store is: the import stages beside the avatar, in here
    copied = []
    if fails == "while checking":
        (root / "landmarks" / "2.lms").write_text("bad\n")
        error = AvatarError
    else:  # the staging folder exists and holds a frame when copying the next one fails
        real_copyfile = shutil.copyfile

        def copy_once_then_fail(src, dst, **kwargs):
            if copied:
                raise OSError(errno.ENOSPC, "No space left on device")
            copied.append(Path(dst))
            return real_copyfile(src, dst, **kwargs)

        monkeypatch.setattr(shutil, "copyfile", copy_once_then_fail)
        error = OSError
    with pytest.raises(error):
        import_avatar(root, store / "x", name="x")
    if copied:
        assert copied[0].parent.parent.parent == store and copied[0].parent.parent.name.startswith(".x.")
    assert list(store.iterdir()) == []  # neither the avatar nor a hidden staging folder


def test_damaged_package_is_refused_at_load(tmp_path):
    avatar = import_avatar(_small_dataset(tmp_path / "ds"), tmp_path / "a", name="a")
    (avatar.root / avatar.frames[1]).unlink()
    with pytest.raises(AvatarError, match=r"frames/000001.jpg: frames\[1\]: frame file missing"):
        load_avatar(avatar.root)
    meta = json.loads((avatar.root / "avatar.json").read_text())
    meta["rects"] = meta["rects"][:2]
    (avatar.root / "avatar.json").write_text(json.dumps(meta))
    with pytest.raises(AvatarError, match=r"avatar.json: rects: one entry per frame is needed"):
        load_avatar(avatar.root)


def test_store_lists_and_finds(tmp_path):
    store = AvatarStore(tmp_path / "avatars")
    import_avatar(_small_dataset(tmp_path / "ds"), store.path("first"), name="first")
    shutil.copytree(store.path("first"), store.path("second"))
    assert store.names() == ["first", "second"]
    assert store.get("first").frame_count == 3
    with pytest.raises(NotFoundError, match="unknown avatar 'third'.*known: first, second"):
        store.get("third")
    with pytest.raises(AvatarError, match="invalid avatar name"):
        store.path("../escape")


def test_demo_avatar(demo_avatar):
    assert demo_avatar.frame_count >= 100
    assert (demo_avatar.width, demo_avatar.height) == (1280, 720)
    sides = {r[2] - r[0] for r in demo_avatar.rects}
    assert len({r[:2] for r in demo_avatar.rects}) > 5  # the head moves
    assert all(r[3] - r[1] == r[2] - r[0] for r in demo_avatar.rects) and min(sides) > 150
