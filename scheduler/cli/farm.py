"""``lipfarm worker|flower|reconcile``: the farm's long-running processes."""

from __future__ import annotations

import functools
import os
import socket
import sys
import time

from common.config import Settings


def add_commands(commands) -> None:
    worker = commands.add_parser("worker", help="run a Celery worker (render, plan, finalize)")
    worker.add_argument("--concurrency", type=int, default=0,
                        help="render processes (default: LIPFARM_WORKER_CONCURRENCY, 1)")
    worker.add_argument("--queues", default="jobs,render,finalize", help="queues to take work from")
    worker.add_argument("--hostname", help="Celery node name (default lipfarm-<pid>@<host>)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    flower = commands.add_parser("flower", help="run Flower (the Celery dashboard) on loopback")
    flower.add_argument("--address", default="127.0.0.1")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)

    recon = commands.add_parser("reconcile", help="recover lost work now (workers also do it on their own)")
    recon.add_argument("--loop", action="store_true",
                       help="run every LIPFARM_RECONCILE_INTERVAL_S, riding out outages, until stopped")
    recon.add_argument("--rebuild", action="store_true",
                       help="rebuild from storage on the first pass even if Redis seems to have its data")
    recon.set_defaults(func=cmd_reconcile)


def cmd_worker(args, settings: Settings) -> int:
    from scheduler.submit import connect_farm

    concurrency = args.concurrency or settings.worker_concurrency
    os.environ["LIPFARM_WORKER_CONCURRENCY"] = str(concurrency)  # children size their threads by it
    connect_farm(settings)
    from common.celery_app import app

    argv = ["worker", f"--concurrency={concurrency}", "--pool=prefork", f"--queues={args.queues}",
            f"--loglevel={args.loglevel}", "--task-events",
            f"--hostname={args.hostname or f'lipfarm-{os.getpid()}@{socket.gethostname()}'}"]
    app.worker_main(argv)
    return 0


def cmd_flower(args, settings: Settings) -> int:
    from scheduler.submit import connect_farm

    connect_farm(settings)
    if args.address in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")  # loopback only: no one else can call it
    command = [sys.executable, "-m", "celery", "-A", "common.celery_app", "flower",
               f"--address={args.address}", f"--port={args.port}"]
    os.execvp(command[0], command)
    return 0


def cmd_reconcile(args, settings: Settings) -> int:
    from scheduler.reconcile import reconcile, run_forever
    from scheduler.tasks import celery_enqueue, connect_recovery

    enqueue = celery_enqueue()
    if args.loop:
        print(f"reconciling every {settings.reconcile_interval_s:g} s (Ctrl-C stops)", flush=True)
        run_forever(functools.partial(connect_recovery, settings), settings, enqueue, rebuild_first=args.rebuild,
                    on_pass=_print_report)
        return 0
    store, storage_at = connect_recovery(settings)
    _print_report(reconcile(store=store, storage=storage_at(settings.storage_url), settings=settings,
                            now=time.time(), enqueue=enqueue, rebuild=args.rebuild, storage_at=storage_at),
                  always=True)
    return 0


def _print_report(report, *, always: bool = False) -> None:
    done = {kind: items for kind, items in report.__dict__.items() if items}
    if done or always:
        print(", ".join(f"{kind} {len(items)}" for kind, items in done.items()) or "nothing to recover", flush=True)
