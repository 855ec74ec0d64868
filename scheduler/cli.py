"""The ``lipfarm`` command line.

Every subcommand is a thin shell: parse, build options once, call a function, print a line. A
``LipfarmError`` becomes one line on stderr and the error's exit code (2 bad input, 3 bad model,
4 not found, 5 service unreachable, 6 job failed, 7 cancelled; 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from common import defaults
from common.config import Settings, load_settings, settings_markdown
from common.errors import LipfarmError
from common.options import RenderOptions

# Help for each RenderOptions field; its flag is the field name with dashes.
OPTION_HELP = {
    "chunk_frames": "frames per chunk (a multiple of --gop-frames)",
    "gop_frames": "keyframe interval in frames; chunks start on keyframes",
    "batch_frames": "UNet batch size in frames; 0 picks by backend (4 on CPUs, 32 on GPUs)",
    "precision": "inference precision: fp32 (exact), bf16 (OpenVINO CPU), fp16 (CUDA)",
    "backend": "inference backend: auto, cpu, openvino, cuda",
    "video_qp": "H.264 constant quantiser, 0 (lossless) to 51; lower is better quality",
    "x264_preset": "x264 speed preset",
    "x264_threads": "x264 threads per chunk encode (part of the bitstream: fixed per job)",
    "audio_bitrate_bps": "AAC bitrate of the output's audio",
}


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``RenderOptions`` field, defaulting to 'not given'."""
    group = parser.add_argument_group("render options")
    for spec in fields(RenderOptions):
        flag = "--" + spec.name.replace("_", "-")
        kind = int if spec.type == "int" else str
        group.add_argument(flag, dest=f"opt_{spec.name}", type=kind, default=None,
                           help=f"{OPTION_HELP[spec.name]} (default {spec.default})")


def options_from_args(args: argparse.Namespace, settings: Settings) -> RenderOptions:
    given = {spec.name: getattr(args, f"opt_{spec.name}") for spec in fields(RenderOptions)}
    if given["precision"] is None:
        given["precision"] = settings.precision
    if given["backend"] is None:
        given["backend"] = settings.backend
    return RenderOptions(**{k: v for k, v in given.items() if v is not None})


def _models(args, settings: Settings) -> tuple[Path, Path]:
    if (args.encoder is None) != (args.generator is None):
        from common.errors import InputError

        raise InputError("give both --encoder and --generator, or neither (the demo models)",
                         field="--encoder/--generator")
    if args.encoder is not None:
        return Path(args.encoder), Path(args.generator)
    from common.demo.assets import ensure_demo_assets

    demo = ensure_demo_assets(settings)
    return demo.encoder, demo.generator


def _print_result(result) -> None:
    print(f"wrote {result.output}: {result.frames} frames ({result.frames / defaults.FPS:.2f} s) "
          f"in {result.wall_s:.1f} s, {result.fps:.1f} frames/s")


def cmd_render(args, settings: Settings) -> int:
    from common.avatar import AvatarStore
    from scheduler.local import render_local

    options = options_from_args(args, settings)
    avatar = AvatarStore(settings.avatars_dir).get(args.avatar)
    encoder, generator = _models(args, settings)
    result = render_local(avatar=avatar, audio=Path(args.audio), out=Path(args.out), encoder=encoder,
                          generator=generator, options=options, settings=settings,
                          workers=args.workers, show_progress=not args.quiet)
    _print_result(result)
    return 0


def cmd_demo(args, settings: Settings) -> int:
    from common.avatar import AvatarStore
    from common.demo.assets import ensure_demo_assets
    from scheduler.local import render_local

    demo = ensure_demo_assets(settings)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = render_local(avatar=AvatarStore(settings.avatars_dir).get(demo.avatar_name),
                          audio=demo.audio, out=out, encoder=demo.encoder, generator=demo.generator,
                          options=options_from_args(args, settings), settings=settings,
                          workers=args.workers, show_progress=not args.quiet)
    _print_result(result)
    return 0


def cmd_avatar_import(args, settings: Settings) -> int:
    from common.avatar import AvatarStore
    from common.avatar_import import import_avatar

    store = AvatarStore(settings.avatars_dir)
    avatar = import_avatar(Path(args.path), store.path(args.name), name=args.name, replace=args.force)
    print(f"imported '{avatar.name}': {avatar.frame_count} frames {avatar.width}x{avatar.height} "
          f"({avatar.source.get('layout')}), hash {avatar.content_hash[:12]}")
    return 0


