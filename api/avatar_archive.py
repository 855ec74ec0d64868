"""An uploaded avatar archive imported as an avatar: checked extraction, then the CLI's own import.

The archive is extracted by ``common.archive.extract_checked`` (every member checked before anything
is written: no ``../`` names, links, devices or bombs; limits from the settings) into a temporary
folder. Its content is found where archivers put it (at the top, or inside one folder) and imported:

- a SyncTalk_2D dataset or pre-cut package with ``common.avatar_import.import_avatar``, exactly as
  ``lipfarm avatar import`` does;
- a lipfarm avatar package (``avatar.json``, e.g. one copied from another machine) is loaded with
  every frame checked against its hash, and written under the new name.

No HTTP here: the route streams the upload to a file and calls ``import_archive``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lipfarm.api.archive import extract_checked
from lipfarm.common.avatar import MANIFEST, Avatar, AvatarStore, load_avatar, write_avatar
from lipfarm.common.avatar_import import import_avatar
from lipfarm.common.config import Settings
from lipfarm.common.errors import AvatarError, InputError

PACKAGE = "lipfarm package"
_MARKERS = ("full_body_img", MANIFEST)
_IGNORED = ("__MACOSX",)


def content_root(folder: Path) -> Path:
    """The folder holding the avatar: ``folder``, or the one folder it holds (archivers often add one)."""
    for _ in range(3):
        if any((folder / marker).exists() for marker in _MARKERS):
            return folder
        entries = [e for e in folder.iterdir() if e.name not in _IGNORED and not e.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir():
            break
        folder = entries[0]
    raise AvatarError("the archive holds no avatar: expected full_body_img/ (a SyncTalk_2D dataset or "
                      "package) or avatar.json (a lipfarm package), at its top or inside one folder",
                      path=folder)


def _import_package(root: Path, dest: Path, *, name: str, replace: bool) -> Avatar:
    package = load_avatar(root, verify_frames=True)
    source = {**package.source, "layout": PACKAGE, "pairing": "the frames and rects of its avatar.json",
              "imported_from": package.name}
    return write_avatar(dest, name=name, frames=[package.frame_path(i) for i in range(package.frame_count)],
                        rects=package.rects, width=package.width, height=package.height, source=source,
                        replace=replace)


def import_archive(archive: Path, *, name: str, store: AvatarStore, settings: Settings, replace: bool,
                   shown_as: str = "archive") -> Avatar:
    """Import the avatar in ``archive`` as ``name`` into ``store``; nothing is written on a refusal.

    Errors name files as the uploader knows them: ``shown_as`` (the archive's name), or a member's
    path inside it, never this machine's temporary folders.
    """
    dest = store.path(name)
    work = settings.work_dir
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lipfarm-avatar-", dir=work) as temp:
        extracted = Path(temp) / "archive"
        try:
            extract_checked(archive, extracted, max_members=settings.archive_max_members,
                            max_total_bytes=int(settings.archive_max_mb * (1 << 20)),
                            max_ratio=settings.archive_max_ratio)
            root = content_root(extracted)
            if (root / MANIFEST).is_file():
                return _import_package(root, dest, name=name, replace=replace)
            return import_avatar(root, dest, name=name, replace=replace)
        except InputError as exc:
            raise as_uploaded(exc, {str(archive): shown_as, str(extracted): shown_as}) from None


def as_uploaded(exc: InputError, names: dict[str, str]) -> InputError:
    """``exc`` with its path as the uploader knows it (``names``: local path -> shown name; "" drops
    the folder). An error about another path is returned as it is."""
    path = exc.path or ""
    for local, shown in names.items():
        if path == local or path.startswith(local + "/"):
            path = (shown + path[len(local):]).lstrip("/")
            return type(exc)(exc.problem, path=path or None, field=exc.field, expected=exc.expected, found=exc.found)
    return exc
