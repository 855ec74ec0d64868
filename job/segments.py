"""Committed segments checked against their commits, and chunks whose segments fail sent back.

A commit records each segment's key, size and SHA-256. Whoever is about to use a segment (the
finalizer joining it into the output, the playlist writer listing it for viewers) fetches it and
checks it first; one that is missing or damaged is never used: its chunk is reopened (rendered
again, with a fresh count of attempts), which also stops the job's finalizer until it is complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lipfarm.common.errors import NotFoundError
from lipfarm.common.messages import EnqueueRender
from lipfarm.common.fileio import file_sha256
from lipfarm.job.jobfiles import JobFiles
from lipfarm.common.state import StateStore, Verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadSegment:
    index: int
    key: str
    problem: str


def check_segment(storage, key: str, size: int, sha256: str, path: Path) -> str:
    """Fetch ``key`` to ``path`` and say what is wrong with it ("" if nothing)."""
    try:
        storage.get_file(key, path)
    except NotFoundError:
        return "missing"
    found = path.stat().st_size
    if found != size:
        return f"{found} bytes, committed as {size}"
    digest = file_sha256(path)
    if digest != sha256:
        return f"SHA-256 {digest[:12]}..., committed as {sha256[:12]}..."
    return ""


def reopen(store: StateStore, files: JobFiles, bad: list[BadSegment], *,
           enqueue_render: EnqueueRender, max_reopens: int) -> bool:
    """Send the chunks of ``bad`` segments back to render. Returns True if the job failed instead
    (its storage keeps losing a chunk's segment): the caller closes it (``common.endings``)."""
    job_id, now = files.job_id, store.now()
    priority = store.job(job_id).priority
    failed = False
    for segment in bad:
        reason = f"segment {segment.key} failed its check ({segment.problem})"
        verdict = store.reopen(job_id, segment.index, reason=reason, now=now, max_reopens=max_reopens)
        log.warning("job %s: %s: %s", job_id, reason, verdict.value)
        if verdict == Verdict.REQUEUED:
            enqueue_render(job_id, segment.index, priority, store.chunk(job_id, segment.index).frames_label, 0.0)
        failed = failed or verdict == Verdict.FAILED
    return failed