def cmd_avatar_list(args, settings: Settings) -> int:
    from common.avatar import AvatarStore

    store = AvatarStore(settings.avatars_dir)
    names = store.names()
    if not names:
        print(f"no avatars in {store.root} (import one with `lipfarm avatar import PATH --name NAME`)")
        return 0
    print(f"{'name':<24} {'frames':>6} {'size':>10}  {'layout':<18} hash")
    for name in names:
        try:
            avatar = store.get(name)
        except LipfarmError as exc:  # one damaged avatar must not hide the others
            print(f"{name:<24} damaged: {exc}")
            continue
        print(f"{name:<24} {avatar.frame_count:>6} {avatar.width:>5}x{avatar.height:<4}  "
              f"{avatar.source.get('layout', '?'):<18} {avatar.content_hash[:12]}")
    return 0


def cmd_avatar_show(args, settings: Settings) -> int:
    from common.avatar import AvatarStore

    avatar = AvatarStore(settings.avatars_dir).get(args.name)
    sides = [r[2] - r[0] for r in avatar.rects]
    print(json.dumps({"name": avatar.name, "path": str(avatar.root), "frames": avatar.frame_count,
                      "size": f"{avatar.width}x{avatar.height}", "content_hash": avatar.content_hash,
                      "rect_0": list(avatar.rects[0]), "rect_side_px": [min(sides), max(sides)],
                      "source": avatar.source}, indent=2))
    return 0


def cmd_bench(args, settings: Settings) -> int:
    from scheduler.bench import BenchConfig, draw_chart, run_bench, write_report

    threads = args.threads or settings.threads_per_process(1)
    configs = []
    for item in args.precisions.split(","):  # "fp32", or "backend:precision" such as "openvino:fp32"
        backend, _, precision = item.strip().rpartition(":")
        configs.append(BenchConfig(backend or args.backend or settings.backend, precision, threads,
                                   args.batch_frames))
    report = run_bench(settings, configs=configs, repeat=args.repeat)
    for run in report["runs"]:
        extra = f", PSNR vs fp32 {run['psnr_vs_fp32_db']} dB" if "psnr_vs_fp32_db" in run else ""
        print(f"{run['backend']}/{run['precision']}: inference {run['inference_fps']:.2f} frames/s, "
              f"end to end {run['end_to_end_fps']:.2f} frames/s, efficiency {run['efficiency']:.3f}{extra}")
    if args.farm:
        from scheduler.bench_farm import run_farm_bench

        counts = [int(c) for c in args.workers.split(",")]
        report["farm"] = run_farm_bench(settings, worker_counts=counts, frames=args.farm_frames,
                                        chunk_frames=args.farm_chunk_frames, redis_db=args.farm_redis_db,
                                        rounds=args.farm_rounds)
        farm = report["farm"]
        print(f"farm: {farm['farm_fps']} frames/s by workers, scaling {farm.get('scaling', '-')}, "
              f"overhead {farm['chunk_overhead_s']:.3f} s per chunk "
              f"({100 * farm['chunk_overhead_share_of_250_frames']:.2f}% of a 250-frame chunk)")
    if args.memory:
        from scheduler.bench_memory import run_memory_bench

        report["memory"] = run_memory_bench(settings, threads=threads)
        print(f"memory: peak RSS ratio 30 min / 1 min: {report['memory']['ratio']}")
    write_report(report, Path(args.json))
    print(f"wrote {args.json}")
    if args.chart:
        print(f"wrote {draw_chart(report, Path(args.chart))}")
    return 0


def _farm_store(settings: Settings):
    from scheduler.submit import check_broker

    return check_broker(settings)


def _handle(job_id: str, settings: Settings):
    from common.services import storage_for
    from scheduler.submit import JobHandle

    return JobHandle(job_id, _farm_store(settings), storage_for(settings))


def cmd_submit(args, settings: Settings) -> int:
    from scheduler.submit import submit_job

    options = options_from_args(args, settings)
    encoder, generator = _models(args, settings)
    handle = submit_job(settings, avatar=args.avatar, audio=Path(args.audio), encoder=encoder,
                        generator=generator, options=options, priority=args.priority)
    print(handle.job_id)
    if args.wait:
        status = handle.wait(show_progress=not args.quiet)
        print(f"done: {status.frames_total} frames in {status.elapsed_s:.1f} s; output: {status.output_location}")
    return 0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def cmd_status(args, settings: Settings) -> int:
    import time

    status = _farm_store(settings).status(args.job, now=time.time())
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
        return 0
    share = f" ({100 * status.frames_done / status.frames_total:.0f}%)" if status.frames_total else ""
    chunks = ", ".join(f"{state} {n}" for state, n in sorted(status.chunks.items())) or "not planned yet"
    print(f"job {status.job_id}: {status.state.value}")
    print(f"  avatar {status.avatar}, audio {status.audio}, priority {status.priority}")
    print(f"  frames {status.frames_done} / {status.frames_total}{share}; chunks: {chunks}")
    left = f", about {_duration(status.eta_s)} left" if status.eta_s is not None else ""
    print(f"  elapsed {_duration(status.elapsed_s)}{left}")
    if status.workers:
        print(f"  workers: {', '.join(status.workers)}")
    if status.output_location:
        print(f"  output: {status.output_location}")
    if status.reason and status.state.value in ("failed", "cancelled"):
        print(f"  reason: {status.reason}")
    return 0


