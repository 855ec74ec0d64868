"""Inference sessions for the encoder and the UNet, on the backend and precision asked for.

Three backends, one ``Runner`` interface (``runner(feeds) -> outputs``):

- ``cpu``: ONNX Runtime's CPU provider, fp32: the exact reference.
- ``openvino``: the OpenVINO runtime on the CPU, fp32 or bf16. bf16 is fast only on CPUs with AMX
  or AVX-512 BF16; elsewhere OpenVINO emulates it (slower than fp32), and we say so.
- ``cuda``: ONNX Runtime's CUDA provider (TensorRT first where it is installed), fp32 or fp16, with
  I/O binding into device buffers that are allocated once per batch shape and reused.

Sessions are heavy and not fork-safe, so they are made lazily in the process that uses them and
kept per process, keyed by model content hash, backend, precision and thread count.

Across processes, what the backends spend making a session is kept on disk (``RuntimeCache``,
under ``<cache_dir>/runtime/`` by default): for ``cpu``, ONNX Runtime's optimised graph (written
once through ``optimized_model_filepath``, then loaded with graph optimisation off: the same graph,
bit-identical outputs, about a third of the time to make the session); for ``openvino``, each
compiled static-shape model, exported and imported. Entries are keyed by the model's content hash,
whether it was exported with batch 1, backend, precision, the library's version and this machine's
CPU (model and flags: the optimised graphs are laid out for its vector width); OpenVINO's also by
the thread count, the batch and the rest of the compile configuration. (ONNX Runtime's graph does
not depend on the thread count.) A cache hit parses no ONNX at all: the input and output names and
the batch decision (``free_batch`` and ``_probe``, made when the entry was built) are stored with it.
CUDA sessions are not cached here (TensorRT keeps its own engine cache).

Every entry is written by atomic rename, payload first, then a small JSON record holding the
payload's SHA-256 and its own; it is used only if the record parses, names the same key, and both
match their hashes. Anything else (a damaged, truncated, stale or foreign file) is dropped, and the
session is built from the model again and stored afresh: a bad cache costs time, never a render.
A cache that cannot be written (read-only, full) is skipped with a warning. The folder must be as
trusted as the models: its hashes catch damage, not tampering. At most ``CACHE_MAX_ENTRIES``
entries (each about the model's size) are kept per backend, least recently used first out.

Where the cache lives: the ``cache_dir`` argument of ``open_runner``; by default the folder named by
``LIPFARM_RUNTIME_CACHE_DIR`` (``off`` disables caching), else ``<LIPFARM_CACHE_DIR>/runtime``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lipfarm.common import defaults
from lipfarm.common.errors import InputError, ModelError
from lipfarm.common.runtimecache import (CACHE_DIR_ENV, CACHE_FORMAT, CACHE_MAX_ENTRIES, RuntimeCache,  # noqa: F401
                                         default_cache_dir, machine_fingerprint)

log = logging.getLogger(__name__)

_FROM_SETTINGS: Any = object()  # open_runner's default cache_dir: see default_cache_dir

BACKENDS = ("auto", "cpu", "openvino", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
# What a job may ask for: a precision, or "auto" (common.autoselect measures and picks one per machine).
PRECISION_CHOICES = ("auto",) + PRECISIONS
_PRECISION_BACKENDS = {"fp32": ("cpu", "openvino", "cuda"), "bf16": ("openvino",), "fp16": ("cuda",)}


def cuda_available() -> bool:
    """Whether ONNX Runtime here can run on an NVIDIA GPU."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present()


def _cuda_device_present() -> bool:
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether OpenVINO finds bf16 units (AMX or AVX-512 BF16) on this CPU."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_backend(backend: str, precision: str, *, has_cuda: Callable[[], bool] = cuda_available) -> str:
    """The concrete backend for a requested backend and precision, or ``InputError`` why not."""
    if precision not in PRECISIONS:
        raise InputError("unknown precision", field="precision", expected=" | ".join(PRECISIONS),
                         found=precision)
    if backend not in BACKENDS:
        raise InputError("unknown backend", field="backend", expected=" | ".join(BACKENDS), found=backend)
    allowed = _PRECISION_BACKENDS[precision]
    if backend == "auto":
        if precision == "fp32":
            return "cuda" if has_cuda() else "cpu"
        backend = allowed[0]
    if backend not in allowed:
        raise InputError(f"precision {precision} does not run on backend {backend}", field="backend",
                         expected=" | ".join(allowed), found=backend)
    if backend == "cuda" and not has_cuda():
        raise InputError("no NVIDIA GPU usable by ONNX Runtime here (install onnxruntime-gpu)",
                         field="backend", expected="a CUDA device", found="none")
    return backend


