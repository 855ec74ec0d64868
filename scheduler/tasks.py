"""The Celery side of the scheduler role: the plan, finalize and webhook tasks (thin shells), and
recovery running inside every worker (a bootstep: a thread of the worker's main process)."""

from __future__ import annotations

import functools
import logging
import threading

from celery import bootsteps
from celery.exceptions import Reject

from lipfarm.common import scratch, services, shutdown
from lipfarm.common.celery_app import (TASK_FINALIZE, TASK_PLAN, TASK_WEBHOOK, app, enqueue_finalize, enqueue_plan,
                               enqueue_render, enqueue_slots, enqueue_webhook, pending_control_messages,
                                       waiting_renders)
from lipfarm.common.config import Settings
from lipfarm.common.errors import ServiceError
from lipfarm.common.identity import this_process
from lipfarm.job.jobfiles import JobFiles
from lipfarm.common.state import StateStore
from lipfarm.common.storage import open_storage
from lipfarm.job.webhooks import deliver
from lipfarm.scheduler.finalize import Finalizer, finalize_job
from lipfarm.scheduler.planning import plan_submitted_job
from lipfarm.scheduler.reconcile import Enqueue, run_forever

log = logging.getLogger(__name__)


def _job_files(job_id: str) -> JobFiles:
    return JobFiles(services.storage_at(services.state_store().job(job_id).storage_url), job_id)


@app.task(name=TASK_PLAN)
def plan_job_task(job_id: str) -> str:
    """Plan job ``job_id``: normalise its audio, write plan.json, queue its chunks."""
    return plan_submitted_job(job_id, store=services.state_store(), files=_job_files(job_id),
                              enqueue_render=enqueue_render, enqueue_slots=enqueue_slots,
                              max_audio_s=services.settings().max_audio_s)


@app.task(name=TASK_FINALIZE)
def finalize_job_task(job_id: str) -> str:
    """Join job ``job_id``'s segments, mux its audio, check and publish output.mp4."""
    finalizer = Finalizer(services.state_store(), services.settings(), this_process(), enqueue_render,
                          enqueue_finalize)
    try:
        return finalize_job(job_id, ctx=finalizer, files=_job_files(job_id))
    except shutdown.ShuttingDown:  # not taken: the message goes back to the queue as it was
        raise Reject("the worker is shutting down", requeue=True) from None


@app.task(name=TASK_WEBHOOK, autoretry_for=(ServiceError,), retry_backoff=5, retry_backoff_max=300,
          max_retries=50)
def deliver_webhook_task(job_id: str, event_id: str, attempt: int = 1) -> str:
    """Attempt ``attempt`` of telling job ``job_id``'s webhook about its end (``event_id``); a failed
    attempt queues the next. Redis out of reach: this same attempt is tried again (Celery's retry)."""
    return deliver(services.state_store(), services.settings(), job_id, event_id, attempt,
                   storage_at=services.storage_at, enqueue=enqueue_webhook)


def celery_enqueue() -> Enqueue:
    return Enqueue(enqueue_plan, enqueue_render, enqueue_finalize, waiting_renders, pending_control_messages,
                   enqueue_webhook)


def connect_recovery(settings: Settings):
    """A state store and storage opener of the recovery loop's own (not shared with tasks)."""
    store = services.connect_state(settings)
    return store, functools.lru_cache(maxsize=8)(lambda url: open_storage(url, settings))


class Recovery(bootsteps.StartStopStep):
    """Every worker runs the recovery pass (``scheduler.reconcile``) in a thread of its main process,
    taking turns: at most one pass per interval across the farm, and no single process to lose."""

    requires = {"celery.worker.components:Pool"}  # start after the pool has forked its processes

    def __init__(self, worker, **kwargs) -> None:
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, worker) -> None:
        settings = services.settings()
        if not settings.worker_reconcile:
            return
        owner = f"{worker.hostname}:{this_process().pid}"
        turn = functools.partial(_take_turn, owner=owner, interval_s=settings.reconcile_interval_s,
                                 temp_dir=settings.temp_dir)
        self.thread = threading.Thread(
            target=run_forever, args=(functools.partial(connect_recovery, settings), settings, celery_enqueue()),
            kwargs={"stop": self.stop_event, "turn": turn}, name="lipfarm-recovery", daemon=True)
        self.thread.start()

    def stop(self, worker) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)


def _take_turn(store: StateStore, *, owner: str, interval_s: float, temp_dir: str = "") -> bool:
    """Whether this worker runs this interval's pass. Every worker, turn or not, sweeps its host's
    temporary folders of dead processes each interval (a render process killed while its worker
    lives leaves one that no start would find soon)."""
    scratch.sweep(temp_dir)
    return store.take_reconcile_turn(owner, interval_s=0.9 * interval_s)


app.steps["worker"].add(Recovery)