def cmd_jobs(args, settings: Settings) -> int:
    import time
    from datetime import datetime

    store = _farm_store(settings)
    ids = store.job_ids(args.limit)
    if not ids:
        print("no jobs")
        return 0
    print(f"{'job':<24} {'state':<11} {'frames':>15} {'priority':<8} {'submitted':<19} avatar / audio")
    for job_id in ids:
        s = store.status(job_id, now=time.time())
        when = datetime.fromtimestamp(s.created_at).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{job_id:<24} {s.state.value:<11} {f'{s.frames_done}/{s.frames_total}':>15} "
              f"{s.priority:<8} {when:<19} {s.avatar} / {s.audio}")
    return 0


def cmd_cancel(args, settings: Settings) -> int:
    handle = _handle(args.job, settings)
    state = handle.status().state.value
    if handle.cancel():
        print(f"job {args.job} cancelled (was {state}); running chunks stop at their next batch")
        return 0
    print(f"job {args.job} already ended: {state}")
    return 0


def cmd_worker(args, settings: Settings) -> int:
    import os
    import socket

    concurrency = args.concurrency or settings.worker_concurrency
    os.environ["LIPFARM_WORKER_CONCURRENCY"] = str(concurrency)  # children size their threads by it
    _farm_store(settings)
    from common.celery_app import app

    argv = ["worker", f"--concurrency={concurrency}", "--pool=prefork", f"--queues={args.queues}",
            f"--loglevel={args.loglevel}", "--task-events",
            f"--hostname={args.hostname or f'lipfarm-{os.getpid()}@{socket.gethostname()}'}"]
    if args.beat:
        argv.append("--beat")
    app.worker_main(argv)
    return 0


def cmd_flower(args, settings: Settings) -> int:
    import os

    _farm_store(settings)
    if args.address in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")  # loopback only: no one else can call it
    command = [sys.executable, "-m", "celery", "-A", "common.celery_app", "flower",
               f"--address={args.address}", f"--port={args.port}"]
    os.execvp(command[0], command)
    return 0


def cmd_reconcile(args, settings: Settings) -> int:
    import time

    from common.celery_app import enqueue_finalize, enqueue_plan, enqueue_render
    from common.storage import open_storage
    from common.services import storage_for
    from scheduler.reconcile import Enqueue, reconcile

    store, storage = _farm_store(settings), storage_for(settings)

    def storage_at(url: str):
        return storage if url == storage.url else open_storage(url, **settings.s3_settings())

    enqueue = Enqueue(enqueue_plan, enqueue_render, enqueue_finalize)
    rebuild = args.rebuild
    while True:
        report = reconcile(store=store, storage=storage, settings=settings, now=time.time(),
                           enqueue=enqueue, rebuild=rebuild, storage_at=storage_at)
        rebuild = False
        print(", ".join(f"{k} {len(v)}" for k, v in report.__dict__.items()), flush=True)
        if not args.loop:
            return 0
        time.sleep(settings.reconcile_interval_s)


