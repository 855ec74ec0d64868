"""``lipfarm bench``: the speed figures (the ``benchmarks`` package, imported only when asked for)."""

from __future__ import annotations

from pathlib import Path

from lipfarm.common import defaults
from lipfarm.common.config import Settings


def add_commands(commands) -> None:
    bench = commands.add_parser("bench", help="measure inference and end-to-end speed on the demo")
    bench.add_argument("--json", required=True, help="where to write the figures")
    bench.add_argument("--precisions", default="fp32",
                       help="comma-separated runs: fp32,bf16,fp16, or backend:precision (openvino:fp32); "
                            "empty: no local runs (only --farm, --watch, --memory, --recovery, --load or --vs-port)")
    bench.add_argument("--backend", help="backend for all runs (default: the setting, auto)")
    bench.add_argument("--threads", type=int, default=0, help="inference threads (default: all cores)")
    bench.add_argument("--batch-frames", type=int, default=defaults.UNET_BATCH_FRAMES,
                       help="UNet batch size; 0 picks by backend, as for renders")
    bench.add_argument("--repeat", type=int, default=3,
                       help="rounds of inference-only then end-to-end; the median round is reported")
    bench.add_argument("--chart", help="also draw a PNG chart of frames/s by stage and backend")
    bench.add_argument("--farm", action="store_true",
                       help="also measure farm throughput and scaling, and time to the first playable segment")
    bench.add_argument("--workers", default="1,2", help="worker counts for --farm (one inference thread each)")
    bench.add_argument("--farm-frames", type=int, default=500, help="frames of the timed farm job")
    bench.add_argument("--farm-chunk-frames", type=int, default=125, help="chunk size of the farm jobs")
    bench.add_argument("--farm-rounds", type=int, default=2, help="alternating rounds of 1 and 2 workers")
    bench.add_argument("--watch", action="store_true",
                       help="measure only the time to the first playable segment and the finalizer's tail "
                            "(real workers; --farm measures them too)")
    bench.add_argument("--watch-minutes", type=float, default=2.0,
                       help="audio length of the --watch job (at least 2)")
    bench.add_argument("--farm-redis-db", type=int, default=15,
                       help="an unused Redis database on the broker's server for --farm")
    bench.add_argument("--memory", action="store_true", help="also measure peak memory, 1-min vs 30-min job")
    bench.add_argument("--recovery", action="store_true",
                       help="also measure how long recoveries take at the default settings (real workers killed)")
    bench.add_argument("--load", action="store_true",
                       help="also simulate the farm's scheduling at scale on this Redis (no rendering): claims/s, "
                            "latencies, memory per job, fair share, recovery pass")
    bench.add_argument("--load-jobs", type=int, default=1000, help="queued jobs for --load")
    bench.add_argument("--load-workers", type=int, default=200, help="simulated workers for --load")
    bench.add_argument("--load-chunks", default="50-500", help="chunks per job for --load, MIN-MAX")
    bench.add_argument("--load-claims", type=int, default=20000, help="claims (each with a commit) to simulate")
    bench.add_argument("--vs-port", metavar="DIR",
                       help="also run the earlier Python port from its checkout in DIR (github.com/cvoalex/"
                            "digital-clone, with its models) against lipfarm render: same frames and models, "
                            "whole processes, pairs in turn; prints the ratios (see benchmarks/vs_port.py)")
    bench.add_argument("--vs-port-frames", type=int, default=250, help="frames of the --vs-port renders")
    bench.add_argument("--vs-port-python", help="Python that runs the port (needs onnxruntime, Pillow, "
                                                "librosa; default: this one)")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args, settings: Settings) -> int:
    from lipfarm.benchmarks.local import BenchConfig, draw_chart, run_bench, write_report

    threads = args.threads or settings.threads_per_process(1)
    configs = []
    for item in filter(None, args.precisions.split(",")):  # "fp32", or "backend:precision" ("openvino:fp32")
        backend, _, precision = item.strip().rpartition(":")
        configs.append(BenchConfig(backend or args.backend or settings.backend, precision, threads,
                                   args.batch_frames))
    report = run_bench(settings, configs=configs, repeat=args.repeat) if configs else {"runs": []}
    for run in report["runs"]:
        extra = f", PSNR vs fp32 {run['psnr_vs_fp32_db']} dB" if "psnr_vs_fp32_db" in run else ""
        print(f"{run['backend']}/{run['precision']}: inference {run['inference_fps']:.2f} frames/s, "
              f"end to end {run['end_to_end_fps']:.2f} frames/s, efficiency {run['efficiency']:.3f}{extra}")
        whole = run["render_process"]
        print(f"  lipfarm render: fixed cost {run['fixed_cost_s']:.2f} s (a {run['fixed_cost_clip_frames']}-frame "
              f"clip, whole process minus inference); {whole['frames']} frames: whole process "
              f"{whole['process_s']:.2f} s, peak RSS {whole['peak_rss_mb']:.0f} MiB")
    if args.farm:
        report["farm"] = _farm(args, settings)
    if args.farm or args.watch:
        report["watch"] = _watch(args, settings)
    if args.memory:
        from lipfarm.benchmarks.memory import run_memory_bench

        report["memory"] = run_memory_bench(settings, threads=threads)
        print(f"memory: peak RSS ratio 30 min / 1 min: {report['memory']['ratio']}")
    if args.recovery:
        from lipfarm.benchmarks.recovery import run_recovery_bench

        report["recovery"] = run_recovery_bench(settings, redis_db=args.farm_redis_db)
        print(f"recovery: {report['recovery']}")
    if args.load:
        report["load"] = _load(args, settings)
    if args.vs_port:
        from lipfarm.benchmarks.vs_port import print_vs_port, run_vs_port

        report["vs_port"] = run_vs_port(settings, Path(args.vs_port), frames=args.vs_port_frames,
                                        rounds=args.repeat, threads=threads, python=args.vs_port_python)
        print_vs_port(report["vs_port"])
    write_report(report, Path(args.json))
    print(f"wrote {args.json}")
    if args.chart:
        print(f"wrote {draw_chart(report, Path(args.chart))}")
    return 0


