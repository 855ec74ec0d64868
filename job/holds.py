"""Hold files: pause a chunk or a finalizer from outside, for debugging and tests.

With ``LIPFARM_HOLD_DIR`` set, a chunk pauses before its next batch while ``<job id>.<chunk>.hold``
exists in that folder (and a finalizer after taking its lease while ``<job id>.finalize.hold``
does), keeping its lease alive meanwhile. The file may hold a number of frames to render first.
Tests use them to catch a job mid-render without sleeping for the right moment.
"""

from __future__ import annotations

from pathlib import Path

from lipfarm.common.config import Settings


def hold_reached(settings: Settings, name: str, frames_done: int = 0) -> bool:
    """Whether ``<hold_dir>/<name>.hold`` exists and asks to pause once ``frames_done`` reaches its number."""
    if not settings.hold_dir:
        return False
    try:
        after = (Path(settings.hold_dir) / f"{name}.hold").read_text().strip()
    except OSError:
        return False
    return frames_done >= (int(after) if after.isdigit() else 0)
