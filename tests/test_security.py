"""Security bounds, proved with real services and real worker processes.

- Redis with a password and with TLS (``rediss://``): a farm works, and a wrong password or a wrong
  CA is one line (exit 5) that names the problem and never the password.
- Celery takes JSON only: a pickled message reaching a worker is refused before it is unpickled.
- Identifiers a user types (job ids, avatar names) cannot address anything outside their place:
  every entry point answers exit 2 with one line, with nothing written or queued.
- Audio longer than ``LIPFARM_MAX_AUDIO_S`` is refused at submission and in a local render.

Each test starts its own ``redis-server`` processes on free loopback ports (never the one on 6379),
with certificates made by ``trustme``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from lipfarm.common import celery_app, services
from lipfarm.common.celery_app import TASK_RENDER
from lipfarm.common.state.connection import mask_url, redis_failure, redis_tls_options, url_without_tls_params
from lipfarm.common.config import load_settings
from lipfarm.common.errors import InputError
from lipfarm.common.options import RenderOptions
from lipfarm.common.state import JobState
from lipfarm.demo.speech import write_wav
from lipfarm.cli import main
from lipfarm.scheduler.processes import LipfarmProcess
from lipfarm.scheduler.submit import submit_job
from tests.farm import farm_env, free_ports, until
from tests.media import long_silence_ogg

trustme = pytest.importorskip("trustme", reason="trustme (test-only) makes the TLS certificates")

PASSWORD = "s3cret-Pa55"
WRONG = "not-the-password"
CHUNK = RenderOptions(chunk_frames=25)
HOSTILE = ["../x", "a/b", ".hidden", "x\x00y", "a" * 300, ".."]


# --- Servers ---------------------------------------------------------------------------------------


@dataclass
class Certs:
    ca: Path  # the CA that signed the server's certificate
    wrong_ca: Path  # another CA
    cert: Path
    key: Path


class RedisServer:
    """A ``redis-server`` on a free loopback port with a password, plain or TLS-only."""

    def __init__(self, folder: Path, *, certs: Certs | None = None) -> None:
        self.folder, self.certs = folder, certs
        self.port = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        command = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.folder), "--requirepass", PASSWORD]
        if self.certs is None:
            command += ["--port", str(self.port)]
        else:
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.certs.cert),
                        "--tls-key-file", str(self.certs.key), "--tls-ca-cert-file", str(self.certs.ca),
                        "--tls-auth-clients", "no"]
        log = self.folder / "redis.log"
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while b"Ready to accept connections" not in log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.05)
        return self

    def url(self, password: str | None = PASSWORD, *, ca: Path | None = None) -> str:
        scheme = "redis" if self.certs is None else "rediss"
        auth = "" if password is None else f":{password}@"
        query = f"?ssl_cert_reqs=required&ssl_ca_certs={ca}" if ca else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0{query}"

    def client(self) -> redis.Redis:
        tls = {} if self.certs is None else {"ssl_ca_certs": str(self.certs.ca)}
        return redis.Redis.from_url(self.url(), **tls)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    ca, wrong = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = Certs(folder / "ca.pem", folder / "wrong-ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(paths.ca))
    wrong.cert_pem.write_to_path(str(paths.wrong_ca))
    server.cert_chain_pems[0].write_to_path(str(paths.cert))
    server.private_key_pem.write_to_path(str(paths.key))
    return paths


@pytest.fixture(scope="module")
def plain_redis(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis-plain")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory, certs):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis-tls"), certs=certs).start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server was built without TLS: {exc}")
        raise
    yield server
    server.stop()


def _closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_ports(1)[0]}/0"  # nothing listens: a connection attempt fails (exit 5)


@contextlib.contextmanager
def farm_environment(env: dict[str, str]):
    """``env`` in this process's environment, the Celery app configured from it; both restored after."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = load_settings()
        celery_app.configure(celery_app.app, settings)
        services.reset()
        try:
            yield settings
        finally:
            services.reset()
    celery_app.configure(celery_app.app, load_settings())


def _run_cli(capsys, args: list[str]) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def _submit_args(demo, audio: Path, avatar: str = "demo") -> list[str]:
    return ["submit", "--avatar", avatar, "--audio", str(audio), "--encoder", str(demo.encoder),
            "--generator", str(demo.generator)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, speech_16k) -> Path:
    """1.2 s of the demo speech: 29 frames, two chunks of <= 25."""
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    write_wav(path, speech_16k[int(0.3 * 16000):int(1.5 * 16000)])
    return path


