"""Every Redis key lipfarm writes, under one configurable prefix (rq's ``key_for``, in one place).

Only ``common.state`` uses them: the Lua scripts receive them as ``KEYS``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "lipfarm"

    def job(self, job_id: str) -> str:
        """Hash: the job's record (state, counts, priority, output, reason)."""
        return f"{self.prefix}:job:{job_id}"

    def chunk(self, job_id: str, index: int | str) -> str:
        """Hash: one chunk's record (state, attempt, token, worker, reason, progress)."""
        return f"{self.prefix}:chunk:{job_id}:{index}"

    def attempts(self, job_id: str, index: int | str) -> str:
        """List: a chunk's attempt log (or, for index "finalize", the finalizer's): JSON events."""
        return f"{self.prefix}:attempts:{job_id}:{index}"

    def jobs(self) -> str:
        """Sorted set: every job id, scored by creation time."""
        return f"{self.prefix}:jobs"

    def active(self) -> str:
        """Set: ids of jobs that are not finished, for the reconciler."""
        return f"{self.prefix}:jobs:active"

    def leases(self) -> str:
        """Sorted set: ``<job id>:<chunk>`` of running attempts, scored by lease deadline."""
        return f"{self.prefix}:leases"

    def finalize_leases(self) -> str:
        """Sorted set: ids of jobs being finalized, scored by their finalizer's lease deadline."""
        return f"{self.prefix}:finalize:leases"

    def unrecorded(self) -> str:
        """Set: ids of jobs that ended in Redis and whose end storage has not recorded yet."""
        return f"{self.prefix}:jobs:unrecorded"

    def playlist_lock(self, job_id: str) -> str:
        """String with a TTL: the process writing the job's HLS playlist now."""
        return f"{self.prefix}:playlist:{job_id}:lock"

    def playlist_dirty(self, job_id: str) -> str:
        """String: set when the playlist may be behind (a commit, an end); taken by its writer."""
        return f"{self.prefix}:playlist:{job_id}:dirty"

    def reconcile_turn(self) -> str:
        """String with a TTL: the process whose recovery pass this interval is (one per farm)."""
        return f"{self.prefix}:reconcile:turn"

    def repair_turn(self) -> str:
        """String with a TTL: the process whose turn it is to look for partly lost state."""
        return f"{self.prefix}:repair:turn"

    def rebuild_lock(self) -> str:
        """String with a TTL: the process rebuilding state from storage (one at a time)."""
        return f"{self.prefix}:rebuild:lock"

    def farm_id(self) -> str:
        """String: this farm's id, made once (``common.farm``); stamped in every job.json it submits."""
        return f"{self.prefix}:farm"

    def generation(self) -> str:
        """String: set by the last rebuild from storage; its absence means Redis lost its data."""
        return f"{self.prefix}:generation"

    @staticmethod
    def parse_lease_member(member: str) -> tuple[str, int]:
        job_id, _, index = member.rpartition(":")
        return job_id, int(index)

    # --- the HTTP API (common.state.tokens) ---------------------------------------------------------

    def api_token_names(self) -> str:
        """Hash: API token name -> the SHA-256 of the token (names are unique)."""
        return f"{self.prefix}:api:tokens"

    def api_token(self, digest: str) -> str:
        """Hash: one API token, by the SHA-256 of its value: id, name, read_only, created_at."""
        return f"{self.prefix}:api:token:{digest}"

    def api_secret(self) -> str:
        """String: the secret API processes sign output URLs with (made once, shared by all)."""
        return f"{self.prefix}:api:secret"

    def idempotency(self, scope: str, key_digest: str) -> str:
        """String with a TTL: a job submission's idempotency key -> its parameters' fingerprint and job."""
        return f"{self.prefix}:api:idempotency:{scope}:{key_digest}"

    # --- tenants (common.state.tenants) -------------------------------------------------------------

    def tenants(self) -> str:
        """Hash: tenant name -> its quotas and fair-share weight (JSON: max_queued, rps, weight)."""
        return f"{self.prefix}:tenants"

    def tenant_bucket(self, tenant: str) -> str:
        """Hash with a TTL: the tenant's request token bucket (tokens left, when it was last filled)."""
        return f"{self.prefix}:tenant:{tenant}:bucket"

    # --- farm-wide figures, exported by the API's /metrics (common.metrics) ---------------------------

    def metrics_totals(self) -> str:
        """Hash: farm-wide counters kept by the commit script (frames_committed, chunks_committed)."""
        return f"{self.prefix}:metrics:totals"

    def metrics_histogram(self, name: str) -> str:
        """Hash: one histogram observed where it happens (bucket bound -> count, "count", "sum")."""
        return f"{self.prefix}:metrics:hist:{name}"

    # --- fair share (the scripts build these names from the prefix: common.state.scripts PRELUDE) --

    def sched_waiting(self, job_id: str) -> str:
        """Sorted set: the job's chunks offered in its lane, waiting for a slot (score: the index)."""
        return f"{self.prefix}:sched:waiting:{job_id}"

    def sched_lane(self, priority: str, tenant: str) -> str:
        """Sorted set: a tenant's jobs with chunks waiting in a priority's lane, the least served
        first (score: running chunks x 1e12 + created at)."""
        return f"{self.prefix}:sched:lane:{priority}:{tenant}"

    def sched_tenants(self, priority: str) -> str:
        """Sorted set: tenants with jobs in a priority's lane (score: running chunks / weight)."""
        return f"{self.prefix}:sched:tenants:{priority}"

    def sched_running(self, priority: str) -> str:
        """Hash: tenant -> chunks of that priority running now."""
        return f"{self.prefix}:sched:running:{priority}"

    def tenant_weights(self) -> str:
        """Hash: tenant -> its weight in the fair share of workers (1 when absent)."""
        return f"{self.prefix}:sched:weights"

    # --- webhooks (common.webhooks) -----------------------------------------------------------------

    def webhook(self, job_id: str) -> str:
        """Hash: the job's webhook event and its delivery (event id, url, state, attempts, last answer)."""
        return f"{self.prefix}:webhook:{job_id}"

    def webhook_attempts(self, job_id: str) -> str:
        """List: each delivery attempt of the job's webhook event (JSON: attempt, at, status, error)."""
        return f"{self.prefix}:webhook:{job_id}:attempts"

    def webhooks_due(self) -> str:
        """Sorted set: jobs whose webhook event is pending, scored by when its next attempt is due
        (queued, a retry's time, or a sender's deadline); the recovery pass re-sends overdue ones."""
        return f"{self.prefix}:webhooks:due"
