"""The job plan: everything a job will do, fixed before the first chunk is queued.

A plan names its inputs by content (avatar hash, model hashes, the normalised audio's key and
length), lists its chunks (frame ranges and the storage keys of their segments) and carries the
``RenderOptions``. It is written to storage as ``jobs/<id>/plan.json``: the source of truth that
workers render from and the reconciler rebuilds queue state from. ``scheduler.plan.plan_job``
makes one; this module holds the types and their JSON form.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from common.errors import InputError
from common.options import RenderOptions

PLAN_VERSION = 1


@dataclass(frozen=True)
class AssetRef:
    """An input by content: its hash, its storage key, and (local renders) a path to use directly."""

    sha256: str
    key: str
    path: str | None = None


@dataclass(frozen=True)
class AudioRef:
    """The job's audio: the original file (muxed at the end) and the 16 kHz float32 PCM (features)."""

    input_key: str
    pcm_key: str
    n_samples: int
    input_path: str | None = None
    pcm_path: str | None = None


@dataclass(frozen=True)
class Chunk:
    index: int
    start_frame: int
    stop_frame: int
    segment_key: str

    @property
    def frames(self) -> int:
        return self.stop_frame - self.start_frame

    @property
    def label(self) -> str:
        return f"chunk {self.index} (frames {self.start_frame}-{self.stop_frame - 1})"


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
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"not JSON ({exc})", path=source) from None
        version = data.get("version")
        if version != PLAN_VERSION:
            raise InputError("unknown plan version", path=source, field="version",
                             expected=PLAN_VERSION, found=version)
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
                version=version,
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"malformed plan ({exc})", path=source) from None
