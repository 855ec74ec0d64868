"""Sync modes rendered: for each mode a job rendered in small chunks equals the same job in one
chunk pixel for pixel, every frame shows the template frame its mode's rule names, and the output
has the mode's frame count and audio length. Short audio and a 20-frame avatar keep it quick."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from lipfarm.common.avatar import Avatar
from lipfarm.common.options import RenderOptions
from lipfarm.common.syncmode import samples_for_frames, template_index
from lipfarm.common.timeline import frame_count
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.local import render_local
from lipfarm.worker.yuv import bgr_to_i420, even_bounds
from tests.media import short_avatar, video_frames, video_info

pytestmark = pytest.mark.slow

N_TEMPLATE = 20
LONG_SAMPLES = 19_200  # 1.2 s: 29 frames, longer than the template
SHORT_SAMPLES = 9_600  # 0.6 s: 14 frames, shorter than the template


@pytest.fixture(scope="module")
def avatar(settings, demo_avatar) -> Avatar:
    """The demo avatar's first 20 frames: short enough that 1.2 s of audio runs past its end."""
    return short_avatar(settings, demo_avatar, N_TEMPLATE)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, speech_16k) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sync-audio")
    out = {}
    for name, samples in (("long", LONG_SAMPLES), ("short", SHORT_SAMPLES)):
        out[name] = folder / f"{name}.wav"
        write_wav(out[name], speech_16k[16_000:16_000 + samples])  # speech, not the lead-in
    return out


# mode, clip, output frames, output audio in 16 kHz samples
CASES = [
    ("bounce", "long", 29, LONG_SAMPLES),
    ("loop", "long", 29, LONG_SAMPLES),
    ("remap", "long", 29, LONG_SAMPLES),
    ("cut_off", "long", N_TEMPLATE, N_TEMPLATE * 640),  # ends with the template's last frame
    ("silence", "short", N_TEMPLATE, samples_for_frames(N_TEMPLATE)),  # padded to the whole template
]


def _render(settings, demo, avatar, audio, out, mode, chunk_frames):
    # Lossless, so every pixel the walk copies from its template is checked exactly below.
    options = RenderOptions(sync_mode=mode, chunk_frames=chunk_frames, gop_frames=5, video_qp=0)
    return render_local(avatar=avatar, audio=audio, out=out, encoder=demo.encoder, generator=demo.generator,
                        options=options, settings=settings, show_progress=False)


def _templates_shown(frames: list[np.ndarray], avatar: Avatar) -> list[set[int]]:
    """For each decoded frame (I420), the template frames whose luma it equals outside the region
    the render writes (the even-aligned box around that template's rect): the template it shows."""
    h = avatar.height
    lumas = [bgr_to_i420(avatar.read_frame(t))[:h] for t in range(avatar.frame_count)]
    shown = []
    for frame in frames:
        matches = set()
        for t, luma in enumerate(lumas):
            x0, y0, x1, y1 = even_bounds(avatar.rects[t])
            outside = np.ones(luma.shape, bool)
            outside[y0:y1, x0:x1] = False
            if np.array_equal(frame[:h][outside], luma[outside]):
                matches.add(t)
        shown.append(matches)
    return shown


@pytest.mark.parametrize("mode, clip, frames, audio_samples", CASES, ids=[c[0] for c in CASES])
def test_each_mode_renders_its_walk_alike_in_any_chunking(settings, demo, avatar, clips, tmp_path,
                                                          mode, clip, frames, audio_samples):
    whole = _render(settings, demo, avatar, clips[clip], tmp_path / "whole.mp4", mode, chunk_frames=100)
    chunked = _render(settings, demo, avatar, clips[clip], tmp_path / "chunked.mp4", mode, chunk_frames=5)
    a, b = (video_frames(r.output, "yuv420p") for r in (whole, chunked))
    assert whole.frames == chunked.frames == len(a) == len(b) == frames
    for i in range(frames):
        np.testing.assert_array_equal(a[i], b[i], err_msg=f"{mode}: frame {i}")

    expected = [template_index(mode, i, N_TEMPLATE, frames) for i in range(frames)]
    assert _templates_shown(a, avatar) == [{t} for t in expected], mode

    for result in (whole, chunked):
        info = video_info(result.output)
        assert info["frames"] == frames and info["rate"] == 25
        assert abs(info["audio_s"] - audio_samples / 16_000) < 1e-3, (mode, info["audio_s"])
    if mode == "cut_off":  # the sound ends with the last frame
        assert abs(video_info(whole.output)["audio_s"] - frames / 25) < 1e-3
    if mode == "silence":
        assert frame_count(SHORT_SAMPLES) < N_TEMPLATE == frame_count(audio_samples)
        _assert_silent_after(whole.output, SHORT_SAMPLES / 16_000 + 0.05)


def _assert_silent_after(path: Path, start_s: float) -> None:
    """The output's sound after ``start_s`` is silence (the padding; AAC's spread settles within 50 ms)."""
    with av.open(str(path)) as container:
        blocks = [(float(f.pts * f.time_base), f.to_ndarray()) for f in container.decode(audio=0)]
    rate = 48_000 if blocks else 0  # 16 kHz input is encoded at 48 kHz (scheduler.audiotrack.aac_rate)
    samples = np.concatenate([block for _, block in blocks], axis=1)
    start = max(0, round((start_s - blocks[0][0]) * rate))
    assert samples.shape[1] > start and np.abs(samples[:, start:]).max() < 1e-3
    assert np.abs(samples[:, :start]).max() > 0.01  # and the speech before it is there


def test_silence_with_audio_longer_than_the_template_renders_as_bounce(settings, demo, avatar, clips, tmp_path):
    bounce, silence = (_render(settings, demo, avatar, clips["long"], tmp_path / f"{mode}.mp4", mode, chunk_frames=10)
                       for mode in ("bounce", "silence"))
    a, b = (video_frames(r.output, "yuv420p") for r in (bounce, silence))
    assert len(a) == len(b) == 29 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert video_info(silence.output)["audio_s"] == video_info(bounce.output)["audio_s"]  # not padded
