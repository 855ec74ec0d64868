"""Sync modes as arithmetic: each mode's walk frame-exact against its rule, any range of frames equal
to the same frames of the whole walk, the output's length and audio, the option and the plan."""

from __future__ import annotations

import json
import random
from fractions import Fraction

import pytest

from lipfarm.common.errors import InputError
from lipfarm.common.options import RenderOptions
from lipfarm.common.plan import AssetRef, AudioRef, Plan, Submission, plan_job
from lipfarm.common.syncmode import (SYNC_MODES, audio_fit_samples, output_frames, samples_for_frames,
                                     template_index, template_indices)
from lipfarm.common.timeline import frame_count
from tests.reference import reference_pingpong


def walk(mode: str, n: int, f: int) -> list[int]:
    return [template_index(mode, i, n, f) for i in range(f)]


# Each rule written out by hand, independently of the implementation.
def test_bounce_is_the_reference_ping_pong():
    for n in (2, 3, 5, 40, 125):
        assert walk("bounce", n, 5 * n + 7) == reference_pingpong(5 * n + 7, n)
    assert walk("bounce", 4, 12) == [1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0]


def test_loop_wraps_around():
    assert walk("loop", 4, 11) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
    assert walk("loop", 5, 3) == [0, 1, 2]
    assert walk("loop", 2, 5) == [0, 1, 0, 1, 0]


