"""The Celery render task: a thin shell over ``worker.attempt.run_attempt``.

What Flower shows (it builds its task list and task pages from task events; a custom event type
``task-<name>`` is state ``<NAME>`` there, and of its fields Flower shows the standard ones only,
so the progress goes in ``result``, the column its list and task page show):

- while a chunk renders, state ``RENDERING`` and the result ``12/25 frames of chunk 0 (frames
  0-24) of job <id>``, refreshed at every heartbeat (a ``task-rendering`` event; the same state with
  ``job_id``, ``chunk``, ``frames``, ``frames_done``, ``frames_total`` in the result backend, for
  ``AsyncResult`` and Flower's ``/api/task/result``);
- an attempt that ended without committing ends in a state named by its outcome, never SUCCESS:
  ``CANCELLED`` (its job was), ``STOPPED`` (the chunk was reassigned), ``STALE``, ``RELEASED`` (handed back
  by a worker shutting down), ``REQUEUED``, ``FAILED``, ``UNREPORTED``, its result saying why
  (the task then ends with ``Ignore``, which keeps that state: no SUCCESS event follows).
  Committed, duplicate and skipped messages succeed with the attempt's result.

Shutdown: the worker's main process raises the shared stop flag when Celery starts shutting down
(SIGTERM, SIGINT, SIGQUIT), and every render process guards against SIGTERM while it holds a chunk
(``common.shutdown``): the chunk in hand is handed back at its next batch.
"""

from __future__ import annotations

import functools
import logging
import signal

from celery import signals
from celery.exceptions import Ignore, Reject

from lipfarm.common import services, shutdown
from lipfarm.common.celery_app import TASK_RENDER, app, enqueue_finalize, enqueue_render
from lipfarm.common.identity import this_process
from lipfarm.worker.assets import AssetCache
from lipfarm.worker.attempt import AttemptResult, FarmContext, Outcome, run_attempt
from lipfarm.worker.templates import process_templates

log = logging.getLogger(__name__)
RENDERING = "RENDERING"
SUCCEEDS = {Outcome.COMMITTED, Outcome.DUPLICATE, Outcome.SKIPPED}  # nothing went wrong: plain SUCCESS


@functools.cache
def farm_context() -> FarmContext:
    settings = services.settings()
    return FarmContext(settings, services.state_store(), services.storage_at,
                       AssetCache(settings.cache_dir, int(settings.cache_max_gb * 2**30)),
                       process_templates(settings.template_cache_frames), this_process(),
                       enqueue_render, enqueue_finalize)


@app.task(name=TASK_RENDER, bind=True)
def render_chunk_task(self, job_id: str = "", chunk: int = -1, frames: str = "", lane: str = "") -> dict:
    """Render chunk ``chunk`` (``frames``, for display) of job ``job_id`` and commit it; or, as a
    slot of a priority's ``lane``, the chunk fair share picks when this message is taken."""
    # The request is thread-local; progress is sent from the heartbeat thread, so keep what it needs.
    task_id, hostname = self.request.id, self.request.hostname
    shown = {"job_id": job_id, "chunk": chunk, "frames": frames, "lane": lane}

    def on_bound(bound_job: str, bound_chunk: int, bound_frames: str) -> None:  # a slot: Flower shows what
        shown.update(job_id=bound_job, chunk=bound_chunk, frames=bound_frames)  # it was bound to

    def show(state: str, summary: str, **fields) -> None:
        self.update_state(task_id=task_id, state=state, meta={**shown, **fields})
        with app.events.default_dispatcher(hostname=hostname) as events:
            events.send(f"task-{state.lower()}", uuid=task_id, result=summary, **shown, **fields)

    def report(done: int, total: int) -> None:
        try:  # a display only: a broker or backend out of reach must not look like a missed lease renewal
            show(RENDERING, f"{done}/{total} frames of chunk {shown['chunk']} (frames {shown['frames'] or '?'}) of job "
                            f"{shown['job_id']}",
                 frames_done=done, frames_total=total)
        except Exception as exc:
            log.debug("progress of chunk %s:%s not shown: %s", shown["job_id"], shown["chunk"], exc)

    try:
        result = run_attempt(farm_context(), job_id, chunk, report=report, lane=lane, on_bound=on_bound)
    except shutdown.ShuttingDown:  # not claimed: the message goes back to the queue as it was
        raise Reject("the worker is shutting down", requeue=True) from None
    return _ended(result, show, shown)


def _ended(result: AttemptResult, show, shown: dict) -> dict:
    """The task's result; an attempt that did not commit ends in its own state (``Ignore`` keeps it)."""
    if result.outcome in SUCCEEDS:
        return {**result.to_dict(), "job_id": shown["job_id"], "chunk": shown["chunk"]}
    try:
        show(result.outcome.value.upper(), f"{result.outcome.value}: {result.detail}", outcome=result.outcome.value,
             detail=result.detail)
    except Exception as exc:  # the attempt's outcome is recorded in the state store already
        log.warning("outcome of a render task not shown (%s): %s", result.outcome.value, exc)
    raise Ignore()


@signals.worker_shutting_down.connect(weak=False)
def _stopping(sig: str = "SIGTERM", **_kwargs) -> None:
    """Main process: every chunk in hand is handed back at its next batch (``common.shutdown``)."""
    shutdown.request(getattr(signal, sig if sig.startswith("SIG") else f"SIG{sig}", signal.SIGTERM))


@signals.worker_process_init.connect(weak=False)
def _guard(**_kwargs) -> None:
    shutdown.guard_render_process()
