"""The command line: bad input gives one clear line and an exit code; flags match the options."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from datetime import datetime

import pytest
import soundfile

from lipfarm.common.options import RenderOptions
from lipfarm.cli import OPTION_HELP, build_parser, main
from tests.media import tone
from tests.onnx_models import tiny_model


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def good_audio(tmp_path):
    path = tmp_path / "ok.wav"
    soundfile.write(path, tone(1.0, 16000).T, 16000)
    return path


def _render_args(demo, audio, out, *extra):
    return ["render", "--avatar", "demo", "--audio", str(audio), "--out", str(out),
            "--encoder", str(demo.encoder), "--generator", str(demo.generator), "--quiet", *extra]


def _broken_avatar(settings, demo_avatar, name, edit):
    target = settings.avatars_dir / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(demo_avatar.root, target)
    edit(target)
    return name


def _bad_inputs(tmp_path, settings, demo, demo_avatar, good_audio):
    """(label, CLI args, exit code, text the one error line must contain)."""
    out = tmp_path / "out.mp4"
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not audio at all\n" * 10)
    soundfile.write(tmp_path / "blip.wav", tone(0.03, 16000).T, 16000)
    corrupt = tmp_path / "corrupt.flac"
    soundfile.write(corrupt, tone(1.0, 16000).T, 16000)
    corrupt.write_bytes(corrupt.read_bytes()[:60] + bytes(4000))
    (tmp_path / "poem.onnx").write_text("roses are red")
    wrong = tiny_model(tmp_path / "wrong.onnx", {"input": ["B", 6, 320, 320], "audio": ["B", 16, 32, 32]},
                       {"output": ["B", 3, 320, 320]})

    def drop_frame(root):
        (root / "frames" / "000010.jpg").unlink()

    def bad_rect(root):
        meta = json.loads((root / "avatar.json").read_text())
        meta["rects"][3] = [1100, 600, 1400, 900]
        (root / "avatar.json").write_text(json.dumps(meta))

    missing = _broken_avatar(settings, demo_avatar, "missing-frame", drop_frame)
    outside = _broken_avatar(settings, demo_avatar, "rect-outside", bad_rect)
    args = lambda audio, *extra: _render_args(demo, audio, out, *extra)  # noqa: E731
    return out, [
        ("unreadable audio", args(tmp_path / "absent.wav"), 2, "absent.wav: file not found"),
        ("empty file", args(tmp_path / "empty.wav"), 2, "empty.wav: not a readable media file"),
        ("corrupt audio", args(corrupt), 2, "corrupt.flac"),
        ("too short", args(tmp_path / "blip.wav"), 2, "blip.wav: audio is too short"),
        ("not audio", args(tmp_path / "notes.txt"), 2,
         ("notes.txt: not a readable media file", "notes.txt: no audio stream")),
        ("unknown avatar", ["render", "--avatar", "nobody", "--audio", str(good_audio), "--out", str(out)], 4,
         "unknown avatar 'nobody'"),
        ("missing frames", [*args(good_audio)[:2], missing, *args(good_audio)[3:]], 2,
         "frames/000010.jpg: frames[10]: frame file missing"),
        ("rect outside", [*args(good_audio)[:2], outside, *args(good_audio)[3:]], 2,
         "rects[3]: rect reaches outside the frame (expected inside 1280x720, found [1100, 600, 1400, 900])"),
        ("not onnx", [*args(good_audio)[:8], str(tmp_path / "poem.onnx"), *args(good_audio)[9:]], 3,
         "poem.onnx: not an ONNX model"),
        ("wrong shapes", [*args(good_audio)[:10], str(wrong), *args(good_audio)[11:]], 3,
         "wrong.onnx: inputs: no audio input of the contract's shape"),
        ("missing directory", _render_args(demo, good_audio, tmp_path / "nowhere" / "x.mp4"), 2,
         "nowhere: output directory does not exist"),
        ("bad option", args(good_audio, "--chunk-frames", "30"), 2,
         "chunk_frames: chunks must start on keyframes"),
        ("unknown sync mode", args(good_audio, "--sync-mode", "pingpong"), 2,
         "sync_mode: not a known sync mode (expected bounce | loop | cut_off | silence | remap, found pingpong)"),
        ("one model only", ["render", "--avatar", "demo", "--audio", str(good_audio), "--out", str(out),
                            "--encoder", str(demo.encoder)], 2, "--encoder/--generator"),
    ]


@pytest.mark.slow
def test_bad_input_gives_one_line_an_exit_code_and_no_output(capsys, tmp_path, settings, demo, demo_avatar,
                                                               good_audio):
    out, cases = _bad_inputs(tmp_path, settings, demo, demo_avatar, good_audio)
    for label, args, code, text in cases:
        got, stdout, stderr = run_cli(capsys, *args)
        lines = stderr.strip().splitlines()
        assert got == code, (label, got, stderr)
        assert len(lines) == 1 and lines[0].startswith("lipfarm: error: "), (label, stderr)
        texts = text if isinstance(text, tuple) else (text,)  # FFmpeg's verdict on text varies
        assert any(t in lines[0] for t in texts), (label, lines[0])
        assert "Traceback" not in stderr
        assert not out.exists(), label


def test_every_render_option_has_a_flag_with_help():
    parser = build_parser()
    render = parser._subparsers._group_actions[0].choices["render"]
    flags = {a.dest: a for a in render._actions}
    for spec in fields(RenderOptions):
        action = flags[f"opt_{spec.name}"]
        flag = "--" + spec.name.replace("_", "-")
        expected = [flag, "--no-" + flag[2:]] if spec.type == "bool" else [flag]
        assert action.option_strings == expected
        assert spec.name in OPTION_HELP and action.help
    assert set(OPTION_HELP) == {spec.name for spec in fields(RenderOptions)}


def test_flags_build_the_options(settings):
    from lipfarm.cli import options_from_args

    args = build_parser().parse_args(["render", "--avatar", "a", "--audio", "b", "--out", "c",
                                      "--chunk-frames", "50", "--video-qp", "23", "--x264-preset", "ultrafast"])
    options = options_from_args(args, settings)
    assert options == RenderOptions(chunk_frames=50, video_qp=23, x264_preset="ultrafast",
                                    precision=settings.precision, backend=settings.backend)


def test_avatar_commands(capsys, sanders, settings):
    code, out, _ = run_cli(capsys, "avatar", "import", str(sanders / "package"), "--name", "sanders-pkg")
    assert code == 0 and "imported 'sanders-pkg': 40 frames 1280x720 (package)" in out
    code, _, err = run_cli(capsys, "avatar", "import", str(sanders / "package"), "--name", "sanders-pkg")
    assert code == 2 and "exists (use --force" in err
    broken = settings.avatars_dir / "broken-one"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "avatar.json").write_text("{not json")
    code, out, _ = run_cli(capsys, "avatar", "list")
    assert code == 0 and "sanders-pkg" in out and "broken-one" in out and "damaged: " in out
    code, out, _ = run_cli(capsys, "avatar", "show", "sanders-pkg")
    shown = json.loads(out)
    assert code == 0 and shown["frames"] == 40 and shown["rect_0"] == [532, 210, 714, 392]
    code, _, err = run_cli(capsys, "avatar", "show", "nobody")
    assert code == 4 and "unknown avatar 'nobody'" in err


def test_console_script_exits_non_zero_without_a_traceback(tmp_path):
    lipfarm = shutil.which("lipfarm", path=str(__import__("pathlib").Path(sys.executable).parent))
    result = subprocess.run([lipfarm, "render", "--avatar", "nobody", "--audio", "x.wav", "--out",
                             str(tmp_path / "o.mp4")], capture_output=True, text=True,
                            env={"LIPFARM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 4
    assert result.stderr.strip().startswith("lipfarm: error: unknown avatar 'nobody'")
    assert "Traceback" not in result.stderr


def _lipfarm_into_a_closed_pipe(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``lipfarm ARGS | head`` where head has already gone: stdout is a pipe whose reader is closed."""
    lipfarm = shutil.which("lipfarm", path=str(__import__("pathlib").Path(sys.executable).parent))
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([lipfarm, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
                              env={"LIPFARM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", **env})
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [["config"], ["jobs"], ["--help"]], ids=["config", "jobs", "help"])
def test_output_piped_into_head_ends_quietly(tmp_path, args):
    from tests.farm import REDIS_DB, redis_url

    result = _lipfarm_into_a_closed_pipe(tmp_path, *args, LIPFARM_BROKER_URL=redis_url(REDIS_DB["cli"]),
                                         LIPFARM_KEY_PREFIX="lipfarm-test-pipe")
    assert result.stderr == "", result.stderr
    assert result.returncode == 141  # as a process ended by SIGPIPE, like any other command in the pipe


