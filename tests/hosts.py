"""Several "hosts" on one machine, for farm tests: network namespaces with a link the test can cut.

``Host`` is a network namespace joined to the root namespace by a veth pair on its own /30 of
10.200.0.0/16.  Processes started with ``Host.popen`` run inside it *and* in a fresh UTS namespace
with their own hostname, so lipfarm's ``<host>:<pid>`` worker ids (``common.identity``) name another
machine and same-host pid liveness checks do not apply to them.  ``Host.cut`` downs the root side of
the veth: the guest's packets are then dropped (not refused, not reset), so its TCP connections hang
and time out, as when a machine's network fails; ``Host.restore`` brings the link back.

``RedisServer`` is a throwaway ``redis-server`` on a free port and its own data folder, bound to
127.0.0.1 and any Host's ``host_ip``, which can be stopped (SIGTERM), killed (SIGKILL) and restarted on
the same port and folder.

Needs root and iproute2 (``ip``) plus util-linux ``unshare``; call ``require_hosts()`` to skip without.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import pytest

# Namespace "lf<pid>x<n>", root-side veth "lf<pid>h<n>", guest-side veth "lf<pid>g<n>": the creating
# pid in every name lets a later run find and remove what a crashed run left (stale_cleanup), and the
# interface names stay within Linux's 15 characters (pid <= 7 digits, n <= 5 digits).
_NAME = re.compile(r"^lf(\d+)([xhg])(\d+)$")
_POOL = ipaddress.ip_network("10.200.0.0/16")
_BLOCKS = _POOL.num_addresses // 4  # /30 blocks in the pool
_counter = itertools.count(1)
_open_hosts: set["Host"] = set()
_open_servers: "weakref.WeakSet[RedisServer]" = weakref.WeakSet()  # killed at exit (own sessions)


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _lock():
    """A machine-wide lock, so parallel test runs never pick the same /30 or clean up each other."""
    folder = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
    with open(os.path.join(folder, "lipfarm-test-hosts.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _netns_names() -> list[str]:
    done = _ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _kill_netns_pids(netns: str, timeout_s: float = 5.0) -> None:
    """SIGKILL every process in ``netns`` until none is left (a namespace with processes outlives
    ``ip netns del``, and so would its veth)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = [int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in namespace {netns} survive SIGKILL")
        time.sleep(0.05)


def _remove(netns: str, host_veth: str) -> None:
    _kill_netns_pids(netns)
    # Deleting either end of a veth pair deletes both; then the namespace.
    _ip("link", "del", host_veth, check=False)
    _ip("netns", "del", netns, check=False)


def stale_cleanup() -> None:
    """Remove namespaces and veths named ``lf<pid>…`` whose creating pid is dead (a crashed run), or
    is this process's pid but no open Host's (an earlier process that had the same pid)."""
    ours = {name for host in _open_hosts for name in (host.name, host.host_veth)}

    def stale(match: re.Match) -> bool:
        pid = int(match[1])
        return (pid == os.getpid() and match[0] not in ours) or (pid != os.getpid() and not _pid_alive(pid))

    for netns in _netns_names():
        match = _NAME.match(netns)
        if match and match[2] == "x" and stale(match):
            _remove(netns, f"lf{match[1]}h{match[3]}")
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        match = _NAME.match(name)
        if match and match[2] == "h" and stale(match):
            _ip("link", "del", name, check=False)


def _mac(device: str, netns: str | None = None) -> str:
    return json.loads(_ip("-j", "link", "show", device, netns=netns).stdout)[0]["address"]


def _used_blocks() -> set[int]:
    """/30 blocks of the pool already on an interface of the root namespace."""
    used = set()
    for address in re.findall(r"inet (10\.200\.\d+\.\d+)/", _ip("-o", "-4", "addr", "show").stdout):
        used.add((int(ipaddress.ip_address(address)) - int(_POOL.network_address)) // 4)
    return used


class Host:
    """Another "machine": a network namespace with a veth link to this one and its own hostname.

    ``host_ip`` is this (the root) namespace's end of the link, so services the guest must reach bind
    to it; ``guest_ip`` is the guest's end.  The guest has its own ``lo`` (so it cannot reach the root
    namespace's 127.0.0.1 services) and no default route (it reaches only ``host_ip``).
    """

    def __init__(self) -> None:
        self.n = next(_counter)
        pid = os.getpid()
        self.name = f"lf{pid}x{self.n}"
        self.host_veth, self.guest_veth = f"lf{pid}h{self.n}", f"lf{pid}g{self.n}"
        self.hostname = f"lipfarm-host{self.n}-{pid}"
        self.host_ip = self.guest_ip = ""
        self.closed = False
        self._processes: list[subprocess.Popen] = []
        _open_hosts.add(self)
        try:
            with _lock():
                stale_cleanup()
                used = _used_blocks()
                start = (pid * 64 + self.n) % _BLOCKS  # spread parallel runs over the pool...
                block = next((start + i) % _BLOCKS for i in range(_BLOCKS)  # ...and skip taken blocks
                             if (start + i) % _BLOCKS not in used)
                base = _POOL.network_address + 4 * block
                self.host_ip, self.guest_ip = str(base + 1), str(base + 2)
                _ip("netns", "add", self.name)
                _ip("link", "add", self.host_veth, "type", "veth", "peer", "name", self.guest_veth,
                    "netns", self.name)
                _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_veth)  # under the lock
            _ip("link", "set", self.host_veth, "up")
            _ip("addr", "add", f"{self.guest_ip}/30", "dev", self.guest_veth, netns=self.name)
            _ip("link", "set", self.guest_veth, "up", netns=self.name)
            _ip("link", "set", "lo", "up", netns=self.name)
            self._pin_neighbours()
        except BaseException:
            self.close()
            raise

    def _pin_neighbours(self) -> None:
        """Permanent ARP entries both ways.  Without them a cut also fails ARP, and the kernel then
        answers new connects (and the first ones after restore) with EHOSTUNREACH instead of letting
        them hang; with them every packet is simply lost while cut.  (Downing the root end flushes its
        entry, so restore() pins it again.)"""
        _ip("neigh", "replace", self.host_ip, "lladdr", _mac(self.host_veth), "dev", self.guest_veth,
            "nud", "permanent", netns=self.name)
        _ip("neigh", "replace", self.guest_ip, "lladdr", _mac(self.guest_veth, self.name), "dev", self.host_veth,
            "nud", "permanent")

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.hostname}, host_ip={self.host_ip}, guest_ip={self.guest_ip})"

    def popen(self, argv: list[str], *, env: dict | None = None, stdout=None, stderr=None, stdin=None,
              start_new_session: bool = True, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the namespace with its own UTS namespace whose hostname is ``hostname``.

        ``ip netns exec``, ``unshare`` (without --fork) and ``sh -c 'exec'`` all exec in place, so the
        returned Popen's pid is the command's own pid (signals reach it directly).  The new UTS
        namespace keeps ``hostname`` from renaming this machine.
        """
        # Absolute paths: a caller's ``env`` need not have a PATH that finds them.
        tools = {tool: shutil.which(tool) or tool for tool in ("ip", "unshare", "hostname")}
        wrapper = [tools["ip"], "netns", "exec", self.name, tools["unshare"], "--uts",
                   "/bin/sh", "-c", f'{tools["hostname"]} "$0" && exec "$@"', self.hostname]
        process = subprocess.Popen([*wrapper, *map(str, argv)], env=env, stdout=stdout, stderr=stderr,
                                   stdin=stdin, start_new_session=start_new_session, **kwargs)
        self._processes.append(process)
        return process

    def run(self, argv: list[str], *, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
        """``popen`` and wait, capturing text output (for short commands in tests)."""
        process = self.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def cut(self) -> None:
        """Fail the link: packets both ways are silently dropped, so the guest's connections hang.

        Downing the root end takes the carrier from both ends; the guest's end keeps its address,
        route and (permanent) ARP entry, so its sends are dropped at the veth with no RST, no ICMP and
        no EHOSTUNREACH: open connections time out on read, new ones on connect.  The root side's
        replies are lost likewise.  (netem, nftables and iptables are not on every machine, and not on
        the one this was written on; this needs nothing but iproute2.)
        """
        _ip("link", "set", self.host_veth, "down")

    def restore(self) -> None:
        """Bring the link back (the kernel re-adds the /30 route with the carrier)."""
        _ip("link", "set", self.host_veth, "up")
        self._pin_neighbours()
        deadline = time.monotonic() + 5
        while "NO-CARRIER" in _ip("link", "show", self.guest_veth, netns=self.name).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.guest_veth} has no carrier after restore")
            time.sleep(0.02)

    def close(self) -> None:
        """Kill every process in the namespace, delete the veth and the namespace.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        _open_hosts.discard(self)
        try:
            _remove(self.name, self.host_veth)
        finally:
            for process in self._processes:  # reap our children (they were SIGKILLed above)
                with contextlib.suppress(Exception):
                    process.kill()
                    process.wait(timeout=5)
        if self.name in _netns_names():
            raise RuntimeError(f"namespace {self.name} survived close()")


@atexit.register
def _close_all() -> None:
    """Last resort for servers and hosts a test forgot (a crash still leaves hosts to stale_cleanup)."""
    for server in list(_open_servers):
        with contextlib.suppress(Exception):
            server.kill()
    for host in list(_open_hosts):
        with contextlib.suppress(Exception):
            host.close()


@functools.cache
def _hosts_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network and UTS namespaces)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command"
    try:
        with Host() as host:  # the real probe: namespaces, veth, addresses and exec inside may be refused
            done = host.run(["true"], timeout=10)
            if done.returncode != 0:
                return f"cannot run in a network namespace: {done.stderr.strip()}"
    except Exception as error:  # any failure means "not on this machine"
        return f"cannot make network namespaces here: {error}"
    return None


