"""Watching a job while it renders (issue 10): the HLS playlist that grows as chunks commit, the
audio encoded once at plan time, and the fast start. Real workers, local storage, Redis DB 9."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import av
import m3u8
import numpy as np
import pytest

from lipfarm.common import celery_app
from lipfarm.common.config import load_settings
from lipfarm.common.hls import TS_OFFSET_S, media_playlist, parse_media_playlist
from lipfarm.common.identity import new_job_id
from lipfarm.job.jobfiles import JobFiles
from lipfarm.common.options import RenderOptions
from lipfarm.job.playlist import advance_playlist
from lipfarm.common.state import JobRecord, JobState, Keys, Segment, StateStore
from lipfarm.common.storage import LocalStorage
from lipfarm.common.storage.layout import hls_segment_key, playlist_key
from lipfarm.demo.speech import write_wav
from lipfarm.cli import main
from lipfarm.scheduler.local import render_local
from lipfarm.scheduler.submit import submit_job
from tests.browser import chromium_page, serve_folder
from tests.farm import farm_env, redis_client, REDIS_DB, redis_url, running_farm, until
from tests.media import decode_streams, short_avatar, video_frames

pytestmark = pytest.mark.slow
DB = REDIS_DB["progressive"]
FPS = 25
CHUNK = RenderOptions(chunk_frames=25)
CLIP_FRAMES = 101  # 4.1 s of speech: chunks of 25, 25, 25, 25, 1


@pytest.fixture(scope="module")
def farm(tmp_path_factory, home, demo, holds):
    redis_client(DB).flushdb()
    storage = tmp_path_factory.mktemp("storage")
    env = farm_env(home, str(storage), None, LIPFARM_BROKER_URL=redis_url(DB),
                   LIPFARM_HOLD_DIR=str(holds.folder))
    clean = redis_client(DB).flushdb
    with running_farm(env, tmp_path_factory.mktemp("workers"), holds, clean) as (settings, _workers):
        yield settings, LocalStorage(storage)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, settings, demo, demo_avatar, clip) -> list[np.ndarray]:
    """The clip rendered locally in one chunk: what every farm output and rendition must equal."""
    out = tmp_path_factory.mktemp("reference") / "clip.mp4"
    render_local(avatar=demo_avatar, audio=clip, out=out, encoder=demo.encoder, generator=demo.generator,
                 options=RenderOptions(), settings=settings, show_progress=False)
    return video_frames(out, "yuv420p")


def _submit(settings, demo, audio, **kw):
    return submit_job(settings, avatar=kw.pop("avatar", "demo"), audio=audio, encoder=demo.encoder,
                      generator=demo.generator, options=kw.pop("options", CHUNK), **kw)


def _playlist(storage: LocalStorage, job_id: str) -> Path:
    return storage.local_path(playlist_key(job_id))


def _decode_listed(playlist: Path):
    """The listed segments joined as one TS stream, as a player buffers them."""
    import io

    segments, _ = parse_media_playlist(playlist.read_text())
    data = b"".join((playlist.parent / uri).read_bytes() for uri, _ in segments)
    with av.open(io.BytesIO(data), format="mpegts") as container:
        return decode_streams(container)


def test_mid_job_the_playlist_lists_only_the_committed_run_from_the_start(farm, holds, demo, clip, reference):
    settings, storage = farm
    job_id = new_job_id()
    holds.hold(job_id, 2)  # chunks 0, 1 and 3, 4 commit; 2 waits: the playlist must stop at 1
    handle = _submit(settings, demo, clip, job_id=job_id)
    until(lambda: [c.state for c in handle.store.chunks(job_id)] ==
          ["committed", "committed", "running", "committed", "committed"], what="all but chunk 2 committed")
    until(lambda: handle.store.job(job_id).playlist_chunks == 2, what="the playlist to list chunks 0 and 1")
    playlist = _playlist(storage, job_id)
    text = playlist.read_text()
    segments, ended = parse_media_playlist(text)
    parsed = m3u8.loads(text)
    assert not ended and not parsed.is_endlist and parsed.playlist_type == "event"
    chunks = handle.store.chunks(job_id)
    assert [uri for uri, _ in segments] == [Path(chunks[0].hls_key).name, Path(chunks[1].hls_key).name]
    assert [s.uri for s in parsed.segments] == [uri for uri, _ in segments]
    assert [d for _, d in segments] == [1.0, 1.0]
    decoded = _decode_listed(playlist)
    assert len(decoded.frames) == 50 and all(np.array_equal(a, b) for a, b in zip(decoded.frames, reference))
    assert abs(decoded.audio_end_s - TS_OFFSET_S - 50 / FPS) <= 1 / FPS  # audio and video agree
    status = handle.status()
    assert status.playable_until_s == 2.0 and status.playlist_key == playlist_key(job_id)
    holds.release(job_id)
    final = handle.wait(timeout_s=300)
    segments, ended = parse_media_playlist(playlist.read_text())
    assert ended and len(segments) == 5 and final.playable_until_s == CLIP_FRAMES / FPS
    with av.open(str(playlist), options={"protocol_whitelist": "file,crypto,data"}) as container:
        rendition = decode_streams(container)
    with av.open(final.output_location) as container:
        mp4 = decode_streams(container)
        mp4_audio_s = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
    assert len(rendition.frames) == len(mp4.frames) == CLIP_FRAMES
    assert all(np.array_equal(a, b) for a, b in zip(rendition.frames, mp4.frames))
    assert abs((rendition.audio_end_s - rendition.video_start_s) - mp4_audio_s) <= 1 / FPS


def test_the_output_copies_the_plans_audio_and_the_segments_video(farm, demo, clip, reference, capsys):
    settings, storage = farm
    handle = _submit(settings, demo, clip)
    status = handle.wait(timeout_s=300)
    plan = JobFiles(storage, handle.job_id).plan()
    assert plan.audio.track_key and storage.exists(plan.audio.track_key)  # encoded once, at plan time
    with av.open(status.output_location) as out, av.open(str(storage.local_path(plan.audio.track_key))) as track:
        out_audio = [bytes(p) for p in out.demux(out.streams.audio[0]) if p.size]
        track_audio = [bytes(p) for p in track.demux(track.streams.audio[0]) if p.size]
        duration = float(out.streams.audio[0].duration * out.streams.audio[0].time_base)
    assert out_audio == track_audio  # copied, not encoded again
    assert abs(duration - 4.1) <= 1 / FPS
    video = []
    for chunk in handle.store.chunks(handle.job_id):
        with av.open(str(storage.local_path(chunk.segment_key))) as segment:
            video += [bytes(p) for p in segment.demux(segment.streams.video[0]) if p.size]
    with av.open(status.output_location) as out:
        assert [bytes(p) for p in out.demux(out.streams.video[0]) if p.size] == video  # bit for bit
    assert all(np.array_equal(a, b) for a, b in zip(video_frames(Path(status.output_location), "yuv420p"),
                                                     reference))
    capsys.readouterr()
    assert main(["watch", handle.job_id]) == 0  # an ended job: where to watch it, and how it ended
    out = capsys.readouterr().out
    assert f"watch: {storage.local_path(f'jobs/{handle.job_id}/hls/index.m3u8')}" in out
    assert f"job {handle.job_id}: done; output: {status.output_location}" in out
    assert main(["watch", "no-such-job"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown job 'no-such-job'" in err[0]


def test_a_fast_start_plan_renders_the_same_frames_as_a_uniform_one(farm, demo, clip, reference):
    settings, storage = farm
    handle = _submit(settings, demo, clip, options=RenderOptions(fast_start=True))  # 250-frame chunks
    status = handle.wait(timeout_s=300)
    plan = JobFiles(storage, handle.job_id).plan()
    assert [c.frames for c in plan.chunks] == [25, 50, 26]  # 1 s, 2 s, then the rest (not 4 s: it ends)
    got = video_frames(Path(status.output_location), "yuv420p")
    assert len(got) == len(reference) and all(np.array_equal(a, b) for a, b in zip(got, reference))


def test_a_fast_starts_first_chunks_go_to_the_front_of_their_priority():
    """On a broker no worker reads (Redis DB 8), the lists the messages land in."""
    client = redis_client(REDIS_DB["progressive-broker"])
    client.flushdb()
    celery_app.configure(celery_app.app, load_settings({"LIPFARM_BROKER_URL": redis_url(REDIS_DB["progressive-broker"])}))
    try:
        celery_app.enqueue_render("x", 3, "normal", "75-99")
        celery_app.enqueue_render("x", 0, "normal", "0-49", first=True)
        celery_app.enqueue_render("y", 0, "high", "0-249")
        lengths = {name: client.llen(name) for name in celery_app.render_lists()}
    finally:
        client.flushdb()
        celery_app.configure(celery_app.app, load_settings())
    assert lengths == {"render": 0, "render:1": 1, "render:3": 1, "render:4": 1, "render:6": 0, "render:7": 0,
                       "render:9": 0}  # high, then normal's front (its fast start), then normal


def test_a_cancelled_jobs_playlist_ends_with_what_was_committed(farm, holds, demo, clip):
    settings, storage = farm
    job_id = new_job_id()
    holds.hold(job_id, 1, 2)
    handle = _submit(settings, demo, clip, job_id=job_id)
    until(lambda: handle.store.job(job_id).playlist_chunks == 1 and handle.status().chunks.get("running") == 2,
          what="chunk 0 listed, 1 and 2 held")
    assert handle.cancel()
    holds.release(job_id)
    text = _playlist(storage, job_id).read_text()
    segments, ended = parse_media_playlist(text)
    assert ended and len(segments) == 1 and "# lipfarm: job cancelled" in text
    assert not storage.exists(f"jobs/{job_id}/output.mp4")


def test_a_damaged_hls_segment_is_never_listed(farm, holds, demo, clip, reference):
    settings, storage = farm
    job_id = new_job_id()
    holds.hold(job_id, 0)  # nothing can be listed before chunk 0
    handle = _submit(settings, demo, clip, job_id=job_id)
    chunk = until(lambda: next((c for c in handle.store.chunks(job_id) if c.index == 1 and c.state == "committed"),
                               None), what="chunk 1 committed")
    path = storage.local_path(chunk.hls_key)
    path.write_bytes(path.read_bytes()[:-300] + bytes(300))  # its HLS segment damaged before it is listed
    holds.release(job_id)
    final = handle.wait(timeout_s=300)
    segments, ended = parse_media_playlist(_playlist(storage, job_id).read_text())
    assert ended and len(segments) == 5
    assert segments[1][0] != Path(chunk.hls_key).name  # chunk 1 was rendered again, its new segment listed
    assert sorted(p.name for p in _playlist(storage, job_id).parent.glob("*.ts")) == sorted(
        name for name, _ in segments)  # the damaged segment, never listed, was deleted with the job's end
    first, second = handle.store.attempts(job_id, 1)
    assert first.outcome == "reopened" and "failed its check" in first.reason and second.outcome == "committed"
    with av.open(str(_playlist(storage, job_id)), options={"protocol_whitelist": "file,crypto,data"}) as container:
        frames = decode_streams(container).frames
    assert len(frames) == final.frames_total and all(np.array_equal(a, b) for a, b in zip(frames, reference))


def test_a_browser_plays_the_playlist_while_the_job_renders(farm, holds, demo, speech_16k, tmp_path):
    settings, storage = farm
    audio = tmp_path / "long.wav"
    write_wav(audio, speech_16k[:int(6.1 * 16000)])  # 151 frames: 6 chunks
    job_id = new_job_id()
    holds.hold(job_id, 4)  # the job cannot finish while the browser watches
    handle = _submit(settings, demo, audio, job_id=job_id)
    until(lambda: handle.store.job(job_id).playlist_chunks >= 2, what="two chunks playable")
    site = storage.local_path(f"jobs/{job_id}/hls")
    (site / "hls.min.js").write_bytes((Path(__file__).parents[1] / "api/static/vendor/hls.min.js").read_bytes())
    (site / "watch.html").write_text(WATCH_PAGE)
    with serve_folder(site) as base, chromium_page(tmp_path, extra_args=["--autoplay-policy=no-user-gesture-required"]) as page:
        page.goto(base + "/watch.html")
        page.wait_for_function("() => document.getElementById('video').currentTime > 1.2", timeout=90_000)
        assert handle.status().state == JobState.RENDERING  # it played past the first segment mid-job
    holds.release(job_id)
    handle.wait(timeout_s=300)


WATCH_PAGE = """<!doctype html>
<meta charset="utf-8">
<video id="video" muted playsinline></video>
<script src="hls.min.js"></script>
<script>
  const video = document.getElementById("video");
  const hls = new Hls();
  hls.on(Hls.Events.MANIFEST_PARSED, () => video.play());
  hls.loadSource("index.m3u8");
  hls.attachMedia(video);
