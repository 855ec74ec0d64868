"""``--precision auto`` and ``--backend auto``: the fastest inference this machine offers within a
quality bound, found by measuring the job's own model here, once.

Which precision is fastest depends on the CPU, not on its flags alone: on a Xeon with AMX, OpenVINO's
bf16 runs the UNet twice as fast as fp32; on a Xeon with AVX-512 BF16 and no AMX it is a quarter
*slower*; on an AMD EPYC with AVX-512 BF16 it is faster again. So it is measured:

1. ``measure``: every candidate this machine can run (ONNX Runtime fp32, OpenVINO fp32 and bf16 on a
   CPU; CUDA fp32 and fp16 on an NVIDIA GPU; only the asked backend's when one is named) runs the
   generator on the same fixed pseudo-random inputs, at the render's batch size and threads: one
   warm-up call, then ``ROUNDS`` rounds taking turns (so a noisy neighbour on a shared machine hits
   every candidate alike), each candidate's fastest call counting. Each output is compared with the
   reference's (fp32 on ONNX Runtime, or on the asked backend): PSNR in dB on the 0..255 scale of
   the unquantised outputs, ``inf`` where they are bit-identical. It takes a few seconds; the
   sessions it builds go to the runtime cache, so the render then opens its choice from there.
2. The figures are kept in the runtime cache beside the compiled models (kind ``choice``), keyed by
   the generator's content hash, its batch handling, the asked backend, threads, batch size, the
   libraries' versions, this machine's CPU and whether a GPU is present: the next render of that
   model here reads them (no measurement).
3. ``choose``: a plain function of the figures. Candidates whose PSNR is under the bound
   (``LIPFARM_AUTO_MIN_PSNR_DB``, 40 dB; ``inf`` asks for output bit-identical to fp32) are out; of
   the rest the fastest wins, but the reference (exact fp32) keeps its place unless the winner is
   ``MIN_GAIN`` times as fast: a few percent is within a shared machine's noise, and exact output is
   worth that much.

Choosing ``bf16`` by hand on a machine where it was measured slower than fp32 logs one warning per
process and model with both figures (the measurement is made for it if none is cached).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lipfarm.common import defaults
from lipfarm.common.runtime import (RuntimeCache, _library, cuda_available, default_cache_dir, load_runner,
                                    machine_fingerprint, resolve_backend)

log = logging.getLogger(__name__)

ROUNDS = 3  # timed calls per candidate, taken in turns
PSNR_FRAMES = 4  # frames each candidate's outputs are compared on
MIN_GAIN = 1.05  # how much faster than exact fp32 another candidate must be to replace it
CHOICE_FORMAT = 1
_SEED = 20_240_601


@dataclass(frozen=True)
class Measured:
    """One candidate's figures on one model and machine: generator frames/s, and PSNR (dB) of its
    outputs against the reference's (``inf``: identical; ``nan``: not finite)."""

    backend: str
    precision: str
    fps: float
    psnr_db: float

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}"


@dataclass(frozen=True)
class Choice:
    """What a render runs on, and why. ``source``: ``asked`` (a fixed precision), ``measured`` (just
    now), ``cached`` (figures from the runtime cache)."""

    backend: str
    precision: str
    reason: str
    source: str = "asked"
    measured: tuple[Measured, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}"


# --- The rule ---------------------------------------------------------------------------------------


