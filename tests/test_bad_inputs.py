"""Inputs at the edges of what users bring (docs/bad-inputs.md): odd audio that must render, and
inputs that must be refused with one clear line and nothing written."""

from __future__ import annotations

import av
import numpy as np
import pytest
import soundfile

from lipfarm.common.timeline import frame_count
from lipfarm.common.audio import load_16k
from lipfarm.cli import main
from tests.media import tone, video_info
from tests.onnx_models import nan_generator

pytestmark = pytest.mark.slow


def _render(capsys, demo, audio, out, *extra, generator=None) -> tuple[int, str]:
    code = main(["render", "--avatar", "demo", "--audio", str(audio), "--out", str(out), "--encoder",
                 str(demo.encoder), "--generator", str(generator or demo.generator), "--quiet",
                 "--chunk-frames", "25", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("rate, channels", [(8000, 1), (96000, 2), (48000, 6)])
def test_any_rate_and_channel_count_renders_with_its_own_audio(capsys, demo, tmp_path, rate, channels):
    audio = tmp_path / f"in-{rate}-{channels}.wav"
    soundfile.write(audio, tone(1.2, rate, channels=channels).T, rate, subtype="PCM_16")
    out = tmp_path / "out.mp4"
    code, err = _render(capsys, demo, audio, out)
    assert code == 0, err
    info = video_info(out)
    assert info["frames"] == frame_count(load_16k(audio).size)
    assert info["audio_rate"] == (rate if rate >= 32000 else 48000)  # AAC frames within a video frame
    assert abs(info["audio_s"] - 1.2) <= 1 / 25
    with av.open(str(out)) as container:
        assert container.streams.audio[0].codec_context.channels == min(channels, 2)


def test_silence_renders_every_frame(capsys, demo, demo_avatar, tmp_path):
    audio = tmp_path / "silence.wav"
    soundfile.write(audio, np.zeros(int(1.5 * 16000), np.float32), 16000)
    out = tmp_path / "silence.mp4"
    code, err = _render(capsys, demo, audio, out)
    assert code == 0, err
    assert video_info(out)["frames"] == frame_count(int(1.5 * 16000))


def test_text_renamed_wav_is_refused_in_one_line(capsys, demo, tmp_path):
    audio = tmp_path / "notes.wav"
    audio.write_text("these are my notes, not audio\n" * 20)
    out = tmp_path / "out.mp4"
    code, err = _render(capsys, demo, audio, out)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "notes.wav" in err
    assert "not a readable media file" in err or "no audio stream" in err
    assert not out.exists()


def test_a_generator_that_outputs_nan_is_refused_naming_it(capsys, demo, tmp_path):
    audio = tmp_path / "clip.wav"
    soundfile.write(audio, tone(1.2, 16000).T, 16000)
    out = tmp_path / "out.mp4"
    code, err = _render(capsys, demo, audio, out, generator=nan_generator(tmp_path / "nan.onnx"))
    assert code == 3, err
    assert "nan.onnx: output 'output': the generator's output holds NaN or infinite values" in err
    assert "frames 0-0" in err and not out.exists()
