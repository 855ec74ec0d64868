"""The Celery render task: a thin shell over ``worker.attempt.run_attempt``.

Flower shows each task with its job id, chunk and frame range, and its progress (frames done of
the chunk's frames) while it runs.
"""

from __future__ import annotations

import functools

from lipfarm.common import services
from lipfarm.common.celery_app import TASK_RENDER, app, enqueue_finalize, enqueue_render
from lipfarm.common.identity import this_process
from lipfarm.worker.assets import AssetCache
from lipfarm.worker.attempt import FarmContext, run_attempt
from lipfarm.worker.templates import process_templates


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

    task_id = self.request.id  # the request is thread-local; progress is sent from the heartbeat thread
    bound = {"job_id": job_id, "chunk": chunk, "frames": frames, "lane": lane}

    def on_bound(bound_job: str, bound_chunk: int) -> None:
        bound.update(job_id=bound_job, chunk=bound_chunk)

    def report(done: int, total: int) -> None:
        self.update_state(task_id=task_id, state="PROGRESS", meta={**bound, "frames_done": done, "frames_total": total})

    result = run_attempt(farm_context(), job_id, chunk, report=report, lane=lane, on_bound=on_bound).to_dict()
    return {**result, "job_id": bound["job_id"], "chunk": bound["chunk"]}
