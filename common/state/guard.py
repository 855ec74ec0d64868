"""One rule for every state verb: a Redis that cannot be reached, or refuses a write, is one
``ServiceError`` naming it, so callers that ride out an outage catch one kind of error."""

from __future__ import annotations

import functools

import redis

from lipfarm.common.errors import ServiceError


def guarded(method):
    """Redis errors out of ``method`` become one ``ServiceError`` naming the server."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError) as exc:
            raise ServiceError(f"cannot reach Redis at {self.where} ({exc.__class__.__name__}: {exc})") from None
        except (redis.OutOfMemoryError, redis.exceptions.ExecAbortError) as exc:  # full, and it evicts nothing
            raise ServiceError(f"Redis at {self.where} refused a write: {' '.join(str(exc).split())[:200]} "
                               "(raise its maxmemory or free memory)") from None

    return guarded
