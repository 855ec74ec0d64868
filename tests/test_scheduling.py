"""Scheduling under load: messages proportional to the work, publication ahead of rendering.

On a real broker (Redis) that no worker reads: which lists messages land in, what the recovery pass
finds there, and that it re-sends a plan or a finalizer only when none is left anywhere.
"""

from __future__ import annotations

import pytest

from lipfarm.common import celery_app
from lipfarm.common.config import load_settings
from lipfarm.common.state import JobRecord, JobState, Segment
from lipfarm.common.storage import LocalStorage
from lipfarm.scheduler.reconcile import reconcile
from lipfarm.scheduler.tasks import celery_enqueue
from tests.farm import REDIS_DB, prefixed_store, redis_client, redis_url

DB = REDIS_DB["scheduling"]
PREFIX = "lipfarm-scheduling"
LEASE_S = 15.0
SEG = Segment("jobs/j/chunks/00000-t.mp4", 1000, "ab" * 32)


@pytest.fixture()
def broker():
    client = redis_client(DB)
    client.flushdb()
    settings = load_settings({"LIPFARM_BROKER_URL": redis_url(DB), "LIPFARM_LEASE_S": str(LEASE_S)})
    celery_app.configure(celery_app.app, settings)
    try:
        yield client, settings
    finally:
        client.flushdb()
        celery_app.configure(celery_app.app, load_settings())


@pytest.fixture()
def store(broker):
    with prefixed_store(DB, PREFIX) as store:
        yield store


def _queued_job(store, job_id: str, *, at: float, priority: str = "normal") -> str:
    store.create_job(JobRecord(job_id=job_id, state=JobState.QUEUED, priority=priority, avatar="demo",
                               audio="a.wav", storage_url="file:///nowhere", created_at=at, updated_at=at))
    return job_id


def test_plans_and_finalizers_go_ahead_of_every_render_whatever_the_priority(broker):
    client, _ = broker
    celery_app.enqueue_render("long", 0, "high", "0-249", first=True)
    celery_app.enqueue_plan("new", "low")
    celery_app.enqueue_finalize("done", "low")
    celery_app.enqueue_webhook("done", "done:done:1")
    # step 0 is read first, and a worker names its queues jobs, finalize, render
    assert (client.llen("jobs"), client.llen("finalize"), client.llen("render")) == (2, 1, 1)
    assert celery_app.QUEUES == ("jobs", "finalize", "render")


def test_results_nobody_reads_are_not_kept():
    assert celery_app.app.conf.task_ignore_result is True


def test_the_broker_scan_finds_waiting_and_reserved_plans_and_finalizers(broker):
    client, _ = broker
    celery_app.enqueue_plan("a", "normal")
    celery_app.enqueue_finalize("b", "high")
    celery_app.enqueue_render("c", 0, "normal")
    celery_app.enqueue_webhook("d", "d:done:1")
    with celery_app.app.connection_for_read() as connection:  # a worker reserves the plan, unacknowledged
        reserved = connection.default_channel.basic_get("jobs", no_ack=False)
        assert reserved is not None and client.hlen("unacked") == 1
        assert client.llen("jobs") == 1  # only the webhook is left in the list
        assert celery_app.pending_control_messages() == {(celery_app.TASK_PLAN, "a"), (celery_app.TASK_FINALIZE, "b")}


def test_a_job_waiting_behind_a_long_queue_is_never_sent_a_second_plan(broker, store, tmp_path):
    client, settings = broker
    enqueue, storage = celery_enqueue(), LocalStorage(tmp_path)
    t0 = store.now()
    jobs = [_queued_job(store, f"j{i}", at=t0) for i in range(20)]
    for job_id in jobs:
        celery_app.enqueue_plan(job_id, "normal")
    for minutes in range(1, 31):  # half an hour of passes while nobody plans
        report = reconcile(store=store, storage=storage, settings=settings, enqueue=enqueue, now=t0 + 60 * minutes)
        assert report.replanned == []
    assert client.llen("jobs") == 20  # one message per job, as sent

    client.delete("jobs")  # the broker loses them all: each job gets one new plan, once
    report = reconcile(store=store, storage=storage, settings=settings, enqueue=enqueue, now=t0 + 3600)
    assert sorted(report.replanned) == sorted(jobs) and client.llen("jobs") == 20
    for seconds in (5, 10, 3600):  # the re-sent messages wait: nothing more, however long
        assert reconcile(store=store, storage=storage, settings=settings, enqueue=enqueue,
                         now=t0 + 3600 + seconds).replanned == []
    assert client.llen("jobs") == 20


