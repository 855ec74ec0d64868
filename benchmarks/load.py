"""``lipfarm bench --load``: the farm's scheduling at scale, by simulation.

Simulated workers (no rendering) drive the real state scripts in a real Redis, in a database of the
benchmark's own on the broker's server: every job is created, planned and offered in its lane as the
planner does it, and each worker, when its simulated chunk ends, commits it and takes the next slot
(``claim_next``, the fair-share claim), as a worker taking a render message does. Time in the
simulation is a virtual clock passed to the store as ``now`` (chunk durations are drawn from a
log-normal distribution around ``chunk_s``); the latencies and rates are wall-clock figures of the
real Redis round trips. It reports:

- claims and commits per second one Redis sustains (one client, back to back), and their p50/p99;
- Redis memory per job and per chunk, and the render messages per job the farm would send;
- the share of claims each tenant got against its weight, over the simulated minute after the farm
  filled up, and the slowdown of the shortest jobs against their time alone on the same workers;
- one recovery pass over all active jobs (``reconcile``), and the job list (`lipfarm jobs`, the
  API's ``GET /v1/jobs``: ``statuses`` of one page) at that many jobs.
"""

from __future__ import annotations

import heapq
import random
import statistics
import time
from dataclasses import dataclass

from lipfarm.benchmarks.farm import bench_database, release_database
from lipfarm.common import defaults
from lipfarm.common.config import Settings, load_settings
from lipfarm.common.state import JobRecord, JobState, Segment, StateStore
from lipfarm.common.storage import LocalStorage
from lipfarm.scheduler.reconcile import Enqueue, reconcile

LOAD_PREFIX = "lipfarm-bench-load"
_SEGMENT = Segment("jobs/x/chunks/0-t.mp4", 1, "0" * 64)


@dataclass(frozen=True)
class LoadConfig:
    workers: int = 200
    jobs: int = 1000
    chunks_min: int = 50
    chunks_max: int = 500
    tenants: tuple[float, ...] = (3.0, 1.0)  # their weights; jobs are dealt to them in turn
    chunk_s: float = 10.0  # the median simulated chunk time
    claims: int = 20_000  # how many claims to simulate (each with its commit)
    seed: int = 1


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _used_memory(store: StateStore) -> int:
    return int(store.redis.info("memory")["used_memory"])


def _fill(store: StateStore, config: LoadConfig, rng: random.Random, t0: float) -> dict[str, tuple[str, int]]:
    """The jobs, planned and offered in their lane: job id -> (tenant, chunks)."""
    jobs = {}
    for n in range(config.jobs):
        job_id, tenant = f"load{n:06d}", f"tenant{n % len(config.tenants)}"
        chunks = rng.randint(config.chunks_min, config.chunks_max)
        at = t0 + n * 1e-3  # submitted in this order
        store.create_job(JobRecord(job_id=job_id, state=JobState.QUEUED, priority="normal", avatar="sim",
                                   audio="sim.wav", storage_url="file:///nowhere", created_at=at, updated_at=at))
        store.redis.hset(store.keys.job(job_id), "tenant", tenant)
        store.start_planning(job_id, now=at)
        store.start_rendering(job_id, [(i, i + 1) for i in range(chunks)], output_key="o.mp4", now=at)
        store.offer(job_id, list(range(chunks)), now=at)
        jobs[job_id] = (tenant, chunks)
    return jobs


def run_load_bench(settings: Settings, config: LoadConfig = LoadConfig(), *, redis_db: int = 15) -> dict:
    """The figures of the module docstring, for ``config``."""
    url, client = bench_database(settings, redis_db)
    rng = random.Random(config.seed)
    try:
        store = StateStore.connect(url, LOAD_PREFIX)
        for n, weight in enumerate(config.tenants):
            store.set_tenant_weight(f"tenant{n}", weight)
        before, t0 = _used_memory(store), store.now()
        store.set_generation(now=t0)  # Redis has not lost its data: the recovery pass rebuilds nothing
        fill_started = time.perf_counter()
        jobs = _fill(store, config, rng, t0)
        fill_s = time.perf_counter() - fill_started
        chunks_total = sum(chunks for _, chunks in jobs.values())
        memory = _used_memory(store) - before
        figures = _simulate(store, config, jobs, rng, t0)
        figures.update(_reads_at_scale(store, settings, t0 + figures["simulated_s"]))
    finally:
        release_database(client)
    return {
        "config": {**config.__dict__, "tenants": list(config.tenants)},
        "jobs": config.jobs, "chunks": chunks_total, "fill_s": round(fill_s, 2),
        "redis_bytes_per_job": round(memory / config.jobs), "redis_bytes_per_chunk": round(memory / chunks_total),
        # planning sends one slot per chunk offered; plus the plan and the finalize message
        "messages_per_job": round(chunks_total / config.jobs + 2, 1),
        **figures,
    }


