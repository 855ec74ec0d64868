"""Flags shared by the commands that render: one per ``RenderOptions`` field, and the models."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError
from lipfarm.common.options import OPTION_HELP, RenderOptions

def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``RenderOptions`` field, defaulting to 'not given'."""
    group = parser.add_argument_group("render options")
    for spec in fields(RenderOptions):
        flag = "--" + spec.name.replace("_", "-")
        if spec.type == "bool":  # --fast-start / --no-fast-start
            group.add_argument(flag, dest=f"opt_{spec.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=f"{OPTION_HELP[spec.name]} (default {'on' if spec.default else 'off'})")
            continue
        kind = int if spec.type == "int" else str
        group.add_argument(flag, dest=f"opt_{spec.name}", type=kind, default=None,
                           help=f"{OPTION_HELP[spec.name]} (default {spec.default})")


def options_from_args(args: argparse.Namespace, settings: Settings) -> RenderOptions:
    """The options given, the settings' defaults for the rest."""
    given = {spec.name: getattr(args, f"opt_{spec.name}") for spec in fields(RenderOptions)}
    if given["precision"] is None:
        given["precision"] = settings.precision
    if given["backend"] is None:
        given["backend"] = settings.backend
    return RenderOptions(**{k: v for k, v in given.items() if v is not None})


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", help="audio encoder ONNX (default: the demo encoder)")
    parser.add_argument("--generator", help="UNet generator ONNX (default: the demo UNet)")


def models_from_args(args: argparse.Namespace, settings: Settings) -> tuple[Path, Path]:
    """The models given, or the demo's when neither is."""
    if (args.encoder is None) != (args.generator is None):
        raise InputError("give both --encoder and --generator, or neither (the demo models)",
                         field="--encoder/--generator")
    if args.encoder is not None:
        return Path(args.encoder), Path(args.generator)
    from lipfarm.demo.assets import ensure_demo_assets

    demo = ensure_demo_assets(settings)
    return demo.encoder, demo.generator
