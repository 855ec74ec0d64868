"""Webhooks against a real HTTP receiver on loopback: signed events, retried with backoff until one
is answered 2xx, each attempt recorded, duplicates carrying the same event id.

The receiver (a threaded ``http.server``) answers by a script (500, then no answer at all, then
200) and records every request it gets; tests wait for what it recorded, never for a moment. The
state store is Redis DB 6 under a prefix of its own; the end-to-end tests run a real ``lipfarm
worker`` (the delivery task runs on the ``jobs`` queue) with the backoff shortened by its setting.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lipfarm.common import celery_app, services

from lipfarm.job import webhooks
from lipfarm.common.config import load_settings
from lipfarm.job.endings import close_job
from lipfarm.common.errors import ServiceError
from lipfarm.common.identity import new_job_id
from lipfarm.job.jobfiles import JobFiles
from lipfarm.common.options import RenderOptions
from lipfarm.common.plan import AssetRef, Submission
from lipfarm.common.state import JobRecord, StateStore
from lipfarm.common.storage import open_storage
from lipfarm.demo.speech import write_wav
from lipfarm.api.schemas import Job
from lipfarm.api.signing import Signer
from lipfarm.common.signing import iso_utc
from lipfarm.api.views import job_view
from lipfarm.scheduler.processes import LipfarmProcess
from lipfarm.scheduler.reconcile import Enqueue, reconcile
from lipfarm.scheduler.submit import submit_job
from tests.farm import delete_prefixed, farm_env, prefixed_store, redis_client, REDIS_DB, redis_url, until

WEBHOOK_DB = REDIS_DB["webhooks"]
PREFIX = "lipfarm-webhooktest"
SECRET = "whsec-test-0123456789"
# the receiver listens on loopback, which the farm refuses to post to unless allowed (common.netguard)
LOOPBACK_ALLOWED = {"LIPFARM_OUTBOUND_ALLOW": "127.0.0.1/32"}


# ---------------------------------------------------------------------------------------------
# A receiver that records what it gets and answers by a script

@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    at: float

    @property
    def event(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """``answers``: what to do with each request in turn (an HTTP status, or "hang": read it, then
    answer nothing until the test ends); after the script, 200."""

    answers: list = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/lipfarm"

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append(Received(body, dict(self.headers), time.time()))
                answer = receiver.answers.pop(0) if receiver.answers else 200
                if answer == "hang":
                    receiver.release.wait(60)  # the sender's timeout (1 s) runs out long before
                    return
                self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver().start()
    yield server
    server.stop()


def readme_verify(secret: str, header: str, body: bytes, tolerance_s: float = 300) -> bool:
    """The recipe of docs/api.md (Webhooks, Signatures), word for word."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    signed = parts["t"].encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) <= tolerance_s


# ---------------------------------------------------------------------------------------------
# The format (no services)

def test_a_signature_verifies_only_for_its_body_secret_and_time():
    body, now = b'{"id":"j:done:1.0"}', 1_800_000_000
    header = webhooks.signature(SECRET, body, timestamp=now)
    assert header.startswith(f"t={now},v1=") and len(header.rsplit("=", 1)[1]) == 64
    assert webhooks.verify(SECRET, header, body, now=now + 10)
    assert not webhooks.verify(SECRET, header, body + b" ", now=now)
    assert not webhooks.verify("other", header, body, now=now)
    assert not webhooks.verify(SECRET, header, body, now=now + 301)  # a replay, too late
    assert not webhooks.verify(SECRET, "v1=abc", body, now=now) and not webhooks.verify(SECRET, "", body, now=now)


def test_retries_back_off_doubling_up_to_a_cap():
    assert [webhooks.backoff_s(n, 5) for n in range(1, 6)] == [5, 10, 20, 40, 80]
    assert webhooks.backoff_s(30, 5) == 3600 and webhooks.backoff_s(3, 5, cap_s=12) == 12


# ---------------------------------------------------------------------------------------------
# Queueing and delivering, against the state store (delivery called directly: time is a parameter)

@pytest.fixture
def store():
    with prefixed_store(WEBHOOK_DB, PREFIX) as store:
        yield store


