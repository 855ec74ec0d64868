"""lipfarm's job and chunk state in Redis, behind one door: ``StateStore``.

- ``keys``: every Redis key, under one configurable prefix;
- ``records``: the typed records, the state enums, the allowed moves, the store's verdicts;
- ``scripts``: the Lua scripts that make each move one atomic step;
- ``store``: ``StateStore``, whose verbs are the only way to read or change that state;
- ``tokens``: ``TokenStore``, the HTTP API's tokens, URL-signing secret and idempotency keys;
- ``tenants``: ``TenantStore``, tenants' quotas, request buckets and fair-share weights.
"""

from lipfarm.common.state.keys import Keys
from lipfarm.common.state.records import (CHUNK_MOVES, DEFAULT_TENANT, JOB_MOVES, AttemptRecord, ChunkRecord,
                                          ChunkState, JobRecord, JobState, JobStatus, RunningChunk, Verdict,
                                          WebhookRecord)
from lipfarm.common.state.recovery import Damage, Lease, Stall, StalledJob
from lipfarm.common.state.store import Claim, Move, Resumed, Segment, StateStore
from lipfarm.common.state.tenants import Taken, Tenant, TenantStore
from lipfarm.common.state.tokens import ApiToken, IdempotencyClaim, TokenStore

__all__ = ["CHUNK_MOVES", "DEFAULT_TENANT", "JOB_MOVES", "Taken", "Tenant", "TenantStore", "AttemptRecord", "ChunkRecord", "ChunkState", "Claim", "JobRecord",
           "Damage", "JobState", "JobStatus", "Keys", "Lease", "Move", "Resumed", "RunningChunk", "Segment", "Stall", "StalledJob",
           "StateStore", "Verdict", "ApiToken", "IdempotencyClaim", "TokenStore", "WebhookRecord"]
