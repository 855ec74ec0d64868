"""``lipfarm avatar import|list|show``: the avatars of this machine."""

from __future__ import annotations

import json
from pathlib import Path

from lipfarm.common.avatar import AvatarStore
from lipfarm.common.config import Settings
from lipfarm.common.errors import LipfarmError


def add_commands(commands) -> None:
    avatar = commands.add_parser("avatar", help="import, list and show avatars")
    actions = avatar.add_subparsers(dest="avatar_command", required=True, metavar="ACTION")
    imp = actions.add_parser("import", help="import a SyncTalk_2D dataset or pre-cut package")
    imp.add_argument("path", help="the dataset or package folder")
    imp.add_argument("--name", required=True, help="the avatar's name in lipfarm")
    imp.add_argument("--force", action="store_true", help="replace an avatar of the same name")
    imp.set_defaults(func=cmd_import)
    actions.add_parser("list", help="list imported avatars").set_defaults(func=cmd_list)
    show = actions.add_parser("show", help="describe an avatar")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)


def cmd_import(args, settings: Settings) -> int:
    from lipfarm.common.avatar_import import import_avatar

    store = AvatarStore(settings.avatars_dir)
    avatar = import_avatar(Path(args.path), store.path(args.name), name=args.name, replace=args.force)
    print(f"imported '{avatar.name}': {avatar.frame_count} frames {avatar.width}x{avatar.height} "
          f"({avatar.source.get('layout')}), hash {avatar.content_hash[:12]}")
    if avatar.source.get("pairing"):
        print(f"  paired {avatar.source['pairing']}")
    return 0


def cmd_list(args, settings: Settings) -> int:
    store = AvatarStore(settings.avatars_dir)
    names = store.names()
    if not names:
        print(f"no avatars in {store.root} (import one with `lipfarm avatar import PATH --name NAME`)")
        return 0
    print(f"{'name':<24} {'frames':>6} {'size':>10}  {'layout':<18} hash")
    for name in names:
        try:
            avatar = store.get(name)
        except LipfarmError as exc:  # one damaged avatar must not hide the others
            print(f"{name:<24} damaged: {exc}")
            continue
        print(f"{name:<24} {avatar.frame_count:>6} {avatar.width:>5}x{avatar.height:<4}  "
              f"{avatar.source.get('layout', '?'):<18} {avatar.content_hash[:12]}")
    return 0


def cmd_show(args, settings: Settings) -> int:
    avatar = AvatarStore(settings.avatars_dir).get(args.name)
    sides = [r[2] - r[0] for r in avatar.rects]
    print(json.dumps({"name": avatar.name, "path": str(avatar.root), "frames": avatar.frame_count,
                      "size": f"{avatar.width}x{avatar.height}", "content_hash": avatar.content_hash,
                      "rect_0": list(avatar.rects[0]), "rect_side_px": [min(sides), max(sides)],
                      "source": avatar.source}, indent=2))
    return 0