def choose(measured: list[Measured] | tuple[Measured, ...], *, min_psnr_db: float = defaults.AUTO_MIN_PSNR_DB,
           min_gain: float = MIN_GAIN) -> Choice:
    """The candidate to run (module docstring, step 3). The reference is the first fp32 candidate
    whose outputs are identical to the reference's (``psnr_db == inf``)."""
    reference = next((m for m in measured if m.precision == "fp32" and m.psnr_db == math.inf), None)
    if reference is None:
        raise ValueError("no exact fp32 reference among the measured candidates")
    eligible = [reference] + [m for m in measured if m is not reference and m.psnr_db >= min_psnr_db and m.fps > 0]
    fastest = max(eligible, key=lambda m: m.fps)
    bound = "exact output" if min_psnr_db == math.inf else f"PSNR >= {min_psnr_db:g} dB"
    below = [m for m in measured if not m.psnr_db >= min_psnr_db]
    left_out = "".join(f"; {m.name} left out: PSNR {_db(m.psnr_db)} < {min_psnr_db:g} dB" for m in below)
    if fastest is reference or fastest.fps < reference.fps * min_gain:
        others = ", ".join(f"{m.name} {m.fps:.1f}" for m in eligible if m is not reference)
        why = (f"{reference.name} {reference.fps:.1f} frames/s is the fastest within {bound}"
               if fastest is reference else
               f"{fastest.name} {fastest.fps:.1f} frames/s is under {min_gain:g}x {reference.name} "
               f"{reference.fps:.1f}: exact fp32 kept")
        return Choice(reference.backend, reference.precision,
                      why + (f" ({others})" if others and fastest is reference else "") + left_out,
                      measured=tuple(measured))
    why = (f"{fastest.name} {fastest.fps:.1f} frames/s, {fastest.fps / reference.fps:.2f}x {reference.name} "
           f"{reference.fps:.1f}, PSNR {_db(fastest.psnr_db)} within {bound}")
    return Choice(fastest.backend, fastest.precision, why + left_out, measured=tuple(measured))


def _db(value: float) -> str:
    return "inf (identical)" if value == math.inf else f"{value:.1f} dB"


def slower_than_fp32(measured, precision: str) -> tuple[Measured, Measured] | None:
    """``(hand-picked, fastest fp32)`` where every candidate of ``precision`` was measured slower
    than the fastest fp32 one, else None."""
    picked = [m for m in measured if m.precision == precision]
    fp32 = [m for m in measured if m.precision == "fp32"]
    if not picked or not fp32:
        return None
    best, best_fp32 = max(picked, key=lambda m: m.fps), max(fp32, key=lambda m: m.fps)
    return (best, best_fp32) if best.fps < best_fp32.fps else None


# --- The measurement --------------------------------------------------------------------------------


def candidates(backend: str, *, has_cuda: bool, has_openvino: bool) -> list[tuple[str, str]]:
    """``(backend, precision)`` pairs to measure, the reference first."""
    if backend == "auto":
        if has_cuda:
            return [("cuda", "fp32"), ("cuda", "fp16")]
        return [("cpu", "fp32")] + ([("openvino", "fp32"), ("openvino", "bf16")] if has_openvino else [])
    return [(backend, p) for p in ("fp32", "bf16", "fp16") if _runs_on(p, backend)]


def _runs_on(precision: str, backend: str) -> bool:
    return backend in {"fp32": ("cpu", "openvino", "cuda"), "bf16": ("openvino",), "fp16": ("cuda",)}[precision]


