"""A job's files in object storage, read and written as typed documents: ``JobFiles``.

Redis holds the live state of a job; storage holds its durable record, from which Redis can be
rebuilt: the submission (``job.json``), the plan (``plan.json``), one commit marker per committed
chunk (which segment, its size and hash), the output, and, once the job has ended, how it ended
(``ended.json``: the state store's records of the job, its chunks and their attempts, so a rebuild
restores it exactly). Keys come from ``common.storage.layout``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lipfarm.common.errors import InputError, NotFoundError
from lipfarm.common.plan import Plan, Submission
from lipfarm.common.storage import Storage
from lipfarm.common.storage import layout


@dataclass(frozen=True)
class CommitMarker:
    """A committed chunk, as its attempt recorded it beside the segment."""

    job_id: str
    chunk: int
    frames: int
    attempt: int
    worker: str
    segment_key: str
    segment_size: int
    segment_sha256: str
    committed_at: float
    timing: dict = field(default_factory=dict)
    hls_key: str = ""
    hls_size: int = 0
    hls_sha256: str = ""


ENDED_VERSION = 1


class JobFiles:
    """The files of job ``job_id`` in ``storage``."""

    def __init__(self, storage: Storage, job_id: str) -> None:
        self.storage = storage
        self.job_id = layout.checked_part(job_id, "job id")

    def _source(self, key: str) -> str:
        return f"{self.storage.url}/{key}"

    # --- the submission and the plan ----------------------------------------------------------------

    def put_submission(self, submission: Submission) -> None:
        self.storage.put_bytes(layout.submission_key(self.job_id), submission.to_json().encode())

    def submission(self) -> Submission:
        key = layout.submission_key(self.job_id)
        return Submission.from_json(self.storage.get_bytes(key).decode(), source=self._source(key))

    def put_input(self, path: Path, name: str) -> str:
        """Upload the job's audio as given; returns its key."""
        key = layout.input_key(self.job_id, name)
        self.storage.put_file(key, path)
        return key

    def put_plan(self, plan: Plan) -> None:
        self.storage.put_bytes(layout.plan_key(self.job_id), plan.to_json().encode())

    def plan(self) -> Plan:
        """The plan, or ``NotFoundError`` when the job has not been planned."""
        key = layout.plan_key(self.job_id)
        return Plan.from_json(self.storage.get_bytes(key).decode(), source=self._source(key))

    def has_plan(self) -> bool:
        return self.storage.exists(layout.plan_key(self.job_id))

    # --- chunks and output --------------------------------------------------------------------------

    def put_commit_marker(self, marker: CommitMarker) -> None:
        self.storage.put_bytes(layout.commit_key(self.job_id, marker.chunk), json.dumps(asdict(marker)).encode())

    def commit_marker(self, index: int) -> CommitMarker | None:
        key = layout.commit_key(self.job_id, index)
        try:
            data = json.loads(self.storage.get_bytes(key))
            return CommitMarker(**data)
        except NotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise InputError(f"malformed commit marker ({exc})", path=self._source(key)) from None

    def committed(self, plan: Plan) -> dict[int, CommitMarker]:
        """The chunks of ``plan`` whose commit markers are in storage."""
        markers = {c.index: self.commit_marker(c.index) for c in plan.chunks
                   if self.storage.exists(layout.commit_key(self.job_id, c.index))}
        return {index: marker for index, marker in markers.items() if marker is not None}

    def has_output(self, plan: Plan) -> bool:
        return self.storage.exists(plan.output_key)

    # --- how it ended ---------------------------------------------------------------------------------

    def put_ended(self, snapshot: dict) -> None:
        """Record how the job ended: the state store's ``snapshot`` of it."""
        self.storage.put_bytes(layout.ended_key(self.job_id),
                               json.dumps({"version": ENDED_VERSION, "snapshot": snapshot}).encode())

    def ended(self) -> dict | None:
        """The snapshot recorded when the job ended, or None while it has not."""
        key = layout.ended_key(self.job_id)
        try:
            data = json.loads(self.storage.get_bytes(key))
        except NotFoundError:
            return None
        except ValueError as exc:
            raise InputError(f"not JSON ({exc})", path=self._source(key)) from None
        if data.get("version") != ENDED_VERSION:
            raise InputError("unknown ended-record version", path=self._source(key), field="version",
                             expected=ENDED_VERSION, found=data.get("version"))
        return data["snapshot"]

    def put_webhook_outcome(self, record: dict) -> None:
        """Record how the job's webhook event's delivery ended (``WebhookRecord.to_dict``): a rebuild
        after Redis lost its data sends again only events not known to be delivered or given up."""
        self.storage.put_bytes(layout.webhook_outcome_key(self.job_id), json.dumps(record).encode())

    def webhook_outcome(self) -> dict | None:
        """The recorded outcome of the job's webhook event, or None if none was recorded (or it is unreadable)."""
        try:
            return json.loads(self.storage.get_bytes(layout.webhook_outcome_key(self.job_id)))
        except NotFoundError:
            return None
        except ValueError:
            return None  # unreadable: sending the event again is the safe side (receivers deduplicate)

    def discard(self) -> None:
        """Remove every file of the job: a submission that was not recorded must leave nothing that
        a rebuild from storage would render."""
        self.storage.delete_prefix(layout.job_prefix(self.job_id))

    def delete_ended(self) -> None:
        """The job goes on (resumed): it has not ended after all."""
        self.storage.delete(layout.ended_key(self.job_id))

    def delete_unused_segments(self, keep: set[str]) -> None:
        """Remove segments (H.264 and HLS) of attempts that did not commit (superseded or late),
        keeping ``keep``."""
        for prefix, ending in ((layout.chunks_prefix(self.job_id), ".mp4"), (layout.hls_prefix(self.job_id), ".ts")):
            for key in list(self.storage.list(prefix)):
                if key.endswith(ending) and key not in keep:
                    self.storage.delete(key)