@dataclass
class Runner:
    """A loaded model: ``runner(feeds)`` returns its outputs as float32 arrays in output order.

    ``max_batch`` is 1 for models whose batch dimension could not be freed; larger batches are then
    run one sample at a time. ``cache`` says where the session came from: ``hit`` (the runtime
    cache), ``stored`` (built from the model, and now in the cache) or ``off`` (built, not cached).
    """

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    run_batch: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    max_batch: int | None = None
    backend: str = "cpu"
    precision: str = "fp32"
    cache: str = "off"

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = len(next(iter(feeds.values())))
        if self.max_batch is None or batch <= self.max_batch:
            return self.run_batch(feeds)
        step = self.max_batch
        parts = [self.run_batch({k: v[i:i + step] for k, v in feeds.items()})
                 for i in range(0, batch, step)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


# --- The runtime cache (common.runtimecache): what making a session costs, kept across processes ---

def _library(backend: str) -> str:
    if backend == "openvino":
        import openvino as ov

        return f"openvino {ov.get_version()}"
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__}"


class _CacheSlot:
    """One runner's place in the runtime cache: the key parts of its entries, and its status."""

    def __init__(self, cache: RuntimeCache, path: str, sha256: str, backend: str, precision: str,
                 threads: int, fixed_batch: bool) -> None:
        self.cache, self.path, self.sha256 = cache, path, sha256
        self.backend, self.precision, self.threads = backend, precision, threads
        self.kind = "openvino" if backend == "openvino" else "onnxruntime"
        self.parts = {"model_sha256": sha256, "fixed_batch": fixed_batch, "backend": backend,
                      "precision": precision, "library": _library(backend), "machine": machine_fingerprint()}
        if backend == "cpu":
            self.parts["graph_optimization"] = "all"  # ORT's default level, as sessions made from the model get
        else:
            self.parts["threads"] = threads
        self._source_checked: bool | None = None
        self.scratch_path: Path | None = None

    def source_matches(self) -> bool:
        """Whether the model file still holds the content its hash names (checked before storing
        anything under that hash)."""
        if self._source_checked is None:
            from lipfarm.common.fileio import file_sha256

            try:
                self._source_checked = file_sha256(self.path) == self.sha256
            except OSError:
                self._source_checked = False
            if not self._source_checked:
                log.warning("%s changed since it was inspected: its session is not cached", self.path)
        return self._source_checked

    def load(self) -> Runner | None:
        """The runner from an intact entry, or None. ONNX Runtime: one entry per model, the optimised
        graph as payload. OpenVINO: a record per model (names, batch decision), and one exported blob
        per compiled shape, each imported when its batch size first comes (``_BlobStore``)."""
        if self.backend == "cpu":
            return self._load_ort()
        found = self.cache.load(self.kind, self.parts)
        if found is None:
            return None
        record = found[0]
        try:
            inputs, outputs = tuple(record["inputs"]), tuple(record["outputs"])
            max_batch, freed = record["max_batch"], bool(record["freed"])
        except (KeyError, TypeError):
            self.cache._bad(self.kind, self.parts, None, "incomplete record")
            return None
        loader = functools.partial(_model_bytes, self.path, freed)
        _, run = _openvino(loader, self.threads, self.precision, blobs=self.blobs(freed))
        return Runner(inputs, outputs, run, max_batch, self.backend, self.precision, "hit")

    def _load_ort(self) -> Runner | None:
        found = self.cache.load(self.kind, self.parts, suffix=".onnx")
        if found is None:
            return None
        record, payload = found
        try:
            inputs, outputs, max_batch = tuple(record["inputs"]), tuple(record["outputs"]), record["max_batch"]
            _, run = _ort_cpu(str(payload), self.threads, optimised=True)
        except Exception as exc:  # a record without its fields, or a graph this runtime refuses
            self.cache._bad(self.kind, self.parts, ".onnx", f"cannot be loaded ({exc})")
            return None
        return Runner(inputs, outputs, run, max_batch, self.backend, self.precision, "hit")

    def new_scratch(self) -> str | None:
        """A fresh file for ONNX Runtime to write the optimised graph into (None: not writable)."""
        self.discard_scratch()
        try:
            self.scratch_path = self.cache.scratch(self.kind, ".onnx")
        except OSError as exc:
            log.warning("runtime cache: cannot write in %s (%s)", self.cache.root, exc)
            return None
        return str(self.scratch_path)

    def _scratch_written(self) -> bool:
        try:
            return self.scratch_path is not None and self.scratch_path.stat().st_size > 0
        except OSError:
            return False

    def discard_scratch(self) -> None:
        if self.scratch_path is not None:
            try:
                self.scratch_path.unlink(missing_ok=True)
            except OSError:
                pass
            self.scratch_path = None

    def blobs(self, freed: bool) -> _BlobStore:
        return _BlobStore(self, {**self.parts, "freed": freed})

    def commit(self, runner: Runner, *, freed: bool) -> Runner:
        """Store what was built for ``runner`` (the model's content checked first)."""
        record = {"inputs": list(runner.input_names), "outputs": list(runner.output_names),
                  "max_batch": runner.max_batch, "freed": freed, "source": self.path}
        stored = False
        if self.source_matches():
            if self.backend == "cpu":
                if self._scratch_written():
                    stored = self.cache.store(self.kind, self.parts, record, payload=self.scratch_path,
                                              suffix=".onnx")
            else:
                stored = self.cache.store(self.kind, self.parts, record)
        self.discard_scratch()
        runner.cache = "stored" if stored else "off"
        return runner


