"""The ``lipfarm`` command line.

Every subcommand is a thin shell: parse, build options once, call a function, print a line. Each
module of this package holds a group of commands and the small builder (``add_commands``) that
declares their flags beside the code that runs them. A ``LipfarmError`` becomes one line on stderr
and the error's exit code (2 bad input, 3 bad model, 4 not found, 5 service unreachable, 6 job
failed, 7 cancelled; 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import sys

from common.config import load_settings
from common.errors import LipfarmError
from scheduler.cli import avatars, bench, farm, jobs, render, settings
from scheduler.cli.options import OPTION_HELP, options_from_args

__all__ = ["OPTION_HELP", "build_parser", "main", "options_from_args"]

COMMAND_GROUPS = (render, avatars, jobs, farm, bench, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipfarm",
                                     description="Lip-sync video rendering on one machine or a render farm.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, load_settings())
    except LipfarmError as exc:
        print(f"lipfarm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lipfarm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
