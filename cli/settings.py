"""``lipfarm config``: the settings in effect."""

from __future__ import annotations

from dataclasses import fields

from lipfarm.common.config import Settings, settings_markdown
from lipfarm.common.state.connection import mask_url


def add_commands(commands) -> None:
    config = commands.add_parser("config", help="print the settings in effect")
    config.add_argument("--markdown", action="store_true", help="the settings table (docs/configuration.md)")
    config.set_defaults(func=cmd_config)


def cmd_config(args, settings: Settings) -> int:
    if args.markdown:
        print(settings_markdown())
        return 0
    for spec in fields(Settings):
        print(f"{spec.name} = {_shown(spec.name, getattr(settings, spec.name))}")
    return 0


def _shown(name: str, value) -> str:
    """A setting as printed: URLs with their passwords masked, secret keys hidden."""
    if name.endswith("secret_key"):
        return "***" if value else ""
    if name.endswith("_url"):
        return mask_url(str(value))
    return str(value)
