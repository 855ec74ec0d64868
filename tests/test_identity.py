"""Which worker processes of this host are gone: what lets a dead chunk or finalizer be taken back
at once instead of when its lease runs out."""

from __future__ import annotations

import socket
import subprocess
import sys

from lipfarm.common.identity import is_dead_here, process_started, this_process
from tests.farm import until


def _state(pid: int) -> str:
    stat = open(f"/proc/{pid}/stat").read()
    return stat[stat.rindex(")") + 2]


def test_a_living_process_is_not_dead_and_a_reused_pid_is_not_its_old_owner():
    me = this_process()
    assert not is_dead_here(me.id, me.started)
    assert is_dead_here(me.id, str(int(me.started) - 1))  # the pid now belongs to a later process
    assert not is_dead_here(f"another-host:{me.pid}", "1")  # nothing here can tell about other hosts


def test_an_exited_child_not_yet_reaped_counts_as_dead():
    """A killed render or finalize process stays a zombie until its parent reaps it; meanwhile its
    /proc entry is there. It must not look alive for those seconds (its lease would be waited out)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    worker = f"{socket.gethostname()}:{child.pid}"
    started = process_started(child.pid) or "unknown"
    until(lambda: _state(child.pid) == "Z", timeout_s=60, what="the child to exit, unreaped")
    try:
        assert process_started(child.pid) == ""
        assert is_dead_here(worker, started)
    finally:
        child.wait()
    assert is_dead_here(worker, started)  # and once reaped
