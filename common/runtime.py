"""Inference sessions for the encoder and the UNet, on the backend and precision asked for.

Three backends, one ``Runner`` interface (``runner(feeds) -> outputs``):

- ``cpu``: ONNX Runtime's CPU provider, fp32: the exact reference.
- ``openvino``: the OpenVINO runtime on the CPU, fp32 or bf16. bf16 is fast only on CPUs with AMX
  or AVX-512 BF16; elsewhere OpenVINO emulates it (slower than fp32), and we say so.
- ``cuda``: ONNX Runtime's CUDA provider (TensorRT first where it is installed), fp32 or fp16, with
  I/O binding into device buffers that are allocated once per batch shape and reused.

Sessions are heavy and not fork-safe, so they are made lazily in the process that uses them and
kept per process, keyed by model content hash, backend, precision and thread count.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from common import defaults
from common.errors import InputError, ModelError
from common.models import free_batch, load_model

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "openvino", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
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
    run one sample at a time.
    """

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    run_batch: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    max_batch: int | None = None
    backend: str = "cpu"
    precision: str = "fp32"

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = len(next(iter(feeds.values())))
        if self.max_batch is None or batch <= self.max_batch:
            return self.run_batch(feeds)
        step = self.max_batch
        parts = [self.run_batch({k: v[i:i + step] for k, v in feeds.items()})
                 for i in range(0, batch, step)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


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


def _ort_cpu(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, _ort_options(threads), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return session, lambda feeds: session.run(names, feeds)


def _openvino(model_bytes: bytes, threads: int, precision: str):
    import openvino as ov

    if precision == "bf16" and not cpu_has_native_bf16():
        log.warning("this CPU has no AMX or AVX-512 BF16: OpenVINO emulates bf16, slower than fp32")
    core = ov.Core()
    model = core.read_model(model=model_bytes, weights=b"")
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
              "NUM_STREAMS": 1}
    runner = _StaticShapeRunner(core, model, config)
    return runner, runner.run


class _StaticShapeRunner:
    """OpenVINO compiled once per batch size, each with static shapes.

    OpenVINO's CPU plugin runs a static-shape model much faster than one with a dynamic batch (on
    the demo UNet in bf16, 62 frames/s at batch 1 against 45 with a dynamic batch of 4), and
    compiling takes a fraction of a second. A chunk sees two or three batch sizes (the full one,
    the last, partial one; the encoder's), so a few compiled models are kept, least recently used
    first out.
    """

    def __init__(self, core, model, config: dict) -> None:
        self.core = core
        self.model = model
        self.config = config
        self._compiled: dict[int, tuple] = {}

    def _request(self, batch: int):
        if batch in self._compiled:
            self._compiled[batch] = self._compiled.pop(batch)  # most recently used last
            return self._compiled[batch]
        model = self.model.clone()
        model.reshape({inp.get_any_name(): [batch] + [d.get_length() for d in list(inp.get_partial_shape())[1:]]
                       for inp in model.inputs})
        compiled = self.core.compile_model(model, "CPU", self.config)
        if len(self._compiled) >= defaults.OPENVINO_COMPILED_MODELS:
            del self._compiled[next(iter(self._compiled))]
        self._compiled[batch] = (compiled.create_infer_request(), compiled.outputs)
        return self._compiled[batch]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request, outputs = self._request(len(next(iter(feeds.values()))))
        result = request.infer(feeds)
        return [np.array(result[o], copy=True) for o in outputs]


def _cuda(model_bytes: bytes, threads: int, precision: str):
    from common.fp16 import to_float16

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


def _build(model: onnx.ModelProto, backend: str, precision: str, threads: int):
    data = model.SerializeToString()
    if backend == "openvino":
        return _openvino(data, threads, precision)
    if backend == "cuda":
        return _cuda(data, threads, precision)
    return _ort_cpu(data, threads)


def _probe(run, model: onnx.ModelProto, batch: int) -> None:
    """Run zeros of the given batch through a model, to see that it accepts that batch."""
    feeds = {}
    weights = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in weights:
            continue
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim][1:]
        feeds[value.name] = np.zeros([batch] + dims, np.float32)
    run(feeds)


@functools.lru_cache(maxsize=8)
def _cached_runner(path: str, sha256: str, backend: str, precision: str, threads: int,
                   fixed_batch: bool) -> Runner:
    model = load_model(path)
    inputs = tuple(i.name for i in model.graph.input if i.name not in
                   {init.name for init in model.graph.initializer})
    outputs = tuple(o.name for o in model.graph.output)
    if fixed_batch:
        try:
            freed = free_batch(model)
            _, run = _build(freed, backend, precision, threads)
            _probe(run, freed, 2)
            return Runner(inputs, outputs, run, None, backend, precision)
        except Exception as exc:  # a graph that hard-codes batch 1 (a Reshape, say) stays at 1
            log.info("%s: runs one sample at a time (batch cannot be freed: %s)", path, exc)
    try:
        _, run = _build(model, backend, precision, threads)
    except Exception as exc:
        raise ModelError(f"cannot be loaded by the {backend} backend ({exc})", path=path) from None
    return Runner(inputs, outputs, run, 1 if fixed_batch else None, backend, precision)


def open_runner(spec, *, backend: str, precision: str, threads: int) -> Runner:
    """A ``Runner`` for an ``EncoderSpec`` or ``GeneratorSpec``, cached in this process."""
    return _cached_runner(spec.path, spec.sha256, backend, precision, threads, spec.fixed_batch)


def run_encoder(runner: Runner, spec) -> Callable[[np.ndarray], np.ndarray]:
    """The encoder as ``windows [B, 1, 80, 16] -> embeddings [B, 512]``."""

    def encode(windows: np.ndarray) -> np.ndarray:
        (out,) = runner({spec.input_name: windows})
        return out.reshape(len(windows), -1)

    return encode

