"""The shapes of the functions that send the farm's messages, one per kind of message.

The real ones are in ``common.celery_app`` (Celery on the broker); tests and the benchmarks pass
recorders of the same shape. Every role that queues work takes these types, so a new argument is
one change here rather than five.
"""

from __future__ import annotations

from typing import Protocol


class EnqueueRender(Protocol):
    """Queue chunk ``index`` of ``job_id`` at ``priority``, no sooner than ``delay_s`` from now; at the
    front of its priority if ``first`` (a fast start). ``frames`` ("0-249") is only shown."""

    def __call__(self, job_id: str, index: int, priority: str, frames: str = "", delay_s: float = 0.0, *,
                 first: bool = False) -> None: ...


class EnqueueSlots(Protocol):
    """Queue ``count`` slots of ``priority``'s lane (bound to chunks by fair share when taken)."""

    def __call__(self, priority: str, count: int) -> None: ...


class EnqueueJob(Protocol):
    """Queue the plan, or the finalizer, of ``job_id`` (``priority`` is the job's)."""

    def __call__(self, job_id: str, priority: str) -> None: ...
