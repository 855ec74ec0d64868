"""The state store's scripts against the moves tables: every script, from every state.

Each chunk move is made by a Lua script; ``CHUNK_MOVES`` and ``JOB_MOVES`` say which moves are
allowed. Here every verb is run against a chunk set up in every state (with the caller's token
current or not, its lease live or expired, attempts left or not, under every job state), and each
move observed must be in the table. The other way round, every move the table lists must be made
by some script: the tables are exactly what the code does.
"""

from __future__ import annotations

import itertools

import pytest

from lipfarm.common.state import CHUNK_MOVES, JOB_MOVES, ChunkState, JobRecord, JobState, Segment, StateStore
from tests.farm import TEST_REDIS_DB, delete_prefixed, prefixed_store

PREFIX = "lipfarm-machine"
T0 = 1_800_000_000.0
LEASE = 30.0
MAX_ATTEMPTS = 3
JOB = "sm"
OWNER = "owner-token"
SEG = Segment("jobs/sm/chunks/00000-x.mp4", 10, "0" * 64)


@pytest.fixture(scope="module")
def store():
    with prefixed_store(TEST_REDIS_DB, PREFIX) as store:
        yield store


def _set_up(store: StateStore, job_state: JobState, chunk_state: ChunkState, *, lease_live: bool,
            attempt: int) -> None:
    """A one-chunk job in the given states, written directly (a test may; the code may not)."""
    delete_prefixed(store.redis, PREFIX)
    store.create_job(JobRecord(job_id=JOB, state=JobState.QUEUED, priority="normal", avatar="a", audio="a.wav",
                               storage_url="file:///x", created_at=T0, updated_at=T0))
    assert store.start_planning(JOB, now=T0)
    assert store.start_rendering(JOB, [(0, 25)], output_key="out", now=T0)
    keys = store.keys
    committed = chunk_state == ChunkState.COMMITTED
    store.redis.hset(keys.job(JOB), mapping={"state": job_state.value, "chunks_committed": int(committed),
                                             "frames_committed": 25 * committed})
    store.redis.hset(keys.chunk(JOB, 0), mapping={"state": chunk_state.value, "attempt": attempt, "spent": attempt,
                                                  "reopened": attempt - 1, "frames_done": 25 * committed,
                                                  "token": OWNER if chunk_state == ChunkState.RUNNING else ""})
    if chunk_state == ChunkState.RUNNING:
        store.redis.zadd(keys.leases(), {f"{JOB}:0": T0 + (LEASE if lease_live else -1)})
    if job_state == JobState.FINALIZING:
        store.redis.hset(keys.job(JOB), "finalizer_token", OWNER)
        store.redis.zadd(keys.finalize_leases(), {JOB: T0 + (LEASE if lease_live else -1)})


VERBS = {
    "claim": lambda s: s.claim(JOB, 0, worker="w2", now=T0, lease_s=LEASE, max_attempts=MAX_ATTEMPTS),
    "beat by owner": lambda s: s.beat(JOB, 0, OWNER, now=T0, lease_s=LEASE, frames_done=3),
    "beat by another": lambda s: s.beat(JOB, 0, "x", now=T0, lease_s=LEASE, frames_done=3),
    "commit by owner": lambda s: s.commit(JOB, 0, OWNER, frames=25, segment=SEG, now=T0),
    "commit by another": lambda s: s.commit(JOB, 0, "x", frames=25, segment=SEG, now=T0),
    "requeue": lambda s: s.requeue(JOB, 0, now=T0, reason="lease expired", max_attempts=MAX_ATTEMPTS),
    "retryable failure": lambda s: s.fail(JOB, 0, OWNER, reason="storage down", retryable=True, now=T0,
                                          max_attempts=MAX_ATTEMPTS),
    "final failure": lambda s: s.fail(JOB, 0, OWNER, reason="bad model", retryable=False, now=T0,
                                      max_attempts=MAX_ATTEMPTS),
    "release": lambda s: s.release(JOB, 0, OWNER, reason="worker shut down", now=T0),
    "reopen": lambda s: s.reopen(JOB, 0, reason="segment failed its check", now=T0, max_reopens=MAX_ATTEMPTS - 1),
    "take the finalizer": lambda s: s.take_finalizer(JOB, worker="f", now=T0, lease_s=LEASE),
    "finalizer done": lambda s: s.finish_done(JOB, OWNER, output_location="x", now=T0),
    "finalizer done, stale": lambda s: s.finish_done(JOB, "x", output_location="x", now=T0),
    "finalizer reopened": lambda s: s.release_finalizer(JOB, OWNER, outcome="reopened", reason="r", now=T0),
    "start planning": lambda s: s.start_planning(JOB, now=T0),
    "start rendering": lambda s: s.start_rendering(JOB, [(0, 25)], output_key="out", now=T0),
    "fail the job": lambda s: s.finish(JOB, JobState.FAILED, now=T0, reason="bad input"),
    "cancel": lambda s: s.cancel(JOB, now=T0),
    "resume": lambda s: s.resume(JOB, now=T0),
    "resume, never planned": lambda s: (s.redis.hset(s.keys.job(JOB), "chunks_total", 0), s.resume(JOB, now=T0)),
}


def _explore(store: StateStore) -> tuple[set, set]:
    """Run every verb from every set-up; returns the chunk and job moves observed (before, after)."""
    chunk_moves, job_moves = set(), set()
    job_states = list(JobState)
    for job_state, chunk_state, live, attempt, verb in itertools.product(
            job_states, ChunkState, (True, False), (1, MAX_ATTEMPTS), VERBS):
        _set_up(store, job_state, chunk_state, lease_live=live, attempt=attempt)
        VERBS[verb](store)
        after_chunk, after_job = store.chunk(JOB, 0).state, store.job(JOB).state
        if after_chunk != chunk_state:
            chunk_moves.add((chunk_state, after_chunk, verb))
        if after_job != job_state:
            job_moves.add((job_state, after_job, verb))
    return chunk_moves, job_moves


def _outside(table: dict, moves: set) -> list:
    return sorted((a.value, b.value, verb) for a, b, verb in moves if b not in table[a])


@pytest.fixture(scope="module")
def observed(store) -> tuple[set, set]:
    return _explore(store)


def test_every_script_keeps_to_the_moves_tables(observed):
    chunk_moves, job_moves = observed
    assert _outside(CHUNK_MOVES, chunk_moves) == []
    assert _outside(JOB_MOVES, job_moves) == []
    # and the tables list nothing no script does (a move to the same state is a takeover)
    for table, moves in ((CHUNK_MOVES, chunk_moves), (JOB_MOVES, job_moves)):
        made = {(a, b) for a, b, _ in moves}
        listed = {(a, b) for a, targets in table.items() for b in targets if a != b}
        assert listed - made == set()


def test_the_check_finds_a_move_the_table_does_not_list(observed):
    """The check above can fail: with commit removed from the table, commits are caught."""
    chunk_moves, _ = observed
    narrowed = {**CHUNK_MOVES, ChunkState.RUNNING: CHUNK_MOVES[ChunkState.RUNNING] - {ChunkState.COMMITTED}}
    assert ("running", "committed", "commit by owner") in _outside(narrowed, chunk_moves)