# --- Redis URLs: TLS options, masking, one-line failures (no worker) -------------------------------


def test_mask_url_hides_every_password():
    assert mask_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("rediss://default:pw@h/1?ssl_cert_reqs=none") == "rediss://default:***@h/1?ssl_cert_reqs=none"
    assert mask_url("redis://pw@h") == "redis://***@h"  # user info without ':' may be a password
    assert mask_url("redis://h:1/0?password=pw&db=1") == "redis://h:1/0?password=***&db=1"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_tls_options_come_from_the_url_or_the_setting(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    import ssl

    assert redis_tls_options("redis://:pw@h/0") == {}
    assert redis_tls_options(f"rediss://:pw@h/0?ssl_ca_certs={ca}") == {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                                                          "ssl_ca_certs": str(ca)}
    assert redis_tls_options("rediss://:pw@h/0", str(ca)) == {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                                               "ssl_ca_certs": str(ca)}
    assert redis_tls_options("rediss://h/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}  # verified by default
    assert redis_tls_options("rediss://h/0?ssl_cert_reqs=none")["ssl_cert_reqs"] == ssl.CERT_NONE  # only if asked
    assert url_without_tls_params(f"rediss://:pw@h/0?ssl_cert_reqs=required&ssl_ca_certs={ca}") == "rediss://:pw@h/0"
    with pytest.raises(InputError, match=r"ssl_ca_certs: TLS parameters on a plain-text Redis URL "
                                         r"\(expected a rediss:// URL, found redis://:\*\*\*@h/0"):
        redis_tls_options(f"redis://:pw@h/0?ssl_ca_certs={ca}")
    with pytest.raises(InputError, match="LIPFARM_REDIS_TLS_CA_FILE: LIPFARM_REDIS_TLS_CA_FILE is set but this "
                                         "Redis URL is plain text"):
        redis_tls_options("redis://h/0", str(ca))
    with pytest.raises(InputError, match=r"absent.pem: LIPFARM_REDIS_TLS_CA_FILE: file not found"):
        redis_tls_options("rediss://h/0", str(tmp_path / "absent.pem"))
    with pytest.raises(InputError, match=r"ssl_cert_reqs: unknown certificate requirement"):
        redis_tls_options("rediss://h/0?ssl_cert_reqs=maybe")


def test_celery_gets_tls_options_and_json_only(tmp_path):
    import ssl

    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    settings = load_settings({"LIPFARM_BROKER_URL": "rediss://:pw@h:1/0", "LIPFARM_REDIS_TLS_CA_FILE": str(ca)})
    conf = celery_app.configure(Celery("t"), settings).conf
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    assert conf.broker_use_ssl == conf.redis_backend_use_ssl == expected
    assert conf.accept_content == conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    plain = celery_app.configure(Celery("t"), load_settings({})).conf
    assert not plain.broker_use_ssl and not plain.redis_backend_use_ssl


def test_celery_and_redis_py_connect_over_tls_with_a_password(tls_redis, certs):
    bare = tls_redis.url()
    with_params = tls_redis.url(ca=certs.ca)
    for url, ca_file in ((with_params, ""), (bare, str(certs.ca))):
        assert redis.Redis.from_url(url, **redis_tls_options(url, ca_file)).ping()
        app = celery_app.configure(Celery("t"), load_settings({"LIPFARM_BROKER_URL": url,
                                                                "LIPFARM_REDIS_TLS_CA_FILE": ca_file}))
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
        app.backend.set("lipfarm-test-key", "value")
        assert app.backend.get("lipfarm-test-key") == b"value"
    # Without a CA the server's certificate is checked against the system's and refused (kombu on its
    # own would not have checked it at all).
    app = celery_app.configure(Celery("t"), load_settings({"LIPFARM_BROKER_URL": bare}))
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)


def test_redis_failures_are_one_masked_line(plain_redis, tls_redis, certs):
    def failure(url, **tls):
        with pytest.raises(redis.RedisError) as caught:
            redis.Redis.from_url(url, socket_connect_timeout=3, **tls).ping()
        return redis_failure(url, caught.value)

    wrong = failure(plain_redis.url(WRONG))
    assert wrong.startswith(f"Redis at redis://:***@127.0.0.1:{plain_redis.port}/0 refused the credentials")
    assert "requires a password and the URL gives none" in failure(plain_redis.url(None))
    tls = failure(tls_redis.url(ca=certs.wrong_ca))
    assert tls.startswith(f"TLS handshake with Redis at rediss://:***@127.0.0.1:{tls_redis.port}/0?")
    assert "certificate verify failed" in tls and "LIPFARM_REDIS_TLS_CA_FILE" in tls
    closed = _closed_port_url()
    assert failure(closed).startswith(f"cannot reach Redis at {closed} (ConnectionError")
    for text in (wrong, tls):
        assert PASSWORD not in text and WRONG not in text and "\n" not in text


@pytest.mark.parametrize("case", ["wrong password", "no password", "wrong CA", "CA not given", "TLS to a plain port",
                                  "plain text to a TLS port"])
def test_wrong_credentials_or_ca_exit_5_with_one_line(case, plain_redis, tls_redis, certs, demo, clip, capsys):
    url, text, ca_file = {
        "wrong password": (plain_redis.url(WRONG), "refused the credentials", ""),
        "no password": (plain_redis.url(None), "requires a password and the URL gives none", ""),
        "wrong CA": (tls_redis.url(ca=certs.wrong_ca), "certificate verify failed", ""),
        "CA not given": (tls_redis.url(), "certificate verify failed", ""),
        "TLS to a plain port": (f"rediss://:{PASSWORD}@127.0.0.1:{plain_redis.port}/0",
                                "does the server speak TLS on that port?", str(certs.ca)),
        "plain text to a TLS port": (f"redis://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0", "use a rediss:// URL", ""),
    }[case]
    env = {"LIPFARM_BROKER_URL": url, "LIPFARM_REDIS_URL": url, "LIPFARM_REDIS_TLS_CA_FILE": ca_file}
    with farm_environment(env):
        for args in (["status", "x"], _submit_args(demo, clip)):
            started = time.monotonic()
            code, err = _run_cli(capsys, args)
            assert code == 5 and len(err) == 1, (case, args, code, err)
            line = err[0]
            assert text in line and f"127.0.0.1:{url.split(':')[-1].split('/')[0]}" in line, line
            assert PASSWORD not in line and WRONG not in line, line
            assert time.monotonic() - started < 15
    assert plain_redis.client().dbsize() == 0  # the refused submissions wrote nothing


def test_the_state_store_uses_the_ca_setting(tls_redis, certs, capsys):
    env = {"LIPFARM_BROKER_URL": tls_redis.url(), "LIPFARM_REDIS_URL": tls_redis.url(),
           "LIPFARM_REDIS_TLS_CA_FILE": str(certs.ca)}
    with farm_environment(env):
        code, err = _run_cli(capsys, ["status", "no-such-job"])
    assert code == 4 and "unknown job 'no-such-job'" in err[0], err  # reached Redis over TLS, found no job


# --- A real farm on a password-protected Redis, plain and TLS ---------------------------------------


@pytest.fixture(scope="module", params=["plain", "tls"])
def farm(request, tmp_path_factory, home, demo, certs):
    """One ``lipfarm worker`` (all queues) on a password-protected Redis of its own, jobs on local storage."""
    server = request.getfixturevalue("plain_redis" if request.param == "plain" else "tls_redis")
    server.client().flushdb()
    url = server.url(ca=certs.ca if request.param == "tls" else None)
    folder = tmp_path_factory.mktemp(f"farm-{request.param}")
    env = farm_env(home, str(folder / "storage"), None, LIPFARM_BROKER_URL=url, LIPFARM_REDIS_URL=url,
                   LIPFARM_REDIS_TLS_CA_FILE="")
    worker = LipfarmProcess.worker(env, folder / "lipfarm.worker.log", "--concurrency", "1", "--queues",
                                   "jobs,finalize,render", "--hostname", f"sec-{request.param}-{os.getpid()}@test")
    worker.start()
    try:
        worker.wait_ready(timeout_s=120)
        yield env, worker, server
    finally:
        worker.stop(timeout_s=20)
        server.client().flushdb()


@pytest.fixture(scope="module")
def finished_job(farm, demo, clip):
    env, worker, server = farm
    with farm_environment(env) as settings:
        handle = submit_job(settings, avatar=demo.avatar_name, audio=clip, encoder=demo.encoder,
                            generator=demo.generator, options=CHUNK)
        status = handle.wait(timeout_s=300, poll_s=0.3)
    return handle, status


@pytest.mark.slow
def test_a_job_completes_on_a_password_protected_redis(farm, finished_job):
    env, worker, server = farm
    handle, status = finished_job
    assert status.state == JobState.DONE, status.reason
    assert status.frames_done == status.frames_total == 29 and status.chunks == {"committed": 2}
    assert Path(status.output_location).stat().st_size > 0
    log = worker.log.read_text(errors="replace")
    assert PASSWORD not in log
    assert f"{'rediss' if server.certs else 'redis'}://:**@127.0.0.1:{server.port}/0" in log  # the banner, masked


class _Unpickled:
    """Unpickling this makes a directory: proof that a worker deserialized a pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.slow
def test_a_worker_refuses_pickled_messages_and_takes_json(farm, finished_job, tmp_path):
    env, worker, _ = farm
    handle, _ = finished_job
    marker = tmp_path / "unpickled"
    pickled_id, json_id = str(uuid.uuid4()), str(uuid.uuid4())
    with farm_environment(env):
        app = celery_app.app
        attempts_before = handle.store.attempts(handle.job_id, 0)
        headers = {"lang": "py", "task": TASK_RENDER, "id": pickled_id, "root_id": pickled_id, "parent_id": None,
                   "group": None, "shadow": None, "eta": None, "expires": None, "retries": 0,
                   "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}", "origin": "attacker"}
        body = ((), {"job_id": handle.job_id, "chunk": 0, "frames": _Unpickled(str(marker))},
                {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
        with app.connection_for_write() as connection:  # straight to the render queue, as anyone with the broker can
            connection.Producer().publish(body, serializer="pickle", exchange="", routing_key="render",
                                          headers=headers, correlation_id=pickled_id, priority=3)
        # The worker logs the refusal with the raw body, which names the marker: this message's refusal.
        log = until(lambda: (text := worker.log.read_text(errors="replace")) and str(marker) in text and text,
                    timeout_s=60, what="the worker to refuse the pickle")
        assert "ContentDisallowed: Refusing to deserialize untrusted content of type pickle" in log
        assert "The message has been ignored and discarded" in log
        assert not marker.exists()  # never unpickled
        assert handle.store.attempts(handle.job_id, 0) == attempts_before  # the task never ran
        assert app.AsyncResult(pickled_id).state == "PENDING"  # never started, no result
        # The same message as JSON is taken and runs (the chunk is committed already: a duplicate).
        app.send_task(TASK_RENDER, task_id=json_id, kwargs={"job_id": handle.job_id, "chunk": 0, "frames": ""},
                      queue="render", priority=3)
        # results are not kept (nothing reads them): the worker's log line of the task's end says it ran
        done = until(lambda: next((line for line in worker.log.read_text(errors="replace").splitlines()
                                   if json_id in line and "succeeded" in line), None),
                     timeout_s=60, what="the JSON message to run")
        assert "'outcome': 'duplicate'" in done or "'outcome': 'skipped'" in done, done
        assert not marker.exists()


# --- Identifiers at every entry point -----------------------------------------------------------------


def _hostile():
    return [pytest.param(value, id=repr(value)[:20])
            for value in HOSTILE]


@pytest.mark.parametrize("command", ["status", "cancel"])
@pytest.mark.parametrize("job_id", [pytest.param(v, id=repr(v)[:20]) for v in HOSTILE])
def test_hostile_job_ids_on_the_command_line(command, job_id, capsys, monkeypatch):
    monkeypatch.setenv("LIPFARM_BROKER_URL", _closed_port_url())  # exit 5 if anything tried to connect
    monkeypatch.delenv("LIPFARM_REDIS_URL", raising=False)
    code, err = _run_cli(capsys, [command, job_id])
    assert code == 2 and len(err) == 1 and "job id: not a valid identifier" in err[0], err
    assert repr(job_id)[:40] in err[0]


@pytest.mark.parametrize("job_id", [pytest.param(v, id=repr(v)[:20]) for v in HOSTILE])
def test_hostile_job_ids_given_to_submit_job(job_id, plain_redis, demo, clip, tmp_path):
    plain_redis.client().flushdb()
    storage = tmp_path / "storage"
    env = {"LIPFARM_BROKER_URL": plain_redis.url(), "LIPFARM_REDIS_URL": plain_redis.url(),
           "LIPFARM_STORAGE_URL": str(storage), "LIPFARM_REDIS_TLS_CA_FILE": ""}
    with farm_environment(env) as settings:
        with pytest.raises(InputError, match="job id: not a valid identifier"):
            submit_job(settings, avatar=demo.avatar_name, audio=clip, encoder=demo.encoder,
                       generator=demo.generator, options=CHUNK, job_id=job_id)
    assert not storage.exists() or [p for p in storage.rglob("*") if p.is_file()] == []
    assert plain_redis.client().dbsize() == 0  # nothing recorded, nothing queued


@pytest.mark.parametrize("name", _hostile())
@pytest.mark.parametrize("entry", ["avatar show", "avatar import", "submit", "render"])
def test_hostile_avatar_names(entry, name, demo, clip, tmp_path, capsys, monkeypatch):
    from tests.test_avatar import _small_dataset

    monkeypatch.setenv("LIPFARM_BROKER_URL", _closed_port_url())
    monkeypatch.delenv("LIPFARM_REDIS_URL", raising=False)
    settings = load_settings()
    before = sorted(p.name for p in settings.avatars_dir.iterdir())
    args = {"avatar show": ["avatar", "show", name],
            "avatar import": ["avatar", "import", str(_small_dataset(tmp_path / "dataset")), "--name", name],
            "submit": _submit_args(demo, clip, name),
            "render": ["render", "--avatar", name, "--audio", str(clip), "--out", str(tmp_path / "out.mp4")]}[entry]
    code, err = _run_cli(capsys, args)
    assert code == 2 and len(err) == 1 and "invalid avatar name" in err[0], err
    assert sorted(p.name for p in settings.avatars_dir.iterdir()) == before
    assert not (tmp_path / "out.mp4").exists()


# --- Audio length at the entry points -----------------------------------------------------------------


@pytest.fixture(scope="module")
def three_hours(tmp_path_factory):
    return long_silence_ogg(tmp_path_factory.mktemp("long") / "three_hours.ogg", 3 * 3600)


def test_submit_refuses_audio_longer_than_the_maximum_before_any_service(three_hours, demo, capsys, monkeypatch):
    monkeypatch.setenv("LIPFARM_BROKER_URL", _closed_port_url())  # exit 5 if it got that far
    monkeypatch.setenv("LIPFARM_MAX_AUDIO_S", "3600")
    code, err = _run_cli(capsys, _submit_args(demo, three_hours))
    assert code == 2 and len(err) == 1, err
    assert "three_hours.ogg: audio is longer than the maximum (expected at most 3600 s (LIPFARM_MAX_AUDIO_S), " \
           "found 10800.0 s" in err[0]


def test_planning_refuses_audio_that_decodes_longer_than_the_maximum(plain_redis, demo, clip, tmp_path):
    """A container that passed the submit-time probe but decodes longer (as a lying one would): the
    plan fails the job naming the bound, and writes neither PCM nor plan to storage."""
    from lipfarm.job.jobfiles import JobFiles
    from lipfarm.common.storage import open_storage
    from lipfarm.common.storage.layout import pcm_key, plan_key
    from lipfarm.scheduler.planning import plan_submitted_job

    url = plain_redis.url().replace("/0", "/1")  # a database no worker of this module reads
    env = {"LIPFARM_BROKER_URL": url, "LIPFARM_REDIS_URL": url, "LIPFARM_STORAGE_URL": str(tmp_path / "storage"),
           "LIPFARM_REDIS_TLS_CA_FILE": ""}
    with farm_environment(env) as settings:
        handle = submit_job(settings, avatar=demo.avatar_name, audio=clip, encoder=demo.encoder,
                            generator=demo.generator, options=CHUNK)  # 1.2 s: passes the 4 h probe
        queued = []
        storage = open_storage(settings.storage_url, settings)
        result = plan_submitted_job(handle.job_id, store=handle.store, files=JobFiles(storage, handle.job_id),
                                    enqueue_render=lambda *args: queued.append(args), max_audio_s=1.0)
        status = handle.status()
        redis.Redis.from_url(url).flushdb()
    assert result.startswith("failed: ") and "decodes to more than 1 s" in result, result
    assert status.state == JobState.FAILED and "audio is longer than the maximum" in status.reason
    assert queued == [] and not storage.exists(pcm_key(handle.job_id)) and not storage.exists(plan_key(handle.job_id))


def test_a_local_render_stops_decoding_at_the_maximum(three_hours, demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIPFARM_MAX_AUDIO_S", "30")
    work = load_settings().work_dir
    before = set(work.iterdir()) if work.exists() else set()
    started = time.monotonic()
    code, err = _run_cli(capsys, ["render", "--avatar", demo.avatar_name, "--audio", str(three_hours),
                                  "--out", str(tmp_path / "out.mp4"), "--quiet"])
    assert code == 2 and len(err) == 1 and "decodes to more than 30 s" in err[0], err
    assert time.monotonic() - started < 20  # 30 s decoded, not three hours
    assert not (tmp_path / "out.mp4").exists()
    assert (set(work.iterdir()) if work.exists() else set()) == before  # its work files are gone
