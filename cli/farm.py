"""``lipfarm worker|flower|reconcile``: the farm's long-running processes."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import sys
import tempfile
from datetime import datetime

from lipfarm.cli import logs
from lipfarm.common import defaults
from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError


def add_commands(commands) -> None:
    worker = commands.add_parser("worker", help="run a Celery worker (render, plan, finalize)")
    worker.add_argument("--concurrency", type=int, default=0,
                        help="render processes (default: LIPFARM_WORKER_CONCURRENCY, 1)")
    worker.add_argument("--queues", default="jobs,finalize,render",  # celery_app.QUEUES (not imported: the CLI starts fast)
                        help="queues to take work from, in the order read at each priority step")
    worker.add_argument("--hostname", help="Celery node name (default lipfarm-<pid>@<host>)")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--metrics-port", type=int, default=0,
                        help=f"serve this worker's Prometheus metrics on this port (0: off; the deploy files use "
                             f"{defaults.METRICS_PORT})")
    worker.add_argument("--metrics-address", default=defaults.METRICS_ADDRESS,
                        help=f"address the metrics are served on (default {defaults.METRICS_ADDRESS}; 0.0.0.0 in "
                             "containers, for Prometheus to reach)")
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
    if args.metrics_port:  # first: prometheus_client picks its mode when it is first imported
        _metrics_in_every_process(args.metrics_port, args.metrics_address)
    from lipfarm.scheduler.submit import connect_farm

    concurrency = args.concurrency or settings.worker_concurrency
    os.environ["LIPFARM_WORKER_CONCURRENCY"] = str(concurrency)  # children size their threads by it
    connect_farm(settings)
    from lipfarm.common import shutdown  # noqa: F401  its shared stop flag is made here, before the pool forks
    if args.log_json:
        logs.json_for_celery()
    from lipfarm.common.celery_app import app

    _print_inference_line(settings, as_json=args.log_json)
    quiet = ["--quiet"] if args.log_json else []  # no banner: every line a shipper reads is JSON
    argv = [*quiet, "worker", f"--concurrency={concurrency}", "--pool=prefork", f"--queues={args.queues}",
            f"--loglevel={args.loglevel}", "--task-events",
            f"--hostname={args.hostname or f'lipfarm-{os.getpid()}@{socket.gethostname()}'}"]
    app.worker_main(argv)
    return 0


def _print_inference_line(settings: Settings, *, as_json: bool = False) -> None:
    """What this worker runs inference on: the default precision and backend and, for ``auto``, the
    choices already measured on this machine (each new model's is logged when first measured).
    With ``--log-json``, one JSON line like the log's."""
    from lipfarm.common.autoselect import cached_choices
    from lipfarm.common.runtime import machine_fingerprint

    choices, cpu = cached_choices(), machine_fingerprint()["cpu"]
    line = (f"lipfarm worker: inference on {cpu}; jobs' default precision {settings.precision}, backend "
            f"{settings.backend}; precision auto: {len(choices)} model(s) measured here, PSNR bound "
            f"{settings.auto_min_psnr_db:g} dB")
    if as_json:
        print(logs.json_line(line, cpu=cpu, auto_choices=choices), flush=True)
        return
    print(line, flush=True)
    for choice in choices:
        print(f"  auto: {choice}", flush=True)


def _metrics_in_every_process(port: int, address: str) -> None:
    """Prometheus multiprocess mode for this worker: a fresh directory of its own (a shared or reused
    one would add other workers' or earlier runs' counts), set before the pool forks so every render
    process writes there; the main process serves the sum once the pool is up (``worker_ready``), and
    a pool process that exits has its live-only gauges dropped (``worker_process_shutdown``)."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess directory was set")
    _check_port_free(port, address)
    folder = tempfile.mkdtemp(prefix=f"lipfarm-metrics-{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)

    from celery import signals

    @signals.worker_ready.connect(weak=False)
    def _serve(**_kwargs) -> None:
        from lipfarm.common.metrics import serve_worker_metrics

        serve_worker_metrics(port, address)
        print(f"metrics on http://{address}:{port}/metrics", flush=True)

    @signals.worker_process_shutdown.connect(weak=False)
    def _exited(pid=None, **_kwargs) -> None:
        from lipfarm.common.metrics import process_exited

        process_exited(pid or os.getpid())


def _check_port_free(port: int, address: str) -> None:
    """Fail now, naming the port, rather than after the worker has started its pool."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            raise InputError(f"cannot serve metrics on {address}:{port} ({exc.strerror})", field="--metrics-port",
                             found=port) from None


def cmd_flower(args, settings: Settings) -> int:
    from lipfarm.scheduler.submit import connect_farm

    connect_farm(settings)
    if args.address in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")  # loopback only: no one else can call it
    command = [sys.executable, "-m", "celery", "-A", "lipfarm.common.celery_app", "flower",
               f"--address={args.address}", f"--port={args.port}"]
    os.execvp(command[0], command)
    return 0


def cmd_reconcile(args, settings: Settings) -> int:
    from lipfarm.scheduler.reconcile import reconcile, run_forever
    from lipfarm.scheduler.tasks import celery_enqueue, connect_recovery

    enqueue = celery_enqueue()
    say = functools.partial(_say, as_json=args.log_json)
    if args.loop:
        from lipfarm.common.services import refuse_evicting_redis

        refuse_evicting_redis(settings)
        say(f"reconciling every {settings.reconcile_interval_s:g} s (Ctrl-C stops)")
        run_forever(functools.partial(connect_recovery, settings), settings, enqueue, rebuild_first=args.rebuild,
                    on_pass=functools.partial(_print_report, say=say))
        return 0
    store, storage_at = connect_recovery(settings)
    _print_report(reconcile(store=store, storage=storage_at(settings.storage_url), settings=settings,
                            enqueue=enqueue, rebuild=args.rebuild, storage_at=storage_at),
                  say=say, always=True)
    return 0


def _print_report(report, *, say, always: bool = False) -> None:
    """One line per pass that did something (every pass with ``always``), with the time it ended:
    an operator reading the loop's output sees when each recovery happened."""
    done = {kind: items for kind, items in report.__dict__.items() if items}
    if done or always:
        say(", ".join(f"{kind} {len(items)}" for kind, items in done.items()) or "nothing to recover",
            counts={kind: len(items) for kind, items in done.items()})


def _say(line: str, *, as_json: bool, **fields) -> None:
    """A line of the reconciler's own, with its time: the local time with its UTC offset (ISO 8601,
    milliseconds), or a JSON line like the log's."""
    text = logs.json_line(line, **fields) if as_json else f"{datetime.now().astimezone().isoformat(timespec='milliseconds')} {line}"
    print(text, flush=True)
