"""A job's HLS playlist, kept in step with its committed chunks while it renders.

``jobs/<id>/hls/index.m3u8`` is an EVENT playlist listing the longest run of committed chunks from
the start (never a gap: a viewer plays it front to back), each chunk's HLS media segment checked
against its commit before it is first listed. Chunks commit out of order on many workers, so the
playlist is written by one process at a time (a per-job lock in the state store) and only ever
grows: a commit marks it dirty, and whoever holds the lock rewrites it until nothing is dirty. The
rewrite replaces the object whole (storage writes are atomic). Once the job ends the playlist gets
``#EXT-X-ENDLIST``; a failed or cancelled job's says so in a comment, and lists nothing new.
"""

from __future__ import annotations

import logging
import math
import secrets
import tempfile
from pathlib import Path

from lipfarm.common import defaults
from lipfarm.common.messages import EnqueueRender
from lipfarm.common.errors import NotFoundError
from lipfarm.common.hls import media_playlist, parse_media_playlist
from lipfarm.common.identity import worker_id
from lipfarm.job.jobfiles import JobFiles
from lipfarm.job.segments import BadSegment, check_segment, reopen
from lipfarm.common.state import ChunkRecord, ChunkState, JobState, StateStore
from lipfarm.common.storage.layout import hls_prefix, playlist_key

log = logging.getLogger(__name__)
LOCK_S = 60.0  # a writer that dies holding the lock holds it this long at most


def advance_playlist(store: StateStore, files: JobFiles, *, enqueue_render: EnqueueRender | None = None,
                     max_reopens: int = defaults.MAX_ATTEMPTS) -> None:
    """Bring the job's playlist up to date with its committed chunks (after a commit, or an end).

    Safe to call from any number of processes at once; at most one writes, and no update is lost.
    ``enqueue_render`` sends back a chunk whose HLS segment fails its check (None: leave it).
    """
    job_id, owner = files.job_id, f"{worker_id()}:{secrets.token_hex(4)}"
    store.mark_playlist_dirty(job_id)
    while store.take_playlist_lock(job_id, owner, ttl_s=LOCK_S):
        try:
            while store.take_playlist_dirty(job_id):
                _write(store, files, enqueue_render, max_reopens)
        finally:
            store.release_playlist_lock(job_id, owner)
        if not store.take_playlist_dirty(job_id):
            return
        store.mark_playlist_dirty(job_id)  # it was marked while we released: go again


def _write(store: StateStore, files: JobFiles, enqueue_render, max_reopens: int) -> None:
    """Append the newly playable chunks (and, once the job has ended, the end) to the playlist.

    What is listed is read back from the playlist itself: once a viewer may have seen a segment, it
    stays as it was, even if its chunk is later rendered again.
    """
    job = store.job(files.job_id)
    listed, ended_before = _listed(files)
    if ended_before:
        return
    chunks = store.chunks(files.job_id, job.chunks_total)
    fresh, bad = _checked_run(files, chunks[len(listed):])
    if bad and enqueue_render is not None:
        reopen(store, files, bad, enqueue_render=enqueue_render, max_reopens=max_reopens)
    ended = job.state.terminal
    if not fresh and not ended:
        return
    entries = listed + [(Path(c.hls_key).name, c.frames / defaults.FPS) for c in fresh]
    target_s = math.ceil(max([c.frames for c in chunks] or [1]) / defaults.FPS)
    text = media_playlist(entries, ended=ended, target_duration_s=target_s)
    if ended and job.state != JobState.DONE:
        text += f"# lipfarm: job {job.state.value}: {job.reason or 'no reason recorded'}\n"
    files.storage.put_bytes(playlist_key(files.job_id), text.encode())
    frames = round(sum(duration for _, duration in entries) * defaults.FPS)
    store.set_playlist(files.job_id, chunks=len(entries), frames=frames, frames_total=job.frames_total)


def reopen_playlist(files: JobFiles) -> bool:
    """A resumed job has not ended after all: its playlist loses its end (and the comment saying
    why), keeping every segment it listed, so the end its publication writes is the one it shows.
    Returns whether there was an end to take back."""
    listed, ended = _listed(files)
    if not ended:
        return False
    target_s = math.ceil(max([duration for _, duration in listed] or [1.0]))
    files.storage.put_bytes(playlist_key(files.job_id),
                            media_playlist(listed, ended=False, target_duration_s=target_s).encode())
    return True


def listed_segment_keys(files: JobFiles) -> set[str]:
    """The keys of the HLS segments the job's playlist lists: a viewer may fetch them, so they stay
    even when their chunk was later rendered again."""
    return {hls_prefix(files.job_id) + name for name, _ in _listed(files)[0]}


def _listed(files: JobFiles) -> tuple[list[tuple[str, float]], bool]:
    """The segments the playlist in storage lists, and whether it has ended."""
    try:
        text = files.storage.get_bytes(playlist_key(files.job_id)).decode()
    except NotFoundError:
        return [], False
    return parse_media_playlist(text)


def _checked_run(files: JobFiles, rest: list[ChunkRecord]) -> tuple[list[ChunkRecord], list[BadSegment]]:
    """The committed chunks that follow the listed ones without a gap, each HLS segment checked;
    and the bad ones met on the way (the run stops at the first)."""
    run: list[ChunkRecord] = []
    with tempfile.TemporaryDirectory(prefix="lipfarm-playlist-") as temp:
        for chunk in rest:
            if chunk.state != ChunkState.COMMITTED or not chunk.hls_key:
                break
            problem = check_segment(files.storage, chunk.hls_key, chunk.hls_size, chunk.hls_sha256,
                                    Path(temp) / "segment.ts")
            if problem:
                return run, [BadSegment(chunk.index, chunk.hls_key, problem)]
            run.append(chunk)
    return run, []
