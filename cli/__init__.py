"""The ``lipfarm`` command line.

Every subcommand is a thin shell: parse, build options once, call a function, print a line. Each
module of this package holds a group of commands and the small builder (``add_commands``) that
declares their flags beside the code that runs them. A ``LipfarmError`` becomes one line on stderr
and the error's exit code (2 bad input, 3 bad model, 4 not found, 5 service unreachable, 6 job
failed, 7 cancelled; 130 on Ctrl-C).

Group modules are imported only when needed: ``main`` builds the parser with just the group of the
command it is given (``lipfarm render`` never imports the farm's Redis client, nor the others), and
the full parser for anything else (no command, help first, a command ``_GROUP_OF`` does not know).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lipfarm.common.config import load_settings
from lipfarm.common.errors import LipfarmError
from lipfarm.cli.options import OPTION_HELP, options_from_args

__all__ = ["OPTION_HELP", "build_parser", "main", "options_from_args"]

# The modules of this package that hold command groups, in the order of `lipfarm --help`.
COMMAND_GROUPS = ("render", "avatars", "jobs", "farm", "service", "cluster", "bench", "settings")
# The group of each command: a fast path only (a command missing here, or moved, gets the full parser).
_GROUP_OF = {"render": "render", "demo": "render", "avatar": "avatars", "submit": "jobs", "status": "jobs",
             "jobs": "jobs", "cancel": "jobs", "watch": "jobs", "resume": "jobs", "worker": "farm",
             "flower": "farm", "reconcile": "farm", "api": "service", "token": "service",
             "tenant": "service", "cluster": "cluster",
             "bench": "bench",
             "config": "settings"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``command``, only that of its group where that group has it."""
    if command in _GROUP_OF:
        parser, commands = _parser((_GROUP_OF[command],))
        if command in commands:
            return parser
    return _parser(COMMAND_GROUPS)[0]


def _parser(groups) -> tuple[argparse.ArgumentParser, dict]:
    """A parser with the commands of ``groups`` (module names), and those commands by name."""
    parser = argparse.ArgumentParser(prog="lipfarm",
                                     description="Lip-sync video rendering on one machine or a render farm.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in groups:
        importlib.import_module(f"lipfarm.cli.{name}").add_commands(commands)
    return parser, commands.choices


def _command_of(argv: list[str]) -> str | None:
    """The command a command line names, when only ``-v`` comes before it (else None)."""
    for token in argv:
        if token not in ("-v", "--verbose"):
            return None if token.startswith("-") else token
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
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
