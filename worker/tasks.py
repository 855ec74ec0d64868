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
def render_chunk_task(self, job_id: str, chunk: int, frames: str = "") -> dict:
    """Render chunk ``chunk`` (``frames``, for display) of job ``job_id`` and commit it."""

    task_id = self.request.id  # the request is thread-local; progress is sent from the heartbeat thread

    def report(done: int, total: int) -> None:
        self.update_state(task_id=task_id, state="PROGRESS",
                          meta={"job_id": job_id, "chunk": chunk, "frames": frames,
                                "frames_done": done, "frames_total": total})

    return run_attempt(farm_context(), job_id, chunk, report=report).to_dict()
