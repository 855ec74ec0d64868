"""``--precision auto``: the choice rule on injected figures, and a real measurement kept and reused."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lipfarm.common.autoselect import (Measured, candidates, choose, choose_runtime, forget_choices,
                                       measured_for, slower_than_fp32, _choice_key)
from lipfarm.common.errors import InputError
from lipfarm.common.models import inspect_generator
from lipfarm.common.options import RenderOptions
from lipfarm.common.runtime import RuntimeCache
from lipfarm.demo.speech import write_wav

ROOT = Path(__file__).resolve().parents[1]
INF = math.inf


def figures(cpu: float, ov32: float, bf16: float, *, bf16_db: float = 55.0, ov32_db: float = 120.0):
    return [Measured("cpu", "fp32", cpu, INF), Measured("openvino", "fp32", ov32, ov32_db),
            Measured("openvino", "bf16", bf16, bf16_db)]


# --- The rule, on figures measured elsewhere (issue 18's machines) -----------------------------------


def test_avx512_bf16_without_amx_keeps_fp32():
    # a Xeon with AVX-512 BF16 and no AMX: bf16 25% slower than fp32
    choice = choose(figures(14.3, 14.8, 11.1))
    assert (choice.backend, choice.precision) == ("cpu", "fp32")  # OpenVINO fp32 is within noise of it
    assert "14.3" in choice.reason


def test_openvino_fp32_wins_when_clearly_faster_and_bf16_is_slower():
    choice = choose(figures(14.3, 16.5, 11.1))
    assert (choice.backend, choice.precision) == ("openvino", "fp32")
    assert "1.15x cpu/fp32" in choice.reason


def test_amx_picks_bf16_when_faster_and_close_enough():
    choice = choose(figures(14.3, 14.8, 31.5, bf16_db=52.0))
    assert (choice.backend, choice.precision) == ("openvino", "bf16")
    assert "52.0 dB" in choice.reason


@pytest.mark.parametrize("db", [39.9, 12.0, math.nan])
def test_never_a_precision_under_the_psnr_bound(db):
    choice = choose(figures(14.3, 14.8, 31.5, bf16_db=db))
    assert choice.precision == "fp32"
    assert "openvino/bf16 left out" in choice.reason


def test_exact_output_when_asked_keeps_only_identical_outputs():
    choice = choose(figures(14.3, 30.0, 31.5, ov32_db=130.0), min_psnr_db=INF)
    assert (choice.backend, choice.precision) == ("cpu", "fp32")


def test_a_raised_bound_is_applied_to_the_same_figures():
    measured = figures(14.3, 14.8, 31.5, bf16_db=45.0)
    assert choose(measured, min_psnr_db=40).precision == "bf16"
    assert choose(measured, min_psnr_db=50).precision == "fp32"


def test_gpu_candidates_choose_fp16_when_faster_and_close():
    measured = [Measured("cuda", "fp32", 200.0, INF), Measured("cuda", "fp16", 520.0, 48.0)]
    assert choose(measured).name == "cuda/fp16"
    assert candidates("auto", has_cuda=True, has_openvino=True) == [("cuda", "fp32"), ("cuda", "fp16")]
    assert candidates("auto", has_cuda=False, has_openvino=True)[0] == ("cpu", "fp32")
    assert candidates("openvino", has_cuda=False, has_openvino=True) == [("openvino", "fp32"), ("openvino", "bf16")]


def test_slower_than_fp32_gives_both_figures():
    slower = slower_than_fp32(figures(14.3, 14.8, 11.1), "bf16")
    assert slower is not None and (slower[0].fps, slower[1].fps) == (11.1, 14.8)
    assert slower_than_fp32(figures(14.3, 14.8, 31.5), "bf16") is None


def test_auto_is_an_option_value_and_others_are_refused():
    assert RenderOptions(precision="auto").precision == "auto"
    with pytest.raises(InputError, match="precision"):
        RenderOptions(precision="int4")


# --- Real: the demo UNet measured once on this machine, then read from the runtime cache --------------


@pytest.fixture(scope="module")
def measured_cache(demo, tmp_path_factory):
    """A runtime cache holding the demo UNet's measurement (threads 1): the first ``auto``."""
    cache = tmp_path_factory.mktemp("runtime-cache")
    forget_choices()
    first = choose_runtime(RenderOptions(precision="auto"), inspect_generator(demo.generator), threads=1,
                           cache_dir=cache)
    return cache, first


