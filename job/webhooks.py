"""Webhooks: a job's end told to the URL its submission gave, signed, at least once.

- **Queued by ``close_job``**, which every end passes through (done, failed, cancelled; and again
  from the recovery pass for ends left in the outbox by a crash): ``queue_event`` records the job's
  event in the state store and queues one delivery task on the ``jobs`` queue. A second close of
  the same end finds the event queued and queues nothing; a close whose broker is down fails, so
  the end stays in the outbox and the next pass queues it.
- **Delivered by ``deliver``** (the Celery task's work): one POST per attempt, its answer recorded
  (status, time, error); a failed attempt queues the next one after ``backoff_s`` (5 s, 10 s, 20 s,
  ... at most an hour), until ``LIPFARM_WEBHOOK_RETRY_S`` after the end, then the event is given up.
  Any 2xx answer delivers it. Attempts are fenced by number in the state store: a duplicate message
  finds its attempt made and stops; a message redelivered because its sender died makes it again.
  Receivers may get an event twice (an answer lost on the way back): the event ``id`` is stable,
  ``<job id>:<state>:<finished_at>``, so they deduplicate by it.
- **Never into the farm's network**: the URL was checked at submission and is checked again at each
  attempt (``common.netguard``: its host may resolve elsewhere by now); the POST goes to the address
  that was checked, redirects are not followed, and an address the guard refuses gives the event up
  at once, nothing sent.
- **Signed like Stripe's**: ``Lipfarm-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``
  with ``LIPFARM_WEBHOOK_SECRET``; the timestamp is the attempt's, so a receiver refuses replays
  older than a few minutes (``verify``).

The event (JSON): ``{"id", "type": "job.done|job.failed|job.cancelled", "created_at", "job": {"id",
"state", "output_url", "reason", "frames_total", "created_at", "finished_at", "elapsed_s"}}``, each time
in seconds beside its ISO 8601 UTC twin (``created_at_iso``...), and ``output_url`` the API's signed URL of
the output (``/v1/jobs/<id>/output?expires=&signature=``, no token needed), signed at each attempt:
absolute after ``LIPFARM_PUBLIC_URL``, or else the base URL of the request that submitted the job; a job
submitted from the CLI with no public URL set gets the signed path alone. Never a storage URL or a server path.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import time
from typing import Callable

from lipfarm.common import defaults, netguard
from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError, LipfarmError, NotFoundError
from lipfarm.job.jobfiles import JobFiles
from lipfarm.common.signing import Signer, iso_utc, output_path
from lipfarm.common.state import JobRecord, StateStore, TokenStore, WebhookRecord
from lipfarm.common.storage import Storage

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Lipfarm-Signature"
REFUSED = -1  # the status of an attempt whose address the guard refused (nothing was sent)
EVENT_TYPES = {"done": "job.done", "failed": "job.failed", "cancelled": "job.cancelled"}

# enqueue(job id, event id, attempt, delay in s): queue a delivery attempt
Enqueue = Callable[[str, str, int, float], None]


# --- The event and its signature -------------------------------------------------------------------


def event_id(job: JobRecord) -> str:
    """The id of the event of ``job``'s end: the same for every attempt, new if it is resumed and ends again."""
    return f"{job.job_id}:{job.state.value}:{job.finished_at:.6f}"


def event_body(job: JobRecord, record: WebhookRecord, output_url: str | None) -> bytes:
    """The event as sent: compact JSON."""
    finished = job.finished_at or job.updated_at
    event = {"id": record.event_id, "type": record.type, "created_at": record.created_at,
             "created_at_iso": iso_utc(record.created_at),
             "job": {"id": job.job_id, "state": job.state.value, "output_url": output_url, "reason": job.reason,
                     "frames_total": job.frames_total, "created_at": job.created_at,
                     "created_at_iso": iso_utc(job.created_at), "finished_at": job.finished_at,
                     "finished_at_iso": iso_utc(job.finished_at), "elapsed_s": round(finished - job.created_at, 3)}}
    return json.dumps(event, separators=(",", ":")).encode()


def signature(secret: str, body: bytes, *, timestamp: int) -> str:
    """The ``Lipfarm-Signature`` header of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, now: float,
           tolerance_s: float = defaults.WEBHOOK_TOLERANCE_S) -> bool:
    """What a receiver does: the header's HMAC matches ``body`` and its timestamp is recent."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = signature(secret, body, timestamp=timestamp).rsplit("v1=", 1)[1]
    return abs(now - timestamp) <= tolerance_s and hmac.compare_digest(expected, parts.get("v1", ""))


