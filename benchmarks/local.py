"""``lipfarm bench``: speed figures measured in one run, as ratios that survive a noisy machine.

For each backend/precision asked for, on the demo (10 s of speech, 249 frames, 1280x720):

- ``inference_fps``: the encoder and the UNet alone, on exactly the frames the render uses, with
  the same threads and batch size (inputs are built outside the timing);
- ``end_to_end_fps``: audio file to finished MP4 through the real local renderer, warm (sessions
  loaded and template frames prepared, as on a farm worker between chunks); the one-off cold start
  is reported apart as ``cold_start_s``;
- ``cold_start_s``: what a user waits for in ``lipfarm render`` before anything is rendered. It is
  the wall seconds from launching a fresh Python process (``subprocess``: no module imported, no
  session, no template in memory) to the moment the first UNet batch's output is returned in it.
  The process does what ``lipfarm render`` does: it imports ``lipfarm.cli`` (the command's entry
  point), then runs ``render_local`` on the demo avatar and speech with this run's options and
  threads; it is stopped right after that first batch. The span therefore holds interpreter start
  and imports, model checks, audio normalisation and planning, session creation, the chunk's audio
  features, the first batch's templates, and the first UNet batch itself. The disk is warm: the
  models, avatar and speech were just read by this benchmark (the OS page cache holds them), and
  the runtime cache (``common.runtime``, a fresh folder per run of the benchmark) was filled by one
  run before. The median of ``repeat`` such runs (at least one) is reported, every run in
  ``cold_start_runs_s``, and ``cold_start_imports_s``, the median seconds until the imports above
  are done;
- ``cold_start_first_run_s``: the same span for that first run, with the runtime cache empty (it
  builds and stores each session): a new machine's, or a new model's, first render;
- ``fixed_cost_s``: what a ``lipfarm render`` process costs beside inference. The real command is
  run in a fresh process on the first second of the demo speech (``FIXED_COST_CLIP_S``), the
  runtime cache warm (filled by the cold starts above), ``repeat`` times; each run's whole-process
  wall time (launch to exit, timed from outside) minus the inference seconds the render reports
  (``--stats-json``: encoder and UNet calls) is that run's fixed cost: interpreter start, imports,
  model checks, sessions, avatar frames, audio, planning, the x264 and mux work a short clip
  needs, and the per-frame loss of its few frames. The median is reported, with every run
  (``fixed_cost_runs_s``) and the median whole-process time (``fixed_cost_process_s``);
- ``render_process``: the same command on the whole demo speech, once: whole-process seconds,
  inference seconds and the process's peak resident memory (``peak_rss_mb``, VmHWM);
- ``efficiency = end_to_end_fps / inference_fps``, and seconds per stage;
- for precisions other than fp32, ``psnr_vs_fp32_db``: PSNR of the generated 320x320 regions
  against fp32's, over every frame.

Each round measures inference alone and then end to end, back to back, and takes their ratio;
the report gives the median round (and every round's ratio), so that a noisy neighbour on a shared
machine does not land on one side of a ratio only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipfarm.common import defaults
from lipfarm.common.audio import ArrayPcm, load_16k
from lipfarm.common.avatar import Avatar, AvatarStore
from lipfarm.common.config import SETTINGS, Settings
from lipfarm.demo.assets import DemoAssets, ensure_demo_assets
from lipfarm.common.features import audio_inputs
from lipfarm.common.timeline import frame_count
from lipfarm.common.models import inspect_encoder, inspect_generator
from lipfarm.common.options import RenderOptions
from lipfarm.common.runtime import CACHE_DIR_ENV, cpu_has_native_bf16, open_runner, resolve_backend, run_encoder
from lipfarm.common.sysinfo import cpu_model, usable_cores
from lipfarm.common.syncmode import template_indices
from lipfarm.scheduler.local import render_local
from lipfarm.worker.roi import crop_side, fill_visual_input
from lipfarm.worker.templates import TemplateCache, process_templates


@dataclass
class InferenceRun:
    frames: int
    encoder_s: float
    unet_s: float
    generated: np.ndarray | None = None  # uint8 [frames, R, R, 3], kept for PSNR comparisons

    @property
    def fps(self) -> float:
        return self.frames / (self.encoder_s + self.unet_s)


@dataclass
class BenchConfig:
    backend: str
    precision: str
    threads: int
    batch_frames: int
    options: RenderOptions = field(init=False)

    def __post_init__(self) -> None:
        self.options = RenderOptions(precision=self.precision, backend=self.backend,
                                     batch_frames=self.batch_frames)


def machine_info() -> dict:
    import onnxruntime
    import openvino

    return {"cpu": cpu_model(), "cores": usable_cores(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
            "cpu_native_bf16": cpu_has_native_bf16()}


def measure_inference(avatar: Avatar, demo: DemoAssets, pcm: ArrayPcm, config: BenchConfig,
                      templates: TemplateCache, *, keep_outputs: bool) -> InferenceRun:
    """Time the encoder and the UNet alone over every frame of the render."""
    backend = resolve_backend(config.backend, config.precision)
    args = dict(backend=backend, precision=config.precision, threads=config.threads)
    enc_spec, gen_spec = inspect_encoder(demo.encoder), inspect_generator(demo.generator)
    encoder = run_encoder(open_runner(enc_spec, **args), enc_spec)
    generator = open_runner(gen_spec, **args)
    total = frame_count(pcm.n_samples)
    spent = {"encoder": 0.0}

    def timed(windows):
        t = time.perf_counter()
        out = encoder(windows)
        spent["encoder"] += time.perf_counter() - t
        return out

    audio = audio_inputs(pcm, timed, start=0, stop=total)
    roi, side = gen_spec.roi_px, crop_side(gen_spec.roi_px)
    # the bench's options keep the default sync mode, bounce, whose output has the audio's L + 2 frames
    indices = template_indices(config.options.sync_mode, 0, total, avatar.frame_count, total)
    size = config.options.unet_batch(backend)
    batch = np.empty((size, 6, roi, roi), np.float32)
    kept = np.empty((total, roi, roi, 3), np.uint8) if keep_outputs else None
    unet_s = 0.0
    for start in range(0, total, size):
        stop = min(start + size, total)
        for j, f in enumerate(range(start, stop)):
            fill_visual_input(templates.get(avatar, int(indices[f]), crop_side=side).crop,
                              roi_px=roi, out=batch[j])
        t = time.perf_counter()
        (out,) = generator({gen_spec.visual_input: batch[:stop - start],
                            gen_spec.audio_input: audio[start:stop]})
        unet_s += time.perf_counter() - t
        if kept is not None:
            kept[start:stop] = (out.transpose(0, 2, 3, 1) * np.float32(255)).astype(np.uint8)
    return InferenceRun(total, spent["encoder"], unet_s, kept)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _end_to_end(avatar, demo, config: BenchConfig, settings: Settings, out_dir: Path):
    """The real local renderer; it keeps this process's template cache warm, as a worker does."""
    return render_local(avatar=avatar, audio=demo.audio, out=out_dir / f"{config.precision}.mp4",
                        encoder=demo.encoder, generator=demo.generator, options=config.options,
                        settings=settings, show_progress=False)


