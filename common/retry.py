"""When to try again: the delay before a chunk's next attempt, and retries of one storage call.

A chunk that failed waits before its next attempt, longer each time (5 s, 10 s, 20 s, ... at most
60 s), so a service that is down for a minute does not burn every attempt at once. A chunk whose
worker was lost (died, or stopped beating) goes again at once the first time: that was most likely
the machine, not the chunk. When it happens again the chunk may be what kills its workers (a
poison chunk), and it waits like a failure.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from lipfarm.common import defaults
from lipfarm.common.errors import ServiceError

log = logging.getLogger(__name__)
T = TypeVar("T")


def retry_delay_s(spent: int, *, worker_lost: bool = False) -> float:
    """Seconds before the next attempt of a chunk that has spent ``spent`` attempts."""
    failures = spent - 1 if worker_lost else spent
    if failures < 1:
        return 0.0
    return min(defaults.RETRY_DELAY_MAX_S, defaults.RETRY_DELAY_S * 2 ** (failures - 1))


def with_retries(action: Callable[[], T], what: str, *, retries: int = defaults.UPLOAD_RETRIES,
                 delay_s: float = defaults.UPLOAD_RETRY_DELAY_S) -> T:
    """Run ``action``, retrying service errors after ``delay_s``, doubling; the last error names ``what``."""
    for attempt in range(retries + 1):
        try:
            return action()
        except (ServiceError, OSError) as exc:
            if attempt == retries:
                raise ServiceError(f"{what} failed {retries + 1} times: {exc}") from None
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay_s * 2 ** attempt)
            time.sleep(delay_s * 2 ** attempt)
    raise AssertionError("unreachable")