</script>
"""


def test_segments_a_viewer_may_fetch_outlive_the_cleanup(tmp_path):
    """At publication, segments of attempts that did not commit go, but an HLS segment the playlist
    listed stays even when its chunk was rendered again afterwards (a viewer may be playing it)."""
    from types import SimpleNamespace

    from lipfarm.scheduler.finalize import _delete_unused_segments

    storage, job = LocalStorage(tmp_path), "20260101-000000-abcdef"
    names = ["chunks/00000-a.mp4", "chunks/00000-b.mp4", "chunks/00001-c.mp4", "chunks/00001-d.mp4",
             "hls/00000-a.ts", "hls/00000-b.ts", "hls/00001-c.ts", "hls/00001-d.ts", "chunks/00000.json"]
    for name in names:
        storage.put_bytes(f"jobs/{job}/{name}", b"x")
    # chunk 0: attempt a listed, then rendered again as b; chunk 1: attempt c superseded by d
    storage.put_bytes(playlist_key(job), media_playlist([("00000-a.ts", 1.0), ("00001-d.ts", 1.0)],
                                                        ended=True, target_duration_s=1).encode())
    chunks = [SimpleNamespace(segment_key=f"jobs/{job}/chunks/00000-b.mp4", hls_key=f"jobs/{job}/hls/00000-b.ts"),
              SimpleNamespace(segment_key=f"jobs/{job}/chunks/00001-d.mp4", hls_key=f"jobs/{job}/hls/00001-d.ts")]
    _delete_unused_segments(JobFiles(storage, job), chunks)
    assert sorted(k.split("/", 2)[2] for k in storage.list(f"jobs/{job}/")) == [
        "chunks/00000-b.mp4", "chunks/00000.json", "chunks/00001-d.mp4",
        "hls/00000-a.ts", "hls/00000-b.ts", "hls/00001-d.ts", "hls/index.m3u8"]


def test_out_of_order_commits_never_leave_a_gap_or_shrink_the_playlist(tmp_path):
    """Chunks commit in any order, from many processes at once; every playlist written on the way
    lists a run from the start that only grows (the store on Redis DB 13, storage in tmp)."""
    store = StateStore(redis_client(REDIS_DB["state"], decode_responses=True), Keys("lipfarm-playlist"))
    storage = LocalStorage(tmp_path / "storage")
    job_id, chunks = "order", 12
    now = time.time()
    store.create_job(JobRecord(job_id=job_id, state=JobState.QUEUED, priority="normal", avatar="a", audio="a.wav",
                               storage_url=storage.url, created_at=now, updated_at=now))
    store.start_planning(job_id, now=now)
    store.start_rendering(job_id, [(25 * i, 25 * (i + 1)) for i in range(chunks)], output_key="out", now=now)
    written: list[list[str]] = []
    real_put = storage.put_bytes

    def recording_put(key: str, data: bytes) -> None:
        real_put(key, data)
        if key == playlist_key(job_id):
            written.append([uri for uri, _ in parse_media_playlist(data.decode())[0]])

    storage.put_bytes = recording_put
    order = [5, 0, 3, 1, 2, 11, 4, 7, 6, 10, 9, 8]
    try:
        threads = [threading.Thread(target=_commit_and_advance, args=(store, storage, job_id, i)) for i in order]
        for thread in threads:
            thread.start()
            time.sleep(0.01)
        for thread in threads:
            thread.join()
        advance_playlist(store, JobFiles(storage, job_id))
        expected = [Path(hls_segment_key(job_id, i, "t")).name for i in range(chunks)]
        assert written and written[-1] == expected
        for earlier, later in zip(written, written[1:]):
            assert later[:len(earlier)] == earlier  # never shrinks, never changes what was listed
        assert all(w == expected[:len(w)] for w in written)  # always a run from chunk 0: no gap
    finally:
        for key in store.redis.scan_iter("lipfarm-playlist:*"):
            store.redis.delete(key)


def _commit_and_advance(store: StateStore, storage: LocalStorage, job_id: str, index: int) -> None:
    data = json.dumps({"chunk": index}).encode()
    key = hls_segment_key(job_id, index, "t")
    storage.put_bytes(key, data)
    import hashlib

    claim = store.claim(job_id, index, worker="w", now=time.time(), lease_s=30, max_attempts=3)
    store.commit(job_id, index, claim.token, frames=25, now=time.time(),
                 segment=Segment("k", 1, "s", key, len(data), hashlib.sha256(data).hexdigest()))
    advance_playlist(store, JobFiles(storage, job_id))


def test_the_api_serves_the_live_playlist_and_its_segments(farm, holds, demo, clip, tmp_path):
    """Through `lipfarm api`: the job's `playlist_url` (signed, no header needed: players fetch it)
    lists the playable chunks and its segments resolve against it; an unknown job is a clear 404."""
    import httpx

    from tests.test_api import make_token, start_api

    settings, storage = farm
    env = {k: v for k, v in os.environ.items() if k.startswith("LIPFARM_")}
    api, base = start_api(env, tmp_path / "api.log")
    try:
        token = make_token(env, "live")
        job_id = new_job_id()
        holds.hold(job_id, 2)
        handle = _submit(settings, demo, clip, job_id=job_id)
        until(lambda: handle.store.job(job_id).playlist_chunks == 2, what="two chunks playable")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client:
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["playable_until_s"] == 2.0 and job["playlist_url"]
            assert job["playlist_url"].startswith(base)  # absolute: a player needs nothing else
            playlist = httpx.get(job["playlist_url"])  # as a player: no token
            assert playlist.status_code == 200 and playlist.headers["cache-control"] == "no-store"
            segments, ended = parse_media_playlist(playlist.text)
            assert len(segments) == 2 and not ended
            segment_url = job["playlist_url"].rsplit("/", 1)[0].split("?")[0] + "/" + segments[0][0]
            segment = httpx.get(segment_url)
            chunk = handle.store.chunk(job_id, 0)
            assert segment.status_code == 200 and segment.content == storage.local_path(chunk.hls_key).read_bytes()
            missing = client.get("/v1/jobs/no-such-job")
            assert missing.status_code == 404 and "unknown job 'no-such-job'" in missing.json()["error"]["message"]
        holds.release(job_id)
        handle.wait(timeout_s=300)
    finally:
        api.stop()


@pytest.mark.parametrize("mode, seconds, audio_s", [("cut_off", 1.2, 20 / FPS), ("silence", 0.6, 0.8375)])
def test_a_sync_mode_that_fits_the_audio_does_so_on_the_farm(farm, demo, demo_avatar, speech_16k, tmp_path,
                                                              mode, seconds, audio_s):
    """cut_off and silence change the audio's length: the planner encodes the track cut or padded,
    workers read the audio padded, the finalizer checks against the fitted length; the output and its
    HLS rendition equal a local render's. A 20-frame avatar; 1.2 s gives 29 frames, 0.6 s 14."""
    settings, storage = farm
    avatar = short_avatar(settings, demo_avatar, 20)
    audio = tmp_path / "talk.wav"
    write_wav(audio, speech_16k[16_000:16_000 + int(seconds * 16_000)])
    options = RenderOptions(chunk_frames=5, gop_frames=5, sync_mode=mode)
    handle = _submit(settings, demo, audio, avatar=avatar.name, options=options)
    status = handle.wait(timeout_s=300)
    assert status.state == JobState.DONE, status.reason
    plan = JobFiles(storage, handle.job_id).plan()
    assert plan.options.sync_mode == mode and plan.frame_count == status.frames_total == 20
    local = render_local(avatar=avatar, audio=audio, out=tmp_path / "local.mp4", encoder=demo.encoder,
                         generator=demo.generator, options=options, settings=settings, show_progress=False)
    with av.open(status.output_location) as container:
        mp4 = decode_streams(container)
        mp4_audio_s = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
    assert abs(mp4_audio_s - audio_s) < 1e-3  # 20 frames; or the shortest audio of 20 frames (13400 samples)
    assert len(mp4.frames) == 20 and all(np.array_equal(a, b) for a, b in
                                         zip(mp4.frames, video_frames(local.output, "yuv420p")))
    with av.open(str(_playlist(storage, handle.job_id)), options={"protocol_whitelist": "file,crypto,data"}) as c:
        rendition = decode_streams(c)
    assert len(rendition.frames) == 20 and all(np.array_equal(a, b) for a, b in zip(rendition.frames, mp4.frames))
    assert abs((rendition.audio_end_s - rendition.video_start_s) - mp4_audio_s) <= 1 / FPS