class _BlobStore:
    """Exported OpenVINO compiled models of one runner, by batch and compile configuration."""

    def __init__(self, slot: _CacheSlot, parts: dict) -> None:
        self.slot, self.parts = slot, parts
        self.hits = self.stores = 0

    def _parts(self, batch: int, config: dict) -> dict:
        return {**self.parts, "batch": batch, "config": {k: str(v) for k, v in sorted(config.items())}}

    def load(self, core, batch: int, config: dict):
        parts = self._parts(batch, config)
        found = self.slot.cache.load("openvino", parts, suffix=".blob", read=True)
        if found is None:
            return None
        try:
            compiled = core.import_model(found[1], "CPU", config)
        except Exception as exc:
            self.slot.cache._bad("openvino", parts, ".blob", f"cannot be imported ({exc})")
            return None
        self.hits += 1
        return compiled

    def store(self, batch: int, config: dict, compiled) -> None:
        if not self.slot.source_matches():
            return
        try:
            data = compiled.export_model()
            data = data.getvalue() if hasattr(data, "getvalue") else bytes(data)
        except Exception as exc:  # a plugin that cannot export: compile each time
            log.info("OpenVINO cannot export this compiled model (%s): not cached", exc)
            return
        if self.slot.cache.store("openvino", self._parts(batch, config), {"source": self.slot.path},
                                 payload=data, suffix=".blob"):
            self.stores += 1


def _model_bytes(path: str, freed: bool) -> bytes:
    from lipfarm.common.models import free_batch, load_model

    model = load_model(path)
    return (free_batch(model) if freed else model).SerializeToString()


# --- The backends ---------------------------------------------------------------------------------------


def _ort_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads would burn the cores the compositing and encoding stages need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _ort_cpu(model: bytes | str, threads: int, *, save_to: str | None = None, optimised: bool = False):
    """A CPU session of ``model`` (bytes, or the path of a graph ONNX Runtime optimised already,
    with ``optimised``); ``save_to`` also writes its optimised graph there."""
    import onnxruntime as ort

    options = _ort_options(threads)
    if optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save_to is not None:
        options.optimized_model_filepath = save_to
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return session, lambda feeds: session.run(names, feeds)


def _openvino(model_bytes: bytes | Callable[[], bytes], threads: int, precision: str, *,
              blobs: _BlobStore | None = None):
    """An OpenVINO runner of the model (its bytes, or a function returning them, called only if
    some batch size must be compiled rather than imported from ``blobs``)."""
    import openvino as ov

    if precision == "bf16" and not cpu_has_native_bf16():
        log.warning("this CPU has no AMX or AVX-512 BF16: OpenVINO emulates bf16, slower than fp32")
    core = ov.Core()
    if callable(model_bytes):
        read = model_bytes

        def model():
            return core.read_model(model=read(), weights=b"")
    else:
        model = core.read_model(model=model_bytes, weights=b"")
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
              "NUM_STREAMS": 1}
    runner = _StaticShapeRunner(core, model, config, blobs=blobs)
    return runner, runner.run


