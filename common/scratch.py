"""Temporary folders that a kill -9 cannot leak: one root per process, swept when its owner is dead.

Every temporary folder a farm process makes (a finalizer's work folder holding a whole output, a
chunk's frames and segment, an API request's partial upload) lives under that process's own root,
``<temp>/lipfarm-proc.<host>.<boot id>.<pid namespace>.<pid>.<start ticks>``; ``<temp>`` is ``LIPFARM_TEMP_DIR``, or
the system's temporary folder. A process that ends normally removes its folders as it goes; one
killed with -9 leaves its root behind, and the next process of any role to start on that host
(``sweep``, called at every role's start) removes each root whose owner is dead: its pid gone, a
zombie, reused by a process that started at another time, or from an earlier boot. Roots of other
hosts (a shared temporary folder) are left to their own host: nothing here can tell if they live.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from lipfarm.common.identity import process_started

log = logging.getLogger(__name__)

ROOT_PREFIX = "lipfarm-proc."
_ROOT = re.compile(r"^lipfarm-proc\.(?P<host>.+)\.(?P<boot>[0-9a-f]{8})\.(?P<ns>\d+)\.(?P<pid>\d+)\.(?P<started>\d*)$")


def temp_base(configured: str | Path = "") -> Path:
    """Where process roots are made: ``configured`` (``LIPFARM_TEMP_DIR``), else the system's."""
    return Path(configured or os.environ.get("LIPFARM_TEMP_DIR") or tempfile.gettempdir())


@functools.cache
def boot_id() -> str:
    """This boot of this host (a pid of an earlier boot names another process): 8 hex digits."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "00000000"


@functools.cache
def pid_namespace() -> str:
    """This process's pid namespace (containers sharing a host name and a temporary folder may each
    have their own: a pid of another namespace says nothing here)."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "0"
    except OSError:
        return "0"


def _host() -> str:
    return socket.gethostname().replace("/", "_")


def root_name(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{ROOT_PREFIX}{_host()}.{boot_id()}.{pid_namespace()}.{pid}.{process_started(pid)}"


def process_root(base: str | Path = "") -> Path:
    """This process's root under ``base`` (made on first use; a forked child gets its own), removed
    when the process exits normally (a kill -9 leaves it to ``sweep``)."""
    root = temp_base(base) / root_name()
    if not root.is_dir():
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        pid = os.getpid()  # a forked child inherits the exit hook: it must not remove its parent's root
        atexit.register(lambda: os.getpid() == pid and shutil.rmtree(root, ignore_errors=True))
    return root


@contextlib.contextmanager
def scratch_dir(prefix: str, base: str | Path = "") -> Iterator[Path]:
    """A temporary folder under this process's root, removed on leaving the block."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=process_root(base)) as folder:
        yield Path(folder)


def _dead(pid: int, started: str) -> bool:
    """Process ``pid`` of this host and boot has ended: no such pid, a zombie, or another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    if stat[stat.rindex(")") + 2:].split()[0] == "Z":  # killed, not yet reaped: dead all the same
        return True
    return bool(started) and process_started(pid) != started


def owner_dead(name: str) -> bool:
    """Whether the root named ``name`` belongs to a dead process of this host (False: alive, another
    host's, or not a root)."""
    match = _ROOT.match(name)
    if match is None or match["host"] != _host():
        return False
    if match["ns"] != pid_namespace():  # another container's: its pids are not ours to look up
        return match["boot"] != boot_id()
    if match["boot"] != boot_id():
        return True
    return _dead(int(match["pid"]), match["started"])


def sweep(base: str | Path = "") -> list[Path]:
    """Remove the roots under ``base`` whose owners died on this host; returns them. Never raises:
    a sweep that cannot finish is no reason for a role not to start."""
    removed = []
    try:
        candidates = [p for p in temp_base(base).iterdir() if p.name.startswith(ROOT_PREFIX)]
    except OSError:
        return removed
    for root in candidates:
        if owner_dead(root.name):
            shutil.rmtree(root, ignore_errors=True)
            if not root.exists():
                removed.append(root)
    if removed:
        log.info("removed %d temporary folder(s) of dead processes under %s", len(removed), temp_base(base))
    return removed
