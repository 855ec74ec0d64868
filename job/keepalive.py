"""A lease kept alive from a thread: ``KeepAlive`` calls ``beat()`` every interval while in use.

Chunk attempts and finalizers hold leases in the state store; a lease not renewed within its time
is taken back. A beat that cannot reach Redis is logged and tried again at the next interval (the
lease has slack for a few); a beat the store answers with anything but OK means the lease is lost,
and ``lost`` says so to the work it guards.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from lipfarm.common.state import Verdict

log = logging.getLogger(__name__)


class KeepAlive:
    """Runs ``beat()`` every ``interval_s`` on a thread, inside a ``with`` block."""

    def __init__(self, beat: Callable[[], Verdict], *, interval_s: float, name: str) -> None:
        self.beat, self.interval_s, self.name = beat, interval_s, name
        self.verdict = Verdict.OK
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lipfarm-keepalive-{name}", daemon=True)

    @property
    def lost(self) -> bool:
        return self.verdict != Verdict.OK

    def __enter__(self) -> "KeepAlive":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                verdict = self.beat()
            except Exception as exc:  # an outage: the lease has slack for a few missed beats
                log.warning("lease of %s not renewed: %s", self.name, exc)
                continue
            if verdict != Verdict.OK:
                self.verdict = verdict
