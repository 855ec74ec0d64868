"""Names of things that every role makes or reads: job ids and worker ids."""

from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime, timezone


def new_job_id() -> str:
    """A time-ordered, unique job id such as ``20261124-130501-3fa9c2``."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def worker_id() -> str:
    """This process as the farm names it in chunk records: ``<host>:<pid>``."""
    return f"{socket.gethostname()}:{os.getpid()}"
