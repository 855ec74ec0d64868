"""What a user's ONNX models must look like, read from the models themselves.

Input and output names, the ROI size (320 or 160 for the known members of the family) and whether
the batch dimension is free are all read from the graph; nothing is hard-coded but the contract's
shapes. A model that does not fit gets a ``ModelError`` naming the file, the input or output, and
the expected and found shapes.

Models exported with a fixed batch of 1 (the SyncTalk_2D export script does this) are given a free
batch dimension in memory so they can run batched; ``common.runtime`` checks the result.

A model is data from a user that every worker loads, so it must be only that: ``load_model`` reads
the file without following external data and refuses any tensor stored outside the model (an
``external_data`` location is a path the runtime would open on the worker: ``../../etc/...``), and
any operator outside the standard ONNX domains and the model's own functions (``com.microsoft``'s
``EPContext`` names a file to load; custom operators need shared libraries, which lipfarm never
registers, so such a model could not run anyway). Every refusal names the file and the tensor or node.

Checking a model reads and hashes the whole file and parses its graph (a third of a second for the
demo models, and importing onnx most of a second more), and one render asks at several places (the
command, the plan, each chunk), so ``inspect_encoder`` and ``inspect_generator`` keep their answers
per process, keyed by the file's identity (real path, device, inode, size, mtime_ns, ctime_ns): a
file replaced or rewritten is checked again. The answers are also kept on disk, in the runtime cache
(``<cache>/runtime/models/``), by that identity and by the SHA-256 of the file's bytes: a later
process gets an unchanged file's verdict without reading it, and a copy of checked bytes without
parsing them (nor importing onnx). A file changed (mtime or ctime) less than ``SETTLE_S`` ago is checked every time,
since a second change within the file system's timestamp granularity could leave its stat unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from lipfarm.common import defaults
from lipfarm.common.errors import ModelError

if TYPE_CHECKING:  # onnx is imported where a model is parsed: a checked model's verdict needs none of it
    import onnx

ENCODER_INPUT = (1, defaults.N_MELS, defaults.WINDOW_MEL_FRAMES)
GENERATOR_AUDIO_INPUT = defaults.AUDIO_INPUT_SHAPE


@dataclass(frozen=True)
class EncoderSpec:
    """An audio encoder: ``[B, 1, 80, 16] -> [B, 512]``."""

    path: str
    sha256: str
    input_name: str
    output_name: str
    fixed_batch: bool  # exported with batch 1; runs batched after ``free_batch``


@dataclass(frozen=True)
class GeneratorSpec:
    """A UNet generator: ``[B, 6, R, R]`` + ``[B, 32, 16, 16]`` -> ``[B, 3, R, R]``."""

    path: str
    sha256: str
    visual_input: str
    audio_input: str
    output_name: str
    roi_px: int
    fixed_batch: bool

    @property
    def crop_px(self) -> int:
        """Side of the bicubic crop the ROI is cut from (328 for a 320 ROI)."""
        return self.roi_px + 2 * defaults.ROI_RING_PX


# Operator domains every ONNX runtime implements itself ("" is ai.onnx).
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def load_model(path: str | Path) -> onnx.ModelProto:
    """Parse an ONNX file and check it is self-contained, or raise ``ModelError`` saying why not."""
    return _parse_model(path, _read_model_file(path))


def _read_model_file(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ModelError("model file not found", path=path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelError(f"not an ONNX model ({type(exc).__name__})", path=path) from None


def _parse_model(path: str | Path, data: bytes) -> onnx.ModelProto:
    """``onnx.load(path, load_external_data=False)`` of the file's bytes, checked."""
    import onnx

    path = Path(path)
    fmt = onnx.serialization.registry.get_format_from_file_extension(path.suffix) or "protobuf"
    try:
        model = onnx.load_model_from_string(data, format=fmt)
    except Exception as exc:  # onnx raises DecodeError, ValueError or OSError for non-ONNX bytes
        raise ModelError(f"not an ONNX model ({type(exc).__name__})", path=path) from None
    if not model.graph.node:
        raise ModelError("not an ONNX model (no graph nodes)", path=path)
    check_self_contained(model, path)
    return model


