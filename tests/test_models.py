"""The model contract, the demo models' cost, and the inference backends."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lipfarm.demo.models import build_generator
from lipfarm.common.errors import InputError, ModelError
from lipfarm.common.fp16 import to_float16
from lipfarm.common.models import inspect_encoder, inspect_generator, load_model
from lipfarm.common.runtime import BoundRunner, open_runner, resolve_backend
from tests.onnx_models import tiny_model


def test_demo_models_fit_the_contract(demo):
    encoder = inspect_encoder(demo.encoder)
    generator = inspect_generator(demo.generator)
    assert (encoder.input_name, encoder.output_name, encoder.fixed_batch) == ("mel", "emb", False)
    assert (generator.visual_input, generator.audio_input, generator.output_name) == ("input", "audio", "output")
    assert (generator.roi_px, generator.crop_px) == (320, 328)


def test_sizes_and_names_are_read_from_the_model(tmp_path):
    path = tiny_model(tmp_path / "g160.onnx", {"audio_features": ["n", 32, 16, 16], "img": ["n", 6, 160, 160]},
                      {"pred": ["n", 3, 160, 160]})
    spec = inspect_generator(path)
    assert (spec.visual_input, spec.audio_input, spec.output_name, spec.roi_px, spec.crop_px) == (
        "img", "audio_features", "pred", 160, 168)
    enc = tiny_model(tmp_path / "e.onnx", {"mel_spectrogram": [1, 1, 80, 16]}, {"audio_features": [1, 512]})
    spec = inspect_encoder(enc)
    assert (spec.input_name, spec.output_name, spec.fixed_batch) == ("mel_spectrogram", "audio_features", True)


@pytest.mark.parametrize("inputs, outputs, message", [
    ({"mel": ["B", 1, 80, 20]}, {"emb": ["B", 512]},
     r"e.onnx: input 'mel': shape does not fit .*expected \[B, 1, 80, 16\], found \[B, 1, 80, 20\]"),
    ({"mel": ["B", 1, 80, 16]}, {"emb": ["B", 256]},
     r"e.onnx: output 'emb': shape does not fit .*expected \[B, 512\], found \[B, 256\]"),
    ({"mel": [4, 1, 80, 16]}, {"emb": [4, 512]}, r"batch dimension must be 1 or free"),
])
def test_wrong_encoder_shapes_are_named(tmp_path, inputs, outputs, message):
    with pytest.raises(ModelError, match=message):
        inspect_encoder(tiny_model(tmp_path / "e.onnx", inputs, outputs))


@pytest.mark.parametrize("inputs, outputs, message", [
    ({"input": ["B", 3, 320, 320], "audio": ["B", 32, 16, 16]}, {"output": ["B", 3, 320, 320]},
     r"input 'input': visual input must have 6 channels .*found \[B, 3, 320, 320\]"),
    ({"input": ["B", 6, 320, 320], "audio": ["B", 16, 32, 32]}, {"output": ["B", 3, 320, 320]},
     r"inputs: no audio input of the contract's shape .*expected \[B, 32, 16, 16\]"),
    ({"input": ["B", 6, 320, 320], "audio": ["B", 32, 16, 16]}, {"output": ["B", 3, 160, 160]},
     r"output 'output': shape does not fit .*expected \[B, 3, 320, 320\], found \[B, 3, 160, 160\]"),
    ({"input": ["B", 6, "h", "w"], "audio": ["B", 32, 16, 16]}, {"output": ["B", 3, 320, 320]},
     r"visual input must be a fixed square"),
    ({"input": ["B", 6, 320, 320]}, {"output": ["B", 3, 320, 320]}, r"has two inputs"),
])
def test_wrong_generator_shapes_are_named(tmp_path, inputs, outputs, message):
    with pytest.raises(ModelError, match=message):
        inspect_generator(tiny_model(tmp_path / "g.onnx", inputs, outputs))


def test_non_float_model(tmp_path):
    path = tiny_model(tmp_path / "h.onnx", {"mel": ["B", 1, 80, 16]}, {"emb": ["B", 512]}, elem=TensorProto.FLOAT16)
    with pytest.raises(ModelError, match="must be float32"):
        inspect_encoder(path)


def test_not_onnx(tmp_path):
    (tmp_path / "model.onnx").write_text("this is not a protobuf, it is a poem")
    with pytest.raises(ModelError, match=r"model.onnx: not an ONNX model"):
        inspect_generator(tmp_path / "model.onnx")
    with pytest.raises(ModelError, match=r"absent.onnx: model file not found"):
        inspect_encoder(tmp_path / "absent.onnx")


def _count_cost(model: onnx.ModelProto) -> tuple[int, int]:
    """Parameters and multiply-adds of a model's convolutions, counted from the ONNX file alone."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in list(fixed.graph.input) + list(fixed.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    params = macs = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = weights[node.input[1]]
        params += w.size + (weights[node.input[2]].size if len(node.input) > 2 else 0)
        out = shapes[node.output[0]]
        macs += int(np.prod(out)) * w.shape[1] * w.shape[2] * w.shape[3]
    return params, macs


