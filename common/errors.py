"""The errors lipfarm raises on purpose.

Every failure a user can cause or fix is a ``LipfarmError`` whose message is one line naming the
file (or service, or job) and the field, with what was expected and what was found. The CLI prints
that line and exits with the class's ``exit_code``; a job records the same line as its failure
reason. Anything else that escapes is a bug.
"""

from __future__ import annotations

from pathlib import Path


class LipfarmError(Exception):
    """Base of every error lipfarm raises for a reason a user can act on."""

    exit_code = 1


class InputError(LipfarmError):
    """Bad input: a file, a field in it, or an option. Names all it knows of the problem."""

    exit_code = 2

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        field: str | None = None,
        expected: object = None,
        found: object = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(self._format())

    def _format(self) -> str:
        where = ": ".join(part for part in (self.path, self.field) if part)
        text = f"{where}: {self.problem}" if where else self.problem
        details = []
        if self.expected is not None:
            details.append(f"expected {self.expected}")
        if self.found is not None:
            details.append(f"found {self.found}")
        return f"{text} ({', '.join(details)})" if details else text

    def __reduce__(self):
        # Keeps the error picklable across process pools with its keyword-only fields.
        return (_rebuild_input_error, (type(self), self.problem, self.path, self.field,
                                       self.expected, self.found))


def _rebuild_input_error(cls, problem, path, field, expected, found):
    return cls(problem, path=path, field=field, expected=expected, found=found)


class AudioError(InputError):
    """An audio file that cannot be used: unreadable, empty, too short, not audio."""


class AvatarError(InputError):
    """An avatar that is missing, incomplete or inconsistent."""


class ModelError(InputError):
    """An ONNX model that is unreadable or does not fit the SyncTalk_2D contract."""

    exit_code = 3


class NotFoundError(LipfarmError):
    """A named thing (avatar, job) does not exist."""

    exit_code = 4


class ServiceError(LipfarmError):
    """A service lipfarm needs (broker, Redis, object storage) is unreachable or refuses us."""

    exit_code = 5


class JobFailedError(LipfarmError):
    """A job ended failed; the message is the recorded reason."""

    exit_code = 6


class CancelledError(LipfarmError):
    """Work stopped because its job was cancelled or its attempt lost ownership."""

    exit_code = 7


class QuotaError(LipfarmError):
    """A tenant is at its limit (``lipfarm tenant set --max-queued``): the submission is refused
    whole; it may be sent again once one of the tenant's jobs ends."""

    exit_code = 8

    def __init__(self, message: str, *, tenant: str, limit: int, unfinished: int) -> None:
        super().__init__(message)
        self.tenant, self.limit, self.unfinished = tenant, limit, unfinished