def _ended_job(store: StateStore, storage, url: str, *, now: float) -> str:
    """A job with a webhook URL in its submission, cancelled at ``now``."""
    job_id = new_job_id()
    ref = AssetRef("0" * 64, "models/x.onnx")
    submission = Submission(job_id, "demo", ref, ref, ref, f"jobs/{job_id}/input/a.wav", "a.wav", RenderOptions(),
                            "normal", now - 10, webhook_url=url)
    JobFiles(storage, job_id).put_submission(submission)
    store.create_job(JobRecord.queued(submission, storage.url))
    assert store.cancel(job_id, now=now)
    return job_id


def test_an_end_is_queued_once_and_again_when_the_broker_was_down(store, tmp_path):
    storage = open_storage(str(tmp_path / "storage"))
    job_id = _ended_job(store, storage, "http://127.0.0.1:9/hook", now=time.time())
    queued = []

    def broker_down(*args):
        raise ServiceError("cannot queue the webhook: the broker at redis://127.0.0.1:1/0 is unreachable")

    assert not close_job(store, storage, job_id, enqueue_webhook=broker_down)
    assert store.unrecorded_job_ids() == [job_id]  # left in the outbox for the next recovery pass
    assert close_job(store, storage, job_id, enqueue_webhook=lambda *a: queued.append(a))
    assert close_job(store, storage, job_id, enqueue_webhook=lambda *a: queued.append(a))
    event = f"{job_id}:cancelled:{store.job(job_id).finished_at:.6f}"
    assert queued == [(job_id, event, 1, 0.0)]  # once per end, however often it is closed
    record = store.webhook(job_id)
    assert (record.event_id, record.type, record.state, record.attempts) == (event, "job.cancelled", "pending", 0)


def test_delivery_gives_up_after_the_retry_window_and_duplicates_stop(store, tmp_path, receiver):
    storage = open_storage(str(tmp_path / "storage"))
    receiver.answers = [503] * 20
    start = time.time()
    job_id = _ended_job(store, storage, receiver.url, now=start)
    queued = []
    webhooks.queue_event(store, JobFiles(storage, job_id), enqueue=lambda *a: queued.append(a), now=start)
    settings = load_settings({**LOOPBACK_ALLOWED, "LIPFARM_WEBHOOK_SECRET": SECRET, "LIPFARM_WEBHOOK_RETRY_S": "100",
                              "LIPFARM_WEBHOOK_BACKOFF_S": "10", "LIPFARM_WEBHOOK_TIMEOUT_S": "2"})
    clock = [start]
    results = []
    while queued:
        job, event, attempt, delay = queued.pop(0)
        clock[0] += delay  # the broker holds the message this long
        results.append(webhooks.deliver(store, settings, job, event, attempt, storage_at=lambda url: storage,
                                        enqueue=lambda *a: queued.append(a), clock=lambda: clock[0]))
        if attempt == 1:  # a duplicate of the first message, delivered late: it finds its attempt made
            assert webhooks.deliver(store, settings, job, event, 1, storage_at=lambda url: storage,
                                    enqueue=lambda *a: queued.append(a), clock=lambda: clock[0]).startswith("skipped")
    # 10 s, 20 s, 40 s: the next wait (80 s) would pass the 100 s window
    assert [r.split(":")[0] for r in results] == ["retry", "retry", "retry", "failed"]
    record = store.webhook(job_id)
    assert record.state == "failed" and record.attempts == 4 and record.next_at is None
    assert [a["status"] for a in record.log] == [503] * 4 and record.last_status == 503
    assert [round(a["at"] - start) for a in record.log] == [0, 10, 30, 70]
    assert len(receiver.received) == 4 and len({r.event["id"] for r in receiver.received}) == 1


