"""Job and chunk state in real Redis: claims, fencing, finalize-once, attempts, cancel, reconcile."""

from __future__ import annotations

import threading

import pytest

from lipfarm.common.config import load_settings
from lipfarm.common.errors import NotFoundError
from lipfarm.common.state import ChunkState, JobRecord, JobState, Segment, StateStore, Verdict
from lipfarm.common.storage import LocalStorage
from lipfarm.scheduler.reconcile import Enqueue, reconcile
from tests.farm import TEST_REDIS_DB, prefixed_store

PREFIX = "lipfarm-unit"
T0 = 1_800_000_000.0
LEASE = 30.0
SEG = Segment("jobs/j/chunks/00000-t.mp4", 1000, "ab" * 32)


@pytest.fixture()
def store():
    with prefixed_store(TEST_REDIS_DB, PREFIX) as store:
        yield store


def make_job(store: StateStore, job_id="j1", chunks=3, frames=25) -> str:
    store.create_job(JobRecord(job_id=job_id, state=JobState.QUEUED, priority="normal", avatar="demo",
                               audio="a.wav", storage_url="file:///nowhere", created_at=T0, updated_at=T0))
    assert store.start_planning(job_id, now=T0)
    assert store.start_rendering(job_id, [(i * frames, (i + 1) * frames) for i in range(chunks)],
                                 output_key=f"jobs/{job_id}/output.mp4", now=T0)
    return job_id


def claim(store, job_id, index, now=T0, worker="w1"):
    return store.claim(job_id, index, worker=worker, now=now, lease_s=LEASE, max_attempts=3)


def test_commits_complete_the_job_and_ask_for_the_finalizer_once(store):
    job = make_job(store)
    verdicts = []
    for index in range(3):
        c = claim(store, job, index)
        assert c.ok and c.attempt == 1
        verdicts.append(store.commit(job, index, c.token, frames=25, segment=SEG, now=T0 + 1))
    assert verdicts == [Verdict.OK, Verdict.OK, Verdict.COMPLETE]
    record = store.job(job)
    assert record.chunks_committed == 3 and record.frames_committed == 75
    assert store.commit(job, 2, "whatever", frames=25, segment=SEG, now=T0 + 2) == Verdict.DUPLICATE


def test_only_the_current_attempt_may_commit(store):
    job = make_job(store, chunks=1)
    first = claim(store, job, 0)
    assert claim(store, job, 0, now=T0 + 1).verdict == Verdict.SKIP  # the lease is live
    second = claim(store, job, 0, now=T0 + LEASE + 1)  # the first attempt's lease expired: taken over
    assert second.ok and second.attempt == 2 and second.token != first.token
    assert store.commit(job, 0, first.token, frames=25, segment=SEG, now=T0 + 40) == Verdict.STALE
    assert store.beat(job, 0, first.token, now=T0 + 40, lease_s=LEASE, frames_done=5) == Verdict.LOST
    assert store.commit(job, 0, second.token, frames=25, segment=SEG, now=T0 + 41) == Verdict.COMPLETE
    assert store.commit(job, 0, second.token, frames=25, segment=SEG, now=T0 + 42) == Verdict.DUPLICATE