def test_demo_models_have_the_real_cost(demo):
    enc_params, enc_macs = _count_cost(onnx.load(str(demo.encoder)))
    gen_params, gen_macs = _count_cost(onnx.load(str(demo.generator)))
    assert enc_params == pytest.approx(2.81e6, rel=0.05)
    assert enc_macs == pytest.approx(93e6, rel=0.05)
    assert gen_params == pytest.approx(12.19e6, rel=0.05)
    assert gen_macs == pytest.approx(4.886e9, rel=0.05)
    assert 40e6 < demo.generator.stat().st_size < 52e6 and 9e6 < demo.encoder.stat().st_size < 13e6


def _fixed_batch_copy(src, dst):
    model = onnx.load(str(src))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(dst))
    return dst


def test_fixed_batch_models_are_run_batched(demo, tmp_path):
    spec = inspect_encoder(_fixed_batch_copy(demo.encoder, tmp_path / "enc_b1.onnx"))
    assert spec.fixed_batch
    runner = open_runner(spec, backend="cpu", precision="fp32", threads=1)
    assert runner.max_batch is None
    windows = np.random.default_rng(0).uniform(-4, 4, (5, 1, 80, 16)).astype(np.float32)
    (batched,) = runner({"mel": windows})
    singles = np.concatenate([runner({"mel": windows[i:i + 1]})[0] for i in range(5)])
    np.testing.assert_array_equal(batched, singles)


