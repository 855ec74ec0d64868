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

    def reconcile_turn(self) -> str:
        """String with a TTL: the process whose recovery pass this interval is (one per farm)."""
        return f"{self.prefix}:reconcile:turn"

    def rebuild_lock(self) -> str:
        """String with a TTL: the process rebuilding state from storage (one at a time)."""
        return f"{self.prefix}:rebuild:lock"

    def generation(self) -> str:
        """String: set by the last rebuild from storage; its absence means Redis lost its data."""
        return f"{self.prefix}:generation"

    @staticmethod
    def parse_lease_member(member: str) -> tuple[str, int]:
        job_id, _, index = member.rpartition(":")
        return job_id, int(index)
