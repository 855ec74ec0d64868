"""A farm beside services it does not own (docs/shared-services.md): a Redis that may evict keys, a Redis that
is full, a disk that fills at publication, processes killed with -9, two farms on one storage.

Every case is real: redis-server processes of the tests' own on free ports, ``lipfarm`` commands as
processes, HTTP on loopback, kill -9.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from tests.farm import fill_disk, tmpfs, until
from tests.hosts import RedisServer, free_port, require_redis_server

LIPFARM = str(Path(sys.executable).parent / "lipfarm")
PREFIX = "lipfarm-services-test"


def lipfarm(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([LIPFARM, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def farm_env(home: Path, server: RedisServer, storage: Path, **extra: str) -> dict[str, str]:
    """A farm's settings: ``home`` is the session's (the demo avatar is imported there)."""
    env = {"LIPFARM_HOME": str(home), "LIPFARM_BROKER_URL": server.url(), "LIPFARM_REDIS_URL": server.url(),
           "LIPFARM_KEY_PREFIX": PREFIX, "LIPFARM_STORAGE_URL": str(storage),
           "LIPFARM_INFERENCE_THREADS": "1", "LIPFARM_CACHE_DIR": str(storage.parent / "cache")}
    env.update(extra)
    return env


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def redis_server(tmp_path):
    """Start redis-server processes with extra arguments; every one is killed at the end."""
    require_redis_server()
    started = []

    def start(*extra: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}", extra=list(extra)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


class Api:
    """``lipfarm api`` as a process on a free loopback port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port(["127.0.0.1"])
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as handle:
            self.process = subprocess.Popen([LIPFARM, "api", "--port", str(self.port)], env={**os.environ, **env},
                                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        until(lambda: self._answers() or self.process.poll() is not None, timeout_s=60, what="the API")
        assert self.process.poll() is None, log.read_text()

    def _answers(self) -> bool:
        try:
            httpx.get(f"{self.url}/v1/health", timeout=2)
            return True
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# --- 1. an evicting Redis is refused ----------------------------------------------------------------

# Each role's start, as a user types it. `cluster up` uses the Redis it finds answering.
ROLES = {"worker": ("worker", "--concurrency", "1"), "reconcile": ("reconcile",),
         "reconcile --loop": ("reconcile", "--loop"), "token": ("token", "list"),
         "cluster up": ("cluster", "up", "--workers", "1", "--api-port", "0", "--flower-port", "0")}


@pytest.mark.parametrize("config", ["CONFIG", "hidden"], ids=["config-get", "config-disabled"])
def test_every_role_refuses_a_redis_that_may_evict(tmp_path, home, redis_server, demo, config):
    """With CONFIG renamed away (as managed Redis does) the policy is read from INFO memory."""
    extra = ["--maxmemory-policy", "allkeys-lru"]
    if config == "hidden":
        extra += ["--rename-command", "CONFIG", "lipfarm-test-no-config"]
    server = redis_server(*extra)
    if config == "hidden":
        with pytest.raises(redis.ResponseError):
            server.client().config_get("maxmemory-policy")
    env = farm_env(home, server, tmp_path / "storage")
    commands = {**ROLES, "api": ("api", "--port", str(free_port(["127.0.0.1"]))),
                "submit": ("submit", "--avatar", demo.avatar_name, "--audio", str(demo.audio),
                           "--encoder", str(demo.encoder), "--generator", str(demo.generator))}
    for role, args in commands.items():
        result = lipfarm(env, *args)
        line = one_line(result.stderr)
        assert result.returncode == 5, (role, result.stderr)
        assert "maxmemory-policy allkeys-lru" in line and "noeviction" in line, (role, line)
        assert "LIPFARM_ALLOW_EVICTING_REDIS" in line, (role, line)
    assert not (tmp_path / "storage" / "jobs").exists()  # submit refused before uploading
    assert not list(server.client().scan_iter(f"{PREFIX}:*"))


def test_accepting_the_risk_is_a_setting(tmp_path, home, redis_server):
    server = redis_server("--maxmemory-policy", "volatile-lru")
    env = farm_env(home, server, tmp_path / "storage")
    assert lipfarm(env, "reconcile").returncode == 5
    allowed = lipfarm({**env, "LIPFARM_ALLOW_EVICTING_REDIS": "1"}, "reconcile")
    assert allowed.returncode == 0, allowed.stderr


def test_health_names_a_policy_changed_under_a_running_api(tmp_path, home, redis_server):
    server = redis_server("--maxmemory-policy", "noeviction")
    env = farm_env(home, server, tmp_path / "storage")
    api = Api(env, tmp_path / "api.log")
    try:
        assert httpx.get(f"{api.url}/v1/health").status_code == 200
        server.client().config_set("maxmemory-policy", "allkeys-random")
        answer = httpx.get(f"{api.url}/v1/health")
        assert answer.status_code == 503
        assert "maxmemory-policy allkeys-random" in answer.json()["checks"]["redis"]
        server.client().config_set("maxmemory-policy", "noeviction")
        assert httpx.get(f"{api.url}/v1/health").status_code == 200
    finally:
        api.stop()


# --- 2. a submission Redis refuses leaves nothing --------------------------------------------------

def _fill(server: RedisServer) -> int:
    """Bound Redis's memory a little above what it uses, and write from another client until it
    refuses (it evicts nothing); returns the keys written."""
    client = server.client()
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 256 * 1024)
    for count in range(1_000_000):
        try:
            client.set(f"filler:{count}", "x" * 1000)
        except redis.exceptions.OutOfMemoryError:
            return count
    raise AssertionError("Redis never filled")