def _farm(args, settings: Settings) -> dict:
    from lipfarm.benchmarks.farm import run_farm_bench

    counts = [int(c) for c in args.workers.split(",")]
    farm = run_farm_bench(settings, worker_counts=counts, frames=args.farm_frames,
                          chunk_frames=args.farm_chunk_frames, redis_db=args.farm_redis_db,
                          rounds=args.farm_rounds)
    print(f"farm: {farm['farm_fps']} frames/s by workers, scaling {farm.get('scaling', '-')}, "
          f"overhead {farm['chunk_overhead_s']:.3f} s per chunk "
          f"({100 * farm['chunk_overhead_share_of_250_frames']:.2f}% of a 250-frame chunk)")
    return farm


def _watch(args, settings: Settings) -> dict:
    from lipfarm.benchmarks.watch import run_watch_bench

    watch = run_watch_bench(settings, minutes=args.watch_minutes, redis_db=args.farm_redis_db)
    for kind in ("fast_start", "uniform"):
        print(f"watch ({kind.replace('_', ' ')}): first playable {watch[kind]['first_playable_s']} s, "
              f"half {watch[kind]['half_playable_s']} s, tail {watch[kind]['tail_s']} s after submit")
    print(f"finalizer tail, 10-minute job: {watch['tail_10min_s']} s")
    return watch


def _load(args, settings: Settings) -> dict:
    from lipfarm.benchmarks.load import LoadConfig, run_load_bench

    low, _, high = args.load_chunks.partition("-")
    config = LoadConfig(workers=args.load_workers, jobs=args.load_jobs, chunks_min=int(low),
                        chunks_max=int(high or low), claims=args.load_claims)
    figures = run_load_bench(settings, config, redis_db=args.farm_redis_db)
    print(f"load: {figures['jobs']} jobs, {figures['chunks']} chunks, {figures['workers']} simulated workers: "
          f"{figures['claims_and_commits_per_s']} claims+commits/s, claim p50/p99 "
          f"{figures['claim_ms']['p50']}/{figures['claim_ms']['p99']} ms, "
          f"{figures['redis_bytes_per_chunk']} B/chunk, recovery pass {figures['recovery_pass_s']} s, "
          f"job list {figures['job_list_s']} s, tenant share {figures['tenant_share']}, "
          f"short-job slowdown {figures['short_job_slowdown']}")
    return figures
