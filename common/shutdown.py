"""A worker's stop request, shared by its main process and its render processes.

Kubernetes and compose (with tini) stop a pod by sending SIGTERM to the worker's main process only,
then SIGKILL after the grace period. Celery's warm shutdown would let the chunk in hand run to its
end (a minute or more), which a grace period cannot promise. So the main process raises this flag
when it starts shutting down (``worker_shutting_down``), and the attempt or finalizer running in a
render process sees it at its next check (before every batch), hands its chunk back to the state
store with the reason, queues it again, and returns normally: Celery acknowledges the old message,
so exactly one message for the chunk is left, and the worker exits within seconds.

The flag is one byte of anonymous shared memory made when this module is imported (in the main
process, before the pool forks): the render processes read the very same byte. It holds the number
of the signal that stopped the worker (0 while running), for the reason recorded.

A render process that gets SIGTERM itself (SIGTERM to the whole process group, as ``lipfarm
cluster down`` and the test harness send) raises the same flag while it holds work, instead of
dying mid-chunk; idle, it exits as before (``Busy``).
"""

from __future__ import annotations

import mmap
import signal
import threading

_FLAG = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: inherited by forked children, and shared with them
_guarded = False  # a pool process: SIGTERM while busy hands the work back (``guard_render_process``)


class ShuttingDown(Exception):
    """The worker is stopping: hand the work back rather than finish it."""


def request(signum: int = signal.SIGTERM) -> None:
    """Ask every process of this worker to hand its work back (the main process calls this)."""
    _FLAG[0] = signum or signal.SIGTERM


def requested() -> bool:
    return _FLAG[0] != 0


def reason(worker: str) -> str:
    """Why the work was handed back, as the attempt log records it."""
    try:
        name = signal.Signals(_FLAG[0]).name
    except ValueError:
        name = "a stop request"
    return f"worker {worker} shutting down ({name}): handed back"


def check() -> None:
    """Raise ``ShuttingDown`` if the worker is stopping."""
    if requested():
        raise ShuttingDown("the worker is shutting down")


class Busy:
    """``with Busy():`` around work that is handed back on a stop request (a chunk, a finalize).

    In a guarded pool process, SIGTERM meanwhile raises the stop flag instead of billiard's handler
    (which exits mid-chunk: a traceback, and a second message for the chunk); that handler is put
    back afterwards, so an idle pool process still exits on SIGTERM as before."""

    def __init__(self) -> None:
        self.previous = None

    def __enter__(self) -> "Busy":
        if _guarded and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _on_sigterm(signum, _frame) -> None:
    request(signum)  # the work in hand stops at its next check and is handed back


def guard_render_process() -> None:
    """Called in each pool process as it starts (``worker_process_init``)."""
    global _guarded
    _guarded = True
