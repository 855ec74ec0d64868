"""lipfarm's Prometheus metrics (all named ``lipfarm_*``): what is recorded where, and why there.

- **Worker figures** are recorded by the process doing the work, a Celery prefork child: frames
  rendered, a chunk's render seconds, the last chunk's inference frames/s, attempts, failures and
  retries by reason, finalize seconds, webhook attempts. prometheus_client runs in multiprocess mode
  there: ``lipfarm worker --metrics-port`` gives the worker a fresh ``PROMETHEUS_MULTIPROC_DIR``
  before its pool forks, every child writes its values to files in it, and the worker's main
  process serves them summed (``serve_worker_metrics``). Without ``--metrics-port`` the same calls
  only update an in-process registry no one reads, so the code paths are the same.
- **Farm figures** (``FARM``) describe the farm as a whole and are exported by the API's
  ``/metrics``, read from the state store and the broker at scrape time: jobs by state, queue lengths,
  farm-wide committed frames and chunks (kept by the commit script, so they agree with the jobs'
  records), and two latency histograms. Those two are *observed* where the moment happens (a job's
  first commit, in a render worker; its publication, in the finalizer) but *kept* in Redis rather
  than in that process: a worker that observed them may be scaled away before any scrape, one job's
  moments happen in different workers, and the farm needs one series, not one per worker.

Failure reasons are short bounded classes (``REASONS``), never free text: a label value per message
would make a new series per message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lipfarm.common.errors import CancelledError, InputError, LipfarmError, ServiceError

log = logging.getLogger(__name__)

# Why an attempt failed. crash: its process died (killed, out of memory); lost: its lease ran out (its
# machine vanished or stalled), counted by the recovery pass; error: anything unforeseen.
REASONS = ("input", "cache", "storage", "redis", "timeout", "memory", "cancelled", "crash", "lost", "error")
WEBHOOK_OUTCOMES = ("delivered", "retry", "failed")

# Bucket bounds, in seconds, sized for CPU chunks of 250 frames (10-25 s) down to GPU ones.
CHUNK_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
FINALIZE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
FIRST_CHUNK_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
PUBLISH_TAIL_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

# --- Worker figures (one set per process; summed by the worker's main process) -------------------

# Not prometheus_client's default registry: Flower serves that one on its /metrics, and every process
# that imports the Celery app (Flower included) would export these series there, all zero (pulling
# down a dashboard's averages). Workers serve their figures from the multiprocess files instead.
WORKER_REGISTRY = CollectorRegistry()

FRAMES_RENDERED = Counter("lipfarm_frames_rendered", "Frames rendered by chunk attempts that finished rendering", registry=WORKER_REGISTRY)
CHUNK_SECONDS = Histogram("lipfarm_chunk_seconds", "Render seconds of a chunk attempt (features, UNet, "
                          "compositing, encoding; not fetching or uploading)", buckets=CHUNK_BUCKETS, registry=WORKER_REGISTRY)
# The last chunk's UNet throughput among the worker's live processes: one series per worker, which
# is what a throughput panel wants (a sum would count idle processes' old chunks).
INFERENCE_FPS = Gauge("lipfarm_inference_fps", "UNet frames per second of the last chunk rendered",
                      multiprocess_mode="livemostrecent", registry=WORKER_REGISTRY)
CHUNK_ATTEMPTS = Counter("lipfarm_chunk_attempts", "Chunk attempts started (claims won)", registry=WORKER_REGISTRY)
CHUNK_FAILURES = Counter("lipfarm_chunk_failures", "Chunk attempts that failed, by reason class", ["reason"], registry=WORKER_REGISTRY)
CHUNK_RETRIES = Counter("lipfarm_chunk_retries", "Failed chunk attempts whose chunk was queued for another "
                        "attempt, by reason class", ["reason"], registry=WORKER_REGISTRY)
FINALIZE_SECONDS = Histogram("lipfarm_finalize_seconds", "Seconds from a finalizer taking a job to its output "
                             "being published", buckets=FINALIZE_BUCKETS, registry=WORKER_REGISTRY)
# How far this host's clock is from Redis's (positive: ahead), measured by every recovery loop.
CLOCK_DRIFT = Gauge("lipfarm_clock_drift_seconds", "This host's clock minus Redis's clock, in seconds",
                    multiprocess_mode="livemostrecent", registry=WORKER_REGISTRY)
WEBHOOK_ATTEMPTS = Counter("lipfarm_webhook_attempts", "Webhook delivery attempts, by outcome", ["outcome"], registry=WORKER_REGISTRY)

WORKER_METRICS = (FRAMES_RENDERED, CHUNK_SECONDS, INFERENCE_FPS, CHUNK_ATTEMPTS, CHUNK_FAILURES, CHUNK_RETRIES,
                  FINALIZE_SECONDS, WEBHOOK_ATTEMPTS)
for _reason in REASONS:  # every class exported from the start, so rate() sees the first failure
    CHUNK_FAILURES.labels(reason=_reason)
    CHUNK_RETRIES.labels(reason=_reason)
for _outcome in WEBHOOK_OUTCOMES:
    WEBHOOK_ATTEMPTS.labels(outcome=_outcome)


def attempt_started() -> None:
    CHUNK_ATTEMPTS.inc()


def chunk_rendered(frames: int, render_s: float, unet_s: float) -> None:
    FRAMES_RENDERED.inc(frames)
    CHUNK_SECONDS.observe(render_s)
    if unet_s > 0:
        INFERENCE_FPS.set(frames / unet_s)


def clock_drift(seconds: float) -> None:
    CLOCK_DRIFT.set(seconds)


def attempt_failed(reason: str, *, retried: bool) -> None:
    """A failed attempt of class ``reason`` (one of ``REASONS``), and whether its chunk goes again."""
    reason = reason if reason in REASONS else "error"
    CHUNK_FAILURES.labels(reason=reason).inc()
    if retried:
        CHUNK_RETRIES.labels(reason=reason).inc()


def failure_reason(exc: BaseException, *, retryable: bool) -> str:
    """The class of what made an attempt fail (``REASONS``)."""
    if isinstance(exc, CancelledError):
        return "cancelled"
    if isinstance(exc, InputError):
        return "cache" if retryable else "input"  # retryable input errors: a damaged cached copy, repaired
    if isinstance(exc, ServiceError):
        text = str(exc)
        return "redis" if "Redis" in text or "broker" in text else "storage"
    if isinstance(exc, MemoryError):
        return "memory"
    if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded", "TimeoutError"):
        return "timeout"
    return "error"


def webhook_attempt(outcome: str) -> None:
    WEBHOOK_ATTEMPTS.labels(outcome=outcome if outcome in WEBHOOK_OUTCOMES else "retry").inc()


# --- Farm figures (kept in the state store; exported by the API) ----------------------------------


@dataclass(frozen=True)
class FarmMetric:
    name: str  # as exported (a counter's samples get ``_total``, a histogram's ``_bucket`` ...)
    kind: str  # gauge, counter, histogram
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def store_name(self) -> str:
        """The histogram's name in the state store."""
        return self.name.removeprefix("lipfarm_")