def test_cut_off_plays_the_template_once_and_ends_at_its_last_frame():
    assert walk("cut_off", 5, 5) == [0, 1, 2, 3, 4]
    assert walk("cut_off", 9, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        template_index("cut_off", 5, 5, 6)  # the plan never makes more frames than the template has
    assert [output_frames("cut_off", a, 30) for a in (4, 29, 30, 31, 500)] == [4, 29, 30, 30, 30]


def test_silence_plays_the_whole_template_once_or_bounces_past_it():
    assert walk("silence", 6, 6) == [0, 1, 2, 3, 4, 5]  # short audio is padded up to the template
    assert walk("silence", 4, 9) == walk("bounce", 4, 9) == [1, 2, 3, 2, 1, 0, 1, 2, 3]  # longer: bounce
    assert [output_frames("silence", a, 30) for a in (4, 29, 30, 31, 500)] == [30, 30, 30, 31, 500]


def test_remap_stretches_the_template_over_the_output():
    def rule(i, n, f):  # round(i (N - 1) / (F - 1)), a half rounded up
        exact = Fraction(i * (n - 1), f - 1)
        return int(exact + Fraction(1, 2)) if exact.denominator != 1 else int(exact)

    assert walk("remap", 5, 9) == [0, 1, 1, 2, 2, 3, 3, 4, 4]  # 0.5, 1.5, 2.5, 3.5 round up
    assert walk("remap", 10, 4) == [0, 3, 6, 9]  # fewer frames than the template: frames skipped
    assert walk("remap", 3, 3) == [0, 1, 2]
    for n, f in ((2, 4), (7, 100), (125, 76), (125, 500), (40, 41), (41, 40)):
        w = walk("remap", n, f)
        assert w == [rule(i, n, f) for i in range(f)]
        assert w[0] == 0 and w[-1] == n - 1 and all(b >= a for a, b in zip(w, w[1:]))
    assert walk("remap", 7, 1) == [0]


def test_audio_modes_keep_the_audio_frame_count():
    for mode in ("bounce", "loop", "remap"):
        assert [output_frames(mode, a, 30) for a in (4, 30, 500)] == [4, 30, 500]


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_any_range_of_frames_is_the_same_frames_of_the_whole_walk(mode):
    rng = random.Random(mode)
    for n in (2, 3, 7, 30, 125):
        for f in (4, 29, 30, 31, 76, 301):
            if (mode == "cut_off" and f > n) or (mode == "silence" and f < n):
                continue  # lengths no plan of that mode has
            whole = walk(mode, n, f)
            assert all(0 <= t < n for t in whole)
            for _ in range(20):
                start = rng.randrange(f)
                stop = rng.randrange(start + 1, f + 1)
                assert template_indices(mode, start, stop, n, f).tolist() == whole[start:stop]


def test_out_of_range_is_refused():
    with pytest.raises(ValueError):
        template_index("bounce", 3, 1, 10)  # a template of one frame
    with pytest.raises(ValueError):
        template_index("loop", 10, 5, 10)  # past the output
    with pytest.raises(ValueError):
        template_index("sideways", 0, 5, 10)


def test_samples_for_frames_is_the_shortest_audio_of_that_length():
    for frames in list(range(4, 400)) + [1121, 9000, 90_001]:
        n = samples_for_frames(frames)
        assert frame_count(n) == frames
        assert n == 3000 or frame_count(n - 1) < frames
    assert samples_for_frames(1121) <= 718_147  # the fixture's 1121 frames (test_features)


def test_audio_fit():
    assert [audio_fit_samples(m, 49_600, 125) for m in ("bounce", "loop", "remap")] == [0, 0, 0]  # 76 frames
    assert audio_fit_samples("cut_off", 49_600, 30) == 30 * 640  # cut with the video's last frame
    assert audio_fit_samples("cut_off", 49_600, 125) == 76 * 640  # no frame dropped: 27.5-80 ms cut
    padded = audio_fit_samples("silence", 49_600, 125)
    assert padded > 49_600 and frame_count(padded) == 125 and frame_count(padded - 200) == 124
    assert audio_fit_samples("silence", 49_600, 76) == 0  # exactly as long: nothing to pad
    assert audio_fit_samples("silence", 49_600, 30) == 0  # longer: bounces, as given


# --- The option and the plan --------------------------------------------------------------------

def test_the_option_is_checked_naming_it():
    assert RenderOptions().sync_mode == "bounce"
    for mode in SYNC_MODES:
        assert RenderOptions(sync_mode=mode).sync_mode == mode
    for bad in ("pingpong", "", "Bounce", 3, None):
        with pytest.raises(InputError) as caught:
            RenderOptions(sync_mode=bad)
        assert caught.value.field == "sync_mode" and "bounce | loop | cut_off | silence | remap" in str(caught.value)


def _submission(mode: str, template_frames: int = 30) -> Submission:
    ref = AssetRef("0" * 64, "assets/x")
    return Submission("j1", "demo", ref, ref, ref, "jobs/j1/input/a.wav", "a.wav",
                      RenderOptions(sync_mode=mode, chunk_frames=25), "normal", 1.0,
                      template_frames=template_frames)


AUDIO = AudioRef("jobs/j1/input/a.wav", "jobs/j1/audio_16k.f32", 49_600, duration_s=3.1)  # 76 frames


@pytest.mark.parametrize("mode, n, frames, fit", [
    ("bounce", 30, 76, 0), ("loop", 30, 76, 0), ("remap", 30, 76, 0), ("remap", 125, 76, 0),
    ("cut_off", 30, 30, 30 * 640), ("cut_off", 125, 76, 76 * 640),
    ("silence", 30, 76, 0), ("silence", 125, 125, samples_for_frames(125)),
])
def test_the_plan_has_the_modes_length_and_audio(mode, n, frames, fit):
    plan = plan_job(_submission(mode, n), AUDIO)
    assert plan.frame_count == frames and plan.chunks[-1].stop_frame == frames
    assert plan.audio.fit_samples == fit and plan.audio.n_samples == 49_600
    assert plan.audio.timeline_samples == max(49_600, fit)
    assert plan.audio.duration_s == (fit / 16000 if fit else 3.1)
    again = Plan.from_json(plan.to_json())
    assert again == plan and json.loads(plan.to_json())["options"]["sync_mode"] == mode


def test_a_plan_or_submission_from_before_sync_modes_reads_as_bounce():
    data = json.loads(plan_job(_submission("bounce"), AUDIO).to_json())
    del data["options"]["sync_mode"], data["audio"]["fit_samples"]
    old = Plan.from_json(json.dumps(data))
    assert old.options.sync_mode == "bounce" and old.audio.fit_samples == 0 and old.frame_count == 76
    sub = json.loads(_submission("bounce").to_json())
    del sub["options"]["sync_mode"], sub["template_frames"]
    assert Submission.from_json(json.dumps(sub)).options.sync_mode == "bounce"


def test_a_mode_that_needs_the_template_length_is_not_planned_without_it():
    with pytest.raises(InputError) as caught:
        plan_job(_submission("cut_off", 0), AUDIO)
    assert caught.value.field == "sync_mode"
