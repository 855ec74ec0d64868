"""``lipfarm`` subcommands run as child processes: the harness tests, benchmarks and ``lipfarm
cluster`` start farms with.

A ``lipfarm`` subcommand (a worker, the reconciler, the API) runs as a child in its own process
group with its output in a log file, so it can be waited for ("ready" in its log) and stopped as a
whole (the group gets SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class LipfarmProcess:
    """``lipfarm <args>`` as a child process in its own process group, logging to ``log``."""

    def __init__(self, args: list[str], *, env: dict[str, str], log: Path, ready_text: bytes = b"") -> None:
        self.args, self.env, self.log, self.ready_text = list(args), env, log, ready_text
        self.process: subprocess.Popen | None = None

    @classmethod
    def worker(cls, env: dict[str, str], log: Path, *args: str) -> "LipfarmProcess":
        """A ``lipfarm worker``: ready once Celery logs that it is."""
        return cls(["worker", *args], env=env, log=log, ready_text=b" ready.")

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> "LipfarmProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        lipfarm = str(Path(sys.executable).parent / "lipfarm")
        with open(self.log, "wb") as handle:
            self.process = subprocess.Popen([lipfarm, *self.args], env={**os.environ, **self.env},
                                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 120) -> "LipfarmProcess":
        deadline = time.monotonic() + timeout_s
        while self.ready_text not in (self.log.read_bytes() if self.log.exists() else b""):
            if self.process.poll() is not None:
                raise RuntimeError(f"lipfarm {self.args[0]} exited: {self.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"lipfarm {self.args[0]} not ready after {timeout_s} s (log: {self.log})")
            time.sleep(0.2)
        return self

    def children(self) -> list[int]:
        """Process ids of its children (a worker's render processes)."""
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM to the whole group (a warm shutdown), SIGKILL if it has not ended in time."""
        if not self.running():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole group: the process and its children die at once, as in a crash."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