def _job_folders(storage: Path) -> list[str]:
    return sorted(p.name for p in (storage / "jobs").iterdir()) if (storage / "jobs").is_dir() else []


def test_a_submission_redis_refuses_is_not_left_in_storage(tmp_path, home, redis_server, demo, clip):
    server = redis_server("--maxmemory-policy", "noeviction")
    storage = tmp_path / "storage"
    env = farm_env(home, server, storage)
    token = lipfarm(env, "token", "create", "--name", "full").stdout.split()[-1]  # while there is room
    api = Api(env, tmp_path / "api.log")
    try:
        assert _fill(server) > 0
        result = lipfarm(env, "submit", "--avatar", demo.avatar_name, "--audio", str(clip),
                         "--encoder", str(demo.encoder), "--generator", str(demo.generator))
        assert result.returncode == 5, result.stderr
        assert "maxmemory" in one_line(result.stderr)
        assert _job_folders(storage) == [], result.stderr  # neither job.json nor the audio stayed

        with open(clip, "rb") as handle:
            answer = httpx.post(f"{api.url}/v1/jobs", headers={"Authorization": f"Bearer {token}"},
                                data={"avatar": demo.avatar_name}, files={"audio": ("talk.wav", handle, "audio/wav")},
                                timeout=60)
        assert answer.status_code == 503, answer.text
        assert _job_folders(storage) == []
    finally:
        api.stop()
    server.client().config_set("maxmemory", 0)  # room again: a rebuild finds nothing to render
    rebuilt = lipfarm(env, "reconcile", "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert lipfarm(env, "jobs").stdout.strip() == "no jobs"


# --- 3. a full disk at publication is retried ------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem that fills up: a 2 MB tmpfs."""
    with tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


class Farm:
    """A farm of processes on a Redis of its own: one render worker, one jobs/finalize worker (with
    its own extra settings), the recovery pass every second."""

    def __init__(self, env: dict[str, str], folder: Path, jobs_env: dict[str, str] | None = None) -> None:
        from lipfarm.common.state import StateStore
        from lipfarm.scheduler.processes import LipfarmProcess

        self.env = {**env, "LIPFARM_LEASE_S": "4", "LIPFARM_HEARTBEAT_INTERVAL_S": "0.5",
                    "LIPFARM_RECONCILE_INTERVAL_S": "1", "LIPFARM_HOLD_DIR": str(folder / "holds")}
        (folder / "holds").mkdir(parents=True, exist_ok=True)
        self.holds = folder / "holds"
        self.render = LipfarmProcess.worker(self.env, folder / "render.log", "--concurrency", "1",
                                            "--queues", "render", "--hostname", f"render-{os.getpid()}@test")
        self.jobs = LipfarmProcess.worker({**self.env, **(jobs_env or {})}, folder / "jobs.log", "--concurrency", "1",
                                          "--queues", "jobs,finalize", "--hostname", f"jobs-{os.getpid()}@test")
        self.store = StateStore.connect(env["LIPFARM_REDIS_URL"], env["LIPFARM_KEY_PREFIX"])

    def start(self) -> "Farm":
        for process in (self.render, self.jobs):
            process.start()
        for process in (self.render, self.jobs):
            process.wait_ready(timeout_s=120)
        return self

    def stop(self) -> None:
        for process in (self.render, self.jobs):
            if process.process is not None and process.running():
                process.stop(timeout_s=20)

    def submit(self, demo, audio: Path) -> str:
        result = lipfarm(self.env, "submit", "--avatar", demo.avatar_name, "--audio", str(audio), "--encoder",
                         str(demo.encoder), "--generator", str(demo.generator), "--chunk-frames", "25")
        assert result.returncode == 0, result.stderr
        return result.stdout.split()[-1]

    def state(self, job_id: str) -> str:
        return self.store.job(job_id).state.value


@pytest.fixture
def short_clip(tmp_path, speech_16k) -> Path:
    """1.2 s of the demo speech: 30 frames, two chunks of 25."""
    from lipfarm.demo.speech import write_wav

    path = tmp_path / "short.wav"
    write_wav(path, speech_16k[:int(1.2 * 16000)])
    return path


def _files(env: dict[str, str], job_id: str):
    from lipfarm.common.config import load_settings
    from lipfarm.common.storage import open_storage
    from lipfarm.job.jobfiles import JobFiles

    return JobFiles(open_storage(env["LIPFARM_STORAGE_URL"], load_settings(env)), job_id)


def _playlist(env: dict[str, str], job_id: str) -> str:
    from lipfarm.common.storage.layout import playlist_key

    return _files(env, job_id).storage.get_bytes(playlist_key(job_id)).decode()


def _retried_publication(farm: Farm, job_id: str, disk: Path) -> Path:
    """Hold the job's finalizer, fill the disk under it, let it go: its first attempt meets a full
    disk. Returns the filler (remove it to give the space back)."""
    (farm.holds / f"{job_id}.finalize.hold").write_text("0")
    until(lambda: farm.state(job_id) == "finalizing", timeout_s=300, what="the job to reach its finalizer")
    filler = fill_disk(disk)
    (farm.holds / f"{job_id}.finalize.hold").unlink()
    first = until(lambda: [a for a in farm.store.finalize_attempts(job_id) if a.ended_at], timeout_s=120,
                  what="the first finalize attempt to end")[0]
    assert first.outcome == "retry", first
    assert "No space left on device" in first.reason or "ENOSPC" in first.reason, first.reason
    assert farm.state(job_id) == "finalizing"  # not failed for good
    return filler


def test_a_full_disk_at_publication_is_retried_until_space_returns(tmp_path, home, redis_server, demo,
                                                                  short_clip, small_disk):
    server = redis_server("--maxmemory-policy", "noeviction")
    env = farm_env(home, server, tmp_path / "storage")
    farm = Farm(env, tmp_path / "farm", jobs_env={"LIPFARM_TEMP_DIR": str(small_disk)}).start()
    try:
        # space comes back: the next finalizer the recovery pass queues publishes
        job_id = farm.submit(demo, short_clip)
        filler = _retried_publication(farm, job_id, small_disk)
        filler.unlink()
        until(lambda: farm.state(job_id) == "done", timeout_s=120, what="publication once space returned")
        outcomes = [a.outcome for a in farm.store.finalize_attempts(job_id)]
        assert outcomes[0] == "retry" and outcomes[-1] == "done", outcomes

        # a job cancelled while its publication waits, then resumed: playlist, ended.json and state agree
        job_id = farm.submit(demo, short_clip)
        filler = _retried_publication(farm, job_id, small_disk)
        assert lipfarm(env, "cancel", job_id).returncode == 0
        until(lambda: _files(env, job_id).ended() is not None, what="the cancel recorded")
        assert "# lipfarm: job cancelled" in _playlist(env, job_id)
        filler.unlink()
        resumed = lipfarm(env, "resume", job_id)
        assert resumed.returncode == 0, resumed.stderr
        until(lambda: farm.state(job_id) == "done", timeout_s=120, what="the resumed job to publish")
        ended = until(lambda: _files(env, job_id).ended(), what="its end recorded")
        assert ended["job"]["state"] == "done"
        playlist = _playlist(env, job_id)
        assert playlist.rstrip().endswith("#EXT-X-ENDLIST") and "# lipfarm: job" not in playlist, playlist
        assert _files(env, job_id).storage.exists(f"jobs/{job_id}/output.mp4")
    finally:
        farm.stop()


# --- 4. kill -9 leaks nothing ---------------------------------------------------------------------

def _roots(temp: Path) -> dict[Path, list[str]]:
    """Each process root under ``temp`` and the folders in it."""
    return {root: sorted(p.name for p in root.iterdir()) for root in temp.glob("lipfarm-proc.*")}


def test_a_killed_workers_temporary_folders_go_when_another_starts(tmp_path, home, redis_server, demo, short_clip):
    from lipfarm.common.scratch import process_root
    from lipfarm.scheduler.processes import LipfarmProcess

    server = redis_server("--maxmemory-policy", "noeviction")
    temp = tmp_path / "temp"
    env = farm_env(home, server, tmp_path / "storage", LIPFARM_TEMP_DIR=str(temp))
    farm = Farm(env, tmp_path / "farm").start()
    mine = process_root(temp)  # a live process's root: never swept
    try:
        job_id = _submit_held(farm, demo, short_clip)
        until(lambda: any(name.startswith("lipfarm-chunk-") for names in _roots(temp).values() for name in names),
              timeout_s=300, what="the chunk's work folder")
        (dead_root,) = [root for root, names in _roots(temp).items() if any(n.startswith("lipfarm-chunk-") for n in names)]
        os.killpg(farm.render.pid, 9)  # the worker and its render process, mid-chunk
        farm.render.process.wait()
        assert dead_root.is_dir()  # left behind: nothing of the dead process removed it
        replacement = LipfarmProcess.worker(farm.env, tmp_path / "farm" / "render2.log", "--concurrency", "1",
                                            "--queues", "render", "--hostname", f"render2-{os.getpid()}@test")
        replacement.start().wait_ready(timeout_s=120)
        try:
            assert not dead_root.exists()
            assert mine.is_dir()
            (farm.holds / f"{job_id}.0.hold").unlink()
            until(lambda: farm.state(job_id) == "done", timeout_s=300, what="the job, on the new worker")
        finally:
            replacement.stop(timeout_s=20)
    finally:
        farm.stop()


def _submit_held(farm: Farm, demo, audio: Path) -> str:
    """Submit a job (in this process: its id is chosen first) whose chunk 0 pauses after 5 frames."""
    from lipfarm.common import celery_app
    from lipfarm.common.config import load_settings
    from lipfarm.common.identity import new_job_id
    from lipfarm.common.options import RenderOptions
    from lipfarm.scheduler.submit import submit_job

    job_id = new_job_id()
    (farm.holds / f"{job_id}.0.hold").write_text("5")
    settings = load_settings({**os.environ, **farm.env})
    celery_app.configure(celery_app.app, settings)
    try:
        submit_job(settings, avatar=demo.avatar_name, audio=audio, encoder=demo.encoder, generator=demo.generator,
                   options=RenderOptions(chunk_frames=25), job_id=job_id)
    finally:
        celery_app.configure(celery_app.app, load_settings())
    return job_id


def test_a_killed_apis_partial_upload_goes_when_it_starts_again(tmp_path, home, redis_server):
    import socket

    server = redis_server("--maxmemory-policy", "noeviction")
    temp = tmp_path / "temp"
    env = farm_env(home, server, tmp_path / "storage", LIPFARM_TEMP_DIR=str(temp))
    token = lipfarm(env, "token", "create", "--name", "uploader").stdout.split()[-1]
    api = Api(env, tmp_path / "api.log")
    boundary = "lipfarmboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"big.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", api.port)) as conn:
        conn.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {50 << 20}\r\n\r\n").encode() + head + bytes(4 << 20))
        partial = until(lambda: [p for p in temp.glob("lipfarm-proc.*/lipfarm-upload-*/*") if p.stat().st_size > 0],
                        timeout_s=60, what="the partial upload on disk")
        os.killpg(api.process.pid, 9)  # mid-upload
        api.process.wait()
    dead_root = partial[0].parents[1]
    assert dead_root.is_dir()
    again = Api(env, tmp_path / "api2.log")
    try:
        assert not dead_root.exists()
    finally:
        again.stop()


# --- 5. two farms on one storage -----------------------------------------------------------------

def _job_ids(server: RedisServer) -> set[str]:
    return {key.decode().rsplit(":", 1)[1] for key in server.client().scan_iter(f"{PREFIX}:job:*")}


def test_two_farms_on_one_storage_each_rebuild_only_their_own_jobs(tmp_path, home, redis_server, demo, short_clip):
    storage = tmp_path / "storage"
    first, second = redis_server("--maxmemory-policy", "noeviction"), redis_server("--maxmemory-policy", "noeviction")
    env_a = farm_env(home, first, storage)  # no id set: made once, and the storage's first farm
    env_b = farm_env(home, second, storage, LIPFARM_FARM_ID="farm-b")
    submit = ("submit", "--avatar", demo.avatar_name, "--audio", str(short_clip), "--encoder", str(demo.encoder),
              "--generator", str(demo.generator))
    job_a, job_b = (lipfarm(env, *submit).stdout.split()[-1] for env in (env_a, env_b))
    assert _job_ids(first) == {job_a} and _job_ids(second) == {job_b}
    stamps = {job: json.loads((storage / "jobs" / job / "job.json").read_text())["farm_id"] for job in (job_a, job_b)}
    assert stamps[job_b] == "farm-b" and stamps[job_a] not in ("", "farm-b")

    for server, env, own, other in ((first, env_a, job_a, job_b), (second, env_b, job_b, job_a)):
        asked = lipfarm(env, "reconcile", "--rebuild")  # Redis intact: the other farm's job stays the other's
        assert asked.returncode == 0 and "other_farms 1" in asked.stdout, asked.stdout + asked.stderr
        server.client().flushall()  # Redis lost everything, its farm id too
        lost = lipfarm(env, "reconcile")
        assert lost.returncode == 0, lost.stderr
        assert _job_ids(server) == {own}, (lost.stdout, lost.stderr)
        assert lipfarm(env, "status", other).returncode == 4

    clash = lipfarm({**env_a, "LIPFARM_FARM_ID": "farm-b"}, "reconcile")  # two ids for one Redis: refused
    assert clash.returncode == 5 and "farm" in one_line(clash.stderr)


def test_whose_temporary_folders_are_swept(tmp_path):
    """Dead here (gone, a zombie, an earlier boot) are swept; alive, or another host's, stay."""
    import socket

    from lipfarm.common import scratch

    child = subprocess.Popen(["true"])
    until(lambda: Path(f"/proc/{child.pid}/stat").read_text().split(")")[1].split()[0] == "Z", what="a zombie")
    zombie = scratch.root_name(child.pid)
    alive = scratch.root_name()
    host, boot = socket.gethostname(), scratch.boot_id()
    earlier_boot = alive.replace(f".{boot}.", ".ffffffff." if boot != "ffffffff" else ".00000000.", 1)
    other_host = alive.replace(f".{host}.", f".{host}-elsewhere.", 1)
    for name in (zombie, alive, earlier_boot, other_host):
        (tmp_path / name / "lipfarm-chunk-x").mkdir(parents=True)
    removed = {p.name for p in scratch.sweep(tmp_path)}
    child.wait()
    assert removed == {zombie, earlier_boot}
    assert (tmp_path / alive).is_dir() and (tmp_path / other_host).is_dir()


def test_a_killed_render_process_leaves_nothing_while_its_worker_lives(tmp_path, home, redis_server, demo,
                                                                      short_clip):
    """No start follows (the worker forks a new render process lazily): the recovery loop of every
    worker sweeps its host each interval."""
    server = redis_server("--maxmemory-policy", "noeviction")
    temp = tmp_path / "temp"
    env = farm_env(home, server, tmp_path / "storage", LIPFARM_TEMP_DIR=str(temp))
    farm = Farm(env, tmp_path / "farm").start()
    try:
        job_id = _submit_held(farm, demo, short_clip)
        until(lambda: any(name.startswith("lipfarm-chunk-") for names in _roots(temp).values() for name in names),
              timeout_s=300, what="the chunk's work folder")
        (dead_root,) = [root for root, names in _roots(temp).items() if any(n.startswith("lipfarm-chunk-") for n in names)]
        pid = int(dead_root.name.split(".")[-2])
        assert pid in farm.render.children()
        os.kill(pid, 9)
        until(lambda: not dead_root.exists(), timeout_s=30, what="the dead render process's folder swept")
        (farm.holds / f"{job_id}.0.hold").unlink()
        until(lambda: farm.state(job_id) == "done", timeout_s=300, what="the job")
    finally:
        farm.stop()