def check_self_contained(model: onnx.ModelProto, path: str | Path) -> None:
    """Refuse tensors stored outside ``model`` and operators it does not carry (module docstring)."""
    local_functions = {(f.domain, f.name) for f in model.functions}
    _check_graph(model.graph, path, "", local_functions)
    for function in model.functions:
        _check_nodes(function.node, path, f"function '{function.domain}.{function.name}', ", local_functions)


def _check_tensor(tensor: onnx.TensorProto, path, where: str) -> None:
    import onnx

    if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "?")
        raise ModelError(f"references external data '{location}'", path=path, field=where,
                         expected="weights stored inside the model")


def _check_graph(graph: onnx.GraphProto, path, where: str, local_functions) -> None:
    for tensor in graph.initializer:
        _check_tensor(tensor, path, f"{where}initializer '{tensor.name}'")
    for sparse in graph.sparse_initializer:
        for part in (sparse.values, sparse.indices):
            _check_tensor(part, path, f"{where}sparse initializer '{sparse.values.name}'")
    _check_nodes(graph.node, path, where, local_functions)


def _check_nodes(nodes, path, where: str, local_functions) -> None:
    for node in nodes:
        name = f"{where}node '{node.name or node.op_type}'"
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in local_functions:
            raise ModelError(f"uses operator '{node.op_type}' of domain '{node.domain}'", path=path, field=name,
                             expected="standard ONNX operators (custom operators are not loaded)")
        for attribute in node.attribute:
            at = f"{name} attribute '{attribute.name}'"
            tensors = ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
            for tensor in tensors:
                _check_tensor(tensor, path, at)
            sparse = ([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []) + list(
                attribute.sparse_tensors)
            for tensor in sparse:
                _check_tensor(tensor.values, path, at)
                _check_tensor(tensor.indices, path, at)
            subgraphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
            for subgraph in subgraphs:
                _check_graph(subgraph, path, f"{at}, ", local_functions)


def _dims(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    """Shape of a graph input/output: ints for fixed dims, names (or '?') for free ones."""
    shape = value.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    weights = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in weights]


def _show(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _check_shape(path, what: str, dims, expected: tuple[int, ...]) -> bool:
    """Check ``dims[1:] == expected`` and a batch dim of 1 or free; returns whether batch is fixed."""
    want = ("B",) + expected
    if len(dims) != len(want) or tuple(dims[1:]) != expected:
        raise ModelError("shape does not fit the SyncTalk_2D contract", path=path, field=what,
                         expected=_show(want), found=_show(dims))
    if isinstance(dims[0], int) and dims[0] not in (0, 1):
        raise ModelError("batch dimension must be 1 or free", path=path, field=what,
                         expected=_show(want), found=_show(dims))
    return isinstance(dims[0], int) and dims[0] == 1


def _check_float(path, what: str, value: onnx.ValueInfoProto) -> None:
    import onnx

    if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        found = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        raise ModelError("must be float32", path=path, field=what, expected="FLOAT", found=found)


# --- Each version of a model file is checked once per process ---------------------------------------

SETTLE_S = 2.0  # a file changed more recently than this is not cached (timestamp granularity)
_CACHE_ENTRIES = 32
_Spec = TypeVar("_Spec", EncoderSpec, GeneratorSpec)
_specs: dict[tuple, EncoderSpec | GeneratorSpec] = {}  # (kind, file identity) -> spec, oldest first
_specs_lock = threading.Lock()


def file_identity(path: str | Path) -> tuple | None:
    """What identifies a version of the regular file at ``path`` without reading it, or None: not a
    regular file, or changed too recently for its stat to tell a later change apart."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    changed = max(info.st_mtime, info.st_ctime)  # ctime: any write or rename, and no one can set it back
    if not stat.S_ISREG(info.st_mode) or abs(time.time() - changed) < SETTLE_S:
        return None
    return (os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _checked_once(kind: str, path: str | Path, inspect: Callable[[str | Path], _Spec]) -> _Spec:
    """``inspect(path)``, answered from this process's cache while the file is unchanged. Refusals
    are not cached (each call raises afresh, naming the path it was given)."""
    identity = file_identity(path)
    if identity is None:
        return inspect(path)
    key = (kind, identity)
    with _specs_lock:
        spec = _specs.get(key)
        if spec is not None:
            _specs[key] = _specs.pop(key)  # most recently used last
    if spec is None:
        spec = _kept_for_file(kind, identity)
        if spec is None:
            spec = inspect(path)
            if file_identity(path) != identity:  # changed while it was read: the answer may not be its content's
                return spec
            _keep_for_file(kind, identity, spec)
        with _specs_lock:
            _specs[key] = spec
            while len(_specs) > _CACHE_ENTRIES:
                del _specs[next(iter(_specs))]
    return spec if spec.path == str(path) else dataclasses.replace(spec, path=str(path))


def _file_parts(kind: str, identity: tuple) -> dict:
    return {"format": INSPECT_FORMAT, "kind": kind, "file": list(identity)}


def _kept_for_file(kind: str, identity: tuple) -> EncoderSpec | GeneratorSpec | None:
    """The verdict the runtime cache keeps for this version of the file (the same identity the
    process's own cache trusts): a later process neither reads nor hashes an unchanged model."""
    cache = _verdicts()
    found = None if cache is None else cache.load("models", _file_parts(kind, identity))
    if found is None:
        return None
    try:
        return _SPEC_CLASSES[kind](path=identity[0], **found[0]["spec"])
    except (KeyError, TypeError):  # a record of another shape: check the model again
        cache.drop("models", _file_parts(kind, identity))
        return None


def _keep_for_file(kind: str, identity: tuple, spec) -> None:
    cache = _verdicts()
    if cache is not None:
        kept = {k: v for k, v in dataclasses.asdict(spec).items() if k != "path"}
        cache.store("models", _file_parts(kind, identity), {"spec": kept})


def forget_checked_models() -> None:
    """Drop every cached check (for tests, and for callers that must re-read models)."""
    with _specs_lock:
        _specs.clear()


_SPEC_CLASSES = {"encoder": EncoderSpec, "generator": GeneratorSpec}


def inspect_encoder(path: str | Path) -> EncoderSpec:
    """Read and check an audio encoder model (once per version of the file in this process)."""
    return _checked_once("encoder", path, _inspect_encoder)


def inspect_generator(path: str | Path) -> GeneratorSpec:
    """Read and check a UNet generator model (once per version of the file in this process)."""
    return _checked_once("generator", path, _inspect_generator)


# --- A model's verdict is kept on disk, by content: checked once per machine ------------------------

INSPECT_FORMAT = 1  # bump when the checks change: verdicts kept by earlier versions are then not used


def _verdicts():
    """The runtime cache, where verdicts are kept (None: caching is off)."""
    from lipfarm.common.runtimecache import RuntimeCache, default_cache_dir

    root = default_cache_dir()
    return None if root is None else RuntimeCache(root)


def _read_and_hash(path: str | Path) -> tuple[bytes, str]:
    data = _read_model_file(path)
    return data, hashlib.sha256(data).hexdigest()


def _inspect_kept(kind: str, path: str | Path, cls: type[_Spec],
                  from_model: Callable[[str | Path, "onnx.ModelProto", str], _Spec]) -> _Spec:
    """``from_model`` of the parsed file, or the verdict the runtime cache keeps for these exact bytes
    (their SHA-256): a model checked once on this machine is not parsed again, and a render whose
    sessions come from the runtime cache never imports onnx. Refusals are not kept."""
    data, sha256 = _read_and_hash(path)
    cache, parts = _verdicts(), {"format": INSPECT_FORMAT, "kind": kind, "model_sha256": sha256}
    if cache is not None:
        found = cache.load("models", parts)
        if found is not None:
            try:
                return cls(path=str(path), sha256=sha256, **found[0]["spec"])
            except TypeError:  # a record of another shape: check the model again
                cache.drop("models", parts)
    spec = from_model(path, _parse_model(path, data), sha256)
    if cache is not None:
        kept = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("path", "sha256")}
        cache.store("models", parts, {"spec": kept})
    return spec


def _inspect_encoder(path: str | Path) -> EncoderSpec:
    return _inspect_kept("encoder", path, EncoderSpec, _encoder_from)


def _inspect_generator(path: str | Path) -> GeneratorSpec:
    return _inspect_kept("generator", path, GeneratorSpec, _generator_from)


def _encoder_from(path: str | Path, model: onnx.ModelProto, sha256: str) -> EncoderSpec:
    inputs, outputs = _graph_inputs(model), list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError("an audio encoder has one input and one output", path=path,
                         expected="1 input, 1 output", found=f"{len(inputs)} inputs, {len(outputs)} outputs")
    (inp,), (out,) = inputs, outputs
    _check_float(path, f"input '{inp.name}'", inp)
    fixed = _check_shape(path, f"input '{inp.name}'", _dims(inp), ENCODER_INPUT)
    out_dims = _dims(out)
    if out_dims[1:] not in ((defaults.EMBEDDING_SIZE,), (defaults.EMBEDDING_SIZE, 1, 1)):
        raise ModelError("shape does not fit the SyncTalk_2D contract", path=path,
                         field=f"output '{out.name}'", expected=f"[B, {defaults.EMBEDDING_SIZE}]",
                         found=_show(out_dims))
    return EncoderSpec(str(path), sha256, inp.name, out.name, fixed)


def _split_generator_inputs(path, inputs) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    if len(inputs) != 2:
        raise ModelError("a UNet generator has two inputs (visual and audio)", path=path,
                         expected="2 inputs", found=f"{len(inputs)}: {[i.name for i in inputs]}")
    audio = [v for v in inputs if tuple(_dims(v)[1:]) == GENERATOR_AUDIO_INPUT]
    visual = [v for v in inputs if len(_dims(v)) == 4 and _dims(v)[1] == 6]
    if len(audio) != 1:
        shapes = ", ".join(f"'{v.name}' {_show(_dims(v))}" for v in inputs)
        raise ModelError("no audio input of the contract's shape", path=path, field="inputs",
                         expected=_show(("B",) + GENERATOR_AUDIO_INPUT), found=shapes)
    if len(visual) != 1 or visual[0] is audio[0]:
        other = next(v for v in inputs if v is not audio[0])
        raise ModelError("visual input must have 6 channels (ROI + masked ROI)", path=path,
                         field=f"input '{other.name}'", expected="[B, 6, R, R]",
                         found=_show(_dims(other)))
    return visual[0], audio[0]


def _generator_from(path: str | Path, model: onnx.ModelProto, sha256: str) -> GeneratorSpec:
    """The ROI size comes from the visual input."""
    visual, audio = _split_generator_inputs(path, _graph_inputs(model))
    outputs = list(model.graph.output)
    if len(outputs) != 1:
        raise ModelError("a UNet generator has one output", path=path,
                         expected="1 output", found=f"{len(outputs)}")
    for value in (visual, audio, outputs[0]):
        _check_float(path, f"'{value.name}'", value)
    dims = _dims(visual)
    roi = dims[2]
    if not isinstance(roi, int) or dims[3] != roi or roi < 32 or roi % 32:
        raise ModelError("visual input must be a fixed square multiple of 32", path=path,
                         field=f"input '{visual.name}'", expected="[B, 6, R, R] with R = 160 or 320",
                         found=_show(dims))
    fixed = _check_shape(path, f"input '{visual.name}'", dims, (6, roi, roi))
    fixed |= _check_shape(path, f"input '{audio.name}'", _dims(audio), GENERATOR_AUDIO_INPUT)
    _check_shape(path, f"output '{outputs[0].name}'", _dims(outputs[0]), (3, roi, roi))
    return GeneratorSpec(str(path), sha256, visual.name, audio.name,
                         outputs[0].name, roi, fixed)


def free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs' and outputs' first dimension is the free ``batch``.

    Intermediate shape annotations are dropped so that ONNX Runtime re-infers them.
    """
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weights = {init.name for init in copy.graph.initializer}
    for value in list(copy.graph.input) + list(copy.graph.output):
        if value.name in weights:
            continue
        first = value.type.tensor_type.shape.dim[0]
        first.Clear()
        first.dim_param = "batch"
    del copy.graph.value_info[:]
    return copy
