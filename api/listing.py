"""Pages of the job list, newest first, with an opaque cursor.

The state store lists job ids newest first (``job_ids``). A cursor holds the last job a page showed
and its position then; the next page starts right after that job, wherever newer submissions have
pushed it since, so a page never repeats or skips a job because others arrived meanwhile. A state
filter, and the tenant filter every token but an admin's gets, read each job's record until the page
is full, looking through at most ``API_LIST_SCAN_JOBS`` jobs per page (a page may then be short, with
a cursor to go on from).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from lipfarm.common import defaults
from lipfarm.common.errors import InputError, NotFoundError
from lipfarm.common.state import JobState, StateStore

_LOOKAHEAD = 1000  # how far newer jobs may have pushed the cursor's job down the list


@dataclass(frozen=True)
class Page:
    job_ids: list[str]
    next_cursor: str | None


def encode_cursor(position: int, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([position, job_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        position, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(position, int) and 0 <= position < 10**9 and isinstance(job_id, str):
            return position, job_id
    except (ValueError, TypeError):
        pass
    raise InputError("not a cursor this API gave", field="cursor", found=repr(cursor[:80]))


def _start(ids: list[str], cursor: str | None) -> int:
    """Index in ``ids`` of the first job after the cursor's."""
    if not cursor:
        return 0
    position, last_id = decode_cursor(cursor)
    try:
        return ids.index(last_id) + 1
    except ValueError:
        return position + 1  # the job is gone (a flushed Redis being rebuilt): go on by position


def page_of_jobs(store: StateStore, *, state: JobState | None, limit: int, cursor: str | None,
                 tenant: str | None = None) -> Page:
    """The ids of one page of jobs (of ``state`` and ``tenant``, where given), and the next page's cursor."""
    position = decode_cursor(cursor)[0] if cursor else 0
    filtered = state is not None or tenant is not None
    scan = defaults.API_LIST_SCAN_JOBS if filtered else limit
    ids = store.job_ids(position + _LOOKAHEAD + scan + 1)
    start = _start(ids, cursor)
    found: list[str] = []
    index = start
    for index in range(start, min(len(ids), start + scan)):
        if not filtered or _matches(store, ids[index], state, tenant):
            found.append(ids[index])
            if len(found) == limit:
                break
    else:
        index = min(len(ids), start + scan) - 1
    more = index + 1 < len(ids)
    return Page(found, encode_cursor(index, ids[index]) if more and index >= 0 else None)


def _matches(store: StateStore, job_id: str, state: JobState | None, tenant: str | None) -> bool:
    try:
        record = store.job(job_id)
    except NotFoundError:
        return False
    return (state is None or record.state == state) and (tenant is None or record.tenant == tenant)