def _openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def synthetic_inputs(spec, frames: int) -> dict[str, np.ndarray]:
    """Stand-in inputs where no real ones are given: smooth pseudo-random images (white noise is far
    from a face and exaggerates bf16's error: 37 dB on the demo UNet against 60 dB on its frames)."""
    import cv2

    rng = np.random.default_rng(_SEED)
    side = spec.roi_px
    coarse = rng.random((frames * 3, 8, 8), dtype=np.float32)
    images = np.stack([cv2.resize(c, (side, side), interpolation=cv2.INTER_CUBIC) for c in coarse])
    images = np.clip(images, 0, 1).reshape(frames, 3, side, side)
    masked = images.copy()
    masked[:, :, side // 2:] = 0  # the masked copy: the mouth half blacked out
    return {spec.visual_input: np.concatenate([images, masked], axis=1),
            spec.audio_input: rng.standard_normal((frames,) + defaults.AUDIO_INPUT_SHAPE, dtype=np.float32)}


def psnr_db(out: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of generator outputs (0..1) on the 0..255 scale, unquantised: ``inf`` only if identical."""
    if not np.all(np.isfinite(out)):
        return math.nan
    mse = float(np.mean((out.astype(np.float64) * 255 - reference.astype(np.float64) * 255) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def measure(spec, pairs: list[tuple[str, str]], *, threads: int, batch: int, cache_dir: str | Path | None,
            sample: Callable[[int], dict] | None = None) -> list[Measured]:
    """Figures of each ``(backend, precision)`` on the generator ``spec`` (module docstring, step 1).
    The first pair is the reference. ``sample(n)``: the generator's inputs for n frames of the job
    (default ``synthetic_inputs``); PSNR is taken over ``PSNR_FRAMES`` frames, time over one batch.
    A candidate that fails to load or run is left out."""
    frames = max(batch, PSNR_FRAMES)
    every = (sample or functools.partial(synthetic_inputs, spec))(frames)
    frames = len(next(iter(every.values())))
    batches = [{k: v[i:i + batch] for k, v in every.items()} for i in range(0, frames, batch)]
    feeds = batches[0]
    batch = len(next(iter(feeds.values())))
    runners, outputs, best = {}, {}, {}
    for pair in pairs:
        try:
            runner = load_runner(spec.path, spec.sha256, backend=pair[0], precision=pair[1], threads=threads,
                                 fixed_batch=spec.fixed_batch, cache_dir=cache_dir)
            # also the warm-up: compiles each shape, fills the caches
            outputs[pair] = np.concatenate([runner(b)[0] for b in batches])
        except Exception as exc:  # a backend this machine cannot run: not a candidate
            if pair == pairs[0]:
                raise
            log.info("auto: %s/%s left out (%s)", *pair, exc)
            continue
        runners[pair], best[pair] = runner, math.inf
    for _ in range(ROUNDS):
        for pair, runner in runners.items():
            started = time.perf_counter()
            runner(feeds)
            best[pair] = min(best[pair], time.perf_counter() - started)
    reference = outputs[pairs[0]]
    return [Measured(b, p, batch / best[(b, p)], math.inf if (b, p) == pairs[0] else psnr_db(outputs[(b, p)], reference))
            for (b, p) in runners]


# --- Kept in the runtime cache ---------------------------------------------------------------------


def _choice_key(spec, backend: str, pairs, *, threads: int, batch: int) -> dict:
    return {"format": CHOICE_FORMAT, "model_sha256": spec.sha256, "fixed_batch": spec.fixed_batch,
            "backend": backend, "candidates": [list(p) for p in pairs], "threads": threads, "batch": batch,
            "libraries": sorted({_library(b) for b, _ in pairs}), "machine": machine_fingerprint()}


def measured_for(spec, backend: str, *, threads: int, batch_frames: int, cache_dir: str | Path | None,
                 sample: Callable[[int], dict] | None = None) -> tuple[list[Measured], str]:
    """The figures for ``spec`` on this machine, and whether they were ``cached`` or ``measured``.
    ``batch_frames`` is the option (0: the reference backend's default batch)."""
    has_cuda = cuda_available()
    if backend == "cuda" and not has_cuda:
        resolve_backend("cuda", "fp32")  # raises the InputError that says why
    pairs = candidates(backend, has_cuda=has_cuda, has_openvino=_openvino_installed())
    batch = batch_frames or (defaults.UNET_BATCH_FRAMES_GPU if pairs[0][0] == "cuda"
                             else defaults.UNET_BATCH_FRAMES_CPU)
    key = _choice_key(spec, backend, pairs, threads=threads, batch=batch)
    cache = RuntimeCache(cache_dir) if cache_dir is not None else None
    if cache is not None:
        found = cache.load("choice", key)
        if found is not None:
            try:
                return [Measured(**m) for m in found[0]["measured"]], "cached"
            except (KeyError, TypeError):
                cache._bad("choice", key, None, "incomplete record")
    started = time.perf_counter()
    figures = measure(spec, pairs, threads=threads, batch=batch, cache_dir=cache_dir, sample=sample)
    log.info("auto: measured %s in %.1f s: %s", spec.path, time.perf_counter() - started,
             ", ".join(f"{m.name} {m.fps:.1f} frames/s PSNR {_db(m.psnr_db)}" for m in figures))
    if cache is not None:
        cache.store("choice", key, {"measured": [asdict(m) for m in figures], "source": spec.path,
                                    "measured_at": time.time()})
    return figures, "measured"


# --- What a render calls ---------------------------------------------------------------------------

_lock = threading.Lock()
_reported: set[tuple] = set()  # hand-picked bf16 already checked by this process
_choices: dict[tuple, Choice] = {}  # this process's auto choices, by model and configuration


def forget_choices() -> None:
    """Drop this process's choices (tests: the next ``auto`` reads the runtime cache again)."""
    with _lock:
        _choices.clear()
        _reported.clear()


def min_psnr_db() -> float:
    """The quality bound of ``auto`` (``LIPFARM_AUTO_MIN_PSNR_DB``)."""
    try:
        from lipfarm.common.config import load_settings

        return load_settings().auto_min_psnr_db
    except Exception:  # a malformed setting elsewhere: the default bound
        return defaults.AUTO_MIN_PSNR_DB


def choose_runtime(options, generator, *, threads: int, cache_dir=None,
                   sample: Callable[[int], dict] | None = None) -> Choice:
    """The backend and precision a chunk of ``options`` runs on here (``cache_dir``: the runtime
    cache, default ``default_cache_dir()``; ``sample``: the job's generator inputs, for a
    measurement). Fixed precisions resolve as ``resolve_backend`` says; ``auto`` is measured or read
    from the cache; a hand-picked ``bf16`` measured slower than fp32 here is warned about once per
    process."""
    if options.precision != "auto":
        backend = resolve_backend(options.backend, options.precision)
        if options.precision == "bf16":
            _warn_if_slower(generator, options, threads, _cache_dir(cache_dir), sample)
        return Choice(backend, options.precision, f"{options.precision} asked")
    key = (generator, options.backend, threads, options.batch_frames, min_psnr_db(), _cache_dir(cache_dir))
    with _lock:
        choice = _choices.get(key)
    if choice is None:
        choice = _auto(*key, sample=sample)
        with _lock:
            _choices[key] = choice
    return choice


def _cache_dir(cache_dir) -> str | None:
    """The runtime cache folder as a string (None: the default one), or None where caching is off."""
    folder = default_cache_dir() if cache_dir is None else cache_dir
    return None if folder is None else str(folder)


def _auto(generator, backend: str, threads: int, batch_frames: int, bound: float, cache_dir: str | None, *,
          sample) -> Choice:
    """The choice for one model and configuration, made once per process (and logged then)."""
    figures, source = measured_for(generator, backend, threads=threads, batch_frames=batch_frames,
                                   cache_dir=cache_dir, sample=sample)
    choice = choose(figures, min_psnr_db=bound)
    choice = Choice(choice.backend, choice.precision, choice.reason, source, choice.measured)
    log.info("precision auto: %s for %s (%s; %s)", choice.name, Path(generator.path).name, choice.reason,
             "figures from the runtime cache" if source == "cached" else "measured now")
    return choice


def _warn_if_slower(generator, options, threads: int, cache_dir: str | None, sample) -> None:
    key = ("bf16", generator.sha256, threads)
    with _lock:
        if key in _reported:
            return
        _reported.add(key)
    # bf16 runs on OpenVINO: compared with both fp32 backends of the CPU (the figures a CPU's ``auto``
    # keeps), or with OpenVINO's fp32 alone where a GPU makes ``auto`` measure CUDA instead
    cpu_backend = "openvino" if cuda_available() else "auto"
    try:
        figures, _ = measured_for(generator, cpu_backend, threads=threads, batch_frames=options.batch_frames,
                                  cache_dir=cache_dir, sample=sample)
    except Exception as exc:  # the warning is advice: never a reason to fail a render
        log.info("bf16 not compared with fp32 (%s)", exc)
        return
    slower = slower_than_fp32(figures, "bf16")
    if slower is not None:
        picked, fp32 = slower
        log.warning("precision bf16 is slower than fp32 on this machine for %s: %s %.1f frames/s against "
                    "%s %.1f; --precision auto or fp32 would render faster", Path(generator.path).name,
                    picked.name, picked.fps, fp32.name, fp32.fps)


def cached_choices(cache_dir: str | Path | None = None, *, bound: float | None = None) -> list[str]:
    """One line per measurement kept for this machine in the runtime cache: model, choice, figures
    (for ``lipfarm worker``'s start line)."""
    root = default_cache_dir() if cache_dir is None else Path(cache_dir)
    bound = min_psnr_db() if bound is None else bound
    lines = []
    if root is None or not (root / "choice").is_dir():
        return lines
    import json

    for path in sorted((root / "choice").glob("*.json")):
        try:
            record = json.loads(path.read_bytes())
            if record["key"]["machine"] != machine_fingerprint():
                continue
            figures = [Measured(**m) for m in record["measured"]]
            choice = choose(figures, min_psnr_db=bound)
        except Exception:  # a damaged or foreign record: the render that needs it rebuilds it
            continue
        lines.append(f"{Path(record.get('source', '?')).name} ({record['key']['model_sha256'][:12]}): "
                     f"{choice.name}: {choice.reason}")
    return lines