def test_auto_measures_once_and_reuses_the_cached_choice(demo, measured_cache):
    cache, first = measured_cache
    assert first.source == "measured"
    assert {m.name for m in first.measured} >= {"cpu/fp32", "openvino/fp32", "openvino/bf16"}
    assert first.precision == "fp32" or dict((m.name, m.psnr_db) for m in first.measured)[first.name] >= 40
    records = list((cache / "choice").glob("*.json"))
    assert len(records) == 1
    forget_choices()  # as a new process would: only the runtime cache is left
    again = choose_runtime(RenderOptions(precision="auto"), inspect_generator(demo.generator), threads=1,
                           cache_dir=cache)
    assert again.source == "cached"
    assert (again.name, again.measured) == (first.name, first.measured)
    assert list((cache / "choice").glob("*.json")) == records


def test_a_damaged_choice_record_is_measured_again(demo, tmp_path, measured_cache):
    cache, first = measured_cache
    for record in (cache / "choice").glob("*.json"):
        (tmp_path / "choice").mkdir(exist_ok=True)
        (tmp_path / "choice" / record.name).write_text(record.read_text().replace('"fps"', '"fsp"'))
    figures_, source = measured_for(inspect_generator(demo.generator), "cpu", threads=1, batch_frames=0,
                                    cache_dir=tmp_path)
    assert source == "measured" and [m.name for m in figures_] == ["cpu/fp32"]


def test_bf16_by_hand_where_measured_slower_warns_once_with_both_figures(demo, tmp_path, caplog):
    spec = inspect_generator(demo.generator)
    pairs = candidates("auto", has_cuda=False, has_openvino=True)
    key = _choice_key(spec, "auto", pairs, threads=1, batch=1)
    injected = [{"backend": m.backend, "precision": m.precision, "fps": m.fps, "psnr_db": m.psnr_db}
                for m in figures(14.3, 14.8, 11.1)]
    assert RuntimeCache(tmp_path).store("choice", key, {"measured": injected})
    forget_choices()
    with caplog.at_level(logging.WARNING, logger="lipfarm.common.autoselect"):
        for _ in range(2):
            choice = choose_runtime(RenderOptions(precision="bf16"), spec, threads=1, cache_dir=tmp_path)
            assert choice.name == "openvino/bf16"
    warnings = [r.getMessage() for r in caplog.records if "slower than fp32" in r.getMessage()]
    assert len(warnings) == 1
    assert "11.1" in warnings[0] and "14.8" in warnings[0]


def test_lipfarm_render_says_what_auto_chose(demo, settings, speech_16k, measured_cache, tmp_path):
    cache, first = measured_cache
    clip = tmp_path / "clip.wav"
    write_wav(clip, speech_16k[:8000])
    env = {**os.environ, "LIPFARM_HOME": str(settings.home), "LIPFARM_RUNTIME_CACHE_DIR": str(cache),
           "LIPFARM_INFERENCE_THREADS": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "lipfarm"), "render", "--avatar", demo.avatar_name,
                           "--audio", str(clip), "--out", str(tmp_path / "out.mp4"), "--precision", "auto",
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"precision auto: {first.name}: " in done.stdout
    assert len(list((cache / "choice").glob("*.json"))) == 1  # read from the cache, not measured again
    assert json.loads(next((cache / "choice").glob("*.json")).read_text())["measured"]


def test_the_worker_start_line_lists_the_choices_measured_here(demo, settings, measured_cache, monkeypatch, capsys):
    from lipfarm.cli.farm import _print_inference_line

    cache, first = measured_cache
    monkeypatch.setenv("LIPFARM_RUNTIME_CACHE_DIR", str(cache))
    _print_inference_line(settings)
    lines = capsys.readouterr().out.splitlines()
    assert "1 model(s) measured here" in lines[0]
    assert lines[1].startswith(f"  auto: {Path(demo.generator).name} (") and f": {first.name}: " in lines[1]
