"""Facts about this process and machine that benchmarks and heartbeats report."""

from __future__ import annotations

import os
import platform
import re
import resource
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Read from ``VmHWM`` (the high-water mark of the current address space), because Linux carries
    ``ru_maxrss`` across ``exec``: a freshly spawned process would report its parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