ROOT = Path(__file__).resolve().parents[1]
_COLD_START_MARK = "lipfarm-cold-start "

# The fresh process of ``cold_start_s`` (module docstring); argv[1] is its JSON arguments. It prints
# one line: the mark, then the wall-clock times at which imports were done and the first UNet batch
# returned, and where that UNet's session came from (the runtime cache or a build).
_COLD_START_CHILD = f"""
import json, sys, time
args = json.loads(sys.argv[1])
import lipfarm.cli  # what the `lipfarm` command imports first
from pathlib import Path
from lipfarm.common.avatar import AvatarStore
from lipfarm.common.config import load_settings
from lipfarm.common.models import GeneratorSpec
from lipfarm.common.options import RenderOptions
from lipfarm.scheduler.local import render_local
from lipfarm.worker import render as worker_render
imported = time.time()

class FirstBatch(Exception):
    pass

open_runner = worker_render.open_runner

def watched(spec, **kwargs):
    runner = open_runner(spec, **kwargs)
    if not isinstance(spec, GeneratorSpec):
        return runner

    def first(feeds):
        runner(feeds)
        done = time.time()
        print({_COLD_START_MARK!r} + json.dumps({{"imported": imported, "first_batch": done,
                                                  "cache": runner.cache}}), flush=True)
        raise FirstBatch

    return first

worker_render.open_runner = watched
settings = load_settings()
try:
    render_local(avatar=AvatarStore(settings.avatars_dir).get(args["avatar"]), audio=Path(args["audio"]),
                 out=Path(args["out"]), encoder=Path(args["encoder"]), generator=Path(args["generator"]),
                 options=RenderOptions.from_dict(args["options"]), settings=settings, show_progress=False)
except FirstBatch:
    pass
else:
    raise SystemExit("the render ended without running the UNet")
"""