def test_models_that_hard_code_batch_1_run_one_at_a_time(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((1280, 512)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 1280], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["mel", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Relu", ["mm"], ["emb"])], "b1",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, 1, 80, 16])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 512])], [w, shape])
    path = tmp_path / "b1.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    runner = open_runner(inspect_encoder(path), backend="cpu", precision="fp32", threads=1)
    assert runner.max_batch == 1
    windows = np.random.default_rng(2).standard_normal((3, 1, 80, 16)).astype(np.float32)
    (out,) = runner({"mel": windows})
    assert out.shape == (3, 512)
    np.testing.assert_allclose(out[1], np.maximum(windows[1].reshape(-1) @ numpy_helper.to_array(w), 0),
                               rtol=1e-4, atol=1e-3)


def test_backend_resolution():
    def no_gpu():
        return False

    def gpu():
        return True

    assert resolve_backend("auto", "fp32", has_cuda=no_gpu) == "cpu"
    assert resolve_backend("auto", "fp32", has_cuda=gpu) == "cuda"
    assert resolve_backend("auto", "bf16", has_cuda=gpu) == "openvino"
    assert resolve_backend("auto", "fp16", has_cuda=gpu) == "cuda"
    assert resolve_backend("openvino", "fp32", has_cuda=no_gpu) == "openvino"
    with pytest.raises(InputError, match="backend: no NVIDIA GPU"):
        resolve_backend("auto", "fp16", has_cuda=no_gpu)
    with pytest.raises(InputError, match="precision bf16 does not run on backend cpu"):
        resolve_backend("cpu", "bf16", has_cuda=no_gpu)
    with pytest.raises(InputError, match="precision: unknown precision"):
        resolve_backend("auto", "int4", has_cuda=no_gpu)


def test_io_binding_reuses_buffers_and_matches_plain_runs(demo):
    session = ort.InferenceSession(str(demo.encoder), providers=["CPUExecutionProvider"])
    bound = BoundRunner(session, "cpu")
    rng = np.random.default_rng(3)
    for batch in (4, 4, 2, 4):
        windows = rng.uniform(-4, 4, (batch, 1, 80, 16)).astype(np.float32)
        (out,) = bound.run({"mel": windows})
        np.testing.assert_array_equal(out, session.run(None, {"mel": windows})[0])
    assert len(bound._buffers) == 2  # one binding per batch shape, reused


def test_openvino_matches_onnxruntime(demo):
    spec = inspect_encoder(demo.encoder)
    windows = np.random.default_rng(4).uniform(-4, 4, (6, 1, 80, 16)).astype(np.float32)
    (reference,) = open_runner(spec, backend="cpu", precision="fp32", threads=1)({"mel": windows})
    (fp32,) = open_runner(spec, backend="openvino", precision="fp32", threads=1)({"mel": windows})
    (bf16,) = open_runner(spec, backend="openvino", precision="bf16", threads=1)({"mel": windows})
    np.testing.assert_allclose(fp32, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    assert np.abs(bf16 - reference).max() < 0.05 * np.abs(reference).max()


def test_openvino_compiles_static_shapes_per_batch_and_keeps_a_few(demo):
    from lipfarm.common.runtime import _openvino

    runner, run = _openvino(load_model(str(demo.encoder)).SerializeToString(), 1, "fp32")
    rng = np.random.default_rng(6)
    windows = rng.uniform(-4, 4, (7, 1, 80, 16)).astype(np.float32)
    (whole,) = run({"mel": windows})
    for batch in (1, 2, 3, 5, 7):  # one compiled model per batch size; each row as in the whole
        (part,) = run({"mel": windows[:batch]})
        np.testing.assert_allclose(part, whole[:batch], rtol=1e-5, atol=1e-5 * np.abs(whole).max())
    assert sorted(runner._compiled) == [2, 3, 5, 7]  # at most KEEP, least recently used dropped


def test_fp16_conversion_keeps_io_float32_and_the_result(demo, tmp_path):
    model, _ = build_generator(160)
    half = to_float16(model)
    onnx.checker.check_model(half)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {i.data_type for i in half.graph.initializer if i.name.startswith("w_")} == {TensorProto.FLOAT16}
    rng = np.random.default_rng(5)
    feeds = {"input": rng.random((2, 6, 160, 160), dtype=np.float32),
             "audio": rng.random((2, 32, 16, 16), dtype=np.float32)}
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    low = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert low.dtype == np.float32
    mse = np.mean((full * 255 - low * 255) ** 2)
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 40


# --- Models must be self-contained: no external data, no custom operators -----------------------------


def _encoder_with_weights(path, *, external: bool, constant_in_subgraph: bool = False):
    """An encoder-shaped model ``mel [B,1,80,16] -> emb [B,512]`` whose weight ``w`` is an initializer
    (or a Constant inside an If branch), saved with its data inside or in ``w.bin`` beside it."""
    from onnx.external_data_helper import convert_model_to_external_data

    weights = np.random.default_rng(0).standard_normal((1280, 512)).astype(np.float32)
    flat = helper.make_node("Flatten", ["mel"], ["flat"], axis=1)
    if constant_in_subgraph:
        const = helper.make_node("Constant", [], ["w_then"], name="c", value=numpy_helper.from_array(weights, "w"))
        then = helper.make_graph([const], "then", [], [helper.make_tensor_value_info("w_then", TensorProto.FLOAT,
                                                                                     [1280, 512])])
        other = helper.make_graph([helper.make_node("Constant", [], ["w_else"], name="z", value=numpy_helper.from_array(
            np.zeros((1280, 512), np.float32), "z"))], "else", [],
            [helper.make_tensor_value_info("w_else", TensorProto.FLOAT, [1280, 512])])
        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes = [flat, helper.make_node("If", ["cond"], ["w"], name="pick", then_branch=then, else_branch=other)]
        inits = [cond]
    else:
        nodes, inits = [flat], [numpy_helper.from_array(weights, "w")]
    nodes.append(helper.make_node("MatMul", ["flat", "w"], ["emb"]))
    graph = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["B", 1, 80, 16])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["B", 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin", size_threshold=1024,
                                       convert_attribute=True)
    onnx.save(model, str(path))
    return path


def test_a_self_contained_model_still_loads_and_runs(tmp_path):
    path = _encoder_with_weights(tmp_path / "encoder.onnx", external=False, constant_in_subgraph=True)
    runner = open_runner(inspect_encoder(path), backend="cpu", precision="fp32", threads=1)
    assert runner({"mel": np.ones((2, 1, 80, 16), np.float32)})[0].shape == (2, 512)


def test_external_data_is_refused_naming_file_and_tensor(tmp_path):
    path = _encoder_with_weights(tmp_path / "encoder.onnx", external=True)
    assert (tmp_path / "w.bin").stat().st_size == 1280 * 512 * 4  # onnx.load would read it, and so would ORT
    message = r"encoder.onnx: initializer 'w': references external data 'w.bin' \(expected weights stored inside"
    with pytest.raises(ModelError, match=message):
        load_model(path)
    with pytest.raises(ModelError, match=message):
        inspect_encoder(path)


def test_external_data_anywhere_is_refused_and_never_read(tmp_path):
    path = _encoder_with_weights(tmp_path / "encoder.onnx", external=True, constant_in_subgraph=True)
    (tmp_path / "w.bin").unlink()  # refused by what the model says, without opening the data
    (tmp_path / "w.bin").mkdir()  # (a directory: reading it would fail differently)
    with pytest.raises(ModelError, match=r"encoder.onnx: node 'pick' attribute 'else_branch', node 'z' attribute "
                                         r"'value': references external data 'w.bin'"):
        load_model(path)


def test_a_path_outside_the_model_is_refused(tmp_path):
    from onnx.external_data_helper import set_external_data

    path = _encoder_with_weights(tmp_path / "encoder.onnx", external=False)
    model = onnx.load(str(path))
    tensor = model.graph.initializer[0]
    set_external_data(tensor, location="../../../../etc/passwd", offset=0, length=1280 * 512 * 4)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match=r"initializer 'w': references external data '../../../../etc/passwd'"):
        inspect_encoder(path)


@pytest.mark.parametrize("domain, op, attrs, found", [
    ("com.example", "Steal", {}, "uses operator 'Steal' of domain 'com.example'"),
    ("com.microsoft", "EPContext", {"embed_mode": 0, "ep_cache_context": "/etc/passwd"},
     "uses operator 'EPContext' of domain 'com.microsoft'"),
])
def test_operators_outside_the_standard_domains_are_refused(tmp_path, domain, op, attrs, found):
    graph = helper.make_graph(
        [helper.make_node(op, ["mel"], ["emb"], name="n", domain=domain, **attrs)], "custom",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["B", 1, 80, 16])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["B", 512])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    onnx.save(model, str(tmp_path / "encoder.onnx"))
    with pytest.raises(ModelError, match=rf"encoder.onnx: node 'n': {found} \(expected standard ONNX operators"):
        inspect_encoder(tmp_path / "encoder.onnx")