JOBS = FarmMetric("lipfarm_jobs", "gauge", "Jobs by state (every job the farm knows)", ("state",))
QUEUE_LENGTH = FarmMetric("lipfarm_queue_length", "gauge", "Messages waiting in the broker, by queue, job "
                          "priority and lane (front: a fast start's first chunks)", ("queue", "priority", "lane"))
FRAMES_COMMITTED = FarmMetric("lipfarm_frames_committed", "counter", "Frames of chunks committed, farm-wide "
                              "(a chunk rendered again after its segment was lost counts again)")
CHUNKS_COMMITTED = FarmMetric("lipfarm_chunks_committed", "counter", "Chunks committed, farm-wide")
TIME_TO_FIRST_CHUNK = FarmMetric("lipfarm_time_to_first_chunk_seconds", "histogram",
                                 "Seconds from a job's submission to its first committed chunk",
                                 buckets=FIRST_CHUNK_BUCKETS)
PUBLISH_TAIL = FarmMetric("lipfarm_publish_tail_seconds", "histogram",
                          "Seconds from a job's last chunk commit to its output being published",
                          buckets=PUBLISH_TAIL_BUCKETS)
FARM = (JOBS, QUEUE_LENGTH, FRAMES_COMMITTED, CHUNKS_COMMITTED, TIME_TO_FIRST_CHUNK, PUBLISH_TAIL)