def backoff_s(attempt: int, base_s: float, cap_s: float = defaults.WEBHOOK_MAX_DELAY_S) -> float:
    """Seconds before attempt ``attempt + 1`` after attempt ``attempt`` failed: base, doubling, capped."""
    return min(cap_s, base_s * 2 ** (attempt - 1))


# --- Queueing (from close_job) ---------------------------------------------------------------------


def queue_event(store: StateStore, files: JobFiles, *, enqueue: Enqueue | None = None,
                now: float | None = None) -> bool:
    """Queue the delivery of the ended job's event, unless it has no webhook or it was queued
    already; True if queued now. ``ServiceError`` if the state store or the broker do not answer."""
    job = store.job(files.job_id)
    if not job.state.terminal or job.finished_at is None:
        return False
    url = _webhook_url(files)
    if not url:
        return False
    now = store.now() if now is None else now
    event = event_id(job)
    if store.open_webhook(job.job_id, event_id=event, event_type=EVENT_TYPES[job.state.value], url=url, now=now):
        return False
    (enqueue or _celery_enqueue)(job.job_id, event, 1, 0.0)
    store.mark_webhook_queued(job.job_id, event, now=now)
    return True


def _webhook_url(files: JobFiles) -> str:
    try:
        return files.submission().webhook_url
    except (NotFoundError, InputError) as exc:  # no readable submission: nothing says where to tell
        log.warning("job %s: no webhook (its submission cannot be read: %s)", files.job_id, exc)
        return ""


def _celery_enqueue(job_id: str, event: str, attempt: int, delay_s: float) -> None:
    from lipfarm.common.celery_app import enqueue_webhook

    enqueue_webhook(job_id, event, attempt, delay_s)


# --- Delivering (the Celery task's work) -----------------------------------------------------------


def deliver(store: StateStore, settings: Settings, job_id: str, event: str, attempt: int, *,
            storage_at: Callable[[str], Storage], enqueue: Enqueue,
            clock: Callable[[], float] = time.time) -> str:
    """Make attempt ``attempt`` of ``event``'s delivery, record it, queue the next if it failed."""
    stale_s = 2 * settings.webhook_timeout_s + 5  # a sender silent this long has died
    verdict, detail = store.begin_webhook_attempt(job_id, event, attempt, now=clock(), stale_s=stale_s)
    if verdict == "busy":
        enqueue(job_id, event, attempt, stale_s)  # look again once that sender is done or known dead
        return f"busy: {detail}"
    if verdict != "ok":
        return f"skipped: {detail}"
    record, job = store.webhook(job_id), store.job(job_id)
    if record is None or event_id(job) != event:  # resumed since: this end is no longer the job's
        store.end_webhook_attempt(job_id, event, attempt, now=clock(), outcome="failed", status=0,
                                  error="superseded: the job was resumed", duration_s=0.0, next_at=None)
        return "skipped: the job was resumed"
    started = clock()
    status, error = post(record.url, _signed(settings, event_body(job, record, output_url(store, settings, job, storage_at)),
                                             event, attempt, timestamp=int(started)),
                         timeout_s=settings.webhook_timeout_s, allow=settings.outbound_allow)
    ended = clock()
    # a refused address (its host now resolves into the farm's network) is given up at once: nothing was sent
    outcome, delay = _next_step(settings, record, attempt, status, ended=ended)
    status = max(status, 0)
    next_at = ended + delay if outcome == "retry" else None
    if outcome != "delivered":
        log.warning("webhook of job %s, attempt %s to %s: %s (%s)", job_id, attempt, record.url,
                    error or f"HTTP {status}", f"retrying in {delay:.0f} s" if next_at else "given up")
    if outcome == "retry":  # first: if recording fails, the next attempt still comes (and finds this one out)
        enqueue(job_id, event, attempt + 1, delay)
    store.end_webhook_attempt(job_id, event, attempt, now=ended, outcome=outcome, status=status,
                              error=error, duration_s=ended - started, next_at=next_at)
    if outcome != "retry":
        _record_outcome(store, storage_at, job)
    from lipfarm.common import metrics  # here: importing it starts prometheus_client, which a worker must set up first

    metrics.webhook_attempt(outcome)
    return f"{outcome}: attempt {attempt}, {error or f'HTTP {status}'}"


