"""``lipfarm api``, ``lipfarm token create|list|revoke`` and ``lipfarm tenant set|list``: the farm as
an HTTP service, its tokens and its tenants' limits."""

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
    create.add_argument("--tenant", default="default",
                        help="whose jobs it sees and makes (default: default, as tokens from before tenants)")
    create.add_argument("--admin", action="store_true", help="sees and steers every tenant's jobs")
    create.set_defaults(func=cmd_token_create)
    actions.add_parser("list", help="list tokens (never their values)").set_defaults(func=cmd_token_list)
    revoke = actions.add_parser("revoke", help="revoke a token: requests carrying it are refused")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_token_revoke)

    tenant = commands.add_parser("tenant", help="set and list tenants' quotas and fair-share weights")
    actions = tenant.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    change = actions.add_parser("set", help="change a tenant's limits (what is not given is kept)")
    change.add_argument("name")
    change.add_argument("--max-queued", type=int, help="jobs not yet ended it may have at once (0: no limit)")
    change.add_argument("--rps", type=float, help="API requests per second (0: no limit)")
    change.add_argument("--weight", type=float, help="its share of the workers when tenants wait (default 1)")
    change.set_defaults(func=cmd_tenant_set)
    actions.add_parser("list", help="list tenants and their limits").set_defaults(func=cmd_tenant_list)


def cmd_api(args, settings: Settings) -> int:
    from lipfarm.api.app import create_app

    app = create_app(settings)
    if args.print_openapi:
        print(json.dumps(app.openapi(), indent=2))
        return 0
    from lipfarm.common.services import refuse_evicting_redis

    refuse_evicting_redis(settings)
    import uvicorn

    # a route that reads no body answers at once; the connection, with a body declared and never
    # sent, is then closed once idle this long (bodies that are read have their own timeout: api.uploads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", server_header=False,
                timeout_graceful_shutdown=30, timeout_keep_alive=defaults.API_KEEP_ALIVE_S,
                log_config=_log_config(as_json=args.log_json))
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
    token, value = _tokens(settings).create(name=args.name, read_only=args.read_only, now=time.time(),
                                            tenant=args.tenant, admin=args.admin)
    print(f"created token '{token.name}' of tenant '{token.tenant}' ({token.access}), id {token.id}; "
          f"it is shown only now: {value}")
    return 0


def cmd_token_list(args, settings: Settings) -> int:
    tokens = _tokens(settings).list()
    if not tokens:
        print("no tokens (make one with `lipfarm token create --name NAME`)")
        return 0
    print(f"{'name':<24} {'id':<12}  {'tenant':<16}  {'access':<17}  created")
    for token in tokens:
        when = datetime.fromtimestamp(token.created_at).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{token.name:<24} {token.id:<12}  {token.tenant:<16}  {token.access:<17}  {when}")
    return 0


def cmd_token_revoke(args, settings: Settings) -> int:
    token = _tokens(settings).revoke(args.name)
    print(f"revoked token '{token.name}' (id {token.id})")
    return 0


def _tenants(settings: Settings):
    from lipfarm.common.state import TenantStore
    from lipfarm.scheduler.submit import connect_farm

    return TenantStore.of(connect_farm(settings))


def _limit(value: float) -> str:
    return "no limit" if not value else f"{value:g}"


def cmd_tenant_set(args, settings: Settings) -> int:
    tenant = _tenants(settings).set(args.name, max_queued=args.max_queued, rps=args.rps, weight=args.weight)
    print(f"tenant '{tenant.name}': max queued {_limit(tenant.max_queued)}, requests/s {_limit(tenant.rps)}, "
          f"weight {tenant.weight:g}")
    return 0


def cmd_tenant_list(args, settings: Settings) -> int:
    """Tenants that were set, and those that only have tokens (with no limits)."""
    print(f"{'tenant':<32}  {'max queued':>10}  {'requests/s':>10}  {'weight':>6}  {'unfinished':>10}")
    store = _tenants(settings)
    known = {tenant.name: tenant for tenant in store.list()}
    for token in _tokens(settings).list():
        known.setdefault(token.tenant, store.get(token.tenant))
    for tenant in (known[name] for name in sorted(known)):
        print(f"{tenant.name:<32}  {_limit(tenant.max_queued):>10}  {_limit(tenant.rps):>10}  {tenant.weight:>6g}  "
              f"{store.unfinished_jobs(tenant.name):>10}")
    return 0
