"""``lipfarm bench --vs-port DIR``: lipfarm side by side with the earlier Python port, whole processes.

The earlier port (github.com/cvoalex/digital-clone, fetched by the user into DIR; nothing of it is
part of lipfarm) renders a lip-synced avatar with ONNX Runtime from ``python_inference/
generate_frames.py``: it reads the avatar package ``model/sanders_full_onnx/`` (frames, pre-cut ROIs
and masked inputs, ``cache/crop_rectangles.json``) and its two ONNX models under ``models/``, and
writes one JPEG per frame. This module runs, in turn, for ``rounds`` pairs:

- the port: ``generate_frames.py --sanders PKG --audio CLIP --output TMP --frames N`` with the
  Python given (it needs onnxruntime, Pillow and librosa), in its own folder as its README says;
- lipfarm: ``lipfarm render`` of the same avatar package (imported once as ``vs-port-<hash>``), the
  same two models and the same audio, fp32 on ONNX Runtime (``--backend cpu``), into an MP4;

on the same audio clip: the port's ``demo/talk_hb.wav`` cut to ``N`` frames (``N / 25`` s), so both
render the same ``N`` frames. Each process is timed from outside, launch to exit; its peak resident
memory is its own VmHWM read at exit (lipfarm's from ``--stats-json``; the port's by a wrapper that
runs its script unchanged and reads VmHWM at exit). The order alternates from pair to pair, so drift
on a shared machine falls on both sides. Reported: every pair, the medians, and the ratios
``port / lipfarm`` (time: above 1, lipfarm is faster) and ``lipfarm / port`` (memory).

The two do not do the same work past inference: lipfarm encodes H.264 and muxes the audio into an
MP4; the port writes JPEG frames and leaves the video to an ffmpeg command it prints.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lipfarm.common import defaults
from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError

PORT_SCRIPT = Path("python_inference") / "generate_frames.py"
PORT_PACKAGE = Path("model") / "sanders_full_onnx"
PORT_AUDIO = Path("demo") / "talk_hb.wav"

# Runs the port's script unchanged (argv[1] is its path, the rest its arguments) and writes this
# process's peak resident memory (VmHWM, in bytes) to $LIPFARM_VS_PORT_RSS at exit.
_PEAK_WRAPPER = """
import atexit, os, re, runpy, sys
def _peak():
    text = open("/proc/self/status").read()
    kib = int(re.search(r"^VmHWM:\\s+(\\d+) kB", text, re.M).group(1))
    open(os.environ["LIPFARM_VS_PORT_RSS"], "w").write(str(kib * 1024))
atexit.register(_peak)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))
runpy.run_path(script, run_name="__main__")
"""


@dataclass(frozen=True)
class PortCheckout:
    """Where the port's script, avatar package, models and audio are in the user's checkout."""

    root: Path

    @property
    def script(self) -> Path:
        return self.root / PORT_SCRIPT

    @property
    def package(self) -> Path:
        return self.root / PORT_PACKAGE

    @property
    def encoder(self) -> Path:
        return self.package / "models" / "audio_encoder.onnx"

    @property
    def generator(self) -> Path:
        return self.package / "models" / "generator.onnx"

    @property
    def audio(self) -> Path:
        return self.root / PORT_AUDIO

    def check(self) -> None:
        for path in (self.script, self.package, self.encoder, self.generator, self.audio):
            if not path.exists():
                raise InputError("not found in the earlier port's checkout (fetch github.com/cvoalex/digital-clone "
                                 "with its models)", field="--vs-port", path=path)


def _clip(checkout: PortCheckout, frames: int, folder: Path) -> Path:
    """The port's speech cut to ``frames`` video frames."""
    from lipfarm.common.audio import load_16k
    from lipfarm.common.timeline import frame_count
    from lipfarm.demo.speech import write_wav

    speech = load_16k(checkout.audio)
    n = frames * defaults.SAMPLE_RATE_HZ // defaults.FPS
    while frame_count(n) < frames and n < speech.size:  # lipfarm renders L + 2 frames of L windows
        n += defaults.HOP_SAMPLES
    samples = speech[:n]
    clip = folder / f"clip-{frames}.wav"
    write_wav(clip, samples)
    return clip