def cmd_config(args, settings: Settings) -> int:
    if args.markdown:
        print(settings_markdown())
        return 0
    for spec in fields(Settings):
        print(f"{spec.name} = {getattr(settings, spec.name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipfarm", description="Lip-sync video rendering on one machine or a render farm.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = commands.add_parser("render", help="render a video on this machine (no broker)")
    render.add_argument("--avatar", required=True, help="name of an imported avatar")
    render.add_argument("--audio", required=True, help="audio file (wav, flac, mp3, ogg, m4a, mp4, mov)")
    render.add_argument("--out", required=True, help="output MP4 path (its directory must exist)")
    render.add_argument("--encoder", help="audio encoder ONNX (default: the demo encoder)")
    render.add_argument("--generator", help="UNet generator ONNX (default: the demo UNet)")
    render.add_argument("--workers", type=int, default=1, help="render processes (default 1)")
    render.add_argument("--quiet", action="store_true", help="no progress bar")
    add_option_flags(render)
    render.set_defaults(func=cmd_render)

    demo = commands.add_parser("demo", help="create the demo assets and render out/demo.mp4")
    demo.add_argument("--out", default="out/demo.mp4")
    demo.add_argument("--workers", type=int, default=1)
    demo.add_argument("--quiet", action="store_true")
    add_option_flags(demo)
    demo.set_defaults(func=cmd_demo)

    avatar = commands.add_parser("avatar", help="import, list and show avatars")
    avatar_commands = avatar.add_subparsers(dest="avatar_command", required=True, metavar="ACTION")
    imp = avatar_commands.add_parser("import", help="import a SyncTalk_2D dataset or pre-cut package")
    imp.add_argument("path")
    imp.add_argument("--name", required=True)
    imp.add_argument("--force", action="store_true", help="replace an avatar of the same name")
    imp.set_defaults(func=cmd_avatar_import)
    avatar_commands.add_parser("list", help="list imported avatars").set_defaults(func=cmd_avatar_list)
    show = avatar_commands.add_parser("show", help="describe an avatar")
    show.add_argument("name")
    show.set_defaults(func=cmd_avatar_show)

    bench = commands.add_parser("bench", help="measure inference and end-to-end speed on the demo")
    bench.add_argument("--json", required=True, help="where to write the figures")
    bench.add_argument("--precisions", default="fp32",
                       help="comma-separated runs: fp32,bf16,fp16, or backend:precision (openvino:fp32)")
    bench.add_argument("--backend", help="backend for all runs (default: the setting, auto)")
    bench.add_argument("--threads", type=int, default=0, help="inference threads (default: all cores)")
    bench.add_argument("--batch-frames", type=int, default=defaults.UNET_BATCH_FRAMES)
    bench.add_argument("--repeat", type=int, default=3,
                       help="rounds of inference-only then end-to-end; the median round is reported")
    bench.add_argument("--chart", help="also draw a PNG chart of frames/s by stage and backend")
    bench.add_argument("--farm", action="store_true", help="also measure farm throughput and scaling")
    bench.add_argument("--workers", default="1,2", help="worker counts for --farm (one inference thread each)")
    bench.add_argument("--farm-frames", type=int, default=500, help="frames of the timed farm job")
    bench.add_argument("--farm-chunk-frames", type=int, default=125)
    bench.add_argument("--farm-rounds", type=int, default=2, help="alternating rounds of 1 and 2 workers")
    bench.add_argument("--farm-redis-db", type=int, default=15,
                       help="an unused Redis database on the broker's server for --farm")
    bench.add_argument("--memory", action="store_true", help="also measure peak memory, 1-min vs 30-min job")
    bench.set_defaults(func=cmd_bench)

    submit = commands.add_parser("submit", help="queue a render job on the farm")
    submit.add_argument("--avatar", required=True)
    submit.add_argument("--audio", required=True)
    submit.add_argument("--encoder")
    submit.add_argument("--generator")
    submit.add_argument("--priority", default="normal", choices=["high", "normal", "low"])
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    submit.add_argument("--quiet", action="store_true", help="no progress bar with --wait")
    add_option_flags(submit)
    submit.set_defaults(func=cmd_submit)

    status = commands.add_parser("status", help="state, progress and output of a job")
    status.add_argument("job")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    jobs = commands.add_parser("jobs", help="recent jobs")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(func=cmd_jobs)

    cancel = commands.add_parser("cancel", help="cancel a job: nothing is published")
    cancel.add_argument("job")
    cancel.set_defaults(func=cmd_cancel)

    worker = commands.add_parser("worker", help="run a Celery worker (render, plan, finalize)")
    worker.add_argument("--concurrency", type=int, default=0,
                        help="render processes (default: LIPFARM_WORKER_CONCURRENCY, 1)")
    worker.add_argument("--queues", default="jobs,render,finalize")
    worker.add_argument("--beat", action="store_true", help="also run the reconcile schedule")
    worker.add_argument("--hostname", help="Celery node name (default lipfarm-<pid>@<host>)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    flower = commands.add_parser("flower", help="run Flower (the Celery dashboard) on loopback")
    flower.add_argument("--address", default="127.0.0.1")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)

    recon = commands.add_parser("reconcile", help="requeue lost chunks and finalizers")
    recon.add_argument("--loop", action="store_true", help="run every LIPFARM_RECONCILE_INTERVAL_S")
    recon.add_argument("--rebuild", action="store_true",
                       help="first restore unfinished jobs missing from Redis from storage")
    recon.set_defaults(func=cmd_reconcile)

    config = commands.add_parser("config", help="print the settings in effect")
    config.add_argument("--markdown", action="store_true", help="the settings table for the README")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        return args.func(args, settings)
    except LipfarmError as exc:
        print(f"lipfarm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lipfarm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
