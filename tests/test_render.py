"""End-to-end local renders: the demo, chunk independence, the reference's pixels, the mouth."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import onnxruntime as ort
import pytest

from lipfarm.common.audio import ArrayPcm, load_16k
from lipfarm.common.errors import AvatarError
from lipfarm.common.features import audio_inputs
from lipfarm.common.timeline import frame_count
from lipfarm.common.models import inspect_encoder
from lipfarm.common.options import RenderOptions
from lipfarm.common.syncmode import template_indices
from lipfarm.common.runtime import open_runner, run_encoder
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.local import render_local
from tests.media import tone, video_frames, video_info, write_audio
from tests.reference import reference_composite, reference_visual_input
from lipfarm.worker.yuv import bgr_to_i420

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_render(tmp_path_factory, settings, demo, demo_avatar):
    out = tmp_path_factory.mktemp("demo") / "lipfarm.demo.mp4"
    result = render_local(avatar=demo_avatar, audio=demo.audio, out=out, encoder=demo.encoder,
                          generator=demo.generator, options=RenderOptions(), settings=settings,
                          show_progress=False)
    return result


@pytest.fixture(scope="module")
def short_audio(tmp_path_factory, speech_16k) -> Path:
    path = tmp_path_factory.mktemp("short") / "short.wav"
    write_wav(path, speech_16k[int(0.3 * 16000):int(3.4 * 16000)])
    return path


def test_demo_render_has_the_planned_frames_rate_and_audio(demo_render, speech_16k):
    info = video_info(demo_render.output)
    expected = frame_count(speech_16k.size)
    assert demo_render.frames == info["frames"] == expected == 249
    assert info["rate"] == 25 and (info["width"], info["height"]) == (1280, 720)
    assert info["keyframes"] == list(range(0, expected, 25))
    assert abs(info["audio_s"] - speech_16k.size / 16000) <= 1 / 25
    frames = video_frames(demo_render.output)  # decodes cleanly, every frame
    assert len(frames) == expected


def test_chunked_render_equals_unchunked_frame_for_frame(settings, demo, demo_avatar, short_audio, tmp_path):
    whole = render_local(avatar=demo_avatar, audio=short_audio, out=tmp_path / "whole.mp4",
                         encoder=demo.encoder, generator=demo.generator,
                         options=RenderOptions(chunk_frames=100), settings=settings, show_progress=False)
    chunked = render_local(avatar=demo_avatar, audio=short_audio, out=tmp_path / "chunked.mp4",
                           encoder=demo.encoder, generator=demo.generator,
                           options=RenderOptions(chunk_frames=25), settings=settings, show_progress=False)
    pooled = render_local(avatar=demo_avatar, audio=short_audio, out=tmp_path / "pooled.mp4",
                          encoder=demo.encoder, generator=demo.generator,
                          options=RenderOptions(chunk_frames=50), settings=settings, workers=2,
                          show_progress=False)
    for result in (whole, chunked, pooled):
        assert video_info(result.output)["rate"] == 25  # joins keep the timing exact
    a, b, c = (video_frames(r.output, "yuv420p") for r in (whole, chunked, pooled))
    assert len(a) == len(b) == len(c) == whole.frames == 76  # 49600 samples: 249 mel, 74 windows
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i], b[i], err_msg=f"frame {i}")
        np.testing.assert_array_equal(a[i], c[i], err_msg=f"frame {i}")


def test_lossless_render_has_the_reference_scripts_pixels(settings, demo, demo_avatar, tmp_path, speech_16k):
    """With qp 0 the video is lossless: decoded frames are the reference's composite, in YUV."""
    audio = tmp_path / "clip.wav"
    clip = speech_16k[int(1.0 * 16000):int(1.8 * 16000)]
    write_wav(audio, clip)
    result = render_local(avatar=demo_avatar, audio=audio, out=tmp_path / "lossless.mp4",
                          encoder=demo.encoder, generator=demo.generator,
                          options=RenderOptions(video_qp=0, chunk_frames=25), settings=settings,
                          show_progress=False)
    decoded = video_frames(result.output, "yuv420p")
    pcm = ArrayPcm(load_16k(audio))
    spec = inspect_encoder(demo.encoder)
    encode = run_encoder(open_runner(spec, backend="cpu", precision="fp32", threads=2), spec)
    audio_in = audio_inputs(pcm, encode, start=0, stop=result.frames)
    session = ort.InferenceSession(str(demo.generator), providers=["CPUExecutionProvider"])
    templates = template_indices("bounce", 0, result.frames, demo_avatar.frame_count, result.frames)
    for i in (0, 1, 7, result.frames // 2, result.frames - 1):
        index = int(templates[i])
        frame, rect = demo_avatar.read_frame(index), demo_avatar.rects[index]
        (generated,) = session.run(None, {"input": reference_visual_input(frame, rect)[None],
                                          "audio": audio_in[i:i + 1]})
        expected = bgr_to_i420(reference_composite(frame, rect, generated[0]))
        np.testing.assert_array_equal(decoded[i], expected, err_msg=f"frame {i}")


def test_the_mouth_follows_loudness(demo_render, demo_avatar, speech_16k):
    frames = video_frames(demo_render.output)
    templates = template_indices("bounce", 0, len(frames), demo_avatar.frame_count, len(frames))
    loudness, change = [], []
    for i, frame in enumerate(frames):
        centre = i * 640 + 320  # samples at 16 kHz: frame i spans [640 i, 640 (i + 1))
        window = speech_16k[max(0, centre - 1600):centre + 1600]
        loudness.append(np.sqrt(np.mean(window ** 2)))
        x1, y1, x2, y2 = demo_avatar.rects[int(templates[i])]
        side = x2 - x1
        box = (slice(y1 + int(0.25 * side), y1 + int(0.6 * side)),
               slice(x1 + int(0.25 * side), x1 + int(0.75 * side)))
        template = demo_avatar.read_frame(int(templates[i]))
        change.append(np.mean(np.abs(frame[box].astype(float) - template[box])))
    loudness, change = np.array(loudness), np.array(change)
    correlation = np.corrcoef(loudness, change)[0, 1]
    assert correlation >= 0.5, correlation
    quiet, loud = change[loudness < np.percentile(loudness, 15)], change[loudness > np.percentile(loudness, 85)]
    assert loud.mean() > 4 * quiet.mean()  # visibly open when loud, closed in the pauses


def test_a_failed_render_leaves_no_output_and_no_work_files(settings, demo, demo_avatar, short_audio, tmp_path):
    import shutil

    from lipfarm.common.avatar import load_avatar

    broken_root = tmp_path / "broken"
    shutil.copytree(demo_avatar.root, broken_root)
    broken = load_avatar(broken_root)
    (broken_root / broken.frames[30]).write_bytes(b"garbage")
    out = tmp_path / "never.mp4"
    before = set(settings.work_dir.iterdir()) if settings.work_dir.exists() else set()
    with pytest.raises(AvatarError, match="frames/000030.jpg: not a decodable image"):
        render_local(avatar=broken, audio=short_audio, out=out, encoder=demo.encoder,
                     generator=demo.generator, options=RenderOptions(chunk_frames=25), settings=settings,
                     show_progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    assert set(settings.work_dir.iterdir()) == before


def test_other_containers_render_with_their_own_audio(settings, demo, demo_avatar, tmp_path):
    path = write_audio(tmp_path / "voice.m4a", tone(1.2, 44100, channels=2), 44100, "aac", container="mp4")
    result = render_local(avatar=demo_avatar, audio=path, out=tmp_path / "m4a.mp4", encoder=demo.encoder,
                          generator=demo.generator, options=RenderOptions(chunk_frames=25),
                          settings=settings, show_progress=False)
    info = video_info(result.output)
    with av.open(str(path)) as original:
        stream = original.streams.audio[0]
        input_s = float(stream.duration * stream.time_base)
    assert info["audio_rate"] == 44100 and abs(info["audio_s"] - input_s) <= 1 / 25
    assert info["frames"] == frame_count(load_16k(path).size)


def test_a_render_checks_each_model_once(settings, demo, demo_avatar, short_audio, tmp_path, monkeypatch):
    from lipfarm.common import models

    models.forget_checked_models()
    monkeypatch.setattr(models, "SETTLE_S", 0.0)  # the demo models may have been written a moment ago
    monkeypatch.setenv("LIPFARM_RUNTIME_CACHE_DIR", str(tmp_path / "runtime-cache"))  # no verdicts kept yet
    read = []
    real = models._read_and_hash
    monkeypatch.setattr(models, "_read_and_hash", lambda path: read.append(str(path)) or real(path))
    render_local(avatar=demo_avatar, audio=short_audio, out=tmp_path / "once.mp4", encoder=demo.encoder,
                 generator=demo.generator, options=RenderOptions(chunk_frames=25), settings=settings,
                 show_progress=False)
    # the command, the plan and each of the 4 chunks ask; each file is read and parsed once
    assert sorted(read) == sorted([str(demo.encoder), str(demo.generator)])
    models.forget_checked_models()


def test_the_first_unet_batch_waits_for_one_block_of_features(settings, demo, demo_avatar, tmp_path,
                                                              speech_16k, monkeypatch):
    """Inference starts once the first 64 encoder windows are done; later ones come as batches
    reach them, each once; the video is the same as a render in chunks, which asks for other ranges."""
    from lipfarm.worker import render as worker_render

    audio = tmp_path / "clip.wav"
    write_wav(audio, speech_16k[:int(6.0 * 16000)])  # 481 mel frames, 147 windows, 149 frames
    calls = []
    real_open = worker_render.open_runner

    def watched(spec, **kwargs):
        runner = real_open(spec, **kwargs)
        kind = "unet" if hasattr(spec, "roi_px") else "encoder"

        def run(feeds):
            calls.append((kind, len(next(iter(feeds.values())))))
            return runner(feeds)

        return run

    monkeypatch.setattr(worker_render, "open_runner", watched)
    result = render_local(avatar=demo_avatar, audio=audio, out=tmp_path / "progressive.mp4",
                          encoder=demo.encoder, generator=demo.generator,
                          options=RenderOptions(chunk_frames=250), settings=settings, show_progress=False)
    assert result.frames == 149
    assert calls[:2] == [("encoder", 64), ("unet", 1)]
    assert [c for c in calls if c[0] == "encoder"] == [("encoder", 64), ("encoder", 64), ("encoder", 19)]
    assert sum(n for kind, n in calls if kind == "unet") == 149
    # frame 58 is the first to read window 64: the second batch is encoded just before it
    assert calls.index(("encoder", 64), 1) == 1 + 58  # after the first encoder call and frames 0-57
    monkeypatch.undo()
    upfront = render_local(avatar=demo_avatar, audio=audio, out=tmp_path / "upfront.mp4", encoder=demo.encoder,
                           generator=demo.generator, options=RenderOptions(chunk_frames=50), settings=settings,
                           show_progress=False)
    a, b = video_frames(result.output, "yuv420p"), video_frames(upfront.output, "yuv420p")
    assert len(a) == len(b) == 149
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i], b[i], err_msg=f"frame {i}")


def test_a_unet_session_that_cannot_open_fails_the_render(settings, demo, demo_avatar, short_audio, tmp_path,
                                                          monkeypatch):
    """The UNet's session opens in a thread of its own; its error is the render's."""
    from lipfarm.worker import render as worker_render
    from lipfarm.common.errors import ModelError
    from lipfarm.common.models import GeneratorSpec

    real_open = worker_render.open_runner

    def failing(spec, **kwargs):
        if isinstance(spec, GeneratorSpec):
            raise ModelError("cannot be loaded by the cpu backend (test)", path=spec.path)
        return real_open(spec, **kwargs)

    monkeypatch.setattr(worker_render, "open_runner", failing)
    out = tmp_path / "never.mp4"
    with pytest.raises(ModelError, match=r"unet_328.onnx: cannot be loaded by the cpu backend \(test\)"):
        render_local(avatar=demo_avatar, audio=short_audio, out=out, encoder=demo.encoder,
                     generator=demo.generator, options=RenderOptions(chunk_frames=25), settings=settings,
                     show_progress=False)
    assert not out.exists()