def _record_outcome(store: StateStore, storage_at: Callable[[str], Storage], job: JobRecord) -> None:
    """Keep the event's final outcome beside the job's end record, so a rebuild after Redis lost
    its data does not send a delivered event again. Best effort: without it, a rebuild sends the
    event once more (receivers deduplicate by its id)."""
    record = store.webhook(job.job_id)
    try:
        JobFiles(storage_at(job.storage_url), job.job_id).put_webhook_outcome(record.to_dict())
    except LipfarmError as exc:
        log.warning("job %s: the webhook's outcome is not recorded in storage (%s)", job.job_id, exc)


def resend_after_rebuild(store: StateStore, files: JobFiles, *, retry_s: float, now: float,
                         enqueue: Enqueue | None = None) -> bool:
    """After a rebuild restored an ended job, queue its event again unless storage records that it
    was delivered or given up, or the end is older than the retry window; True if queued."""
    job = store.job(files.job_id)
    if job.finished_at is None or now - job.finished_at > retry_s:
        return False
    outcome = files.webhook_outcome()
    if outcome is not None and outcome.get("event_id") == event_id(job):
        return False
    return queue_event(store, files, enqueue=enqueue, now=now)


def _next_step(settings: Settings, record: WebhookRecord, attempt: int, status: int, *,
               ended: float) -> tuple[str, float]:
    """After an attempt answered ``status``: ("delivered", 0), ("retry", the wait before the next),
    or ("failed", 0) once the next would pass LIPFARM_WEBHOOK_RETRY_S after the end. The wait stays
    below the broker's visibility timeout (twice the chunk time limit): a message held longer would
    be handed to a second worker."""
    if 200 <= status < 300:
        return "delivered", 0.0
    if status == REFUSED:
        return "failed", 0.0
    delay = backoff_s(attempt, settings.webhook_backoff_s,
                      min(defaults.WEBHOOK_MAX_DELAY_S, settings.chunk_time_limit_s))
    if ended + delay - record.created_at > settings.webhook_retry_s:
        return "failed", 0.0
    return "retry", delay


def _signed(settings: Settings, body: bytes, event: str, attempt: int, *, timestamp: int) -> tuple[bytes, dict]:
    """The body and headers of one attempt, signed at ``timestamp``."""
    headers = {"Content-Type": "application/json", "User-Agent": "lipfarm-webhook",
               "Lipfarm-Event-Id": event, "Lipfarm-Delivery-Attempt": str(attempt)}
    if settings.webhook_secret_key:
        headers[SIGNATURE_HEADER] = signature(settings.webhook_secret_key, body, timestamp=timestamp)
    else:
        log.warning("LIPFARM_WEBHOOK_SECRET is not set: the webhook event %s is sent unsigned", event)
    return body, headers


def output_url(store: StateStore, settings: Settings, job: JobRecord,
               storage_at: Callable[[str], Storage], *, now: float | None = None) -> str | None:
    """The API's signed URL of a done job's output, signed now with the API's secret (see the module docstring)."""
    if job.state.value != "done" or not job.output_key:
        return None
    secret = settings.api_secret_key or TokenStore.of(store).signing_secret()
    path = Signer(secret, ttl_s=settings.api_url_ttl_s).signed(output_path(job.job_id),
                                                               now=time.time() if now is None else now)
    return _api_base(settings, job, storage_at) + path


def _api_base(settings: Settings, job: JobRecord, storage_at: Callable[[str], Storage]) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/")
    try:
        return JobFiles(storage_at(job.storage_url), job.job_id).submission().api_url
    except LipfarmError as exc:
        log.warning("job %s: its submission cannot be read (%s); the webhook's output_url is a path", job.job_id, exc)
        return ""


def post(url: str, signed: tuple[bytes, dict], *, timeout_s: float, allow: str = "") -> tuple[int, str]:
    """POST the body to ``url``, checked again now (its host may resolve elsewhere than at submission)
    and pinned to the checked address; returns (HTTP status, "") or (0, what went wrong) when there
    was no answer. A refused address is never connected to: (-1, why)."""
    body, headers = signed
    try:
        target = netguard.check_url(url, allow)
    except InputError as exc:
        return REFUSED, f"refused: {exc}"[:300]
    try:
        status = netguard.post(target, body, headers, timeout_s=timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"[:300]
    return status, "" if 200 <= status < 300 else f"HTTP {status}"
