"""Prometheus metrics as Prometheus would read them: a real ``lipfarm worker --metrics-port`` (two
render processes, so the figures are summed across processes) and a real ``lipfarm api`` serving
``/metrics``, on loopback, Redis DB 7, a key prefix of their own, local storage.

The job is caught mid-render with hold files (two chunks paused, three waiting in the broker), so
"while it runs" is a state the test waits for, not a moment it hopes to hit.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lipfarm.common import celery_app, metrics, services
from lipfarm.common.config import load_settings
from lipfarm.common.errors import CancelledError, InputError, ServiceError
from lipfarm.common.identity import new_job_id
from lipfarm.common.options import RenderOptions
from lipfarm.common.state import JobState
from lipfarm.scheduler.processes import LipfarmProcess, free_ports
from lipfarm.scheduler.submit import submit_job
from tests.farm import farm_env, redis_client, REDIS_DB, redis_url, until

METRICS_DB = REDIS_DB["metrics"]
PREFIX = "lipfarm-metricstest"
CHUNK = RenderOptions(chunk_frames=25)
CLIP_FRAMES, CLIP_CHUNKS = 101, 5  # 4.1 s of speech (see tests/test_farm.py)


class Scrape:
    """One scrape: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def sum(self, name: str, **labels: str) -> float:
        """The sum over the series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)


def queue_panel(*replicas: Scrape) -> dict[str, float]:
    """The dashboard's queue panel (deploy/grafana-dashboard.json) evaluated on these scrapes, each as
    one API replica would be scraped (Prometheus adds an ``instance`` label per target): its query,
    ``sum by (queue) (max by (LABELS) (lipfarm_queue_length))``, read from the dashboard itself."""
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "lipfarm_queue_length" in t["expr"]]
    (expr,) = exprs
    form = re.fullmatch(r"sum by \(queue\) \(max by \(([^)]*)\) \(lipfarm_queue_length\)\)", expr)
    assert form, expr
    kept = [label.strip() for label in form[1].split(",")]
    maxed: dict[tuple, float] = {}
    for instance, replica in enumerate(replicas):
        for (name, labels), value in replica.samples.items():
            if name == "lipfarm_queue_length":
                labels = dict(labels, instance=str(instance))
                key = tuple(labels.get(k, "") for k in kept)
                maxed[key] = max(maxed.get(key, value), value)
    shown: dict[str, float] = {}
    for key, value in maxed.items():
        queue = key[kept.index("queue")]
        shown[queue] = shown.get(queue, 0.0) + value
    return shown


def scrape(url: str) -> Scrape:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


# ---------------------------------------------------------------------------------------------
# What is recorded where (no services)

def test_the_queue_panel_adds_up_the_lanes_of_a_priority():
    """3 waiting in two lanes of one priority (a fast start's front, and its own) show as 3, scraped
    from one API replica or two (the figure the former ``max by (queue, priority)`` showed as 2)."""
    text = "".join(f'lipfarm_queue_length{{queue="render",priority="normal",lane="{lane}"}} {n}\n'
                   for lane, n in (("front", 2), ("normal", 1), ("late", 0)))
    text = "# TYPE lipfarm_queue_length gauge\n" + text
    assert queue_panel(Scrape(text)) == {"render": 3}
    assert queue_panel(Scrape(text), Scrape(text)) == {"render": 3}


def test_failures_are_sorted_into_bounded_reasons():
    cases = [(CancelledError("job cancelled"), False, "cancelled"),
             (InputError("bad wav", field="audio"), False, "input"),
             (InputError("damaged cached avatar"), True, "cache"),
             (ServiceError("cannot reach Redis at 127.0.0.1:6379/0"), True, "redis"),
             (ServiceError("cannot reach the S3 endpoint http://s3"), True, "storage"),
             (MemoryError(), True, "memory"), (TimeoutError(), True, "timeout"),
             (ZeroDivisionError("a bug"), True, "error")]
    for exc, retryable, reason in cases:
        assert metrics.failure_reason(exc, retryable=retryable) == reason, exc
        assert reason in metrics.REASONS


def test_histograms_kept_in_the_store_are_exported_cumulative():
    kept = {"1.0": 2.0, "5.0": 1.0, "+Inf": 1.0, "count": 4.0, "sum": 30.0}
    assert metrics._cumulative(kept, (1, 2, 5)) == [("1.0", 2.0), ("2.0", 2.0), ("5.0", 3.0), ("+Inf", 4.0)]


# ---------------------------------------------------------------------------------------------
# A worker and the API, scraped while a job runs

def _flush() -> None:
    redis_client(METRICS_DB).flushdb()


@pytest.fixture(scope="module")
def farm(tmp_path_factory, home, demo, holds):
    """A worker taking every queue with two render processes and metrics on a free port, and the
    API; their settings also in this process's environment (for ``submit_job``) for the module."""
    _flush()
    folder = tmp_path_factory.mktemp("metrics-farm")
    env = farm_env(home, str(folder / "storage"), None, LIPFARM_BROKER_URL=redis_url(METRICS_DB),
                   LIPFARM_KEY_PREFIX=PREFIX, LIPFARM_HOLD_DIR=str(holds.folder))
    worker_port, api_port = free_ports(2)
    worker = LipfarmProcess.worker(env, folder / "lipfarm.worker.log", "--concurrency", "2", "--queues",
                                   "jobs,finalize,render", "--metrics-port", str(worker_port),
                                   "--hostname", f"metrics-{os.getpid()}@test")
    api = LipfarmProcess(["api", "--host", "127.0.0.1", "--port", str(api_port)], env=env, log=folder / "api.log",
                         ready_text=b"Uvicorn running on")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        celery_app.configure(celery_app.app, load_settings())  # this process queues to the same broker
        try:
            worker.start()
            api.start()
            worker.wait_ready(timeout_s=90)
            api.wait_ready(timeout_s=60)
            yield (load_settings(), f"http://127.0.0.1:{worker_port}/metrics",
                   f"http://127.0.0.1:{api_port}/metrics", worker)
        finally:
            holds.release()
            api.stop(timeout_s=20)
            worker.stop(timeout_s=30)
            _flush()
    celery_app.configure(celery_app.app, load_settings())
    services.reset()


@pytest.mark.slow
def test_a_running_job_moves_the_figures_and_they_agree_with_its_status(farm, holds, demo, clip):
    settings, worker_url, api_url, worker = farm
    worker0, api0 = scrape(worker_url), scrape(api_url)
    job_id = new_job_id()
    holds.hold(job_id, *range(CLIP_CHUNKS), after_frames=5)  # whichever two chunks start first pause there
    handle = submit_job(settings, avatar="demo", audio=clip, encoder=demo.encoder, generator=demo.generator,
                        options=CHUNK, job_id=job_id)

    # While it runs: two chunks held by the two render processes, three waiting in the broker.
    until(lambda: len([c for c in handle.store.chunks(job_id) if c.frames_done >= 5]) == 2, timeout_s=180,
          what="two chunks held")
    during = until(lambda: (s := scrape(api_url)).sum("lipfarm_queue_length", queue="render") == 3 and s,
                   what="three render messages waiting")
    assert during.value("lipfarm_jobs", state="rendering") == api0.value("lipfarm_jobs", state="rendering") + 1
    assert during.sum("lipfarm_queue_length", queue="render", priority="normal") == 3
    assert queue_panel(during, during)["render"] == 3  # the dashboard shows 3, with two API replicas scraped
    assert during.value("lipfarm_frames_committed_total") == api0.value("lipfarm_frames_committed_total")
    busy = scrape(worker_url)
    assert busy.value("lipfarm_chunk_attempts_total") - worker0.value("lipfarm_chunk_attempts_total") == 2
    assert busy.value("lipfarm_frames_rendered_total") == worker0.value("lipfarm_frames_rendered_total")

    holds.release(job_id)
    final = handle.wait(timeout_s=300, poll_s=0.2)
    assert final.state == JobState.DONE and final.frames_total == CLIP_FRAMES
    # the finalizer records its seconds just after marking the job done: wait for that figure
    after = until(lambda: (s := scrape(worker_url)).value("lipfarm_finalize_seconds_count")
                  == worker0.value("lipfarm_finalize_seconds_count") + 1 and s, what="the finalize figure")

    def moved(name: str, before=worker0, now=after, **labels) -> float:
        return now.value(name, **labels) - before.value(name, **labels)

    attempts = [a for i in range(CLIP_CHUNKS) for a in handle.store.attempts(job_id, i)]
    assert len({a.worker for a in attempts}) == 2  # both processes rendered: their figures were summed
    assert moved("lipfarm_frames_rendered_total") == final.frames_total
    assert moved("lipfarm_chunk_seconds_count") == moved("lipfarm_chunk_attempts_total") == CLIP_CHUNKS
    assert 0 < moved("lipfarm_chunk_seconds_sum") < final.elapsed_s * 2  # two processes at once
    assert after.value("lipfarm_inference_fps") > 0
    assert sum(moved("lipfarm_chunk_failures_total", reason=r) for r in metrics.REASONS) == 0
    assert 0 < moved("lipfarm_finalize_seconds_sum") < final.elapsed_s

    farm_after = scrape(api_url)

    def farm_moved(name: str, **labels) -> float:
        return farm_after.value(name, **labels) - api0.value(name, **labels)

    assert farm_moved("lipfarm_jobs", state="done") == 1
    assert farm_after.value("lipfarm_jobs", state="rendering") == api0.value("lipfarm_jobs", state="rendering")
    assert farm_moved("lipfarm_frames_committed_total") == final.frames_total
    assert farm_moved("lipfarm_chunks_committed_total") == CLIP_CHUNKS
    assert farm_after.sum("lipfarm_queue_length") == 0
    assert farm_moved("lipfarm_time_to_first_chunk_seconds_count") == 1
    assert 0 < farm_moved("lipfarm_time_to_first_chunk_seconds_sum") < final.elapsed_s
    assert farm_moved("lipfarm_publish_tail_seconds_count") == 1
    assert farm_moved("lipfarm_publish_tail_seconds_bucket", le="+Inf") == 1
    assert 0 <= farm_moved("lipfarm_publish_tail_seconds_sum") < final.elapsed_s


@pytest.mark.slow
def test_metrics_may_require_a_token(farm, home):
    from lipfarm.api.app import create_app
    from tests.browser import live_server
    from tests.test_api import make_token

    settings = farm[0]
    env = {k: v for k, v in os.environ.items() if k.startswith("LIPFARM_")}
    token = make_token(env, f"scraper-{os.getpid()}", "--read-only")
    guarded = load_settings({**env, "LIPFARM_API_METRICS_AUTH": "1"})
    with live_server(create_app(guarded)) as base:
        refused = httpx.get(f"{base}/metrics", timeout=30)
        read = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["field"] == "Authorization"
    assert read.status_code == 200 and "lipfarm_jobs{" in read.text
    assert not settings.api_metrics_auth  # open by default


@pytest.mark.slow
def test_a_worker_refuses_a_metrics_port_in_use(farm, tmp_path):
    _settings, worker_url, _api_url, _worker = farm
    port = worker_url.rsplit(":", 1)[1].split("/")[0]
    env = {k: v for k, v in os.environ.items() if k.startswith("LIPFARM_")}
    from tests.test_api import lipfarm

    done = lipfarm(env, "worker", "--metrics-port", port)
    assert done.returncode == 2 and f"127.0.0.1:{port}" in done.stderr and "--metrics-port" in done.stderr