def test_a_second_sender_waits_for_the_first_and_takes_over_if_it_died(store, tmp_path):
    storage = open_storage(str(tmp_path / "storage"))
    now = time.time()
    job_id = _ended_job(store, storage, "http://127.0.0.1:9/hook", now=now)
    queued = []
    webhooks.queue_event(store, JobFiles(storage, job_id), enqueue=lambda *a: queued.append(a), now=now)
    event = queued[0][1]
    assert store.begin_webhook_attempt(job_id, event, 1, now=now, stale_s=25) == ("ok", "")
    assert store.begin_webhook_attempt(job_id, event, 1, now=now + 5, stale_s=25)[0] == "busy"
    assert store.begin_webhook_attempt(job_id, event, 1, now=now + 30, stale_s=25) == ("ok", "")  # the first died
    assert store.begin_webhook_attempt(job_id, "other:event", 1, now=now, stale_s=25)[0] == "skip"



def test_the_recovery_pass_resends_a_delivery_message_the_broker_lost(store, tmp_path, receiver):
    """Each delivery message is lost on its way (a broker that lost its data): the recovery pass
    finds the overdue attempt and queues it again, never one that is only waiting or being sent."""
    storage = open_storage(str(tmp_path / "storage"))
    settings = load_settings({**LOOPBACK_ALLOWED, "LIPFARM_WEBHOOK_SECRET": SECRET, "LIPFARM_WEBHOOK_BACKOFF_S": "10",
                              "LIPFARM_WEBHOOK_TIMEOUT_S": "2", "LIPFARM_LEASE_S": "30"})
    grace = 2 * settings.lease_s + 60
    receiver.answers = [503]
    start = time.time()
    store.set_generation(now=start)
    job_id = _ended_job(store, storage, receiver.url, now=start)
    lost = []
    webhooks.queue_event(store, JobFiles(storage, job_id), enqueue=lambda *a: lost.append(a), now=start)
    event = lost[0][1]
    resent = []
    enqueue = Enqueue(plan=lambda *a: None, render=lambda *a: None, finalize=lambda *a: None,
                      webhook=lambda *a: resent.append(a))

    def recover(at: float) -> list[str]:
        return reconcile(store=store, storage=storage, settings=settings, now=at, enqueue=enqueue).webhooks_resent

    def deliver(attempt: int, at: float) -> str:
        return webhooks.deliver(store, settings, job_id, event, attempt, storage_at=lambda url: storage,
                                enqueue=lambda *a: lost.append(a), clock=lambda: at)

    assert recover(start + grace - 1) == [] and resent == []  # the message may still be on its way
    assert recover(start + grace + 1) == [f"{job_id}:1"] and resent == [(job_id, event, 1, 0.0)]
    t1 = start + grace + 2
    assert store.begin_webhook_attempt(job_id, event, 1, now=t1, stale_s=9) == ("ok", "")  # a sender at it
    assert recover(t1 + 9 + grace - 1) == []  # being sent: not overdue until its sender is taken for dead
    resent.clear()
    assert recover(t1 + 9 + grace + 1) == [f"{job_id}:1"]  # that sender died: attempt 1 again
    t1 += 9 + grace + 2
    assert deliver(1, t1).startswith("retry")  # 503: attempt 2 queued in 10 s, and lost
    t2 = t1 + 10
    assert recover(t2 + grace - 1) == []
    assert recover(t2 + grace + 1) == [f"{job_id}:2"] and resent[-1] == (job_id, event, 2, 0.0)
    assert deliver(2, t2 + grace + 2).startswith("delivered")
    assert deliver(2, t2 + grace + 3).startswith("skipped")  # the lost message, late after all
    assert recover(t2 + 10 * grace) == []  # delivered: nothing more to send
    record = store.webhook(job_id)
    assert record.state == "delivered" and [a["status"] for a in record.log] == [503, 200]
    assert [r.event["id"] for r in receiver.received] == [event, event]



