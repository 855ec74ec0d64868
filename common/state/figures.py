"""Farm-wide figures kept in Redis for the API's ``/metrics``: histograms observed where things
happen, totals kept by the scripts, job counts. Mixed into ``StateStore``."""

from __future__ import annotations

from lipfarm.common.state.guard import guarded
from lipfarm.common.state.records import JobState

class FarmFigures:
    """The farm's figures (a part of ``StateStore``)."""

    # --- farm-wide figures, for the API's /metrics (common.metrics names and buckets them) ---------
    # Figures of the farm as a whole are kept here rather than in a process's memory: a job's first
    # commit and its publication happen in whichever worker gets there, and workers come and go
    # (scaled to zero), so these survive them and the API exports one series for the farm.

    @guarded
    def observe(self, name: str, value: float, *, buckets: tuple[float, ...]) -> None:
        """Add ``value`` to histogram ``name``."""
        self._scripts["observe"](keys=[self.keys.metrics_histogram(name)],
                                 args=[repr(float(value)), *[repr(float(b)) for b in buckets]])

    @guarded
    def first_commit(self, job_id: str, *, now: float | None = None, histogram: str, buckets: tuple[float, ...]) -> float | None:
        """Mark the job's first commit, once; the first caller also observes the seconds since the
        job was submitted into ``histogram`` and gets them back (later callers get None)."""
        now = self._at(now)
        delay = self._scripts["first_commit"](keys=[self.keys.job(job_id), self.keys.metrics_histogram(histogram)],
                                              args=[repr(now), *[repr(float(b)) for b in buckets]])
        return None if delay is None else float(delay)

    @guarded
    def histogram(self, name: str) -> dict[str, float]:
        """Histogram ``name`` as kept: per-bucket counts by bound ('+Inf' past the last), 'count', 'sum'."""
        return {field: float(value) for field, value in self.redis.hgetall(self.keys.metrics_histogram(name)).items()}

    @guarded
    def totals(self) -> dict[str, int]:
        """Farm-wide counters the commit script keeps: frames_committed, chunks_committed."""
        return {field: int(value) for field, value in self.redis.hgetall(self.keys.metrics_totals()).items()}

    @guarded
    def job_counts(self, *, batch: int = 1000) -> dict[str, int]:
        """Jobs by state: the unfinished read from the active set (the farm's current work), the
        ended from counters the scripts keep as jobs end, resume and leave Redis, so a scrape costs
        the same with 100,000 retained jobs as with ten. Counters missing (a Redis from before
        them) are made once by counting every job."""
        totals = self.redis.hgetall(self.keys.metrics_totals())
        if "jobs_counted" not in totals:
            self._count_ended_once(batch)
            totals = self.redis.hgetall(self.keys.metrics_totals())
        counts = {state.value: 0 for state in JobState}
        active = list(self.redis.smembers(self.keys.active()))
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in active:
                pipe.hget(self.keys.job(job_id), "state")
            for state in pipe.execute():
                if state in counts and not JobState(state).terminal:
                    counts[state] += 1
        for state in JobState:
            if state.terminal:
                counts[state.value] = max(0, int(totals.get(f"jobs_{state.value}", 0)))
        return counts

    def _count_ended_once(self, batch: int) -> None:
        counts = {state.value: 0 for state in JobState if state.terminal}
        total = self.redis.zcard(self.keys.jobs())
        for start in range(0, total, batch):
            ids = self.redis.zrange(self.keys.jobs(), start, start + batch - 1)
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(self.keys.job(job_id), "state")
                for state in pipe.execute():
                    if state in counts:
                        counts[state] += 1
        with self.redis.pipeline() as pipe:  # set, not added: a recount replaces whatever was there
            pipe.hset(self.keys.metrics_totals(), mapping={f"jobs_{s}": n for s, n in counts.items()})
            pipe.hset(self.keys.metrics_totals(), "jobs_counted", 1)
            pipe.execute()
