"""Every object-storage key lipfarm reads or writes: the storage layout, in one place.

::

    avatars/<content hash>/avatar.tar      an avatar package, by content (shared by all jobs)
    models/<sha256>.onnx                   a model, by content
    jobs/<job id>/job.json                 the submission (what the user asked for)
    jobs/<job id>/input/<file name>        the uploaded audio, as given
    jobs/<job id>/input/audio_16k.f32      the audio decoded to 16 kHz mono float32 (features)
    jobs/<job id>/input/audio.m4a          the audio encoded to AAC once, at plan time (muxed by copy)
    jobs/<job id>/input/audio/<n>.lfap     chunk n's share of those AAC packets (for its HLS segment)
    jobs/<job id>/plan.json                the plan: the source of truth workers render from
    jobs/<job id>/chunks/<n>-<attempt>.mp4 chunk n's H.264 segment, one per attempt (a late attempt
                                           never overwrites the segment another attempt committed)
    jobs/<job id>/chunks/<n>.json          chunk n's commit marker: which segment, its size and hash
    jobs/<job id>/hls/<n>-<attempt>.ts     chunk n's HLS media segment (its video and its audio)
    jobs/<job id>/hls/index.m3u8           the EVENT playlist of the chunks playable so far
    jobs/<job id>/output.mp4               the published result
    jobs/<job id>/ended.json               how the job ended (done, failed, cancelled): its records
    jobs/<job id>/webhook.json             how its webhook event's delivery ended (delivered, given up)

Every id that becomes part of a key is checked here, so no job id, hash or file name can address
anything outside its own place (``..``, ``/``, hidden names).
"""

from __future__ import annotations

import re

from lipfarm.common.errors import InputError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def checked_part(value: str, what: str) -> str:
    """``value`` if it is safe as one path component of a key, else ``InputError`` naming ``what``."""
    if not isinstance(value, str) or not _ID.match(value) or ".." in value:
        raise InputError("not a valid identifier", field=what,
                         expected="letters, digits, '.', '_' or '-', not starting with '.', no '..'",
                         found=repr(value))
    return value


def avatar_key(content_hash: str) -> str:
    return f"avatars/{checked_part(content_hash, 'avatar hash')}/avatar.tar"


def model_key(sha256: str) -> str:
    return f"models/{checked_part(sha256, 'model hash')}.onnx"


def job_prefix(job_id: str) -> str:
    return f"jobs/{checked_part(job_id, 'job id')}/"


def submission_key(job_id: str) -> str:
    return job_prefix(job_id) + "job.json"


def input_key(job_id: str, filename: str) -> str:
    return job_prefix(job_id) + f"input/{checked_part(filename, 'audio file name')}"


def pcm_key(job_id: str) -> str:
    return job_prefix(job_id) + "input/audio_16k.f32"


def audio_track_key(job_id: str) -> str:
    return job_prefix(job_id) + "input/audio.m4a"


def audio_piece_key(job_id: str, index: int) -> str:
    return job_prefix(job_id) + f"input/audio/{index:05d}.lfap"


def hls_segment_key(job_id: str, index: int, attempt: str) -> str:
    return hls_prefix(job_id) + f"{index:05d}-{checked_part(attempt, 'attempt')}.ts"


def playlist_key(job_id: str) -> str:
    return hls_prefix(job_id) + "index.m3u8"


def plan_key(job_id: str) -> str:
    return job_prefix(job_id) + "plan.json"


def segment_key(job_id: str, index: int, attempt: str) -> str:
    """The segment of one attempt at chunk ``index`` (``attempt`` is its token, or "local")."""
    return job_prefix(job_id) + f"chunks/{index:05d}-{checked_part(attempt, 'attempt')}.mp4"


def chunks_prefix(job_id: str) -> str:
    return job_prefix(job_id) + "chunks/"


def hls_prefix(job_id: str) -> str:
    return job_prefix(job_id) + "hls/"


def commit_key(job_id: str, index: int) -> str:
    return job_prefix(job_id) + f"chunks/{index:05d}.json"


def output_key(job_id: str) -> str:
    return job_prefix(job_id) + "output.mp4"


def ended_key(job_id: str) -> str:
    return job_prefix(job_id) + "ended.json"


def webhook_outcome_key(job_id: str) -> str:
    return job_prefix(job_id) + "webhook.json"


def submitted_job_ids(keys) -> list[str]:
    """Job ids of the ``jobs/<id>/job.json`` keys among ``keys`` (a listing of ``jobs/``)."""
    return sorted({key.split("/")[1] for key in keys
                   if key.startswith("jobs/") and key.endswith("/job.json") and key.count("/") == 2})