def test_functions_the_model_defines_itself_are_accepted(tmp_path):
    relu = helper.make_function("local.fns", "MyRelu", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["mel"], ["flat"], axis=1),
         helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["cut"]),
         helper.make_node("MyRelu", ["cut"], ["emb"], domain="local.fns")], "fn",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["B", 1, 80, 16])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["B", 512])],
        [numpy_helper.from_array(np.array([value], np.int64), name)
         for name, value in (("starts", 0), ("ends", 512), ("axes", 1))])
    model = helper.make_model(graph, functions=[relu],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fns", 1)])
    onnx.save(model, str(tmp_path / "encoder.onnx"))
    runner = open_runner(inspect_encoder(tmp_path / "encoder.onnx"), backend="cpu", precision="fp32", threads=1)
    mel = np.random.default_rng(1).standard_normal((2, 1, 80, 16)).astype(np.float32)
    np.testing.assert_array_equal(runner({"mel": mel})[0], np.maximum(mel.reshape(2, -1)[:, :512], 0))


# --- The runtime cache: sessions kept across processes, never trusted blindly ---------------------------


def _runner(spec, cache_dir, *, backend="cpu", precision="fp32", threads=1):
    from lipfarm.common.runtime import load_runner

    return load_runner(spec.path, spec.sha256, backend=backend, precision=precision, threads=threads,
                       fixed_batch=spec.fixed_batch, cache_dir=cache_dir)


def _demo_feeds(spec, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    if hasattr(spec, "input_name"):
        return {spec.input_name: rng.uniform(-4, 4, (batch, 1, 80, 16)).astype(np.float32)}
    return {spec.visual_input: rng.random((batch, 6, spec.roi_px, spec.roi_px), dtype=np.float32),
            spec.audio_input: rng.random((batch, 32, 16, 16), dtype=np.float32)}


def _entries(cache_dir, kind="onnxruntime", suffix=".json"):
    return sorted((cache_dir / kind).glob(f"*{suffix}"))


@pytest.mark.parametrize("which", ["encoder", "generator"])
def test_runtime_cache_gives_bit_identical_outputs(demo, tmp_path, which):
    spec = inspect_encoder(demo.encoder) if which == "encoder" else inspect_generator(demo.generator)
    feeds = _demo_feeds(spec, 3, seed=7)
    (reference,) = _runner(spec, None)(feeds)
    built, loaded = _runner(spec, tmp_path), _runner(spec, tmp_path)
    assert (built.cache, loaded.cache) == ("stored", "hit")
    assert loaded.input_names == built.input_names and loaded.output_names == built.output_names
    for runner in (built, loaded):
        np.testing.assert_array_equal(runner(feeds)[0], reference)
    (single,) = loaded({k: v[:1] for k, v in feeds.items()})  # the cached graph keeps a free batch
    np.testing.assert_array_equal(single, _runner(spec, None)({k: v[:1] for k, v in feeds.items()})[0])


@pytest.mark.parametrize("damage", ["garbage payload", "one byte changed", "truncated payload", "garbage record",
                                    "record of another key", "payload missing"])
def test_a_damaged_cache_entry_is_rebuilt_and_the_session_is_right(demo, tmp_path, damage):
    spec = inspect_encoder(demo.encoder)
    feeds = _demo_feeds(spec, 4, seed=8)
    (reference,) = _runner(spec, None)(feeds)
    assert _runner(spec, tmp_path).cache == "stored"
    (record,), (payload,) = _entries(tmp_path), _entries(tmp_path, suffix=".onnx")
    if damage == "garbage payload":
        payload.write_bytes(b"\x00garbage, not a graph" * 4096)
    elif damage == "one byte changed":  # still parses: only the hash tells
        data = bytearray(payload.read_bytes())
        data[len(data) // 2] ^= 0x40
        payload.write_bytes(bytes(data))
    elif damage == "truncated payload":
        payload.write_bytes(payload.read_bytes()[:1000])
    elif damage == "garbage record":
        record.write_bytes(b"{not json")
    elif damage == "record of another key":
        import json

        data = json.loads(record.read_text())
        data["key"]["library"] = "onnxruntime 0.0.1"
        record.write_text(json.dumps(data))
    else:
        payload.unlink()
    rebuilt = _runner(spec, tmp_path)
    assert rebuilt.cache == "stored"
    np.testing.assert_array_equal(rebuilt(feeds)[0], reference)
    again = _runner(spec, tmp_path)
    assert again.cache == "hit" and len(_entries(tmp_path)) == 1
    np.testing.assert_array_equal(again(feeds)[0], reference)


def test_runtime_cache_entries_are_keyed_by_model_and_precision(demo, tmp_path):
    from lipfarm.common.runtime import RuntimeCache, _CacheSlot

    encoder, generator = inspect_encoder(demo.encoder), inspect_generator(demo.generator)
    assert _runner(encoder, tmp_path).cache == "stored"
    assert _runner(generator, tmp_path).cache == "stored"  # another model: its own entry
    assert len(_entries(tmp_path)) == 2 and len(_entries(tmp_path, suffix=".onnx")) == 2
    assert _runner(encoder, tmp_path).cache == _runner(generator, tmp_path).cache == "hit"
    # OpenVINO: fp32 and bf16 compile to different models, each with its own record and blobs.
    windows = _demo_feeds(encoder, 3, seed=9)
    outputs = {}
    for precision in ("fp32", "bf16"):
        runner = _runner(encoder, tmp_path, backend="openvino", precision=precision)
        assert runner.cache == "stored"
        outputs[precision] = runner(windows)[0]
    assert len(_entries(tmp_path, "openvino")) == 4 and len(_entries(tmp_path, "openvino", ".blob")) == 2
    for precision in ("fp32", "bf16"):
        runner = _runner(encoder, tmp_path, backend="openvino", precision=precision)
        assert runner.cache == "hit"
        np.testing.assert_array_equal(runner(windows)[0], outputs[precision])
        assert runner.run_batch.__self__.blobs.hits == 1  # imported, not compiled
    assert len(_entries(tmp_path, "openvino", ".blob")) == 2
    # Every part of the key changes the entry: model, precision, threads (OpenVINO), machine, library.
    cache = RuntimeCache(tmp_path)

    def key(**changes):
        args = dict(path=encoder.path, sha256=encoder.sha256, backend="openvino", precision="fp32", threads=1,
                    fixed_batch=False)
        args.update(changes)
        slot = _CacheSlot(cache, **args)
        return cache.key(slot.parts)

    base = key()
    assert len({base, key(sha256=generator.sha256), key(precision="bf16"), key(threads=2),
                key(fixed_batch=True), key(backend="cpu")}) == 6
    parts = _CacheSlot(cache, encoder.path, encoder.sha256, "cpu", "fp32", 1, False).parts
    assert cache.key({**parts, "library": "onnxruntime 0.0.1"}) != cache.key(parts)
    assert cache.key({**parts, "machine": {**parts["machine"], "cpu_flags": "0"}}) != cache.key(parts)


def test_runtime_cache_keeps_the_batch_decisions(demo, tmp_path):
    spec = inspect_encoder(_fixed_batch_copy(demo.encoder, tmp_path / "enc_b1.onnx"))
    windows = np.random.default_rng(10).uniform(-4, 4, (5, 1, 80, 16)).astype(np.float32)
    (reference,) = _runner(spec, None)({"mel": windows})
    for expected in ("stored", "hit"):
        runner = _runner(spec, tmp_path / "cache")
        assert (runner.cache, runner.max_batch) == (expected, None)  # batch freed, probed once
        np.testing.assert_array_equal(runner({"mel": windows})[0], reference)
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((1280, 512)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 1280], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["mel", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["emb"])],
        "b1", [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, 1, 80, 16])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 512])], [w, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "b1.onnx")
    spec = inspect_encoder(tmp_path / "b1.onnx")
    for expected in ("stored", "hit"):
        runner = _runner(spec, tmp_path / "cache")
        assert (runner.cache, runner.max_batch) == (expected, 1)  # hard-coded batch 1: one at a time
        assert runner({"mel": windows})[0].shape == (5, 512)


