"""A job's JSON (``schemas.Job``): its ``JobStatus``, as ``lipfarm status --json`` has it, plus URLs.

A webhook's delivery shows delivered or failed and the HTTP status only (``_webhook_view``).
The output URL is signed (``signing``), so the page's ``<video>`` can load it without a token; every URL
is absolute, after ``base`` (``api.public``), and every time in seconds has an ISO 8601 twin. The
live playlist's URL is given where the status names a playlist (``playlist_key``, with how far it
can be watched in ``playable_until_s``); statuses without those fields give none.
"""

from __future__ import annotations

from typing import Callable

from lipfarm.common.state import JobState, JobStatus
from lipfarm.common.signing import Signer, iso_utc, live_folder, output_path


def job_view(status: JobStatus, signer: Signer, *, now: float, public: Callable[[str], str] = str,
             base: str = "") -> dict:
    """The ``Job`` JSON of ``status``; ``public`` rewrites its reason for clients (``Redactor.text``),
    ``base`` (the API's public base URL) goes before its URLs."""
    playlist_key = status.playlist_key
    published = status.state == JobState.DONE and bool(status.output_key)
    return {
        "id": status.job_id, "tenant": status.tenant, "state": status.state.value, "priority": status.priority,
        "avatar": status.avatar, "audio": status.audio, "created_at": status.created_at,
        "created_at_iso": iso_utc(status.created_at), "finished_at": status.finished_at,
        "finished_at_iso": iso_utc(status.finished_at), "elapsed_s": round(status.elapsed_s, 3),
        "eta_s": None if status.eta_s is None else round(status.eta_s, 1),
        "frames_done": status.frames_done, "frames_total": status.frames_total, "chunks": status.chunks,
        "reason": public(status.reason),
        "output_url": base + signer.signed(output_path(status.job_id), now=now) if published else None,
        "playlist_url": (base + signer.signed_folder(live_folder(status.job_id), playlist_key.rsplit("/", 1)[-1], now=now)
                         if playlist_key else None),
        "playable_until_s": float(status.playable_until_s),
        "running": [{"index": r.index, "frames": r.frames, "worker": r.worker, "attempt": r.attempt,
                     "frames_done": r.frames_done, "heartbeat_age_s": r.heartbeat_age_s,
                     "lease_expired": r.lease_expired} for r in status.running],
        "webhook": _webhook_view(status.webhook) if status.webhook else None,
    }


def _webhook_view(webhook: dict) -> dict:
    """The delivery as its submitter sees it: delivered or failed and the HTTP status, never the
    error text of a connection made from inside the farm (it would map the farm's network)."""
    view = {key: webhook[key] for key in _WEBHOOK_FIELDS}
    view["next_at_iso"], view["delivered_at_iso"] = iso_utc(view["next_at"]), iso_utc(view["delivered_at"])
    error = webhook.get("last_error") or ""
    view["last_error"] = ("" if webhook.get("last_status") or not error
                          else "refused: not a public address" if error.startswith("refused")
                          else "no HTTP answer")
    return view


_WEBHOOK_FIELDS = ("event_id", "type", "url", "state", "attempts", "last_status", "last_error", "next_at",
                   "delivered_at")
