"""``lipfarm render`` and ``lipfarm demo``: renders on this machine, no broker."""

from __future__ import annotations

from pathlib import Path

from lipfarm.common import defaults
from lipfarm.common.config import Settings
from lipfarm.cli.options import add_model_flags, add_option_flags, models_from_args, options_from_args


def add_commands(commands) -> None:
    render = commands.add_parser("render", help="render a video on this machine (no broker)")
    render.add_argument("--avatar", required=True, help="name of an imported avatar")
    render.add_argument("--audio", required=True, help="audio file (wav, flac, mp3, ogg, m4a, mp4, mov)")
    render.add_argument("--out", required=True, help="output MP4 path (its directory must exist)")
    add_model_flags(render)
    _add_run_flags(render)
    render.set_defaults(func=cmd_render)

    demo = commands.add_parser("demo", help="create the demo assets and render out/demo.mp4")
    demo.add_argument("--out", default="out/demo.mp4", help="output MP4 path (default out/demo.mp4)")
    _add_run_flags(demo)
    demo.set_defaults(func=cmd_demo)


def _add_run_flags(parser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="render processes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--stats-json", metavar="PATH",
                        help="also write the render's figures there: wall and inference seconds, stages, the "
                             "backend and precision run (and why), this process's peak memory")
    add_option_flags(parser)


def _print_result(result, options) -> None:
    if options.precision == "auto":  # say what was chosen and why
        stages = result.stages
        print(f"precision auto: {stages.backend}/{stages.precision}: {stages.choice}")
    print(f"wrote {result.output}: {result.frames} frames ({result.frames / defaults.FPS:.2f} s) "
          f"in {result.wall_s:.1f} s, {result.fps:.1f} frames/s")


def cmd_render(args, settings: Settings) -> int:
    from lipfarm.common.avatar import AvatarStore
    from lipfarm.scheduler.local import render_local

    options = options_from_args(args, settings)
    avatar = AvatarStore(settings.avatars_dir).get(args.avatar)
    encoder, generator = models_from_args(args, settings)
    result = render_local(avatar=avatar, audio=Path(args.audio), out=Path(args.out), encoder=encoder,
                          generator=generator, options=options, settings=settings,
                          workers=args.workers, show_progress=not args.quiet)
    _print_result(result, options)
    _write_stats(args.stats_json, result)
    return 0


def _write_stats(path: str | None, result) -> None:
    """The figures ``lipfarm bench`` reads from a render process it times from outside."""
    if path is None:
        return
    import json
    from dataclasses import asdict

    from lipfarm.common.sysinfo import peak_rss_bytes

    stages = result.stages
    figures = {"frames": result.frames, "wall_s": result.wall_s,
               "inference_s": stages.encoder_s + stages.unet_s, "backend": stages.backend,
               "precision": stages.precision, "choice": stages.choice, "audio_s": result.audio_s,
               "stitch_s": result.stitch_s, "stages": asdict(stages), "peak_rss_bytes": peak_rss_bytes()}
    Path(path).write_text(json.dumps(figures, indent=1) + "\n")


def cmd_demo(args, settings: Settings) -> int:
    from lipfarm.common.avatar import AvatarStore
    from lipfarm.demo.assets import ensure_demo_assets
    from lipfarm.scheduler.local import render_local

    demo = ensure_demo_assets(settings)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = options_from_args(args, settings)
    result = render_local(avatar=AvatarStore(settings.avatars_dir).get(demo.avatar_name),
                          audio=demo.audio, out=out, encoder=demo.encoder, generator=demo.generator,
                          options=options, settings=settings,
                          workers=args.workers, show_progress=not args.quiet)
    _print_result(result, options)
    _write_stats(args.stats_json, result)
    return 0