def test_an_unwritable_runtime_cache_only_costs_time(demo, tmp_path):
    spec = inspect_encoder(demo.encoder)
    feeds = _demo_feeds(spec, 2, seed=11)
    (reference,) = _runner(spec, None)(feeds)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    for backend in ("cpu", "openvino"):
        runner = _runner(spec, blocked / "runtime", backend=backend)
        assert runner.cache == "off"
        if backend == "cpu":
            np.testing.assert_array_equal(runner(feeds)[0], reference)
        else:
            assert runner(feeds)[0].shape == reference.shape


def test_a_damaged_openvino_blob_is_compiled_again(demo, tmp_path):
    spec = inspect_encoder(demo.encoder)
    windows = _demo_feeds(spec, 3, seed=12)
    (reference,) = _runner(spec, None, backend="openvino")(windows)
    _runner(spec, tmp_path, backend="openvino")(windows)
    (blob,) = _entries(tmp_path, "openvino", ".blob")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # OpenVINO itself would import this silently
    blob.write_bytes(bytes(data))
    runner = _runner(spec, tmp_path, backend="openvino")
    np.testing.assert_array_equal(runner(windows)[0], reference)
    assert runner.run_batch.__self__.blobs.hits == 0 and runner.run_batch.__self__.blobs.stores == 1


