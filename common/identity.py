"""Names of things every role makes or reads: job ids, and worker processes.

A worker process is named ``<host>:<pid>`` in chunk and finalizer records, with its start time
beside it. On the same host that is enough to know, without waiting for a lease to run out, that
the process which owns a chunk is gone: no such pid, or a pid reused by a process that started
at another time. Another host's processes cannot be checked from here; their leases tell.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


def new_job_id() -> str:
    """A time-ordered, unique job id such as ``20261124-130501-3fa9c2``."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the name (field 3 on), or [] if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces


def process_started(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (``/proc``), or "" if unknown. A
    process that has exited but not been reaped (a zombie: its parent has not waited for it yet)
    counts as gone: it will never renew a lease again."""
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X"):  # field 3: the state
        return ""
    return fields[19]  # field 22


@dataclass(frozen=True)
class WorkerProcess:
    host: str
    pid: int
    started: str

    @property
    def id(self) -> str:
        return f"{self.host}:{self.pid}"


def this_process() -> WorkerProcess:
    pid = os.getpid()
    return WorkerProcess(socket.gethostname(), pid, process_started(pid))


def worker_id() -> str:
    """This process as the farm names it in chunk records: ``<host>:<pid>``."""
    return this_process().id


def is_dead_here(worker: str, started: str) -> bool:
    """Whether ``worker`` (``<host>:<pid>``, started at ``started``) is a process of this host that
    has ended. False for other hosts' processes: nothing here can tell."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or not Path("/proc/self/stat").exists():
        return False
    now_started = process_started(int(pid))
    return now_started == "" or (bool(started) and now_started != started)
