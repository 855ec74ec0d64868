"""The benchmark's code paths, on short inputs: figures present and sane (speed targets live in
the benchmark itself, never in tests)."""

from __future__ import annotations

import pytest

from lipfarm.benchmarks.local import BenchConfig, draw_chart, run_bench
from lipfarm.benchmarks.memory import measure_job
from tests.farm import REDIS_DB

pytestmark = pytest.mark.slow


def test_local_bench_reports_every_figure(settings, demo, tmp_path):
    configs = [BenchConfig("cpu", "fp32", 2, 8), BenchConfig("openvino", "bf16", 2, 8)]
    report = run_bench(settings, configs=configs, repeat=1, seconds=1.0)
    fp32, bf16 = report["runs"]
    assert report["frames"] == fp32["frames"] == 24 and report["machine"]["cores"] >= 1  # 1 s of speech
    for run in report["runs"]:
        assert run["inference_fps"] > 0 and run["end_to_end_fps"] > 0
        assert 0.2 < run["efficiency"] < 2.0
        assert set(run["stages_s"]) >= {"audio", "inference", "composite", "encode", "stitch"}
        assert set(run["non_inference_ms_per_frame"]) == {"audio", "prepare", "composite", "encode", "stitch"}
        # Cold start: fresh processes up to the first UNet batch; the first fills the runtime cache.
        assert 0 < run["cold_start_imports_s"] < run["cold_start_s"] and run["cold_start_first_run_s"] > 0
        assert len(run["cold_start_runs_s"]) == 1 and run["cold_start_s"] == run["cold_start_runs_s"][0]
        # (a hand-picked bf16 is first compared with fp32, which builds and stores its session)
        assert run["cold_start_runtime_cache"] == ["stored" if run["precision"] == "fp32" else "hit", "hit"]
        # Fixed cost: `lipfarm render` processes timed from outside, minus the inference they report.
        assert len(run["fixed_cost_runs_s"]) == 1 and 0 < run["fixed_cost_s"] < run["fixed_cost_process_s"]
        whole = run["render_process"]
        assert whole["frames"] == 24 and 0 < whole["inference_s"] < whole["process_s"] and whole["peak_rss_mb"] > 50
        assert whole["inference"] == f"{run['backend']}/{run['precision']}"
    assert (fp32["backend"], bf16["backend"]) == ("cpu", "openvino")
    assert "psnr_vs_fp32_db" not in fp32 and bf16["psnr_vs_fp32_db"] > 30
    chart = draw_chart(report, tmp_path / "chart.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_bench_measures_each_role(settings, demo, tmp_path):
    result = measure_job(settings, 0.25, tmp_path, threads=2)
    assert result["chunks"] == 2 and result["rendered_chunks"] == [0, 1]
    assert result["frames"] == 374  # 15 s: 240000 samples, 1201 mel frames, 372 windows
    assert all(mb > 50 for mb in result["peak_rss_mb"].values())


def test_watch_bench_times_the_first_playable_segment_and_the_tail(settings, demo):
    """Short jobs (449 frames: chunks of 25, 50, 100, 250 and 24 with the fast start) on a real
    worker; the tail job (675 frames) is made of the fast-start job's segments."""
    from lipfarm.benchmarks.watch import run_watch_bench

    figures = run_watch_bench(settings, minutes=0.3, tail_minutes=0.45, redis_db=REDIS_DB["bench-watch"])
    fast, uniform = figures["fast_start"], figures["uniform"]
    assert fast["frames"] == uniform["frames"] == 449  # 18 s of audio
    assert (fast["chunks"], uniform["chunks"]) == (5, 2)
    for job in (fast, uniform):
        assert 0 < job["first_playable_s"] <= job["half_playable_s"] <= job["total_s"]
        assert 0 <= job["tail_s"] < job["total_s"]
    assert figures["tail_0.45min_s"] > 0


def test_the_load_bench_drives_the_real_scripts_and_reports_fair_shares(settings):
    from lipfarm.benchmarks.load import LoadConfig, run_load_bench

    config = LoadConfig(workers=12, jobs=24, chunks_min=10, chunks_max=40, claims=600)
    figures = run_load_bench(settings, config, redis_db=REDIS_DB["bench-load"])
    assert figures["claims"] == 600 and figures["commits"] == 600 - 12  # each worker holds its last claim
    assert figures["chunks"] >= 24 * 10 and figures["messages_per_job"] == round(figures["chunks"] / 24 + 2, 1)
    for tenant in figures["tenant_share"].values():
        assert abs(tenant["share"] - tenant["weight_share"]) <= 0.10
    assert figures["redis_bytes_per_chunk"] > 0 and figures["recovery_messages"] == 0
    assert figures["job_list_jobs"] == 20 and figures["claims_and_commits_per_s"] > 0
# A stand-in for the earlier port's script (the real one is the user's to fetch): it takes the same
# arguments and writes one JPEG per frame, so the side-by-side runner is tested end to end.
_STAND_IN_PORT = '''
import argparse, pathlib
import numpy as np
from PIL import Image
parser = argparse.ArgumentParser()
for flag in ("--sanders", "--audio", "--output"):
    parser.add_argument(flag)
parser.add_argument("--frames", type=int)
args = parser.parse_args()
out = pathlib.Path(args.output)
out.mkdir(parents=True, exist_ok=True)
for i in range(1, args.frames + 1):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / f"frame_{i:05d}.jpg")
'''


def test_vs_port_runs_both_in_turn_on_the_same_frames(settings, demo, sanders, tmp_path):
    import shutil

    from lipfarm.benchmarks.vs_port import PORT_AUDIO, PORT_PACKAGE, PORT_SCRIPT, run_vs_port

    checkout = tmp_path / "digital-clone"
    shutil.copytree(sanders / "package", checkout / PORT_PACKAGE)
    (checkout / PORT_PACKAGE / "models").mkdir()
    shutil.copyfile(demo.encoder, checkout / PORT_PACKAGE / "models" / "audio_encoder.onnx")
    shutil.copyfile(demo.generator, checkout / PORT_PACKAGE / "models" / "generator.onnx")
    (checkout / PORT_AUDIO).parent.mkdir()
    shutil.copyfile(sanders / "audio" / "talk_hb.wav", checkout / PORT_AUDIO)
    (checkout / PORT_SCRIPT).parent.mkdir()
    (checkout / PORT_SCRIPT).write_text(_STAND_IN_PORT)
    report = run_vs_port(settings, checkout, frames=10, rounds=2, threads=1)
    assert len(report["pairs"]) == 2
    for pair in report["pairs"]:
        assert pair["port"]["frames"] == 10 and pair["port"]["peak_rss_mb"] > 5
        assert pair["lipfarm"]["frames"] == 10 and pair["lipfarm"]["inference"] == "cpu/fp32"
    assert report["time_ratio_port_over_lipfarm"] > 0 and report["memory_ratio_lipfarm_over_port"] > 0


def test_vs_port_names_what_is_missing(settings, tmp_path):
    from lipfarm.benchmarks.vs_port import run_vs_port
    from lipfarm.common.errors import InputError

    with pytest.raises(InputError, match="--vs-port"):
        run_vs_port(settings, tmp_path, frames=10, rounds=1, threads=1)
