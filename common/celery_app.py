"""The Celery application: broker, queues, priorities and the rules for long chunk tasks.

- Late acknowledgement and reject-on-worker-lost: a killed worker's chunk goes back to the queue
  (our own attempt counter, in ``common.state``, ends a chunk that keeps killing workers).
- Prefetch 1: a worker reserves only the chunk it runs, so others can take the rest.
- Soft time limit < hard time limit < Redis visibility timeout: a chunk is never redelivered while
  it may still be running for a legitimate reason; duplicates that do happen are fenced at commit.
- Three queues: ``jobs`` (planning, webhooks), ``finalize`` (stitching), ``render`` (chunks).
- Priorities: Redis lists per priority step; a worker reads step by step, and within a step the
  queues in the order it names them (``jobs,finalize,render``). Job priorities give render steps
  1, 4, 7 (each with a front step just before it for a fast start's first chunks); plans,
  finalizers and webhooks always go on step 0, so however long the render backlog, a new job is
  planned and a complete job published by the next worker that frees up (publication is never
  starved by renders of lower or equal priority).
- Results are not kept (``task_ignore_result``): nothing reads them; the state store holds the truth.
- No chords: the committing chunk that completes a job enqueues its finalizer (``common.state``).
- JSON only: the broker is a network service, and a pickled message is code run by whoever can
  write to it. Workers refuse any other content type before decoding it (``accept_content``).
- Password-protected and TLS Redis (``rediss://``): the URLs carry the password; TLS options come
  from the URL's ``ssl_*`` parameters or ``LIPFARM_REDIS_TLS_CA_FILE`` (``redis_tls_options``) and
  always verify the server's certificate unless a URL says ``ssl_cert_reqs=none`` (kombu on its own
  would silently not verify). The same helpers are for redis-py (``StateStore.connect``); every
  message that shows a URL shows it through ``mask_url``.

Configuration is read from the environment when this module is imported (no I/O happens then);
``celery -A lipfarm.common.celery_app ...`` works with the same settings as ``lipfarm``.
"""

from __future__ import annotations

import base64
import json

import redis
from celery import Celery
from kombu import Queue

from lipfarm.common import defaults
from lipfarm.common.config import Settings, load_settings
from lipfarm.common.errors import ServiceError
from lipfarm.common.state.connection import mask_url, redis_tls_options, url_without_tls_params

# Redis has no message priorities: kombu keeps one list per priority step and reads them in order
# (a lower step first; a message's step is the largest one at or below its priority). Each job
# priority has two steps: its front, for a fast start's first chunks, then its own.
PRIORITIES = dict(zip(defaults.PRIORITIES, (1, 4, 7)))
PRIORITY_STEPS = [0, 1, 3, 4, 6, 7, 9]
QUEUES = ("jobs", "finalize", "render")  # the order a worker reads them in at each priority step
# Plans, finalizers and webhooks: ahead of every render, whatever the job's priority.
CONTROL_PRIORITY = 0
TASK_PLAN = "lipfarm.plan_job"
TASK_RENDER = "lipfarm.render_chunk"
TASK_FINALIZE = "lipfarm.finalize_job"
TASK_WEBHOOK = "lipfarm.deliver_webhook"  # on the jobs queue: small, and never behind chunk renders


# --- The application --------------------------------------------------------------------------------


def _forget_connections(app: Celery) -> None:
    """Drop the app's cached broker pools and result backend, so a new configuration is used."""
    app._pool = None
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None
    app._backend_cache = None
    if app._local is not None and hasattr(app._local, "backend"):
        del app._local.backend


def configure(app: Celery, settings: Settings) -> Celery:
    """Configure ``app`` from ``settings`` (again, in tests: cached connections are dropped)."""
    hard_s = settings.chunk_time_limit_s
    transport = {"visibility_timeout": 2 * hard_s, "priority_steps": PRIORITY_STEPS, "sep": ":",
                 "queue_order_strategy": "priority", "socket_connect_timeout": 3}
    broker_tls = redis_tls_options(settings.broker_url, settings.redis_tls_ca_file)
    backend_tls = redis_tls_options(settings.redis_url, settings.redis_tls_ca_file)
    _forget_connections(app)
    app.conf.update(
        broker_url=url_without_tls_params(settings.broker_url),
        result_backend=url_without_tls_params(settings.redis_url),
        broker_use_ssl=broker_tls or False,
        redis_backend_use_ssl=backend_tls or None,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": 2 * hard_s},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_serializer="json", result_serializer="json", event_serializer="json",
        accept_content=["json"], result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=hard_s,
        task_soft_time_limit=int(0.9 * hard_s),
        task_track_started=True,
        task_ignore_result=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="jobs",
        task_routes={TASK_PLAN: {"queue": "jobs"}, TASK_RENDER: {"queue": "render"},
                     TASK_FINALIZE: {"queue": "finalize"}, TASK_WEBHOOK: {"queue": "jobs"}},
        task_default_priority=PRIORITIES[defaults.PRIORITY],
        result_expires=24 * 3600,
        worker_max_tasks_per_child=None,
    )
    return app


