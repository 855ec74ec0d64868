"""What the API answers, typed: ``Job`` (the fields a client acts on; all of them in ``raw``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ENDED = frozenset({"done", "failed", "cancelled"})


@dataclass(frozen=True)
class Job:
    id: str
    state: str  # queued, planning, rendering, finalizing, done, failed, cancelled
    tenant: str
    avatar: str
    audio: str
    frames_done: int
    frames_total: int  # 0 until the job is planned
    created_at: float  # Unix seconds; created_at_iso in raw
    finished_at: float | None
    reason: str  # why it failed or was cancelled
    output_url: str | None  # absolute, signed: no token needed, once done
    playlist_url: str | None  # absolute, signed: the live HLS playlist while it renders
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def progress(self) -> float:
        """Frames done as a fraction of all (0 until planned)."""
        return self.frames_done / self.frames_total if self.frames_total else 0.0

    @classmethod
    def of(cls, data: dict[str, Any]) -> "Job":
        return cls(id=data["id"], state=data["state"], tenant=data.get("tenant", ""), avatar=data.get("avatar", ""),
                   audio=data.get("audio", ""), frames_done=int(data.get("frames_done", 0)),
                   frames_total=int(data.get("frames_total", 0)), created_at=float(data.get("created_at", 0.0)),
                   finished_at=data.get("finished_at"), reason=data.get("reason", ""),
                   output_url=data.get("output_url"), playlist_url=data.get("playlist_url"), raw=data)