def test_a_complete_job_gets_one_finalizer_message_while_it_waits(broker, store, tmp_path):
    client, settings = broker
    enqueue, storage = celery_enqueue(), LocalStorage(tmp_path)
    t0 = store.now()
    job = _queued_job(store, "complete", at=t0)
    assert store.start_planning(job, now=t0) and store.start_rendering(job, [(0, 25)], output_key="o.mp4", now=t0)
    claim = store.claim(job, 0, worker="w", now=t0, lease_s=LEASE_S, max_attempts=3)
    assert store.commit(job, 0, claim.token, frames=25, segment=SEG, now=t0 + 1).value == "complete"
    celery_app.enqueue_finalize(job, "normal")  # what the committing worker does
    for minutes in range(1, 31):
        report = reconcile(store=store, storage=storage, settings=settings, enqueue=enqueue, now=t0 + 60 * minutes)
        assert report.finalizers == []
    assert client.llen("finalize") == 1

    client.delete("finalize")  # lost: one new message, recorded, not repeated by the next passes
    assert reconcile(store=store, storage=storage, settings=settings, enqueue=enqueue,
                     now=t0 + 3600).finalizers == [job]
    client.delete("finalize")  # lost again at once: the record holds the next pass off for the grace
    assert reconcile(store=store, storage=storage, settings=settings, enqueue=enqueue,
                     now=t0 + 3605).finalizers == []
    assert reconcile(store=store, storage=storage, settings=settings, enqueue=enqueue,
                     now=t0 + 3600 + 2 * LEASE_S + 1).finalizers == [job]


# --- fair share: which chunk a lane's slot is bound to ---------------------------------------------------

def _rendering_job(store, job_id: str, chunks: int, *, at: float, priority: str = "normal",
                   tenant: str = "") -> str:
    _queued_job(store, job_id, at=at, priority=priority)
    if tenant:
        store.redis.hset(store.keys.job(job_id), "tenant", tenant)
    assert store.start_planning(job_id) and store.start_rendering(
        job_id, [(25 * i, 25 * (i + 1)) for i in range(chunks)], output_key=f"{job_id}.mp4")
    assert store.offer(job_id, list(range(chunks))) == chunks
    return job_id


def _next(store, priority="normal", worker="w"):
    return store.claim_next(priority, worker=worker, lease_s=LEASE_S, max_attempts=3)


def test_two_jobs_of_one_priority_share_the_workers_instead_of_first_come_first_served(store):
    t0 = store.now()
    long = _rendering_job(store, "long", 40, at=t0)
    short = _rendering_job(store, "short", 6, at=t0 + 1)  # sent after the long job's 40 chunks
    running = [_next(store), _next(store)]  # two workers
    order = [c.job_id for c in running]
    while running:
        done = running.pop(0)  # the older attempt finishes first; its worker takes the next slot
        assert store.commit(done.job_id, done.index, done.token, frames=25, segment=SEG) in ("ok", "complete")
        claim = _next(store)
        if claim.ok:
            running.append(claim)
            order.append(claim.job_id)
    assert order[:2] == ["long", "short"]  # the short job starts at once, not after 40 chunks
    assert order[:12].count("short") == 6  # and has half the workers until it is done
    assert sorted(order) == sorted(["long"] * 40 + ["short"] * 6)  # every chunk once
    assert store.job(short).chunks_committed == 6 and store.job(long).chunks_committed == 40
    assert _next(store).verdict == "skip"  # the lane is empty: a slot left over finds nothing


def test_within_a_job_chunks_go_in_order_and_each_is_bound_once(store):
    t0 = store.now()
    job = _rendering_job(store, "one", 5, at=t0)
    claims = [_next(store) for _ in range(6)]
    assert [c.index for c in claims[:5]] == [0, 1, 2, 3, 4] and {c.job_id for c in claims[:5]} == {job}
    assert claims[5].verdict == "skip"
    # a chunk requeued after a lost worker is bound by its own message, not offered again
    move = store.requeue(job, 2, reason="lease expired", max_attempts=3, now=store.now() + LEASE_S + 1)
    assert move.verdict == "requeued" and _next(store).verdict == "skip"


def test_busy_tenants_share_the_workers_by_weight(store):
    t0 = store.now()
    store.set_tenant_weight("big", 3)
    store.set_tenant_weight("small", 1)
    _rendering_job(store, "b1", 200, at=t0, tenant="big")
    _rendering_job(store, "s1", 100, at=t0 + 1, tenant="small")
    _rendering_job(store, "s2", 100, at=t0 + 2, tenant="small")  # more jobs do not buy more share
    running = [_next(store) for _ in range(8)]  # eight workers
    tenants = [store.redis.hget(store.keys.job(c.job_id), "tenant") for c in running]
    assert tenants.count("big") == 6 and tenants.count("small") == 2  # 3 : 1
    served = {"big": 0, "small": 0}
    for _ in range(200):  # a minute of a busy farm: the oldest attempt ends, its worker takes a slot
        done = running.pop(0)
        store.commit(done.job_id, done.index, done.token, frames=25, segment=SEG)
        claim = _next(store)
        running.append(claim)
        served["big" if claim.job_id == "b1" else "small"] += 1
    assert abs(served["big"] / 200 - 0.75) <= 0.10
    small = [store.job(j).chunks_committed for j in ("s1", "s2")]
    assert abs(small[0] - small[1]) <= 2  # within the small tenant, its two jobs share alike


def test_priorities_still_order_and_an_ended_job_leaves_its_lane(store):
    t0 = store.now()
    _rendering_job(store, "low", 3, at=t0, priority="low")
    _rendering_job(store, "gone", 3, at=t0 + 1)
    assert store.cancel("gone")
    assert _next(store, "normal").verdict == "skip"  # cancelled: nothing of it is bound
    assert store.redis.exists(store.keys.sched_waiting("gone")) == 0
    assert _next(store, "low").job_id == "low"