def test_after_redis_loses_its_data_an_undelivered_event_is_sent_again(store, tmp_path, receiver):
    """The delivery state lived in Redis: a rebuild from storage queues again the event of a job that
    ended within the retry window, unless storage records it delivered; an older end is left alone."""
    storage = open_storage(str(tmp_path / "storage"))
    settings = load_settings({**LOOPBACK_ALLOWED, "LIPFARM_WEBHOOK_SECRET": SECRET, "LIPFARM_WEBHOOK_RETRY_S": "3600"})
    start = time.time()
    store.set_generation(now=start)
    fresh = _ended_job(store, storage, receiver.url, now=start)
    old = _ended_job(store, storage, receiver.url, now=start - 7200)  # ended before the retry window
    lost = []
    for job_id in (fresh, old):
        assert close_job(store, storage, job_id, enqueue_webhook=lambda *a: lost.append(a))  # messages lost
    events = {job_id: store.webhook(job_id).event_id for job_id in (fresh, old)}
    resent = []
    enqueue = Enqueue(plan=lambda *a: None, render=lambda *a: None, finalize=lambda *a: None,
                      webhook=lambda *a: resent.append(a))

    def lose_redis_and_recover(at: float) -> list[str]:
        delete_prefixed(store.redis, PREFIX)
        report = reconcile(store=store, storage=storage, settings=settings, now=at, enqueue=enqueue)
        assert sorted(report.rebuilt) == sorted([fresh, old])
        return report.webhooks_resent

    assert lose_redis_and_recover(start + 10) == [f"{fresh}:1"]
    assert resent == [(fresh, events[fresh], 1, 0.0)]  # the same event id: receivers deduplicate
    assert store.webhook(fresh).state == "pending" and store.webhook(old) is None
    assert webhooks.deliver(store, settings, fresh, events[fresh], 1, storage_at=lambda url: storage,
                            enqueue=lambda *a: None).startswith("delivered")
    assert JobFiles(storage, fresh).webhook_outcome()["state"] == "delivered"
    resent.clear()
    assert lose_redis_and_recover(start + 20) == [] and resent == []  # known delivered: not again
    assert [r.event["id"] for r in receiver.received] == [events[fresh]]


# ---------------------------------------------------------------------------------------------
# End to end: a real worker delivers them

@pytest.fixture(scope="module")
def worker(tmp_path_factory, home, demo):
    """One worker on every queue (plans, chunks, finalizers, webhooks), with the backoff shortened."""
    redis_client(WEBHOOK_DB).flushdb()
    folder = tmp_path_factory.mktemp("webhook-farm")
    env = farm_env(home, str(folder / "storage"), None, LIPFARM_BROKER_URL=redis_url(WEBHOOK_DB),
                   LIPFARM_KEY_PREFIX=PREFIX, LIPFARM_WEBHOOK_SECRET=SECRET, LIPFARM_WEBHOOK_BACKOFF_S="0.5",
                   LIPFARM_WEBHOOK_TIMEOUT_S="1", **LOOPBACK_ALLOWED)
    process = LipfarmProcess.worker(env, folder / "lipfarm.worker.log", "--concurrency", "1",
                                    "--queues", "jobs,finalize,render", "--hostname", f"webhooks-{os.getpid()}@test")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        celery_app.configure(celery_app.app, load_settings())  # this process queues to the same broker
        try:
            process.start().wait_ready(timeout_s=90)
            yield load_settings()
        finally:
            process.stop(timeout_s=30)
            redis_client(WEBHOOK_DB).flushdb()
    celery_app.configure(celery_app.app, load_settings())
    services.reset()


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory, speech_16k) -> Path:
    path = tmp_path_factory.mktemp("webhook-clip") / "clip.wav"
    write_wav(path, speech_16k[int(0.3 * 16000):int(1.5 * 16000)])
    return path


def _submit(settings, demo, audio, url):
    return submit_job(settings, avatar="demo", audio=audio, encoder=demo.encoder, generator=demo.generator,
                      options=RenderOptions(chunk_frames=25), webhook_url=url)