def test_open_runner_finds_the_runtime_cache_in_the_settings(demo, home, monkeypatch, tmp_path):
    from lipfarm.common.runtime import CACHE_DIR_ENV, default_cache_dir

    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("LIPFARM_CACHE_DIR", raising=False)
    assert default_cache_dir() == home / "cache" / "runtime"
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv(CACHE_DIR_ENV, "off")
    assert default_cache_dir() is None
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    spec = inspect_encoder(demo.encoder)
    runner = open_runner(spec, backend="cpu", precision="fp32", threads=1)
    assert runner.cache in ("stored", "hit") and _entries(tmp_path / "elsewhere")
    assert open_runner(spec, backend="cpu", precision="fp32", threads=1, cache_dir=None).cache == "off"


# --- Each version of a model file is checked once per process ------------------------------------------


@pytest.fixture
def counted_checks(monkeypatch, tmp_path):
    """Checks cached from the first second (no settling), and a list of the files actually read
    (with an empty runtime cache: no verdicts kept by earlier tests)."""
    from lipfarm.common import models

    monkeypatch.setenv("LIPFARM_RUNTIME_CACHE_DIR", str(tmp_path / "runtime-cache"))
    models.forget_checked_models()
    monkeypatch.setattr(models, "SETTLE_S", 0.0)
    read = []
    real = models._read_and_hash

    def counting(path):
        read.append(str(path))
        return real(path)

    monkeypatch.setattr(models, "_read_and_hash", counting)
    yield read
    models.forget_checked_models()


