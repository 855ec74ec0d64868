"""A job from request to plan: ``Submission`` in, ``Plan`` out, by the pure ``plan_job``.

- A ``Submission`` is what a user asked for, written to storage as ``jobs/<id>/job.json`` when the
  job is submitted: the avatar and models by content hash, the uploaded audio's key, the options,
  the priority.
- ``plan_job(submission, audio)`` turns it into a ``Plan`` once the audio's length is known: the
  frame count (``L + 2``, docs/contract.md, or as the job's sync mode fits it to the avatar's
  template, ``common.syncmode``) and the chunks, each a frame range. It does no I/O, reads no clock
  and draws no random numbers, so planning twice gives the same plan.
- The plan is written to storage as ``jobs/<id>/plan.json``: the source of truth that workers
  render from and the reconciler rebuilds queue state from.

Both files carry a format version; an unknown one is refused, naming expected and found.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, replace

from lipfarm.common import defaults
from lipfarm.common.errors import InputError
from lipfarm.common.timeline import frame_count
from lipfarm.common.options import RenderOptions
from lipfarm.common.storage.layout import output_key
from lipfarm.common.syncmode import LENGTH_MODES, audio_fit_samples, output_frames

PLAN_VERSION = 3  # 2: segments named per attempt; 3: the audio encoded once, at plan time
SUBMISSION_VERSION = 1


@dataclass(frozen=True)
class AssetRef:
    """An input by content: its hash, its storage key, and (local renders) a path to use directly."""

    sha256: str
    key: str
    path: str | None = None


@dataclass(frozen=True)
class AudioRef:
    """The job's audio: the original file, the 16 kHz float32 PCM (features), and the AAC track
    encoded once at plan time (muxed by stream copy into the output and, cut per chunk, into its
    HLS segment), with the duration the output's audio is checked against: the original's, or the
    length the sync mode cut or padded it to."""

    input_key: str
    pcm_key: str
    n_samples: int
    track_key: str = ""
    duration_s: float = 0.0
    input_path: str | None = None
    pcm_path: str | None = None
    # Where the job's sync mode changes the audio's length (cut_off, silence: ``common.syncmode``):
    # the output's audio in 16 kHz samples, the input cut or padded with silence to it; 0: as given.
    fit_samples: int = 0

    @property
    def timeline_samples(self) -> int:
        """The 16 kHz samples the features run over: the input's, followed by the silence a sync mode
        pads it with. (A cut_off plan renders a prefix of the whole input's frames, so it uses them all.)"""
        return max(self.n_samples, self.fit_samples)


@dataclass(frozen=True)
class Chunk:
    index: int
    start_frame: int
    stop_frame: int

    @property
    def frames(self) -> int:
        return self.stop_frame - self.start_frame

    @property
    def frames_label(self) -> str:
        """The chunk's frames as people read them: ``"250-499"`` (inclusive)."""
        return f"{self.start_frame}-{self.stop_frame - 1}"


@dataclass(frozen=True)
class Submission:
    """What a user asked for; ``plan_job`` turns it into a ``Plan``."""

    job_id: str
    avatar_name: str
    avatar: AssetRef
    encoder: AssetRef
    generator: AssetRef
    audio_key: str
    audio_name: str
    options: RenderOptions
    priority: str
    submitted_at: float
    webhook_url: str = ""  # told (POST, signed) when the job ends
    farm_id: str = ""  # the farm that took it (``common.farm``): a rebuild adopts only its own; "" before farm ids
    tenant: str = "default"  # whose job (kept here too, so a rebuild from storage keeps it)
    api_url: str = ""  # the API's public base URL as the submitting request reached it ("" from the CLI)
    template_frames: int = 0  # the avatar's frame count, which sync modes plan with; 0 before them
    version: int = SUBMISSION_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["options"] = self.options.to_dict()
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str = "job.json") -> "Submission":
        data = _versioned(text, source, SUBMISSION_VERSION, "submission")
        try:
            return cls(**{**data, "avatar": AssetRef(**data["avatar"]), "encoder": AssetRef(**data["encoder"]),
                          "generator": AssetRef(**data["generator"]),
                          "options": RenderOptions.from_dict(data["options"])})
        except (KeyError, TypeError) as exc:
            raise InputError(f"malformed submission ({exc})", path=source) from None


