"""``lipfarm cluster up|down|status``: a whole farm on this machine in one command (``scheduler.cluster``)."""

from __future__ import annotations

import os
import shlex

from lipfarm.common import defaults
from lipfarm.common.config import Settings
from lipfarm.common.state.connection import mask_url


def add_commands(commands) -> None:
    cluster = commands.add_parser("cluster", help="run a whole farm on this machine (Redis, S3, workers, "
                                                  "Flower, the API), on loopback")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="start the cluster, wait until every part answers, print how to use it")
    up.add_argument("--workers", type=int, default=2, help="render workers, one render process each (default 2)")
    up.add_argument("--s3", action="store_true", help="keep jobs in a local S3 server (SeaweedFS) of the cluster's "
                                                      "own instead of LIPFARM_STORAGE_URL")
    up.add_argument("--api-port", type=int, default=defaults.API_PORT,
                    help=f"the API's port (default {defaults.API_PORT}; 0: a free one)")
    up.add_argument("--flower-port", type=int, default=5555, help="Flower's port (default 5555; 0: a free one)")
    up.add_argument("--redis", metavar="URL", default="",
                    help="use this Redis (it must answer); default: LIPFARM_BROKER_URL if set in the environment, "
                         "else a redis-server of the cluster's own on a free port (never one that merely answers "
                         "on the default port)")
    up.set_defaults(func=cmd_cluster_up)
    actions.add_parser("down", help="stop every process of the cluster (its data stays)").set_defaults(
        func=cmd_cluster_down)
    actions.add_parser("status", help="list the cluster's processes, alive or not").set_defaults(
        func=cmd_cluster_status)


def cmd_cluster_up(args, settings: Settings) -> int:
    from lipfarm.scheduler.cluster import ClusterSpec, LocalCluster

    redis, named_by = _named_redis(args.redis)
    spec = ClusterSpec(workers=args.workers, s3=args.s3, api_port=args.api_port, flower_port=args.flower_port,
                       redis=redis, redis_named_by=named_by)
    print(f"starting a cluster in {settings.home / 'cluster'} ...", flush=True)
    cluster = LocalCluster(settings).up(spec)
    for note in cluster.notes:
        print(note)
    width = max(len(name) for name in cluster.urls)
    for name, url in cluster.urls.items():
        print(f"{name:<{width}}  {url}")
    print(f"{'logs':<{width}}  {cluster.folder / 'logs'}")
    print(f"{'pids':<{width}}  {', '.join(f'{d.name} {d.pid}' for d in cluster.processes)}")
    print(cluster.token_line)
    print("# to use it from a shell (lipfarm submit, status, token ...):")
    for name, value in cluster.settings.items():
        if mask_url(value) != value:  # a Redis password from your settings: never printed
            print(f"# {name}: as set in your environment (it holds a password)")
        else:
            print(f"export {name}={shlex.quote(value)}")
    print("# stop it with: lipfarm cluster down", flush=True)
    return 0


def _named_redis(flag: str) -> tuple[str, str]:
    """The Redis the user named, and how: ``--redis``, else LIPFARM_BROKER_URL set in the environment
    (a setting left at its default names nothing)."""
    if flag:
        return flag, "--redis"
    if os.environ.get("LIPFARM_BROKER_URL"):
        return os.environ["LIPFARM_BROKER_URL"], "LIPFARM_BROKER_URL"
    return "", ""


def cmd_cluster_down(args, settings: Settings) -> int:
    from lipfarm.scheduler.cluster import LocalCluster

    stopped = LocalCluster(settings).down()
    print(f"stopped {len(stopped)} processes: {', '.join(f'{d.name} ({d.pid})' for d in stopped)}")
    return 0


def cmd_cluster_status(args, settings: Settings) -> int:
    from lipfarm.scheduler.cluster import LocalCluster

    cluster = LocalCluster(settings).current()
    dead = 0
    for daemon in cluster.processes:
        alive = daemon.alive()
        dead += not alive
        print(f"{daemon.name:<16} pid {daemon.pid:<8} {'alive' if alive else 'DEAD':<6} {daemon.url}")
    if dead:
        print(f"{dead} of {len(cluster.processes)} processes are not running: see their logs in "
              f"{cluster.folder / 'logs'}; `lipfarm cluster down` stops the rest")
        return 5
    return 0