class _StaticShapeRunner:
    """OpenVINO compiled once per batch size, each with static shapes.

    OpenVINO's CPU plugin runs a static-shape model much faster than one with a dynamic batch (on
    the demo UNet in bf16, 62 frames/s at batch 1 against 45 with a dynamic batch of 4), and
    compiling takes a fraction of a second. A chunk sees two or three batch sizes (the full one,
    the last, partial one; the encoder's), so a few compiled models are kept, least recently used
    first out. With ``blobs``, a batch size compiled once on this machine is imported instead
    (no model read, no compile), and each new compilation is exported there.
    """

    def __init__(self, core, model, config: dict, *, blobs: _BlobStore | None = None) -> None:
        self.core = core
        self._model = model  # an ov.Model, or a function reading it on first need
        self.config = config
        self.blobs = blobs
        self._compiled: dict[int, tuple] = {}

    @property
    def model(self):
        if callable(self._model):
            self._model = self._model()
        return self._model

    def _compile(self, batch: int):
        if self.blobs is not None:
            compiled = self.blobs.load(self.core, batch, self.config)
            if compiled is not None:
                return compiled
        model = self.model.clone()
        model.reshape({inp.get_any_name(): [batch] + [d.get_length() for d in list(inp.get_partial_shape())[1:]]
                       for inp in model.inputs})
        compiled = self.core.compile_model(model, "CPU", self.config)
        if self.blobs is not None:
            self.blobs.store(batch, self.config, compiled)
        return compiled

    def _request(self, batch: int):
        if batch in self._compiled:
            self._compiled[batch] = self._compiled.pop(batch)  # most recently used last
            return self._compiled[batch]
        compiled = self._compile(batch)
        if len(self._compiled) >= defaults.OPENVINO_COMPILED_MODELS:
            del self._compiled[next(iter(self._compiled))]
        self._compiled[batch] = (compiled.create_infer_request(), compiled.outputs)
        return self._compiled[batch]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request, outputs = self._request(len(next(iter(feeds.values()))))
        result = request.infer(feeds)
        return [np.array(result[o], copy=True) for o in outputs]