@pytest.mark.slow
def test_a_cancelled_job_is_told_after_a_500_and_a_timeout(worker, demo, short_clip, receiver):
    receiver.answers = [500, "hang"]  # then 200
    handle = _submit(worker, demo, short_clip, receiver.url)
    assert handle.cancel()

    def delivered():
        webhook = handle.status().webhook
        return webhook if webhook and webhook["state"] == "delivered" else None

    webhook = until(delivered, timeout_s=60, what="the webhook delivered")
    assert len(receiver.received) == 3  # the second one arrived; its answer never did
    events = [r.event for r in receiver.received]
    assert len({e["id"] for e in events}) == 1  # a duplicate carries the same id: receivers dedupe by it
    job = handle.status()
    event = events[-1]
    assert event["id"] == f"{handle.job_id}:cancelled:{job.finished_at:.6f}" and event["type"] == "job.cancelled"
    assert event["job"] == {"id": handle.job_id, "state": "cancelled", "output_url": None, "reason": job.reason,
                            "frames_total": job.frames_total, "created_at": job.created_at,
                            "created_at_iso": iso_utc(job.created_at), "finished_at": job.finished_at,
                            "finished_at_iso": iso_utc(job.finished_at),
                            "elapsed_s": round(job.finished_at - job.created_at, 3)}
    for request in receiver.received:
        assert readme_verify(SECRET, request.headers["Lipfarm-Signature"], request.body)
        assert request.headers["Content-Type"] == "application/json"
    assert [r.headers["Lipfarm-Delivery-Attempt"] for r in receiver.received] == ["1", "2", "3"]
    # each attempt recorded: status, time, error; and the waits grew (0.5 s, then 1 s after the timeout)
    assert [a["status"] for a in webhook["log"]] == [500, 0, 200] and webhook["attempts"] == 3
    assert "timed out" in webhook["log"][1]["error"] and webhook["log"][2]["error"] == ""
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:])]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0 + 1.0  # the 1 s timeout, then the doubled backoff


@pytest.mark.slow
def test_a_done_job_is_told_where_its_output_is(worker, demo, short_clip, receiver):
    handle = _submit(worker, demo, short_clip, receiver.url)
    final = handle.wait(timeout_s=300, poll_s=0.2)
    until(lambda: receiver.received, timeout_s=60, what="the event")
    request = receiver.received[0]
    assert readme_verify(SECRET, request.headers["Lipfarm-Signature"], request.body)
    event = request.event
    assert event["type"] == "job.done" and event["id"] == f"{handle.job_id}:done:{final.finished_at:.6f}"
    assert event["job"]["state"] == "done" and event["job"]["frames_total"] == final.frames_total > 0
    # the API's signed URL (a path: submitted from Python, with no LIPFARM_PUBLIC_URL), never a storage path
    assert event["job"]["output_url"].startswith(f"/v1/jobs/{handle.job_id}/output?expires=")
    assert final.output_location not in event["job"]["output_url"]
    assert until(lambda: (handle.status().webhook or {}).get("state") == "delivered", what="delivered")
    assert len(receiver.received) == 1
    # the API's job JSON sums the delivery up (and validates against its schema)
    view = Job.model_validate(job_view(handle.status(), Signer("s", ttl_s=60), now=time.time())).webhook
    assert view.state == "delivered" and view.attempts == 1 and view.last_status == 200
    assert view.event_id == event["id"] and view.url == receiver.url


def test_an_address_refused_at_delivery_is_given_up_at_once_and_shown_without_detail(store, tmp_path, receiver):
    storage = open_storage(str(tmp_path / "storage"))
    now = time.time()
    job_id = _ended_job(store, storage, receiver.url, now=now)  # accepted once (an allow-list since removed)
    queued = []
    webhooks.queue_event(store, JobFiles(storage, job_id), enqueue=lambda *a: queued.append(a), now=now)
    settings = load_settings({"LIPFARM_WEBHOOK_SECRET": SECRET})  # no allow-list: loopback is refused
    result = webhooks.deliver(store, settings, job_id, queued[0][1], 1, storage_at=lambda url: storage,
                              enqueue=lambda *a: queued.append(a), clock=lambda: now)
    assert result.startswith("failed") and receiver.received == [] and len(queued) == 1  # nothing sent, no retry
    record = store.webhook(job_id)
    assert record.state == "failed" and record.last_status == 0 and "loopback" in record.last_error
    view = job_view(store.status(job_id, now=now), Signer("s", ttl_s=60), now=now)["webhook"]
    assert (view["state"], view["last_status"], view["last_error"]) == ("failed", 0, "refused: not a public address")