def require_hosts() -> None:
    """``pytest.skip`` unless this machine can make Hosts (root, iproute2 with netns, unshare)."""
    reason = _hosts_unavailable()
    if reason:
        pytest.skip(f"multi-host tests: {reason}")


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("the 'redis-server' binary is not installed")


def free_port(bind: list[str] | tuple[str, ...] = ("0.0.0.0",)) -> int:
    """A TCP port free on every address in ``bind`` (bound on the first, checked on the rest)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((bind[0], 0))
            port = sock.getsockname()[1]
        try:
            for address in bind[1:]:
                with socket.socket() as sock:
                    sock.bind((address, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {bind}")


class RedisServer:
    """A ``redis-server`` of its own: free port, own data folder, bound to the given addresses.

    No RDB snapshots (``save ""``), so data outlives a restart only with ``appendonly=True`` and a
    clean ``stop()`` (SIGTERM: Redis flushes and fsyncs the AOF on shutdown); ``kill()`` is SIGKILL, a
    crash.  The port and folder are kept across ``restart()``, so clients' URLs stay valid.
    """

    def __init__(self, folder: Path | str, bind: list[str] | tuple[str, ...] = ("127.0.0.1",),
                 port: int | None = None, *, appendonly: bool = False, password: str | None = None,
                 extra: list[str] | tuple[str, ...] = ()) -> None:
        self.extra = list(extra)  # more redis-server arguments: a policy, a memory bound, a renamed command
        self.folder = Path(folder)
        self.bind = list(bind)
        self.port = port or free_port(self.bind)
        self.appendonly, self.password = appendonly, password
        self.process: subprocess.Popen | None = None
        _open_servers.add(self)

    @property
    def log(self) -> Path:
        return self.folder / "redis.log"

    def url(self, host: str | None = None, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{host or self.bind[0]}:{self.port}/{db}"

    def client(self, host: str | None = None, **kwargs):
        import redis

        return redis.Redis(host=host or self.bind[0], port=self.port, password=self.password, **kwargs)

    def start(self, timeout_s: float = 20) -> "RedisServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", *self.bind, "--dir", str(self.folder),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--daemonize", "no", "--protected-mode", "no", "--logfile", str(self.log)]
        if self.password:
            argv += ["--requirepass", self.password]
        argv += self.extra
        # Its own session: a ^C to pytest does not reach it, and stop()/kill() signal its pid only.
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited {self.process.returncode}: "
                                   f"{self.process.stderr.read().decode()[-1000:]}{self._log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server on port {self.port} not answering after {timeout_s} s"
                                   f"{self._log_tail()}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        """PING answered (and, with appendonly, the AOF loaded: LOADING errors count as not ready)."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:  # no retries: redis-py's default backoff would stretch each failed probe to seconds
            with self.client(socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)) as client:
                return client.ping() is True
        except Exception:
            return False

    def _log_tail(self) -> str:
        return f"\n{self.log.read_text()[-2000:]}" if self.log.exists() else ""

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM and wait: a clean shutdown (persists the AOF with appendonly); SIGKILL if it hangs."""
        self._signal(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL: a crash, loses what was not yet on disk."""
        self._signal(signal.SIGKILL, 10)

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()

    def _signal(self, signum: int, timeout_s: float) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def __enter__(self) -> "RedisServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.kill()


@contextlib.contextmanager
def redis_server(bind: list[str], port: int | None, folder: Path | str, *, appendonly: bool = False,
                 password: str | None = None):
    """A started RedisServer, killed on exit."""
    server = RedisServer(folder, bind, port, appendonly=appendonly, password=password)
    with server.start():
        yield server