def test_a_model_is_checked_once_while_its_file_is_unchanged(demo, tmp_path, monkeypatch, counted_checks):
    import shutil

    from lipfarm.common.fileio import file_sha256

    path = tmp_path / "encoder.onnx"
    shutil.copyfile(demo.encoder, path)
    first = inspect_encoder(path)
    assert first.sha256 == file_sha256(path) == inspect_encoder(demo.encoder).sha256
    monkeypatch.chdir(tmp_path)
    again, relative = inspect_encoder(str(path)), inspect_encoder("encoder.onnx")
    assert counted_checks == [str(path), str(demo.encoder)]  # one check per file
    assert (again.path, relative.path) == (str(path), "encoder.onnx")  # each caller's own spelling
    assert again == first and relative.sha256 == first.sha256

    # the same file checked as a generator is a different question (and a refusal)
    with pytest.raises(ModelError, match="two inputs"):
        inspect_generator(path)
    with pytest.raises(ModelError, match="two inputs"):
        inspect_generator(path)
    assert counted_checks[2:] == [str(path), str(path)]  # refusals are not kept


def test_a_changed_model_file_is_checked_again(tmp_path, counted_checks):
    path = tiny_model(tmp_path / "e.onnx", {"mel": ["B", 1, 80, 16]}, {"emb": ["B", 512]})
    before = inspect_encoder(path)
    # rewritten in place, same size (another output name of the same length), mtime set back
    stat = path.stat()
    tiny_model(path, {"mel": ["B", 1, 80, 16]}, {"out": ["B", 512]})
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    after = inspect_encoder(path)
    assert (before.output_name, after.output_name) == ("emb", "out") and before.sha256 != after.sha256
    # replaced by another file
    other = tiny_model(tmp_path / "other.onnx", {"mel": ["B", 1, 80, 16]}, {"new": ["B", 512]})
    os.replace(other, path)
    assert inspect_encoder(path).output_name == "new"
    # replaced by something that is not a model: refused, not answered from the cache
    path.write_text("not a model any more")
    with pytest.raises(ModelError, match="not an ONNX model"):
        inspect_encoder(path)
    path.unlink()
    with pytest.raises(ModelError, match="model file not found"):
        inspect_encoder(path)
    assert len(counted_checks) == 5