def test_reconcile_lines_carry_times(tmp_path):
    from tests.farm import REDIS_DB, redis_url

    lipfarm = shutil.which("lipfarm", path=str(__import__("pathlib").Path(sys.executable).parent))
    result = subprocess.run([lipfarm, "reconcile"], capture_output=True, text=True, timeout=120,
                            env={"LIPFARM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
                                 "LIPFARM_BROKER_URL": redis_url(REDIS_DB["cli"]), "LIPFARM_KEY_PREFIX": "lipfarm-test-pipe",
                                 "LIPFARM_STORAGE_URL": str(tmp_path / "storage")})
    assert result.returncode == 0, result.stderr
    stamp, _, line = result.stdout.strip().partition(" ")
    assert line and datetime.fromisoformat(stamp).tzinfo is not None, result.stdout


def test_the_api_logs_with_times(tmp_path):
    from lipfarm.scheduler.processes import LipfarmProcess, free_ports
    from tests.farm import REDIS_DB, redis_url

    port = free_ports(1)[0]
    env = {"LIPFARM_HOME": str(tmp_path), "LIPFARM_BROKER_URL": redis_url(REDIS_DB["cli"]),
           "LIPFARM_KEY_PREFIX": "lipfarm-test-pipe", "LIPFARM_STORAGE_URL": str(tmp_path / "storage")}
    api = LipfarmProcess(["api", "--host", "127.0.0.1", "--port", str(port)], env=env, log=tmp_path / "api.log",
                         ready_text=b"Uvicorn running on").start()
    try:
        api.wait_ready(timeout_s=60)
    finally:
        api.stop(timeout_s=30)
    line = next(line for line in api.log.read_text().splitlines() if "Uvicorn running on" in line)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line), line


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_log_json_gives_json_lines_with_times(tmp_path):
    """``--log-json``: every line the reconciler and a worker write is one JSON object with its time."""
    from lipfarm.scheduler.processes import LipfarmProcess
    from tests.farm import REDIS_DB, redis_url

    env = {"LIPFARM_HOME": str(tmp_path), "LIPFARM_BROKER_URL": redis_url(REDIS_DB["cli"]),
           "LIPFARM_KEY_PREFIX": "lipfarm-test-pipe", "LIPFARM_STORAGE_URL": str(tmp_path / "storage")}
    lipfarm = shutil.which("lipfarm", path=str(__import__("pathlib").Path(sys.executable).parent))
    result = subprocess.run([lipfarm, "--log-json", "reconcile"], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 0, result.stderr
    (line,) = _json_lines(result.stdout)
    assert line["message"] == "nothing to recover" and datetime.fromisoformat(line["time"]).tzinfo is not None

    worker = LipfarmProcess(["--log-json", "worker", "--queues", "jobs", "--hostname", f"json-{os.getpid()}@test"],
                            env={**env, "LIPFARM_WORKER_RECONCILE": "0"}, log=tmp_path / "worker.log",
                            ready_text=b" ready.").start()
    try:
        worker.wait_ready(timeout_s=90)
    finally:
        worker.stop(timeout_s=30)
    # the JSON lines, without Python's warnings (running as root, in a container without a user)
    lines = [line for line in worker.log.read_text().splitlines() if line.strip() and "Warning" not in line
             and not line.startswith((" ", "absolutely", "Please", "User information"))]
    entries = _json_lines("\n".join(line for line in lines if line != "worker: Warm shutdown (MainProcess)"))
    assert any(e["message"].endswith(" ready.") for e in entries), lines
    assert all(datetime.fromisoformat(e["time"]).tzinfo is not None and e["level"] for e in entries)