@dataclass(frozen=True)
class Plan:
    job_id: str
    avatar: AssetRef
    avatar_name: str
    encoder: AssetRef
    generator: AssetRef
    audio: AudioRef
    frame_count: int
    chunks: tuple[Chunk, ...]
    options: RenderOptions
    output_key: str
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["options"] = self.options.to_dict()
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan.json") -> "Plan":
        data = _versioned(text, source, PLAN_VERSION, "plan")
        try:
            return cls(
                job_id=data["job_id"],
                avatar=AssetRef(**data["avatar"]),
                avatar_name=data["avatar_name"],
                encoder=AssetRef(**data["encoder"]),
                generator=AssetRef(**data["generator"]),
                audio=AudioRef(**data["audio"]),
                frame_count=data["frame_count"],
                chunks=tuple(Chunk(**c) for c in data["chunks"]),
                options=RenderOptions.from_dict(data["options"]),
                output_key=data["output_key"],
                version=data["version"],
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"malformed plan ({exc})", path=source) from None


def _fitted(audio: AudioRef, mode: str, n_template: int) -> tuple[AudioRef, int]:
    """The audio as ``mode`` fits it to a template of ``n_template`` frames (``common.syncmode``),
    and the output's frame count."""
    audio_frames = frame_count(audio.n_samples)
    if mode not in LENGTH_MODES:
        return audio, audio_frames
    if n_template < 2:
        raise InputError("the avatar's frame count is needed to plan this sync mode", field="sync_mode",
                         found=mode)
    fit = audio_fit_samples(mode, audio.n_samples, n_template)
    if fit:
        audio = replace(audio, fit_samples=fit, duration_s=fit / defaults.SAMPLE_RATE_HZ)
    return audio, output_frames(mode, audio_frames, n_template)


def _versioned(text: str, source: str, expected: int, what: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"not JSON ({exc})", path=source) from None
    if not isinstance(data, dict):
        raise InputError(f"not a {what} (expected a JSON object)", path=source)
    if data.get("version") != expected:
        raise InputError(f"unknown {what} version", path=source, field="version", expected=expected,
                         found=data.get("version"))
    return data


def chunk_ranges(total_frames: int, chunk_frames: int, *, first_frames: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """``[start, stop)`` frame ranges covering ``total_frames`` in order: the ``first_frames`` sizes
    first (a fast start), then ``chunk_frames`` each; the last takes what is left."""
    ranges, start = [], 0
    sizes = itertools.chain((f for f in first_frames if f < chunk_frames), itertools.repeat(chunk_frames))
    while start < total_frames:
        size = next(sizes)
        ranges.append((start, min(start + size, total_frames)))
        start += size
    return ranges


def fast_start_frames(options: RenderOptions) -> tuple[int, ...]:
    """The sizes of a fast start's first chunks: about 1 s, 2 s and 4 s, each a whole number of GOPs."""
    return tuple(max(options.gop_frames, round(seconds * defaults.FPS / options.gop_frames) * options.gop_frames)
                 for seconds in defaults.FAST_START_S)


def plan_job(submission: Submission, audio: AudioRef) -> Plan:
    """The plan of ``submission``, whose audio is now known as ``audio`` (see the module docstring).

    Chunks are ``chunk_frames`` long, a multiple of the GOP, so every chunk starts on a keyframe.
    With ``fast_start`` the first ones are shorter (1 s, 2 s, then 4 s): the first segment a viewer can
    play is ready a few seconds after a worker takes it. Any chunking gives the same frames.
    """
    job_id, options = submission.job_id, submission.options
    audio, total = _fitted(audio, options.sync_mode, submission.template_frames)
    first = fast_start_frames(options) if options.fast_start else ()
    chunks = tuple(Chunk(i, start, stop) for i, (start, stop) in
                   enumerate(chunk_ranges(total, options.chunk_frames, first_frames=first)))
    return Plan(job_id=job_id, avatar=submission.avatar, avatar_name=submission.avatar_name,
                encoder=submission.encoder, generator=submission.generator, audio=audio,
                frame_count=total, chunks=chunks, options=options, output_key=output_key(job_id))