def test_a_model_file_changed_just_now_is_checked_every_time(tmp_path, monkeypatch, counted_checks):
    from lipfarm.common import models

    monkeypatch.setattr(models, "SETTLE_S", 60.0)  # its timestamps may not yet tell a second change
    path = tiny_model(tmp_path / "e.onnx", {"mel": ["B", 1, 80, 16]}, {"emb": ["B", 512]})
    inspect_encoder(path), inspect_encoder(path)
    assert len(counted_checks) == 2
    old = time.time() - 3600
    os.utime(path, (old, old))  # an old mtime, but the ctime is now: still too recent
    inspect_encoder(path)
    assert len(counted_checks) == 3


def test_model_hash_and_parse_come_from_one_read(demo, tmp_path):
    from lipfarm.common.fileio import file_sha256
    from lipfarm.common.models import _read_and_hash, load_model

    data, digest = _read_and_hash(demo.generator)
    assert digest == file_sha256(demo.generator)
    assert load_model(demo.generator) == onnx.load(str(demo.generator), load_external_data=False)
    assert load_model(demo.generator).SerializeToString() == onnx.load_model_from_string(data).SerializeToString()


def test_a_verdict_is_kept_in_the_runtime_cache_by_content(demo, tmp_path, monkeypatch):
    """A model checked once on this machine is not parsed again in another process (no onnx import);
    a refusal is not kept, and a copy of the same bytes elsewhere gets the same verdict."""
    import shutil

    from lipfarm.common import models

    monkeypatch.setenv("LIPFARM_RUNTIME_CACHE_DIR", str(tmp_path / "cache"))
    models.forget_checked_models()
    first = inspect_generator(demo.generator)
    kept = sorted((tmp_path / "cache" / "models").glob("*.json"))  # by content, and by file once settled
    assert kept
    models.forget_checked_models()  # as a new process would

    def no_parse(path, data):
        raise AssertionError("parsed again")

    monkeypatch.setattr(models, "_parse_model", no_parse)
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(demo.generator, copy)
    assert inspect_generator(copy) == dataclasses.replace(first, path=str(copy))
    monkeypatch.undo()
    monkeypatch.setenv("LIPFARM_RUNTIME_CACHE_DIR", str(tmp_path / "cache"))
    kept = sorted((tmp_path / "cache" / "models").glob("*.json"))
    with pytest.raises(ModelError, match="two inputs"):
        inspect_generator(demo.encoder)
    assert sorted((tmp_path / "cache" / "models").glob("*.json")) == kept


def test_an_unchanged_file_is_not_even_read_by_a_later_process(demo, tmp_path, monkeypatch):
    from lipfarm.common import models

    monkeypatch.setenv("LIPFARM_RUNTIME_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "SETTLE_S", 0.0)
    models.forget_checked_models()
    first = inspect_encoder(demo.encoder)
    models.forget_checked_models()  # as a new process would

    def no_read(path):
        raise AssertionError("read again")

    monkeypatch.setattr(models, "_read_and_hash", no_read)
    assert inspect_encoder(demo.encoder) == first
    os.utime(demo.encoder)  # touched: its identity changes (ctime), so it is read again
    models.forget_checked_models()
    with pytest.raises(AssertionError, match="read again"):
        inspect_encoder(demo.encoder)
    models.forget_checked_models()
