"""One clock: the farm measures leases, delays and stalls on Redis's clock, never a host's.

Processes run under libfaketime (Debian's ``faketime``) with their clock shifted by minutes, as a
host with a broken NTP would be; they share a real Redis with the test, whose clock is true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from lipfarm.common.state import ChunkState, JobRecord, JobState
from tests.farm import REDIS_DB, prefixed_store, redis_url

PREFIX = "lipfarm-clock"
DB = REDIS_DB["clock"]
LEASE_S = 15.0

pytestmark = pytest.mark.skipif(shutil.which("faketime") is None, reason="needs Debian's faketime (.ci/run installs it)")

# Run in a process whose clock is shifted: connect to the test's store, do one thing, print JSON.
_CHILD = """
import json, logging, sys, time
logging.basicConfig(level=logging.WARNING)
from lipfarm.common.config import load_settings
from lipfarm.common.state import Keys, StateStore
from lipfarm.common.storage import LocalStorage
from lipfarm.scheduler.reconcile import Enqueue, check_clock, reconcile
url, prefix, action, job_id, folder = sys.argv[1:6]
store = StateStore.connect(url, prefix)
out = {"host_time": time.time(), "drift": store.clock_drift()}
if action == "claim":
    claim = store.claim(job_id, 0, worker="skewed-host", lease_s=%(lease)r, max_attempts=3)
    out["claim"] = claim.verdict.value
elif action == "reconcile":
    sent = []
    enqueue = Enqueue(plan=lambda *a: sent.append(["plan", *a]), render=lambda *a: sent.append(["render", *a]),
                      finalize=lambda *a: sent.append(["finalize", *a]))
    check_clock(store)  # what every recovery loop does first
    settings = load_settings({"LIPFARM_LEASE_S": "%(lease)s", "LIPFARM_STORAGE_URL": folder})
    report = reconcile(store=store, storage=LocalStorage(folder), settings=settings, enqueue=enqueue)
    out["requeued"], out["failed"], out["sent"] = report.requeued, report.failed, sent
print(json.dumps(out))
""" % {"lease": LEASE_S}


def _skewed(shift: str, action: str, job_id: str, folder) -> dict:
    env = {**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    done = subprocess.run(["faketime", "-f", shift, sys.executable, "-c", _CHILD, redis_url(DB), PREFIX, action,
                           job_id, str(folder)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"log": done.stderr}


@pytest.fixture()
def store():
    with prefixed_store(DB, PREFIX) as store:
        yield store


def _rendering_job(store, job_id: str) -> str:
    now = store.now()
    store.create_job(JobRecord(job_id=job_id, state=JobState.QUEUED, priority="normal", avatar="demo",
                               audio="a.wav", storage_url="file:///nowhere", created_at=now, updated_at=now))
    assert store.start_planning(job_id)
    assert store.start_rendering(job_id, [(0, 25), (25, 50)], output_key=f"jobs/{job_id}/output.mp4")
    return job_id


def test_a_host_minutes_ahead_does_not_take_back_a_live_chunk(store, tmp_path):
    job = _rendering_job(store, "ahead")
    claim = store.claim(job, 0, worker="healthy", lease_s=LEASE_S, max_attempts=3)
    assert claim.ok
    seen = _skewed("+300s", "reconcile", job, tmp_path)
    assert seen["drift"] > 250  # the child's clock really was five minutes ahead
    assert seen["requeued"] == [] and seen["failed"] == []
    chunk = store.chunk(job, 0)
    assert chunk.state == ChunkState.RUNNING and chunk.attempt == 1
    assert [(a.attempt, a.outcome) for a in store.attempts(job, 0)] == [(1, "")]  # still running
    assert "clock is +" in seen["log"]  # and the skewed host says so


def test_a_host_minutes_behind_claims_a_lease_that_ends_on_redis_time(store, tmp_path):
    job = _rendering_job(store, "behind")
    seen = _skewed("-300s", "claim", job, tmp_path)
    assert seen["claim"] == "ok" and seen["drift"] < -250
    deadline = store.redis.zscore(store.keys.leases(), f"{job}:0")
    assert abs(deadline - (store.now() + LEASE_S)) < 5  # not five minutes in the past
    assert store.expired_leases() == []
    # once the lease has run out on Redis's clock, a pass on a true host takes the chunk back
    assert store.expired_leases(now=store.now() + LEASE_S + 1) == [(job, 0)]


def test_the_store_clock_is_redis_time(store):
    seconds, micros = store.redis.time()
    assert abs(store.now() - (seconds + micros / 1e6)) < 1
    assert abs(store.clock_drift()) < 1  # this host's clock is Redis's host's clock
    assert time.time() > 0