def _settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that make ``load_settings()`` in a child process return ``settings``."""
    env = dict(os.environ)
    for setting in SETTINGS:
        value = getattr(settings, setting.name)
        env[setting.env] = str(value)
    return env


def cold_start_once(config: BenchConfig, *, avatar_name: str, demo: DemoAssets, settings: Settings,
                    runtime_cache: Path, out: Path) -> dict:
    """One fresh process's cold start (module docstring): seconds to imports done and to the first
    UNet batch, and whether that UNet's session came from the runtime cache."""
    env = _settings_env(settings)
    env["LIPFARM_INFERENCE_THREADS"] = str(config.threads)
    env[CACHE_DIR_ENV] = str(runtime_cache)
    args = {"avatar": avatar_name, "audio": str(demo.audio), "encoder": str(demo.encoder),
            "generator": str(demo.generator), "out": str(out), "options": config.options.to_dict()}
    started = time.time()
    done = subprocess.run([sys.executable, "-c", _COLD_START_CHILD, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_COLD_START_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"cold-start process failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(lines[-1][len(_COLD_START_MARK):])
    return {"imports_s": result["imported"] - started, "first_batch_s": result["first_batch"] - started,
            "cache": result["cache"]}


def runtime_cache_of(out_dir: Path) -> Path:
    """The runtime cache of one configuration's runs (empty until its first cold start)."""
    return out_dir / "runtime-cache"


def measure_cold_start(config: BenchConfig, *, avatar_name: str, demo: DemoAssets, settings: Settings,
                       out_dir: Path, runs: int) -> dict:
    """``cold_start_first_run_s`` (an empty runtime cache), then ``runs`` cold starts with it filled."""
    cache = runtime_cache_of(out_dir)
    once = functools.partial(cold_start_once, config, avatar_name=avatar_name, demo=demo, settings=settings,
                             runtime_cache=cache, out=out_dir / "cold-start.mp4")
    first = once()
    warm = [once() for _ in range(max(1, runs))]
    return {"cold_start_s": round(statistics.median(r["first_batch_s"] for r in warm), 3),
            "cold_start_first_run_s": round(first["first_batch_s"], 3),
            "cold_start_runs_s": [round(r["first_batch_s"], 3) for r in warm],
            "cold_start_imports_s": round(statistics.median(r["imports_s"] for r in warm), 3),
            "cold_start_runtime_cache": [first["cache"]] + [r["cache"] for r in warm]}


FIXED_COST_CLIP_S = 1.0


def render_process(config: BenchConfig, *, avatar_name: str, demo: DemoAssets, audio: Path, settings: Settings,
                   runtime_cache: Path, out_dir: Path) -> dict:
    """One ``lipfarm render`` in a fresh process, timed from outside, with the figures it writes."""
    env = _settings_env(settings)
    env["LIPFARM_INFERENCE_THREADS"] = str(config.threads)
    env[CACHE_DIR_ENV] = str(runtime_cache)
    stats = out_dir / "render-stats.json"
    stats.unlink(missing_ok=True)
    options = config.options
    command = [str(Path(sys.executable).parent / "lipfarm"), "render", "--avatar", avatar_name, "--audio", str(audio),
               "--out", str(out_dir / "render-process.mp4"), "--encoder", str(demo.encoder),
               "--generator", str(demo.generator), "--precision", options.precision, "--backend", options.backend,
               "--batch-frames", str(options.batch_frames), "--quiet", "--stats-json", str(stats)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not stats.is_file():
        raise RuntimeError(f"lipfarm render failed (exit {done.returncode}): {done.stderr[-2000:]}")
    figures = json.loads(stats.read_text())
    return {"process_s": wall, "inference_s": figures["inference_s"], "frames": figures["frames"],
            "fixed_s": wall - figures["inference_s"], "peak_rss_mb": figures["peak_rss_bytes"] / 2**20,
            "inference": f"{figures['backend']}/{figures['precision']}"}


def measure_fixed_cost(config: BenchConfig, *, avatar_name: str, demo: DemoAssets, settings: Settings,
                       runtime_cache: Path, out_dir: Path, runs: int) -> dict:
    """``fixed_cost_s`` and ``render_process`` (module docstring)."""
    from lipfarm.demo.speech import write_wav

    clip = out_dir / "fixed-cost-clip.wav"
    write_wav(clip, load_16k(demo.audio)[:int(FIXED_COST_CLIP_S * defaults.SAMPLE_RATE_HZ)])
    once = functools.partial(render_process, config, avatar_name=avatar_name, demo=demo, settings=settings,
                             runtime_cache=runtime_cache, out_dir=out_dir)
    short = [once(audio=clip) for _ in range(max(1, runs))]
    whole = once(audio=demo.audio)
    return {"fixed_cost_s": round(statistics.median(r["fixed_s"] for r in short), 3),
            "fixed_cost_runs_s": [round(r["fixed_s"], 3) for r in short],
            "fixed_cost_process_s": round(statistics.median(r["process_s"] for r in short), 3),
            "fixed_cost_clip_frames": short[0]["frames"],
            "render_process": {k: round(v, 3) if isinstance(v, float) else v for k, v in whole.items()}}


def bench_config(config: BenchConfig, *, avatar, demo, pcm, settings, repeat: int,
                 reference: InferenceRun | None, out_dir: Path) -> tuple[dict, InferenceRun]:
    """All figures of one backend/precision."""
    out_dir = out_dir / f"{config.backend}-{config.precision}"
    out_dir.mkdir(exist_ok=True)
    cold = measure_cold_start(config, avatar_name=demo.avatar_name, demo=demo, settings=settings, out_dir=out_dir,
                              runs=repeat)
    fixed = measure_fixed_cost(config, avatar_name=demo.avatar_name, demo=demo, settings=settings,
                               runtime_cache=runtime_cache_of(out_dir), out_dir=out_dir, runs=repeat)
    templates = process_templates(settings.template_cache_frames)  # shared with render_local
    first = measure_inference(avatar, demo, pcm, config, templates, keep_outputs=True)
    _end_to_end(avatar, demo, config, settings, out_dir)  # warms the render path
    rounds = []
    for _ in range(repeat):  # each round: inference alone, then end to end, back to back
        run = measure_inference(avatar, demo, pcm, config, templates, keep_outputs=False)
        result = _end_to_end(avatar, demo, config, settings, out_dir)
        rounds.append((run, result, result.fps / run.fps))
    rounds.sort(key=lambda r: r[2])
    best_inf, best_e2e, efficiency = rounds[len(rounds) // 2]  # the median round, by its ratio
    stages = best_e2e.stages
    figures = {
        "backend": stages.backend, "precision": config.precision, "threads": config.threads,
        "batch_frames": config.options.unet_batch(stages.backend), "frames": best_e2e.frames,
        "inference_fps": round(best_inf.fps, 3), "end_to_end_fps": round(best_e2e.fps, 3),
        "efficiency": round(efficiency, 4),
        "efficiency_rounds": [round(r[2], 4) for r in rounds],
        "stages_s": {
            "audio": round(best_e2e.audio_s + stages.mel_s, 3),
            "inference": round(stages.encoder_s + stages.unet_s, 3),
            "prepare": round(stages.prepare_s, 3),
            "composite": round(stages.composite_s, 3),
            "encode": round(stages.encode_s, 3),
            "stitch": round(best_e2e.stitch_s, 3),
            "wall": round(best_e2e.wall_s, 3),
        },
        "inference_waited_s": {"for_inputs": round(stages.starved_s, 3),
                               "for_compositing": round(stages.blocked_s, 3)},
        "inference_only_s": round(best_inf.encoder_s + best_inf.unet_s, 3),
        **cold,
        **fixed,
    }
    frames = best_e2e.frames
    figures["non_inference_ms_per_frame"] = {
        name: round(1000 * figures["stages_s"][name] / frames, 3)
        for name in ("audio", "prepare", "composite", "encode", "stitch")}
    if reference is not None and config.precision != "fp32":
        figures["psnr_vs_fp32_db"] = round(psnr_db(first.generated, reference.generated), 2)
    return figures, first


def run_bench(settings: Settings, *, configs: list[BenchConfig], repeat: int = 2,
              seconds: float | None = None) -> dict:
    """The local-pipeline figures for each configuration (fp32 first, the PSNR reference).

    ``seconds`` cuts the demo speech shorter (for quick checks); by default all 10 s are used.
    """
    demo = ensure_demo_assets(settings)
    avatar = AvatarStore(settings.avatars_dir).get(demo.avatar_name)
    samples = load_16k(demo.audio)
    if seconds is not None:
        from lipfarm.demo.speech import write_wav

        clip = settings.work_dir / "bench-clip.wav"
        clip.parent.mkdir(parents=True, exist_ok=True)
        samples = samples[:int(seconds * defaults.SAMPLE_RATE_HZ)]
        write_wav(clip, samples)
        demo = dataclasses.replace(demo, audio=clip)
    pcm = ArrayPcm(load_16k(demo.audio))
    report = {"machine": machine_info(), "demo": {"audio_s": pcm.n_samples / defaults.SAMPLE_RATE_HZ,
                                                  "frames": frame_count(pcm.n_samples),
                                                  "size": f"{avatar.width}x{avatar.height}"},
              "runs": []}
    reference = None
    with tempfile.TemporaryDirectory(prefix="lipfarm-bench-") as out_dir:
        for config in sorted(configs, key=lambda c: c.precision != "fp32"):
            figures, first = bench_config(config, avatar=avatar, demo=demo, pcm=pcm, settings=settings,
                                          repeat=repeat, reference=reference, out_dir=Path(out_dir))
            if config.precision == "fp32" and reference is None:
                reference = first
            report["runs"].append(figures)
    report.update({k: v for k, v in report["runs"][0].items()})
    return report


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def draw_chart(report: dict, path: Path) -> Path:
    """A PNG of frames/s by stage (and farm throughput by worker count) for each backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["end to end", "inference", "audio", "prepare", "composite", "encode", "stitch"]
    panels = 2 if report.get("farm") else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(report["runs"]))
    for k, run in enumerate(report["runs"]):
        frames, spent = run["frames"], run["stages_s"]
        values = [run["end_to_end_fps"], run["inference_fps"]] + [
            frames / max(spent[name], 1e-6) for name in stages[2:]]
        positions = [i + k * width for i in range(len(stages))]
        ax.bar(positions, values, width, label=f"{run['backend']} {run['precision']}")
    ax.set_yscale("log")
    ax.set_xticks([i + width * (len(report["runs"]) - 1) / 2 for i in range(len(stages))], stages, rotation=20)
    ax.set_ylabel("frames/s (log scale; higher is faster)")
    ax.set_title(f"lipfarm demo, {report['machine']['cores']} cores: speed by stage")
    ax.legend()
    if report.get("farm"):
        farm = report["farm"]["farm_fps"]
        ax2 = axes[0][1]
        ax2.bar([f"{w} worker{'s' if w != '1' else ''}" for w in farm], list(farm.values()), color="tab:green")
        ax2.set_ylabel("frames/s, submit to output")
        ax2.set_title(f"farm, 1 inference thread per worker (scaling {report['farm'].get('scaling', '-')})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