def chunk_committed(store, job_id: str, *, now: float | None = None) -> None:
    """After a commit: the job's first commit is observed (once) into ``TIME_TO_FIRST_CHUNK``.
    Best effort: a figure is never worth failing a commit for."""
    try:
        store.first_commit(job_id, now=now, histogram=TIME_TO_FIRST_CHUNK.store_name,
                           buckets=TIME_TO_FIRST_CHUNK.buckets)
    except LipfarmError as exc:
        log.warning("job %s: time to first chunk not recorded: %s", job_id, exc)


def job_published(store, job_id: str, *, finalize_s: float, last_commit_at: float | None) -> None:
    """After a job is published: its finalize seconds (this worker) and its publish tail, from its
    last chunk's commit (the farm)."""
    FINALIZE_SECONDS.observe(finalize_s)
    if last_commit_at is None:
        return
    try:
        store.observe(PUBLISH_TAIL.store_name, max(0.0, store.now() - last_commit_at), buckets=PUBLISH_TAIL.buckets)
    except LipfarmError as exc:
        log.warning("job %s: publish tail not recorded: %s", job_id, exc)


def farm_families(*, jobs: dict[str, int], queues: list[tuple[dict[str, str], int]], totals: dict[str, int],
                  histograms: dict[str, dict[str, float]]):
    """The ``FARM`` metric families from what was read: ``jobs`` by state, ``queues`` as (labels,
    length), the commit ``totals``, and each histogram as the store keeps it (``histogram`` verb)."""
    families = []
    jobs_family = GaugeMetricFamily(JOBS.name, JOBS.doc, labels=JOBS.labels)
    for state, count in sorted(jobs.items()):
        jobs_family.add_metric([state], count)
    queue_family = GaugeMetricFamily(QUEUE_LENGTH.name, QUEUE_LENGTH.doc, labels=QUEUE_LENGTH.labels)
    for labels, length in queues:
        queue_family.add_metric([labels[name] for name in QUEUE_LENGTH.labels], length)
    families += [jobs_family, queue_family]
    for metric, field in ((FRAMES_COMMITTED, "frames_committed"), (CHUNKS_COMMITTED, "chunks_committed")):
        families.append(CounterMetricFamily(metric.name, metric.doc, value=totals.get(field, 0)))
    for metric in (TIME_TO_FIRST_CHUNK, PUBLISH_TAIL):
        kept = histograms.get(metric.store_name, {})
        families.append(HistogramMetricFamily(metric.name, metric.doc, buckets=_cumulative(kept, metric.buckets),
                                              sum_value=kept.get("sum", 0.0)))
    return families


def _cumulative(kept: dict[str, float], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Per-bucket counts (keyed by bound) -> Prometheus' cumulative buckets, ``+Inf`` = the count.
    Bounds kept under an older bucket layout still land in the first bucket at or above them."""
    per_bound = [(float(field), count) for field, count in kept.items() if field not in ("count", "sum", "+Inf")]
    buckets = [(_bound_text(b), sum(c for bound, c in per_bound if bound <= b)) for b in bounds]
    return buckets + [("+Inf", kept.get("count", 0.0))]


def _bound_text(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)  # as prometheus_client writes the worker histograms' bounds


def exported_series() -> dict[str, set[str]]:
    """Every series name the code exports (workers and API), with its label names: what a dashboard
    may query. Read off the metric objects themselves, so it cannot drift from them."""
    series: dict[str, set[str]] = {}
    families = [f for metric in WORKER_METRICS for f in metric.collect()]
    families += farm_families(jobs={"done": 0}, queues=[({n: "x" for n in QUEUE_LENGTH.labels}, 0)],
                              totals={}, histograms={})
    for family in families:
        for sample in family.samples:
            if not sample.name.endswith("_created"):  # single-process mode only; workers serve none
                series.setdefault(sample.name, set()).update(sample.labels)
    return series


# --- Serving a worker's figures --------------------------------------------------------------------


def serve_worker_metrics(port: int, address: str):
    """Serve the figures of every process of this worker (multiprocess mode) on ``address:port``;
    returns the server. Call in the worker's main process once its pool has forked."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server


def process_exited(pid: int) -> None:
    """Forget the live-only gauges of a pool process that exited (its inference frames/s)."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)
    except (OSError, TypeError) as exc:  # no multiprocess directory: nothing to forget
        log.debug("metrics of process %s not cleared: %s", pid, exc)
