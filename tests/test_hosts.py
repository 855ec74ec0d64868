"""The multi-host test helpers (tests/hosts.py): namespaces, hostnames, cutting a link, Redis servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.hosts import Host, RedisServer, redis_server, require_hosts, require_redis_server

pytestmark = pytest.mark.slow

# A guest that holds one Redis client (socket_timeout=2, no retries, so each error is the first one)
# and answers each "ping" line on stdin with [result or error, the error's cause, seconds taken].
GUEST_CLIENT = r"""
import json, sys, time
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
client = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]), socket_timeout=2, socket_connect_timeout=2,
                     retry=Retry(NoBackoff(), 0))
for line in sys.stdin:
    started = time.monotonic()
    try:
        result, cause = repr(client.ping()), None
    except Exception as error:
        result = f"{type(error).__module__}.{type(error).__name__}: {error}"
        cause = type(error.__cause__ or error.__context__).__name__
    print(json.dumps([result, cause, time.monotonic() - started]), flush=True)
"""


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def _links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(autouse=True)
def _needs_hosts():
    require_hosts()
    require_redis_server()


def test_a_host_is_another_machine(tmp_path):
    here = socket.gethostname()
    with Host() as host, Host() as other, RedisServer(tmp_path, ["127.0.0.1", host.host_ip]) as server:
        assert len({host.name, other.name}) == 2 and len({host.hostname, other.hostname, here}) == 3
        assert len({host.host_ip, host.guest_ip, other.host_ip, other.guest_ip}) == 4

        # lipfarm names a worker <hostname>:<pid>: the guest's names another machine, with its own pid.
        process = host.popen([sys.executable, "-c", "import os; from lipfarm.common.identity import worker_id; "
                              "print(worker_id(), os.getpid())"], stdout=subprocess.PIPE, text=True)
        out, _ = process.communicate(timeout=30)
        name, pid = out.split()
        assert name == f"{host.hostname}:{process.pid}" and int(pid) == process.pid
        assert socket.gethostname() == here  # the guest's hostname did not leak to this machine

        # Its 127.0.0.1 is its own: the server (and the machine's Redis on 6379) are not there...
        for port in (server.port, 6379):
            done = host.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "ping"])
            assert "Connection refused" in done.stdout + done.stderr
        # ...but the server on host_ip is.
        assert host.run(["redis-cli", "-h", host.host_ip, "-p", str(server.port), "ping"]).stdout.strip() == "PONG"
        assert server.client().ping()  # and this machine still reaches it on 127.0.0.1


def test_cut_makes_connections_hang_until_restored(tmp_path):
    with Host() as host, RedisServer(tmp_path, ["127.0.0.1", host.host_ip]) as server:
        guest = host.popen([sys.executable, "-c", GUEST_CLIENT, host.host_ip, str(server.port)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def ping() -> tuple[str, str | None, float]:
            guest.stdin.write("ping\n")
            guest.stdin.flush()
            return tuple(json.loads(guest.stdout.readline()))

        assert ping()[0] == "True"  # the connection is open
        host.cut()
        try:
            # Observed: the open connection's read times out after socket_timeout (the kernel's
            # socket.timeout underneath), not refused, not reset: the packets are simply lost...
            # (the class and the timing are the facts; redis-py's wording differs between versions)
            result, cause, seconds = ping()
            assert result.startswith("redis.exceptions.TimeoutError:")
            assert cause == "TimeoutError" and 1.8 < seconds < 3
            # ...and reconnecting hangs too (no EHOSTUNREACH: the ARP entries are pinned).
            for _ in range(2):
                result, cause, seconds = ping()
                assert result.startswith("redis.exceptions.TimeoutError:")
                assert cause == "TimeoutError" and 1.8 < seconds < 3
            assert server.client().ping()  # the server itself is fine: only the link is down
            assert guest.poll() is None
        finally:
            host.restore()
        result, _, seconds = ping()  # the client reconnects at once
        assert result == "True" and seconds < 1
        assert ping()[0] == "True"
        guest.stdin.close()
        assert guest.wait(timeout=10) == 0


def test_redis_server_stop_restart_and_kill(tmp_path):
    with redis_server(["127.0.0.1"], None, tmp_path / "aof", appendonly=True, password="sekrit") as server:
        port, client = server.port, redis.Redis.from_url(server.url("127.0.0.1", db=3))
        client.set("kept", "yes")
        server.stop()  # SIGTERM: a clean shutdown writes the AOF
        with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens on its port
            socket.create_connection(("127.0.0.1", port), timeout=2)
        server.restart()
        assert server.port == port and client.get("kept") == b"yes"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, retry=Retry(NoBackoff(), 0)).ping()

    with RedisServer(tmp_path / "plain", ["127.0.0.1"]) as server:
        pid = server.process.pid
        server.client().set("lost", "yes")
        server.kill()  # SIGKILL, and no appendonly and no snapshots: a crash loses everything
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        server.start()
        assert server.client().get("lost") is None


def test_close_leaves_nothing_even_when_the_test_fails():
    class BodyFailed(Exception):
        pass

    with pytest.raises(BodyFailed):
        with Host() as host:
            sleeper = host.popen(["sleep", "600"])
            assert host.name in _netns_list() and host.host_veth in _links()
            raise BodyFailed
    assert sleeper.poll() == -signal.SIGKILL
    assert host.name not in _netns_list()
    assert host.host_veth not in _links() and host.guest_veth not in _links()
    host.close()  # idempotent


def _gone(pid: int) -> bool:
    try:  # dead, or a zombie its (re)parent has not reaped yet
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_crashed_runs_namespaces_are_cleaned_up():
    crash = ("import os, subprocess; from tests.hosts import Host; host = Host(); "
             "sleeper = host.popen(['sleep', '600'], stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL); "
             "print(host.name, host.host_veth, sleeper.pid, flush=True); os._exit(1)")
    out = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60).stdout
    name, veth, pid = out.split()
    assert name in _netns_list() and veth in _links() and not _gone(int(pid))  # left behind, in use
    with Host():  # a new Host removes what dead pids left
        assert name not in _netns_list() and veth not in _links()
    deadline = time.monotonic() + 5
    while not _gone(int(pid)):
        assert time.monotonic() < deadline, "the crashed run's process survived"
        time.sleep(0.05)