def _simulate(store: StateStore, config: LoadConfig, jobs: dict, rng: random.Random, t0: float) -> dict:
    sigma = 0.3
    finishing: list[tuple[float, int, object]] = []  # (simulated end, worker, claim)
    claim_ms, commit_ms, served, done_at, started_at = [], [], [], {}, {}
    lease_s, remaining = 10 * config.chunk_s, {job: chunks for job, (_, chunks) in jobs.items()}
    wall = time.perf_counter()

    def take(worker: int, now: float) -> None:
        began = time.perf_counter()
        claim = store.claim_next("normal", worker=f"sim{worker}", now=now, lease_s=lease_s, max_attempts=3)
        claim_ms.append(1000 * (time.perf_counter() - began))
        if claim.ok:
            started_at.setdefault(claim.job_id, now)
            served.append((now, jobs[claim.job_id][0]))
            heapq.heappush(finishing, (now + rng.lognormvariate(0, sigma) * config.chunk_s, worker, claim))

    for worker in range(config.workers):
        take(worker, t0)
    now = t0
    while finishing and len(claim_ms) < config.claims:
        now, worker, claim = heapq.heappop(finishing)
        began = time.perf_counter()
        store.commit(claim.job_id, claim.index, claim.token, frames=1, segment=_SEGMENT, now=now)
        commit_ms.append(1000 * (time.perf_counter() - began))
        remaining[claim.job_id] -= 1
        if remaining[claim.job_id] == 0:
            done_at[claim.job_id] = now
        take(worker, now)
    wall = time.perf_counter() - wall
    return {"workers": config.workers, "claims": len(claim_ms), "commits": len(commit_ms),
            "claims_and_commits_per_s": round((len(claim_ms) + len(commit_ms)) / wall),
            "claim_ms": {"p50": round(_percentile(claim_ms, 0.5), 3), "p99": round(_percentile(claim_ms, 0.99), 3)},
            "commit_ms": {"p50": round(_percentile(commit_ms, 0.5), 3),
                          "p99": round(_percentile(commit_ms, 0.99), 3)},
            "simulated_s": round(now - t0, 1),
            "tenant_share": _tenant_share(served, config, t0),
            "short_job_slowdown": _short_job_slowdown(jobs, started_at, done_at, config, t0)}


def _tenant_share(served: list[tuple[float, str]], config: LoadConfig, t0: float) -> dict:
    """Each tenant's share of the claims in the minute after the first chunks ended, against its
    weight's share (every tenant is busy throughout: their jobs outlast the run)."""
    window = [tenant for at, tenant in served if t0 + 2 * config.chunk_s <= at < t0 + 2 * config.chunk_s + 60]
    total = sum(config.tenants)
    return {f"tenant{n}": {"weight_share": round(w / total, 3),
                           "share": round(window.count(f"tenant{n}") / max(1, len(window)), 3)}
            for n, w in enumerate(config.tenants)}


def _short_job_slowdown(jobs: dict, started_at: dict, done_at: dict, config: LoadConfig, t0: float) -> dict | None:
    """The jobs that finished, shortest tenth: time from submission to their last chunk, against the
    time alone on the same workers (its chunks spread over as many workers as it has chunks)."""
    finished = sorted((jobs[job][1], done_at[job] - t0) for job in done_at)
    if not finished:
        return None
    shortest = finished[:max(1, len(finished) // 10)]
    ratios = [took / (config.chunk_s * max(1.0, chunks / config.workers)) for chunks, took in shortest]
    return {"jobs": len(shortest), "median": round(statistics.median(ratios), 2), "max": round(max(ratios), 2)}


def _reads_at_scale(store: StateStore, settings: Settings, now: float) -> dict:
    """The recovery pass over every active job, and one page of the job list, timed."""
    sent = []
    enqueue = Enqueue(plan=lambda *a: sent.append(a), render=lambda *a: sent.append(a),
                      finalize=lambda *a: sent.append(a), waiting_renders=lambda: 1)  # slots wait in the broker
    pass_settings = load_settings({"LIPFARM_JOB_RETENTION_S": "0", "LIPFARM_LEASE_S": str(1e9)})
    began = time.perf_counter()
    reconcile(store=store, storage=LocalStorage("/nonexistent-lipfarm-bench"), settings=pass_settings,
              enqueue=enqueue, now=now)
    pass_s = time.perf_counter() - began
    began = time.perf_counter()
    page = store.statuses(store.job_ids(defaults.API_PAGE_JOBS), now=now)
    list_s = time.perf_counter() - began
    return {"recovery_pass_s": round(pass_s, 3), "recovery_messages": len(sent),
            "job_list_s": round(list_s, 3), "job_list_jobs": len(page)}