def _avatar(checkout: PortCheckout, settings: Settings) -> str:
    """The port's avatar package imported into lipfarm (once per content of its crop rectangles)."""
    from lipfarm.common.avatar import AvatarStore
    from lipfarm.common.avatar_import import import_avatar

    rects = checkout.package / "cache" / "crop_rectangles.json"
    name = "vs-port-" + hashlib.sha256(rects.read_bytes()).hexdigest()[:10]
    store = AvatarStore(settings.avatars_dir)
    if name not in store.names():
        import_avatar(checkout.package, store.path(name), name=name, replace=True)
    return name


def run_port(checkout: PortCheckout, *, python: str, clip: Path, frames: int, folder: Path) -> dict:
    """One run of the port in a fresh process: wall seconds and peak memory."""
    out, peak = folder / "port-frames", folder / "port-peak"
    peak.unlink(missing_ok=True)
    command = [python, "-c", _PEAK_WRAPPER, str(checkout.script), "--sanders", str(checkout.package),
               "--audio", str(clip), "--output", str(out), "--frames", str(frames)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=checkout.script.parent, capture_output=True, text=True,
                          env={**os.environ, "LIPFARM_VS_PORT_RSS": str(peak)}, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not peak.is_file():
        raise RuntimeError(f"the earlier port failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return {"process_s": wall, "peak_rss_mb": int(peak.read_text()) / 2**20,
            "frames": len(list(out.glob("*.jpg")))}


def run_vs_port(settings: Settings, port_dir: Path, *, frames: int = 250, rounds: int = 3, threads: int,
                python: str | None = None) -> dict:
    """Pairs of whole-process runs, the port's and lipfarm's, in turn (module docstring)."""
    from lipfarm.benchmarks.local import BenchConfig, render_process
    from lipfarm.demo.assets import DemoAssets

    checkout = PortCheckout(Path(port_dir))
    checkout.check()
    avatar = _avatar(checkout, settings)
    config = BenchConfig("cpu", "fp32", threads, 0)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="lipfarm-vs-port-") as temp:
        folder = Path(temp)
        clip = _clip(checkout, frames, folder)
        models = DemoAssets(avatar, clip, checkout.encoder, checkout.generator)
        cache = folder / "runtime-cache"

        def lipfarm() -> dict:
            return render_process(config, avatar_name=avatar, demo=models, audio=clip, settings=settings,
                                  runtime_cache=cache, out_dir=folder)

        def port() -> dict:
            return run_port(checkout, python=python or sys.executable, clip=clip, frames=frames, folder=folder)

        lipfarm()  # fills lipfarm's runtime cache and the page cache; the port's first run warms its files
        port()
        for index in range(max(1, rounds)):
            first, second = (port, lipfarm) if index % 2 == 0 else (lipfarm, port)
            a, b = first(), second()
            ours, theirs = (b, a) if first is port else (a, b)
            pairs.append({"lipfarm": _rounded(ours), "port": _rounded(theirs)})
    ours = statistics.median(p["lipfarm"]["process_s"] for p in pairs)
    theirs = statistics.median(p["port"]["process_s"] for p in pairs)
    ours_mb = statistics.median(p["lipfarm"]["peak_rss_mb"] for p in pairs)
    theirs_mb = statistics.median(p["port"]["peak_rss_mb"] for p in pairs)
    return {"frames": frames, "threads": threads, "pairs": pairs,
            "lipfarm_process_s": round(ours, 3), "port_process_s": round(theirs, 3),
            "time_ratio_port_over_lipfarm": round(theirs / ours, 3),
            "lipfarm_peak_rss_mb": round(ours_mb, 1), "port_peak_rss_mb": round(theirs_mb, 1),
            "memory_ratio_lipfarm_over_port": round(ours_mb / theirs_mb, 3)}


def _rounded(run: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()}


def print_vs_port(report: dict) -> None:
    for i, pair in enumerate(report["pairs"], 1):
        print(f"  pair {i}: lipfarm {pair['lipfarm']['process_s']:.2f} s, {pair['lipfarm']['peak_rss_mb']:.0f} MiB; "
              f"port {pair['port']['process_s']:.2f} s, {pair['port']['peak_rss_mb']:.0f} MiB")
    print(f"vs port ({report['frames']} frames, whole processes, median of {len(report['pairs'])} pairs): "
          f"lipfarm {report['lipfarm_process_s']:.2f} s, port {report['port_process_s']:.2f} s, "
          f"{report['time_ratio_port_over_lipfarm']:.2f}x; peak RSS lipfarm {report['lipfarm_peak_rss_mb']:.0f} MiB, "
          f"port {report['port_peak_rss_mb']:.0f} MiB ({report['memory_ratio_lipfarm_over_port']:.2f}x)")