app = configure(Celery("lipfarm", include=["lipfarm.worker.tasks", "lipfarm.scheduler.tasks"]), load_settings())


def _broker(action, what: str):
    """Run a broker call; a broker that cannot be reached is one ``ServiceError`` naming it."""
    from kombu.exceptions import OperationalError

    try:
        return action()
    except (OperationalError, redis.RedisError, OSError) as exc:
        raise ServiceError(f"cannot {what}: the broker at {mask_url(app.conf.broker_url)} is unreachable "
                           f"({exc.__class__.__name__}: {exc})") from None


def enqueue_plan(job_id: str, priority: str) -> None:
    _broker(lambda: app.send_task(TASK_PLAN, kwargs={"job_id": job_id}, queue="jobs",
                                  priority=CONTROL_PRIORITY, retry=False), f"queue the plan of job {job_id}")


def enqueue_render(job_id: str, index: int, priority: str, frames: str = "", delay_s: float = 0.0, *,
                   first: bool = False) -> None:
    """One render task, taken no sooner than ``delay_s`` from now (a retry's backoff), at the front of
    its priority if ``first`` (a fast start's first chunks); ``frames`` ("0-249") is only shown
    (Flower), the plan is the truth."""
    _broker(lambda: app.send_task(TASK_RENDER, kwargs={"job_id": job_id, "chunk": index, "frames": frames},
                                  queue="render", priority=PRIORITIES[priority] - first, retry=False,
                                  countdown=delay_s or None),
            f"queue chunk {index} of job {job_id}")


def enqueue_slots(priority: str, count: int) -> None:
    """``count`` render messages in ``priority``'s lane, bound to a chunk only when a worker takes
    one (``StateStore.claim_next``: the least served tenant's least served job): one message per
    chunk offered, so the broker carries what the work needs and no more."""
    def send() -> None:
        for _ in range(count):
            app.send_task(TASK_RENDER, kwargs={"lane": priority}, queue="render", priority=PRIORITIES[priority],
                          retry=False)

    _broker(send, f"queue {count} render slots of priority {priority}")


def enqueue_finalize(job_id: str, priority: str) -> None:
    _broker(lambda: app.send_task(TASK_FINALIZE, kwargs={"job_id": job_id}, queue="finalize",
                                  priority=CONTROL_PRIORITY, retry=False), f"queue the finalizer of job {job_id}")


def enqueue_webhook(job_id: str, event_id: str, attempt: int = 1, delay_s: float = 0.0) -> None:
    """Attempt ``attempt`` of delivering a job's webhook event, no sooner than ``delay_s`` from now
    (a retry's backoff, kept below the visibility timeout: see ``common.webhooks``)."""
    _broker(lambda: app.send_task(TASK_WEBHOOK, kwargs={"job_id": job_id, "event_id": event_id, "attempt": attempt},
                                  queue="jobs", priority=CONTROL_PRIORITY, retry=False,
                                  countdown=delay_s or None),
            f"queue the webhook of job {job_id}")


def _lists(queue: str) -> list[str]:
    """The broker's Redis lists of ``queue``, one per priority step (kombu's naming)."""
    return [queue if step == 0 else f"{queue}:{step}" for step in PRIORITY_STEPS]


def _job_of(payload: bytes | str) -> tuple[str, str] | None:
    """(task name, job id) of one kombu message as the Redis transport stores it, or None."""
    try:
        message = json.loads(payload)
        if isinstance(message, list):  # kombu's unacked hash: [message, exchange, routing key]
            message = message[0]
        body = json.loads(base64.b64decode(message["body"]))
        return message["headers"]["task"], body[1]["job_id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def pending_control_messages() -> set[tuple[str, str]]:
    """(task name, job id) of every plan and finalize message in the broker: waiting in its lists,
    or reserved by a worker and not yet acknowledged. The recovery pass re-sends one only when
    none is here, so a job waiting behind others is never given a second message.

    These lists stay short (plans and finalizers go ahead of every render), so reading them whole
    each pass is cheap; the reserved set holds at most one message per worker process."""
    def read() -> set[tuple[str, str]]:
        with app.connection_for_read() as connection:
            client = connection.default_channel.client
            with client.pipeline(transaction=False) as pipe:
                for name in _lists("jobs") + _lists("finalize"):
                    pipe.lrange(name, 0, -1)
                pipe.hvals("unacked")
                payloads = [p for group in pipe.execute() for p in group]
        found = {_job_of(p) for p in payloads}
        return {item for item in found if item is not None and item[0] in (TASK_PLAN, TASK_FINALIZE)}

    return _broker(read, "read the plan and finalize queues")


def render_lists() -> list[str]:
    """The broker's Redis lists of the render queue, one per priority step (kombu's naming)."""
    return _lists("render")


def waiting_renders() -> int:
    """Render messages waiting in the broker (not those a worker holds)."""
    def count() -> int:
        with app.connection_for_read() as connection:
            client = connection.default_channel.client
            return sum(client.llen(name) for name in render_lists())

    return _broker(count, "count the render queue")
