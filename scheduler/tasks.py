"""The Celery tasks of the scheduler role: plan, finalize, reconcile. Each a thin shell."""

from __future__ import annotations

import time

from common import services
from common.celery_app import (TASK_FINALIZE, TASK_PLAN, TASK_RECONCILE, app, enqueue_finalize,
                               enqueue_plan, enqueue_render)
from common.identity import worker_id
from common.jobfiles import JobFiles
from scheduler.finalize import finalize_job
from scheduler.planning import plan_submitted_job
from scheduler.reconcile import Enqueue, reconcile


def _job_files(job_id: str) -> JobFiles:
    return JobFiles(services.storage_at(services.state_store().job(job_id).storage_url), job_id)


@app.task(name=TASK_PLAN)
def plan_job_task(job_id: str) -> str:
    """Plan job ``job_id``: normalise its audio, write plan.json, queue its chunks."""
    return plan_submitted_job(job_id, store=services.state_store(), files=_job_files(job_id),
                              enqueue_render=enqueue_render)


@app.task(name=TASK_FINALIZE)
def finalize_job_task(job_id: str) -> str:
    """Join job ``job_id``'s segments, mux its audio, check and publish output.mp4."""
    return finalize_job(job_id, store=services.state_store(), files=_job_files(job_id), worker=worker_id())


@app.task(name=TASK_RECONCILE)
def reconcile_task() -> dict:
    """Requeue lost chunks, re-queue lost finalizers and plans."""
    report = reconcile(store=services.state_store(), storage=services.storage(), storage_at=services.storage_at,
                       settings=services.settings(), now=time.time(),
                       enqueue=Enqueue(enqueue_plan, enqueue_render, enqueue_finalize))
    return report.__dict__
