"""``lipfarm api`` and ``lipfarm token create|list|revoke``: the farm as an HTTP service."""

from __future__ import annotations

import json
import time
from datetime import datetime

from lipfarm.common import defaults
from lipfarm.common.config import Settings


def add_commands(commands) -> None:
    api = commands.add_parser("api", help="serve the HTTP API and the jobs page")
    api.add_argument("--host", default=defaults.API_HOST,
                     help=f"address to listen on (default {defaults.API_HOST}; 0.0.0.0 for every interface)")
    api.add_argument("--port", type=int, default=defaults.API_PORT, help=f"port (default {defaults.API_PORT})")
    api.add_argument("--print-openapi", action="store_true",
                     help="print the OpenAPI document and exit (docs/openapi.json is its output)")
    api.set_defaults(func=cmd_api)

    token = commands.add_parser("token", help="create, list and revoke API tokens")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a token (printed once, as the last word)")
    create.add_argument("--name", help="a name to list and revoke it by (default token-<id>)")
    create.add_argument("--read-only", action="store_true", help="may read, not submit, cancel or upload")
    create.set_defaults(func=cmd_token_create)
    actions.add_parser("list", help="list tokens (never their values)").set_defaults(func=cmd_token_list)
    revoke = actions.add_parser("revoke", help="revoke a token: requests carrying it are refused")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_token_revoke)


def cmd_api(args, settings: Settings) -> int:
    from lipfarm.api.app import create_app

    app = create_app(settings)
    if args.print_openapi:
        print(json.dumps(app.openapi(), indent=2))
        return 0
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="info", server_header=False,
                timeout_graceful_shutdown=30, log_config=_log_config(as_json=args.log_json))
    return 0


def _log_config(*, as_json: bool) -> dict:
    """uvicorn's logging, each line with its time first (an operator reads when, not only what), or
    as JSON lines (``--log-json``)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        if as_json:
            formatter.clear()
            formatter["()"] = "lipfarm.cli.logs.JsonFormatter"
        else:
            formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
    return config


def _tokens(settings: Settings):
    from lipfarm.common.state import TokenStore
    from lipfarm.scheduler.submit import connect_farm

    return TokenStore.of(connect_farm(settings))


def cmd_token_create(args, settings: Settings) -> int:
    token, value = _tokens(settings).create(name=args.name, read_only=args.read_only, now=time.time())
    print(f"created token '{token.name}' ({token.access}), id {token.id}; it is shown only now: {value}")
    return 0


def cmd_token_list(args, settings: Settings) -> int:
    tokens = _tokens(settings).list()
    if not tokens:
        print("no tokens (make one with `lipfarm token create --name NAME`)")
        return 0
    print(f"{'name':<24} {'id':<12}  {'access':<10}  created")
    for token in tokens:
        when = datetime.fromtimestamp(token.created_at).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{token.name:<24} {token.id:<12}  {token.access:<10}  {when}")
    return 0


def cmd_token_revoke(args, settings: Settings) -> int:
    token = _tokens(settings).revoke(args.name)
    print(f"revoked token '{token.name}' (id {token.id})")
    return 0
