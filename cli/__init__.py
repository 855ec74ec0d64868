"""The ``lipfarm`` command line.

Every subcommand is a thin shell: parse, build options once, call a function, print a line. Each
module of this package holds a group of commands and the small builder (``add_commands``) that
declares their flags beside the code that runs them. A ``LipfarmError`` becomes one line on stderr
and the error's exit code (2 bad input, 3 bad model, 4 not found, 5 service unreachable, 6 job
failed, 7 cancelled; 130 on Ctrl-C). Output piped into a reader that stops early (``lipfarm jobs |
head``) ends quietly, with the exit status of a process ended by SIGPIPE (141). Long-running roles
(``reconcile``, ``api``) log with timestamps; ``--log-json`` makes them, and the worker, log JSON lines
(``cli.logs``).

Group modules are imported only when needed: ``main`` builds the parser with just the group of the
command it is given (``lipfarm render`` never imports the farm's Redis client, nor the others), and
the full parser for anything else (no command, help first, a command ``_GROUP_OF`` does not know).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lipfarm.common.config import load_settings
from lipfarm.common.errors import LipfarmError
from lipfarm.cli import logs
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
    parser.add_argument("--log-json", action="store_true",
                        help="log one JSON object a line (time, level, logger, message), for log shippers: "
                             "worker, reconcile, api")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in groups:
        importlib.import_module(f"lipfarm.cli.{name}").add_commands(commands)
    return parser, commands.choices


def _command_of(argv: list[str]) -> str | None:
    """The command a command line names, when only global flags come before it (else None)."""
    for token in argv:
        if token not in ("-v", "--verbose", "--log-json"):
            return None if token.startswith("-") else token
    return None


LONG_RUNNING = {"reconcile", "api"}  # their log lines carry times (a worker's and Flower's do already)
EXIT_BROKEN_PIPE = 128 + 13  # as a process ended by SIGPIPE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            return _run(argv)
        finally:  # also after argparse's exit (--help): flushed here, not at exit, so a gone reader is seen below
            sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


def _run(argv: list[str]) -> int:
    args = build_parser(_command_of(argv)).parse_args(argv)
    logs.configure(verbose=args.verbose, as_json=args.log_json, timed=args.command in LONG_RUNNING)
    try:
        return args.func(args, load_settings())
    except LipfarmError as exc:
        print(f"lipfarm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lipfarm: interrupted", file=sys.stderr)
        return 130


def _quiet_stdout() -> None:
    """The reader of stdout is gone: point stdout at /dev/null, so the interpreter's last flush at
    exit does not raise (and print) the same error again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests): nothing to flush
        pass


if __name__ == "__main__":
    sys.exit(main())