def _cuda(model_bytes: bytes, threads: int, precision: str):
    from lipfarm.common.fp16 import to_float16

    import onnx
    import onnxruntime as ort

    providers = []
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        cache = os.path.join(os.path.expanduser("~"), ".cache", "lipfarm", "trt")
        providers.append(("TensorrtExecutionProvider", {
            "trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache}))
    elif precision == "fp16":
        model_bytes = to_float16(onnx.load_from_string(model_bytes)).SerializeToString()
    # TF32 would round fp32 convolutions to 10-bit mantissas on Ampere and later: not fp32.
    cuda = {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0" if precision == "fp32" else "1"}
    providers += [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    session = ort.InferenceSession(model_bytes, _ort_options(threads), providers=providers)
    return session, BoundRunner(session, "cuda").run


class BoundRunner:
    """Runs a session through I/O binding on ``device``, reusing device buffers per batch shape.

    Inputs are copied host-to-device into buffers kept across calls (``update_inplace``), outputs
    are written by the model into device buffers kept across calls, and each output crosses back
    to the host once. On the CPU device the same code runs, which is how it is tested without a GPU.
    """

    def __init__(self, session, device: str, device_id: int = 0) -> None:
        self.session = session
        self.device = device
        self.device_id = device_id
        self.outputs = [o.name for o in session.get_outputs()]
        self._buffers: dict[tuple, tuple] = {}

    def _bound(self, feeds: dict[str, np.ndarray]):
        import onnxruntime as ort

        key = tuple((name, array.shape) for name, array in feeds.items())
        if key not in self._buffers:
            binding = self.session.io_binding()
            inputs = {}
            for name, array in feeds.items():
                value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, np.float32,
                                                                  self.device, self.device_id)
                binding.bind_ortvalue_input(name, value)
                inputs[name] = value
            for name in self.outputs:
                binding.bind_output(name, self.device, self.device_id)
            self._buffers[key] = (binding, inputs)
        return self._buffers[key]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        binding, inputs = self._bound(feeds)
        for name, array in feeds.items():
            inputs[name].update_inplace(np.ascontiguousarray(array, dtype=np.float32))
        self.session.run_with_iobinding(binding)
        return [np.asarray(out) for out in binding.copy_outputs_to_cpu()]


def _build(model, backend: str, precision: str, threads: int, slot: _CacheSlot | None, *, freed: bool):
    """A session of the ``onnx.ModelProto`` ``model``, writing what ``slot`` can keep as it goes."""
    data = model.SerializeToString()
    if backend == "openvino":
        return _openvino(data, threads, precision, blobs=None if slot is None else slot.blobs(freed))
    if backend == "cuda":
        return _cuda(data, threads, precision)
    save_to = None if slot is None else slot.new_scratch()
    if save_to is not None:
        try:
            return _ort_cpu(data, threads, save_to=save_to)
        except Exception as exc:  # writing the optimised graph failed (a model over 2 GB, say): build without
            slot.discard_scratch()
            log.info("%s: optimised graph not cached (%s)", slot.path, exc)
    return _ort_cpu(data, threads)


def _probe(run, model, batch: int) -> None:
    """Run zeros of the given batch through a model, to see that it accepts that batch."""
    feeds = {}
    weights = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in weights:
            continue
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim][1:]
        feeds[value.name] = np.zeros([batch] + dims, np.float32)
    run(feeds)


def load_runner(path: str, sha256: str, *, backend: str, precision: str, threads: int, fixed_batch: bool,
                cache_dir: str | Path | None = None) -> Runner:
    """A new ``Runner`` of the model file at ``path`` (content hash ``sha256``), from the runtime
    cache in ``cache_dir`` where it holds an intact entry, else built from the model (and stored)."""
    started = time.perf_counter()
    slot = None
    if cache_dir is not None and backend in ("cpu", "openvino"):
        slot = _CacheSlot(RuntimeCache(cache_dir), path, sha256, backend, precision, threads, fixed_batch)
        runner = slot.load()
        if runner is not None:
            log.info("%s: %s session from the runtime cache in %.3f s", path, backend,
                     time.perf_counter() - started)
            return runner
    try:
        runner = _build_runner(path, backend, precision, threads, fixed_batch, slot)
    finally:
        if slot is not None:
            slot.discard_scratch()
    log.info("%s: %s session built in %.3f s (cache: %s)", path, backend, time.perf_counter() - started,
             runner.cache)
    return runner


def _build_runner(path: str, backend: str, precision: str, threads: int, fixed_batch: bool,
                  slot: _CacheSlot | None) -> Runner:
    from lipfarm.common.models import free_batch, load_model

    model = load_model(path)
    inputs = tuple(i.name for i in model.graph.input if i.name not in
                   {init.name for init in model.graph.initializer})
    outputs = tuple(o.name for o in model.graph.output)
    if fixed_batch:
        try:
            freed = free_batch(model)
            _, run = _build(freed, backend, precision, threads, slot, freed=True)
            _probe(run, freed, 2)
            runner = Runner(inputs, outputs, run, None, backend, precision)
            return runner if slot is None else slot.commit(runner, freed=True)
        except Exception as exc:  # a graph that hard-codes batch 1 (a Reshape, say) stays at 1
            log.info("%s: runs one sample at a time (batch cannot be freed: %s)", path, exc)
    try:
        _, run = _build(model, backend, precision, threads, slot, freed=False)
    except Exception as exc:
        raise ModelError(f"cannot be loaded by the {backend} backend ({exc})", path=path) from None
    runner = Runner(inputs, outputs, run, 1 if fixed_batch else None, backend, precision)
    return runner if slot is None else slot.commit(runner, freed=False)


@functools.lru_cache(maxsize=8)
def _cached_runner(path: str, sha256: str, backend: str, precision: str, threads: int,
                   fixed_batch: bool, cache_dir: str | None) -> Runner:
    return load_runner(path, sha256, backend=backend, precision=precision, threads=threads,
                       fixed_batch=fixed_batch, cache_dir=cache_dir)


def open_runner(spec, *, backend: str, precision: str, threads: int,
                cache_dir: str | Path | None = _FROM_SETTINGS) -> Runner:
    """A ``Runner`` for an ``EncoderSpec`` or ``GeneratorSpec``, cached in this process and, through
    the runtime cache in ``cache_dir`` (default: ``default_cache_dir()``; None: none), across processes."""
    if cache_dir is _FROM_SETTINGS:
        cache_dir = default_cache_dir()
    return _cached_runner(spec.path, spec.sha256, backend, precision, threads, spec.fixed_batch,
                          None if cache_dir is None else str(cache_dir))


def run_encoder(runner: Runner, spec) -> Callable[[np.ndarray], np.ndarray]:
    """The encoder as ``windows [B, 1, 80, 16] -> embeddings [B, 512]``."""

    def encode(windows: np.ndarray) -> np.ndarray:
        (out,) = runner({spec.input_name: windows})
        return out.reshape(len(windows), -1)

    return encode