def test_concurrent_completing_commits_ask_for_one_finalizer(store):
    for round_ in range(10):
        job = make_job(store, job_id=f"race{round_}", chunks=4)
        tokens = [claim(store, job, i).token for i in range(4)]
        results, barrier = [], threading.Barrier(4)

        def commit(i, job=job, tokens=tokens, results=results, barrier=barrier):
            barrier.wait()
            results.append(store.commit(job, i, tokens[i], frames=25, segment=SEG, now=T0 + 1))

        threads = [threading.Thread(target=commit, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [Verdict.COMPLETE, Verdict.OK, Verdict.OK, Verdict.OK]


def test_heartbeat_extends_the_lease_and_reports_progress(store):
    job = make_job(store, chunks=1)
    c = claim(store, job, 0)
    assert store.beat(job, 0, c.token, now=T0 + 20, lease_s=LEASE, frames_done=12, peak_rss=10**8) == Verdict.OK
    assert store.expired_leases(T0 + LEASE + 1) == []  # renewed to T0 + 50
    assert store.expired_leases(T0 + 51) == [(job, 0)]
    status = store.status(job, now=T0 + 21)
    assert status.frames_done == 12 and status.chunks == {"running": 1}
    assert status.eta_s == pytest.approx((25 - 12) / (12 / 21))


def test_a_chunk_out_of_attempts_fails_its_job_with_the_reason(store):
    job = make_job(store, chunks=2)
    now, delays = T0, []
    for attempt in range(1, 4):
        c = claim(store, job, 0, now=now)
        assert c.ok and c.attempt == attempt
        now += LEASE + 1
        move = store.requeue(job, 0, now=now, reason="lease expired", max_attempts=3)
        assert move.verdict == ("requeued" if attempt < 3 else "failed")
        delays.append(move.delay_s)
        now += move.delay_s
    assert delays == [0.0, 5.0, 0.0]  # a lost worker's chunk goes at once the first time only
    record = store.job(job)
    assert record.state == JobState.FAILED
    assert record.reason.startswith("chunk 0 (frames 0-24) failed: attempt 3: lease expired")
    assert store.chunk(job, 0).state == ChunkState.FAILED
    assert claim(store, job, 1, now=now).verdict == Verdict.SKIP


def test_worker_reported_failures(store):
    job = make_job(store, chunks=2)
    c = claim(store, job, 0)
    assert store.fail(job, 0, c.token, reason="storage down", retryable=True, now=T0 + 1,
                      max_attempts=3).verdict == Verdict.REQUEUED
    assert store.chunk(job, 0).reason == "attempt 1: storage down"
    c = claim(store, job, 0, now=T0 + 6)
    assert store.fail(job, 0, c.token, reason="model.onnx: not an ONNX model", retryable=False,
                      now=T0 + 3, max_attempts=3).verdict == Verdict.FAILED
    assert store.job(job).reason == "chunk 0 (frames 0-24) failed: model.onnx: not an ONNX model"


def test_a_requeued_chunk_waits_out_its_retry_delay_whatever_message_comes(store):
    """A copy of the render message redelivered from a dead process must not start the next attempt
    early: the claim is told to come back when the delay has run out (and by how long)."""
    job = make_job(store, chunks=1)
    c = claim(store, job, 0)
    move = store.fail(job, 0, c.token, reason="storage down", retryable=True, now=T0 + 1, max_attempts=3)
    assert (move.verdict, move.spent, move.delay_s) == (Verdict.REQUEUED, 1, 5.0)
    early = claim(store, job, 0, now=T0 + 3)
    assert early.verdict == Verdict.LATER and float(early.detail) == 3.0
    assert store.chunk(job, 0).state == ChunkState.QUEUED and store.chunk(job, 0).spent == 1  # nothing spent
    second = claim(store, job, 0, now=T0 + 6)
    assert second.ok and second.attempt == 2
    move = store.requeue(job, 0, now=T0 + 7, reason="worker process h:9 died", max_attempts=3,
                         dead_token=second.token)
    assert (move.verdict, move.delay_s) == (Verdict.REQUEUED, 5.0)  # lost twice: a poison chunk waits too
    assert claim(store, job, 0, now=T0 + 11).verdict == Verdict.LATER
    assert claim(store, job, 0, now=T0 + 12).ok


def test_release_does_not_spend_the_attempt(store):
    job = make_job(store, chunks=1)
    c = claim(store, job, 0)
    assert store.release(job, 0, c.token, reason="worker shut down", now=T0 + 1) == Verdict.RELEASED
    assert store.chunk(job, 0).spent == 0
    again = claim(store, job, 0, now=T0 + 2, worker="w2")
    assert again.attempt == 2 and store.chunk(job, 0).spent == 1
    assert store.commit(job, 0, again.token, frames=25, segment=SEG, now=T0 + 3) == Verdict.COMPLETE
    log = store.attempts(job, 0)
    assert [(a.attempt, a.worker, a.started_at, a.ended_at, a.outcome) for a in log] == [
        (1, "w1", T0, T0 + 1, "released"), (2, "w2", T0 + 2, T0 + 3, "committed")]
    assert log[0].reason == "worker shut down"


def test_the_attempt_log_records_takeovers_and_failures(store):
    job = make_job(store, chunks=1)
    first = claim(store, job, 0, worker="w1")
    second = claim(store, job, 0, now=T0 + LEASE + 1, worker="w2")  # w1's lease ran out: taken over
    assert store.fail(job, 0, second.token, reason="storage down", retryable=True, now=T0 + 40,
                      max_attempts=3).verdict == Verdict.REQUEUED
    third = claim(store, job, 0, now=T0 + 50, worker="w1")  # after its retry delay (2 spent: 10 s)
    assert store.fail(job, 0, third.token, reason="bad model", retryable=False, now=T0 + 52,
                      max_attempts=3).verdict == Verdict.FAILED
    assert first.attempt == 1 and third.attempt == 3
    assert [(a.attempt, a.worker, a.outcome, a.reason) for a in store.attempts(job, 0)] == [
        (1, "w1", "expired", "lease expired: taken over"), (2, "w2", "requeued", "storage down"),
        (3, "w1", "failed", "bad model")]


def test_cancel_stops_every_chunk_at_once_and_refuses_commits(store):
    job = make_job(store, chunks=3)
    running = claim(store, job, 0)
    assert store.cancel(job, now=T0 + 1)
    assert store.job(job).state == JobState.CANCELLED
    assert [c.state for c in store.chunks(job)] == [ChunkState.CANCELLED] * 3  # nothing left running
    assert [(a.outcome, a.ended_at) for a in store.attempts(job, 0)] == [("stopped", T0 + 1)]
    assert store.expired_leases(T0 + 10 * LEASE) == []
    assert not store.is_current(job, 0, running.token)
    assert store.beat(job, 0, running.token, now=T0 + 2, lease_s=LEASE, frames_done=1) == Verdict.LOST
    assert store.commit(job, 0, running.token, frames=25, segment=SEG, now=T0 + 3) == Verdict.STALE
    assert claim(store, job, 1, now=T0 + 3).verdict == Verdict.SKIP
    assert not store.cancel(job, now=T0 + 4)  # already ended
    assert store.unrecorded_job_ids() == [job]  # its end waits to be recorded in storage


def test_job_moves_follow_the_table(store):
    job = make_job(store, chunks=1)
    assert not store.start_planning(job, now=T0)  # rendering -> planning is not a move
    assert store.take_finalizer(job, worker="f", now=T0, lease_s=LEASE).verdict == Verdict.SKIP  # not complete
    c = claim(store, job, 0)
    assert store.commit(job, 0, c.token, frames=25, segment=SEG, now=T0) == Verdict.COMPLETE
    final = store.take_finalizer(job, worker="f", now=T0, lease_s=LEASE)
    assert final.ok and store.job(job).state == JobState.FINALIZING
    assert store.finish_done(job, "not-the-token", output_location="s3://x", now=T0 + 1) == Verdict.STALE
    assert store.finish_done(job, final.token, output_location="s3://x", now=T0 + 1) == Verdict.OK
    assert not store.start_rendering(job, [(0, 25)], output_key="x", now=T0 + 2)
    assert not store.finish(job, JobState.FAILED, now=T0 + 2, reason="too late")
    assert store.job(job).finished_at == T0 + 1 and store.job(job).output_location == "s3://x"
    assert job not in store.active_job_ids()
    with pytest.raises(NotFoundError, match="unknown job 'nope'"):
        store.finish("nope", JobState.FAILED, now=T0, reason="x")


def test_one_finalizer_at_a_time_and_a_dead_one_is_replaced(store):
    job = make_job(store, chunks=1)
    c = claim(store, job, 0)
    store.commit(job, 0, c.token, frames=25, segment=SEG, now=T0)
    first = store.take_finalizer(job, worker="h:1", worker_started="7", now=T0, lease_s=LEASE)
    second = store.take_finalizer(job, worker="h:2", now=T0 + 1, lease_s=LEASE)
    assert first.ok and second.verdict == Verdict.SKIP
    assert (second.owner, second.owner_started, second.owner_token) == ("h:1", "7", first.token)
    assert store.beat_finalizer(job, first.token, now=T0 + 20, lease_s=LEASE) == Verdict.OK
    assert not store.take_finalizer(job, worker="h:2", now=T0 + 40, lease_s=LEASE).ok  # renewed to T0 + 50
    taken = store.take_finalizer(job, worker="h:2", now=T0 + 41, lease_s=LEASE, take_over=first.token)
    assert taken.ok  # h:1's process is known dead: taken over before its lease ran out
    assert store.beat_finalizer(job, first.token, now=T0 + 42, lease_s=LEASE) == Verdict.LOST
    assert store.finish_done(job, taken.token, output_location="x", now=T0 + 43) == Verdict.OK
    assert [(a.worker, a.outcome) for a in store.finalize_attempts(job)] == [("h:1", "expired"), ("h:2", "done")]


def test_a_reopened_chunk_renders_again_with_a_fresh_count(store):
    job = make_job(store, chunks=2)
    for i in range(2):
        c = claim(store, job, i)
        store.commit(job, i, c.token, frames=25, segment=SEG, now=T0)
    final = store.take_finalizer(job, worker="f", now=T0, lease_s=LEASE)
    assert store.reopen(job, 1, reason="segment failed its check", now=T0 + 1, max_reopens=2) == Verdict.REQUEUED
    record = store.job(job)
    assert record.state == JobState.RENDERING and record.chunks_committed == 1 and record.frames_committed == 25
    assert store.chunk(job, 1).spent == 0 and store.chunk(job, 1).state == ChunkState.QUEUED
    assert store.finish_done(job, final.token, output_location="x", now=T0 + 2) == Verdict.REFUSED
    again = claim(store, job, 1, now=T0 + 3)
    assert again.attempt == 2 and store.commit(job, 1, again.token, frames=25, segment=SEG,
                                               now=T0 + 4) == Verdict.COMPLETE
    for n in range(2):  # storage that keeps losing the segment fails the job in the end
        store.take_finalizer(job, worker="f", now=T0 + 5 + n, lease_s=LEASE)
        verdict = store.reopen(job, 1, reason="segment failed its check", now=T0 + 5 + n, max_reopens=2)
        if verdict == Verdict.REQUEUED:
            c = claim(store, job, 1, now=T0 + 5 + n)
            store.commit(job, 1, c.token, frames=25, segment=SEG, now=T0 + 5 + n)
    assert verdict == Verdict.FAILED and store.job(job).state == JobState.FAILED
    assert "storage keeps losing its segment" in store.job(job).reason


class Recorder(Enqueue):
    def __init__(self):
        self.calls = []
        super().__init__(plan=lambda *a: self.calls.append(("plan", *a)),
                         render=lambda *a: self.calls.append(("render", *a)),
                         finalize=lambda *a: self.calls.append(("finalize", *a)))


def _failures(reason: str) -> float:
    from lipfarm.common import metrics

    return metrics.CHUNK_FAILURES.labels(reason=reason)._value.get()


def test_reconcile_requeues_lost_attempts_and_lost_finalizers(store, tmp_path):
    settings = load_settings({"LIPFARM_LEASE_S": str(LEASE), "LIPFARM_MAX_ATTEMPTS": "3"})
    storage = LocalStorage(tmp_path)
    job = make_job(store, chunks=2)
    lost = claim(store, job, 0)
    done = claim(store, job, 1)
    assert store.commit(job, 1, done.token, frames=25, segment=SEG, now=T0 + 1) == Verdict.OK
    enqueue = Recorder()
    lost_before = _failures("lost")
    report = reconcile(store=store, storage=storage, settings=settings, now=T0 + 5, enqueue=enqueue)
    assert enqueue.calls == [] and report.requeued == []  # nothing is late yet
    report = reconcile(store=store, storage=storage, settings=settings, now=T0 + LEASE + 1, enqueue=enqueue)
    assert report.requeued == [f"{job}:0"] and enqueue.calls == [("render", job, 0, "normal", "0-24", 0.0)]
    assert _failures("lost") == lost_before + 1  # counted once, as a lost worker's attempt
    assert store.chunk(job, 0).reason == "attempt 1: lease expired: worker lost or stalled"
    again = claim(store, job, 0, now=T0 + 40)
    assert store.commit(job, 0, lost.token, frames=25, segment=SEG, now=T0 + 41) == Verdict.STALE
    assert store.commit(job, 0, again.token, frames=25, segment=SEG, now=T0 + 42) == Verdict.COMPLETE
    enqueue.calls.clear()  # the committer should have enqueued the finalizer; say its message was lost
    reconcile(store=store, storage=storage, settings=settings, now=T0 + 43, enqueue=enqueue)
    assert enqueue.calls == []  # within the grace period: the finalizer may be on its way
    reconcile(store=store, storage=storage, settings=settings, now=T0 + 43 + 2 * LEASE + 1, enqueue=enqueue)
    assert enqueue.calls == [("finalize", job, "normal")]


def test_status_shows_a_stuck_job_as_stuck(store):
    """Defect 10: a dead attempt's frames counted as progress, the estimate stood still, dead workers
    were listed. Now: live frames only, each running chunk's heartbeat age, expired leases named."""
    job = make_job(store, chunks=3)
    live, dead = claim(store, job, 0, worker="h:1"), claim(store, job, 1, worker="h:2")
    store.beat(job, 0, live.token, now=T0 + 10, lease_s=LEASE, frames_done=10)
    store.beat(job, 1, dead.token, now=T0 + 10, lease_s=LEASE, frames_done=20)  # h:2 dies after this beat
    early = store.status(job, now=T0 + 11)
    assert early.frames_done == 30 and early.workers == ["h:1", "h:2"]
    store.beat(job, 0, live.token, now=T0 + 40, lease_s=LEASE, frames_done=15)
    status = store.status(job, now=T0 + 45)  # h:2's lease ran out at T0 + 40
    assert status.frames_done == 15  # the dead attempt's frames are not progress
    assert status.workers == ["h:1"]
    running = {c.index: c for c in status.running}
    assert running[0].worker == "h:1" and running[0].heartbeat_age_s == 5 and not running[0].lease_expired
    assert running[1].worker == "h:2" and running[1].heartbeat_age_s == 35 and running[1].lease_expired
    store.beat(job, 0, live.token, now=T0 + 80, lease_s=LEASE, frames_done=15)  # alive, but no progress
    later = store.status(job, now=T0 + 85)
    assert later.frames_done == 15 and later.eta_s > status.eta_s > 0  # nothing progresses: the estimate grows


def test_ended_jobs_leave_redis_after_their_retention_and_come_back_when_asked(store, tmp_path):
    """Redis holds the live farm, not its history: an ended job whose end storage holds leaves it
    after LIPFARM_JOB_RETENTION_S, all its keys at once, and comes back from ended.json when asked
    for. A job still in the outbox, unfinished, recently ended or with a webhook pending stays."""
    from lipfarm.job.endings import close_job
    from lipfarm.job.jobfiles import JobFiles

    storage = LocalStorage(tmp_path)
    store.set_generation(now=T0)
    jobs = {name: make_job(store, name, chunks=2) for name in ("old", "outbox", "running", "recent", "hooked")}
    running = claim(store, "running", 0)
    for name, ended_at in (("old", T0 + 1), ("outbox", T0 + 1), ("recent", T0 + 3000), ("hooked", T0 + 1)):
        assert store.cancel(name, now=ended_at)
        if name != "outbox":
            assert close_job(store, storage, name)  # its end recorded in storage
    store.open_webhook("hooked", event_id="hooked:cancelled:1", event_type="job.cancelled",
                       url="http://127.0.0.1:9/hook", now=T0 + 2)
    before = {key for key in store.redis.scan_iter(f"{PREFIX}:*") if ":old" not in key}

    assert store.forget_ended(ended_before=T0 + 100) == ["old"]
    assert not store.exists("old") and {key for key in store.redis.scan_iter(f"{PREFIX}:*")} == before
    assert store.chunk("running", 0).token == running.token  # the others untouched
    with pytest.raises(NotFoundError, match="unknown job 'old'"):
        store.job("old")

    store.recall_ended_from(lambda job_id: JobFiles(storage, job_id).ended())
    back = store.status("old", now=T0 + 200)
    assert back.state == JobState.CANCELLED and back.finished_at == T0 + 1
    assert [c.state for c in store.chunks("old")] == [ChunkState.CANCELLED] * 2
    assert "old" in store.redis.zrange(store.keys.jobs(), 0, -1)

    settings = load_settings({"LIPFARM_JOB_RETENTION_S": "3600"})
    report = reconcile(store=store, storage=storage, settings=settings, now=T0 + 3602, enqueue=Recorder())
    assert sorted(report.forgotten) == ["old", "outbox"]  # the outbox's end recorded first, in the same pass
    assert sorted(store.redis.zrange(store.keys.jobs(), 0, -1)) == sorted(set(jobs) - {"old", "outbox"})
    assert reconcile(store=store, storage=storage, settings=load_settings({"LIPFARM_JOB_RETENTION_S": "0"}),
                     now=T0 + 10 ** 6, enqueue=Recorder()).forgotten == []  # 0: kept for ever


def test_statuses_of_many_jobs_equal_each_jobs_status(store):
    jobs = [make_job(store, f"s{i}", chunks=i + 1) for i in range(4)]
    c = claim(store, jobs[2], 1)
    store.beat(jobs[2], 1, c.token, now=T0 + 3, lease_s=LEASE, frames_done=7)
    assert store.cancel(jobs[3], now=T0 + 4)
    many = store.statuses([*jobs, "not-a-job"], now=T0 + 5)
    assert [s.job_id for s in many] == jobs
    assert many == [store.status(job_id, now=T0 + 5) for job_id in jobs]


def test_reconcile_repairs_a_job_left_out_of_the_active_set_and_leaves_one_it_cannot_restore(store, tmp_path):
    """Partial loss (a failover, a key deleted by hand): the recovery pass reads only the active
    set, so a running job missing from it would never be looked at again."""
    settings = load_settings({"LIPFARM_LEASE_S": str(LEASE)})
    job = make_job(store, "orphan", chunks=2)
    store.set_generation(now=T0)
    store.redis.srem(store.keys.active(), job)
    lost = make_job(store, "lost", chunks=1)
    store.redis.delete(store.keys.job(lost))  # its record gone, and storage has nothing of it
    report = reconcile(store=store, storage=LocalStorage(tmp_path), settings=settings, now=T0 + 1, enqueue=Recorder())
    assert report.repaired == ["orphan: not active"]
    assert job in store.active_job_ids()
    again = reconcile(store=store, storage=LocalStorage(tmp_path), settings=settings, now=T0 + 2, enqueue=Recorder())
    assert again.repaired == []  # once a minute across the farm, not every pass


def test_reconcile_drops_token_names_whose_token_was_lost(store, tmp_path):
    from lipfarm.common.state import TokenStore

    tokens = TokenStore.of(store)
    kept, _ = tokens.create(name="kept", read_only=False, now=T0)
    lost, _ = tokens.create(name="lost", read_only=True, now=T0)
    digest = store.redis.hget(store.keys.api_token_names(), "lost")
    store.redis.delete(store.keys.api_token(digest))
    store.set_generation(now=T0)
    report = reconcile(store=store, storage=LocalStorage(tmp_path), settings=load_settings(), now=T0 + 1,
                       enqueue=Recorder())
    assert report.repaired == ["token lost: lost"]
    assert [t.name for t in tokens.list()] == ["kept"] and store.redis.hkeys(store.keys.api_token_names()) == ["kept"]


def _counted_by_hand(store) -> dict[str, int]:
    counts = {state.value: 0 for state in JobState}
    for job_id in store.redis.zrange(store.keys.jobs(), 0, -1):
        state = store.redis.hget(store.keys.job(job_id), "state")
        if state:
            counts[state] += 1
    return counts


def test_job_counts_are_kept_as_jobs_move_and_equal_a_recount(store, tmp_path):
    """/metrics reads these: the ended are counted as they end, resume and leave Redis."""
    from lipfarm.job.endings import close_job
    from lipfarm.job.jobfiles import JobFiles

    storage = LocalStorage(tmp_path)
    assert store.job_counts() == _counted_by_hand(store)  # the first scrape counts once
    jobs = [make_job(store, f"c{i}", chunks=1) for i in range(6)]
    store.cancel(jobs[0], now=T0 + 1)
    store.finish(jobs[1], JobState.FAILED, now=T0 + 1, reason="broken")
    done = claim(store, jobs[2], 0)
    store.commit(jobs[2], 0, done.token, frames=25, segment=SEG, now=T0 + 2)
    final = store.take_finalizer(jobs[2], worker="f", now=T0 + 3, lease_s=LEASE)
    assert store.finish_done(jobs[2], final.token, output_location="x", now=T0 + 4) == Verdict.OK
    store.cancel(jobs[3], now=T0 + 1)
    assert store.resume(jobs[3], now=T0 + 5).verdict == Verdict.OK  # back to rendering: uncounted as ended
    assert store.job_counts() == _counted_by_hand(store)
    assert close_job(store, storage, jobs[0])
    assert store.forget_ended(ended_before=T0 + 100) == [jobs[0]]  # recorded, then forgotten
    assert store.job_counts() == _counted_by_hand(store)
    store.recall_ended_from(lambda job_id: JobFiles(storage, job_id).ended())
    store.job(jobs[0])  # asked for: back from storage, counted again
    counts = store.job_counts()
    assert counts == _counted_by_hand(store) and counts["cancelled"] == 1 and counts["done"] == 1


def test_a_tenants_job_limit_is_checked_and_recorded_in_one_step(store):
    """Submissions racing each other cannot pass a tenant's max_queued together."""
    from concurrent.futures import ThreadPoolExecutor

    from lipfarm.common.errors import QuotaError

    make_job(store, "theirs")  # another tenant's (default) job does not count
    def submit(n: int) -> bool:
        record = JobRecord(job_id=f"q{n}", state=JobState.QUEUED, priority="normal", avatar="demo", audio="a.wav",
                           storage_url="file:///nowhere", created_at=T0, updated_at=T0, tenant="acme")
        try:
            store.create_job(record, max_unfinished=3)
            return True
        except QuotaError as exc:
            assert (exc.tenant, exc.limit, exc.unfinished) == ("acme", 3, 3)
            return False

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(submit, range(16)))
    assert made.count(True) == 3
    assert sorted(j for j in store.active_job_ids() if j.startswith("q")) == sorted(
        f"q{n}" for n, ok in enumerate(made) if ok)
    assert store.job("q" + str(made.index(True))).tenant == "acme"
