"""The Celery application: broker, queues, priorities and the rules for long chunk tasks.

- Late acknowledgement and reject-on-worker-lost: a killed worker's chunk goes back to the queue
  (our own attempt counter, in ``common.state``, ends a chunk that keeps killing workers).
- Prefetch 1: a worker reserves only the chunk it runs, so others can take the rest.
- Soft time limit < hard time limit < Redis visibility timeout: a chunk is never redelivered while
  it may still be running for a legitimate reason; duplicates that do happen are fenced at commit.
- Three queues: ``jobs`` (planning, reconciling), ``render`` (chunks), ``finalize`` (stitching).
- Priorities: Redis lists per priority step; high=0 runs before normal=3 before low=6.
- No chords: the committing chunk that completes a job enqueues its finalizer (``common.state``).

Configuration is read from the environment when this module is imported (no I/O happens then);
``celery -A common.celery_app ...`` works with the same settings as ``lipfarm``.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from common import defaults
from common.config import Settings, load_settings

# Redis has no message priorities: kombu keeps one list per priority step and reads them in order.
PRIORITIES = dict(zip(defaults.PRIORITIES, (0, 3, 6)))
PRIORITY_STEPS = [0, 3, 6, 9]
QUEUES = ("jobs", "render", "finalize")
TASK_PLAN = "lipfarm.plan_job"
TASK_RENDER = "lipfarm.render_chunk"
TASK_FINALIZE = "lipfarm.finalize_job"
TASK_RECONCILE = "lipfarm.reconcile"


def configure(app: Celery, settings: Settings) -> Celery:
    hard_s = settings.chunk_time_limit_s
    transport = {"visibility_timeout": 2 * hard_s, "priority_steps": PRIORITY_STEPS, "sep": ":",
                 "queue_order_strategy": "priority", "socket_connect_timeout": 3}
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.redis_url,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": 2 * hard_s},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=hard_s,
        task_soft_time_limit=int(0.9 * hard_s),
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="jobs",
        task_routes={TASK_PLAN: {"queue": "jobs"}, TASK_RECONCILE: {"queue": "jobs"},
                     TASK_RENDER: {"queue": "render"}, TASK_FINALIZE: {"queue": "finalize"}},
        task_default_priority=PRIORITIES[defaults.PRIORITY],
        result_expires=24 * 3600,
        worker_max_tasks_per_child=None,
        beat_schedule={"reconcile": {"task": TASK_RECONCILE, "schedule": settings.reconcile_interval_s}},
    )
    return app


app = configure(Celery("lipfarm", include=["worker.tasks", "scheduler.tasks"]), load_settings())


def enqueue_plan(job_id: str, priority: str) -> None:
    app.send_task(TASK_PLAN, kwargs={"job_id": job_id}, queue="jobs", priority=PRIORITIES[priority],
                  retry=False)


def enqueue_render(job_id: str, index: int, priority: str, frames: str = "") -> None:
    """One render task; ``frames`` ("0-249") is only shown (Flower), the plan is the truth."""
    app.send_task(TASK_RENDER, kwargs={"job_id": job_id, "chunk": index, "frames": frames},
                  queue="render", priority=PRIORITIES[priority], retry=False)


def enqueue_finalize(job_id: str, priority: str) -> None:
    app.send_task(TASK_FINALIZE, kwargs={"job_id": job_id}, queue="finalize", priority=PRIORITIES[priority],
                  retry=False)
