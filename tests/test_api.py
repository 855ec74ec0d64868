"""The HTTP API (``lipfarm api``) as a client meets it: a real ``lipfarm api`` process on loopback,
Redis DB 10, local storage, tokens made with ``lipfarm token create``.

No workers run here, so every job stays queued where a test left it (cancel and resume are then
deterministic); tests/test_jobs_page.py runs the API with a real farm, the output endpoint and the
page. Every refusal is checked for its status, its error body (code, field) and for what it must not
do: nothing queued in Redis or the broker, nothing written to storage or the avatar folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import hypothesis
import pytest

from lipfarm.common.config import load_settings
from lipfarm.demo import avatar as demo_avatar
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.processes import LipfarmProcess
from tests.farm import farm_env, free_ports, redis_client, REDIS_DB, redis_url

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
API_DB = REDIS_DB["api"]
API_PREFIX = "lipfarm-apitest"
AUDIO_LIMIT_MB, AVATAR_LIMIT_MB = 1, 2
BROKER_QUEUES = ("jobs", "render", "finalize")
FUZZ_EXAMPLES, FUZZ_DEADLINE_MS = 25, 20_000  # per operation and mode; a deadline that allows an ffmpeg probe


# ---------------------------------------------------------------------------------------------
# The API process and its tokens (tests/test_jobs_page.py uses these too)

def flush_api_db() -> None:
    redis_client(API_DB).flushdb()


def api_env(home: Path, **extra: str) -> dict[str, str]:
    """Settings of an API (and of workers beside it): Redis DB 10, a prefix of its own, local storage."""
    return farm_env(home, str(home / "storage"), None, LIPFARM_BROKER_URL=redis_url(API_DB),
                    LIPFARM_KEY_PREFIX=API_PREFIX, **extra)


def start_api(env: dict[str, str], log: Path) -> tuple[LipfarmProcess, str]:
    """``lipfarm api`` on a free loopback port, once it listens; returns it and its base URL."""
    port = free_ports(1)[0]
    process = LipfarmProcess(["api", "--host", "127.0.0.1", "--port", str(port)], env=env, log=log,
                             ready_text=b"Uvicorn running on").start()
    process.wait_ready(timeout_s=60)
    return process, f"http://127.0.0.1:{port}"


def lipfarm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The ``lipfarm`` command, run as a user would, with ``env``."""
    command = [str(Path(sys.executable).parent / "lipfarm"), *args]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def make_token(env: dict[str, str], name: str, *flags: str) -> str:
    done = lipfarm(env, "token", "create", "--name", name, *flags)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


def queued_messages() -> dict[str, int]:
    """Messages waiting in the broker, by Celery queue (kombu keeps one list per priority step)."""
    client = redis_client(API_DB, decode_responses=True)
    lists = [k for q in BROKER_QUEUES for k in client.keys(f"{q}*") if client.type(k) == "list"]
    return {name: client.llen(name) for name in sorted(lists)}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def api_home(tmp_path_factory, demo) -> Path:
    """An API home of its own, with the demo assets (avatar 'demo', the models)."""
    from lipfarm.demo.assets import ensure_demo_assets

    home = tmp_path_factory.mktemp("api-home")
    ensure_demo_assets(load_settings({"LIPFARM_HOME": str(home)}))
    return home


@pytest.fixture(scope="module")
def env(api_home) -> dict[str, str]:
    return api_env(api_home, LIPFARM_API_MAX_AUDIO_MB=str(AUDIO_LIMIT_MB),
                   LIPFARM_API_MAX_AVATAR_MB=str(AVATAR_LIMIT_MB), LIPFARM_API_MAX_MODEL_MB="64")


@pytest.fixture(scope="module")
def api(env, tmp_path_factory):
    """A ``lipfarm api`` process; Redis DB 10 is flushed before and after."""
    flush_api_db()
    process, base = start_api(env, tmp_path_factory.mktemp("api") / "api.log")
    try:
        yield base
    finally:
        process.stop(timeout_s=20)
        flush_api_db()


@pytest.fixture(scope="module")
def token(env, api) -> str:
    return make_token(env, "tests")


@pytest.fixture(scope="module")
def reader_token(env, api) -> str:
    return make_token(env, "reader", "--read-only")


@pytest.fixture
def client(api, token):
    with httpx.Client(base_url=api, headers=bearer(token), timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def talk(tmp_path_factory, speech_16k) -> Path:
    """2 s of the demo speech."""
    path = tmp_path_factory.mktemp("talk") / "talk.wav"
    write_wav(path, speech_16k[:2 * 16000])
    return path


@pytest.fixture
def untouched(api_home):
    """Asserts, after the test, that it queued nothing and wrote nothing (storage, avatars, Redis jobs)."""
    def snapshot():
        client = redis_client(API_DB)
        storage = api_home / "storage"
        return {"jobs": client.zrange(f"{API_PREFIX}:jobs", 0, -1),
                "queued": queued_messages(),
                "storage": sorted(str(p.relative_to(storage)) for p in storage.rglob("*")) if storage.exists() else [],
                "avatars": sorted(p.name for p in (api_home / "avatars").iterdir())}

    before = snapshot()
    yield
    assert snapshot() == before


def submit(client: httpx.Client, audio: Path, **fields) -> httpx.Response:
    with open(audio, "rb") as handle:
        return client.post("/v1/jobs", data={"avatar": "demo", "chunk_frames": "25", **fields},
                           files={"audio": (audio.name, handle, "audio/wav")})


def error_of(response: httpx.Response, status: int, code: str | None = None, field: str | None = None) -> str:
    """The error message of a refusal, after checking its status, shape, code and field."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if field is not None:
        assert error["field"] == field, error
    return error["message"]


# ---------------------------------------------------------------------------------------------
# Health, tokens

def test_health_answers_without_a_token(api):
    response = httpx.get(f"{api}/v1/health")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ok"
    assert body["checks"] == {"redis": "ok", "storage": "ok"}
    assert abs(body["clock_drift_s"]) < 1 and "warnings" not in body  # this host keeps Redis's time


def test_health_names_the_service_that_does_not_answer(api_home, tmp_path):
    from lipfarm.api.app import create_app
    from tests.browser import live_server

    down = load_settings({**api_env(api_home), "LIPFARM_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0"})
    with live_server(create_app(down)) as base:
        response = httpx.get(f"{base}/v1/health", timeout=30)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["checks"]["storage"] == "ok"
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in body["checks"]["redis"]
    assert "hunter2" not in response.text


def test_an_unexpected_error_is_a_500_without_its_traceback(api_home, caplog):
    from lipfarm.api.app import create_app
    from tests.browser import live_server

    def broken():
        raise KeyError("internal detail")

    app = create_app(load_settings(api_env(api_home)))
    app.state.farm.tokens = broken  # a bug behind every authenticated request
    with caplog.at_level("ERROR", logger="lipfarm.api"), live_server(app) as base:
        response = httpx.get(f"{base}/v1/jobs", headers=bearer("lf_anything"))
    assert response.status_code == 500
    message = error_of(response, 500, "internal")
    assert message.startswith("internal error (logged as ") and "internal detail" not in response.text
    incident = message.split("logged as ")[1].rstrip(")")
    assert any(incident in record.getMessage() and record.exc_info for record in caplog.records)


def test_token_commands_create_list_and_revoke(env, api):
    made = lipfarm(env, "token", "create", "--name", "ci", "--read-only")
    assert made.returncode == 0, made.stderr
    value = made.stdout.split()[-1]
    assert made.stdout.startswith("created token 'ci' of tenant 'default' (read-only)") and value.startswith("lf_")
    listed = lipfarm(env, "token", "list")
    assert "ci" in listed.stdout and "read-only" in listed.stdout and value not in listed.stdout
    stored = redis_client(API_DB, decode_responses=True)  # only its SHA-256 is kept
    kept = [stored.hgetall(k) for k in stored.keys(f"{API_PREFIX}:api:token*")]
    assert kept and value not in str(kept) and hashlib.sha256(value.encode()).hexdigest() in str(kept)
    assert httpx.get(f"{api}/v1/jobs", headers=bearer(value)).status_code == 200
    duplicate = lipfarm(env, "token", "create", "--name", "ci")
    assert duplicate.returncode == 2 and "a token of this name exists" in duplicate.stderr
    revoked = lipfarm(env, "token", "revoke", "ci")
    assert revoked.returncode == 0 and "revoked token 'ci'" in revoked.stdout
    error_of(httpx.get(f"{api}/v1/jobs", headers=bearer(value)), 401, "unauthorized", "Authorization")
    again = lipfarm(env, "token", "revoke", "ci")
    assert again.returncode == 4 and "unknown token 'ci'" in again.stderr


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer lf_not-a-token"}, {"Authorization": "Basic eDp5"},
                                     {"Authorization": "Bearer"}])
def test_no_token_or_a_bad_one_gets_401(api, talk, untouched, headers):
    with httpx.Client(base_url=api, headers=headers) as anonymous:
        message = error_of(anonymous.get("/v1/jobs"), 401, "unauthorized", "Authorization")
        assert "token" in message
        assert anonymous.get("/v1/jobs").headers["www-authenticate"] == "Bearer"
        error_of(submit(anonymous, talk), 401, "unauthorized")
        error_of(anonymous.get("/v1/avatars"), 401)


def test_a_read_only_token_reads_but_does_not_write(api, reader_token, talk, untouched):
    with httpx.Client(base_url=api, headers=bearer(reader_token)) as reader:
        assert reader.get("/v1/jobs").status_code == 200
        assert reader.get("/v1/avatars").status_code == 200
        message = error_of(submit(reader, talk), 403, "forbidden", "Authorization")
        assert "read-only" in message
        error_of(reader.delete("/v1/jobs/20260101-000000-abcdef"), 403, "forbidden")
        error_of(reader.post("/v1/models", files={"model": ("m.onnx", b"x")}), 403, "forbidden")


# ---------------------------------------------------------------------------------------------
# Jobs

def test_submit_follow_list_cancel_and_resume(client, talk):
    created = submit(client, talk, priority="high", video_qp="18")
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["state"] == "queued" and job["avatar"] == "demo" and job["audio"] == "talk.wav"
    assert job["priority"] == "high" and job["output_url"] is None and job["running"] == []
    assert job["tenant"] == "default"  # a token made without --tenant, as every token before tenants
    assert set(job) == {"id", "tenant", "state", "priority", "avatar", "audio", "created_at", "created_at_iso",
                        "finished_at", "finished_at_iso", "elapsed_s", "eta_s", "frames_done", "frames_total", "chunks", "reason", "output_url", "playlist_url",
                        "playable_until_s", "running", "webhook"}
    assert job["webhook"] is None  # none was asked for
    assert sum(queued_messages().values()) >= 1  # its plan is queued
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    assert job["id"] in [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
    error_of(client.post(f"/v1/jobs/{job['id']}/resume"), 409, "conflict", "job_id")

    cancelled = client.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert "already ended: cancelled" in error_of(client.delete(f"/v1/jobs/{job['id']}"), 409, "conflict")
    resumed = client.post(f"/v1/jobs/{job['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "queued"
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200


def test_submit_audio_already_in_storage(client, api_home, talk):
    uploads = api_home / "storage" / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(talk, uploads / "my talk.wav")
    created = client.post("/v1/jobs", json={"audio_key": "uploads/my talk.wav", "avatar": "demo", "chunk_frames": 25})
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["audio"] == "my_talk.wav" and job["state"] == "queued"
    assert (api_home / "storage" / "jobs" / job["id"] / "input" / "my_talk.wav").is_file()
    client.delete(f"/v1/jobs/{job['id']}")


def test_the_same_idempotency_key_gives_the_same_job(client, talk):
    first = submit(client, talk, idempotency_key="talk-1")
    assert first.status_code == 201, first.text
    again = submit(client, talk, idempotency_key="talk-1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    with open(talk, "rb") as handle:  # the header works the same
        header = client.post("/v1/jobs", data={"avatar": "demo", "chunk_frames": "25"},
                             files={"audio": ("talk.wav", handle)}, headers={"Idempotency-Key": "talk-1"})
    assert header.status_code == 200 and header.json()["id"] == first.json()["id"]
    ids = redis_client(API_DB, decode_responses=True).zrange(f"{API_PREFIX}:jobs", 0, -1)
    assert ids.count(first.json()["id"]) == 1
    jobs_before = len(ids)
    message = error_of(submit(client, talk, idempotency_key="talk-1", priority="low"), 409,
                       "idempotency_conflict", "idempotency_key")
    assert "'talk-1'" in message
    assert len(redis_client(API_DB).zrange(f"{API_PREFIX}:jobs", 0, -1)) == jobs_before
    ttl = redis_client(API_DB).ttl(next(iter(redis_client(API_DB).keys(f"{API_PREFIX}:api:idempotency:*"))))
    assert 23 * 3600 < ttl <= 24 * 3600
    client.delete(f"/v1/jobs/{first.json()['id']}")


def test_a_refused_submission_leaves_its_idempotency_key_free(client, talk, tmp_path):
    notes = tmp_path / "notes.wav"
    notes.write_text("not sound\n" * 100)
    error_of(submit(client, notes, idempotency_key="retry-1"), 422, "invalid", "audio")
    corrected = submit(client, talk, idempotency_key="retry-1")
    assert corrected.status_code == 201, corrected.text
    client.delete(f"/v1/jobs/{corrected.json()['id']}")


def test_jobs_are_listed_newest_first_in_pages(client, talk):
    made = [submit(client, talk).json()["id"] for _ in range(3)]
    client.delete(f"/v1/jobs/{made[1]}")
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["jobs"]] == made[::-1][:2] and first["next_cursor"]
    submit_later = submit(client, talk).json()["id"]  # a newer job does not shift the next page
    second = client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert second["jobs"][0]["id"] == made[0]
    listed = client.get("/v1/jobs", params={"state": "cancelled", "limit": 100}).json()["jobs"]
    assert made[1] in [j["id"] for j in listed] and all(j["state"] == "cancelled" for j in listed)
    error_of(client.get("/v1/jobs", params={"cursor": "not-a-cursor"}), 422, "invalid", "cursor")
    error_of(client.get("/v1/jobs", params={"limit": 0}), 422, "invalid", "limit")
    error_of(client.get("/v1/jobs", params={"state": "sleeping"}), 422, "invalid", "state")
    for job_id in (*made, submit_later):
        client.delete(f"/v1/jobs/{job_id}")


def test_signed_urls_expire_and_cannot_be_altered():
    from lipfarm.api.signing import Signer

    signer = Signer("secret", ttl_s=6 * 3600)
    url = signer.signed("/v1/jobs/a/output", now=1000.0)
    path, query = url.split("?")
    params = dict(pair.split("=") for pair in query.split("&"))
    expires, signature = int(params["expires"]), params["signature"]
    assert 1000 + 6 * 3600 <= expires <= 1000 + 7 * 3600
    assert signer.signed(path, now=1060.0) == url  # the same URL from poll to poll: a player is not reloaded
    assert signer.valid(path, expires, signature, now=expires - 1)
    assert not signer.valid(path, expires, signature, now=expires + 1)
    assert not signer.valid("/v1/jobs/b/output", expires, signature, now=2000.0)
    assert not signer.valid(path, expires + 1, signature, now=2000.0)
    assert not Signer("another", ttl_s=6 * 3600).valid(path, expires, signature, now=2000.0)
    assert not signer.valid(path, expires, "\u00e9" * 64, now=2000.0)


def test_live_files_need_a_signature_of_their_folder(client, api, talk):
    from lipfarm.api.signing import Signer, live_folder

    job = submit(client, talk).json()
    assert job["playlist_url"] is None and job["playable_until_s"] == 0  # nothing playable yet
    secret = redis_client(API_DB, decode_responses=True).get(f"{API_PREFIX}:api:secret")
    signed = Signer(secret, ttl_s=3600).signed_folder(live_folder(job["id"]), "index.m3u8", now=time.time())
    assert "has no live playlist" in error_of(httpx.get(api + signed), 404, "not_found")
    folder, expires, _, name = signed.rsplit("/", 3)
    error_of(httpx.get(f"{api}{folder}/{expires}/{'0' * 64}/{name}"), 401, "unauthorized", "signature")
    client.delete(f"/v1/jobs/{job['id']}")


# ---------------------------------------------------------------------------------------------
# Bad input: a 4xx naming the problem, and nothing queued or written

def _raw_request(base: str, head: str, body_parts, *, read_after: bool = True) -> tuple[int, dict]:
    """Send a request by hand (``body_parts`` as chunked transfer encoding, never finished) and read
    the answer: proof that the server answered before the whole body was read."""
    host, port = base.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        for part in body_parts:
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def _oversized_upload(base: str, token: str, path: str, field: str, limit_mb: float, extra: bytes = b"") -> tuple:
    boundary = "lipfarmtestboundary"
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n")
    opening = extra + (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"big.bin\"\r\n"
                       f"Content-Type: application/octet-stream\r\n\r\n").encode()
    limit = int(limit_mb * (1 << 20))
    piece = 64 * 1024
    parts = [opening] + [b"\0" * piece] * (limit // piece) + [b"\0" * 1024]  # the last piece crosses the limit
    return _raw_request(base, head, parts)


def test_an_oversized_upload_is_refused_before_the_body_is_read(api, token, untouched):
    status, body = _oversized_upload(api, token, "/v1/jobs", "audio", AUDIO_LIMIT_MB)
    assert status == 413 and body["error"]["code"] == "too_large" and body["error"]["field"] == "audio"
    status, body = _oversized_upload(api, token, "/v1/avatars", "archive", AVATAR_LIMIT_MB)
    assert status == 413 and body["error"]["field"] == "archive"
    declared = (f"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 10000000000\r\n\r\n")
    status, body = _raw_request(api, declared, [])  # refused on its declared length alone: nothing sent
    assert status == 413 and "at most 1 MB" in body["error"]["message"]


def test_bad_submissions_are_refused_naming_the_problem(client, talk, tmp_path, untouched):
    notes = tmp_path / "notes.wav"
    notes.write_text("these are my notes, not sound\n" * 50)
    cases = [
        (submit(client, talk, avatar="nobody"), 404, "not_found", "avatar", "unknown avatar 'nobody'"),
        (submit(client, talk, avatar="../etc"), 422, "invalid", "avatar", "invalid avatar name"),
        (submit(client, notes), 422, "invalid", "audio", "notes.wav: not a readable media file"),
        (submit(client, talk, webhook_url="ftp://example.com/x"), 422, "invalid", "webhook_url", "http(s)"),
        (submit(client, talk, webhook_url="https:///nohost"), 422, "invalid", "webhook_url", "with a host"),
        (submit(client, talk, webhook_url="http://0x7f000001:6379/"), 422, "invalid", "webhook_url", "loopback"),
        (submit(client, talk, webhook_url="http://169.254.169.254/latest/meta-data/"), 422, "invalid",
         "webhook_url", "metadata"),
        (submit(client, talk, chunk_frames="30"), 422, "invalid", "chunk_frames", "multiple of 25"),
        (submit(client, talk, chunk_frames="many"), 422, "invalid", "chunk_frames", "integer"),
        (submit(client, talk, sync_mode="pingpong"), 422, "invalid", "sync_mode", "bounce | loop | cut_off"),
        (submit(client, talk, colour="blue"), 422, "invalid", "colour", "Extra inputs"),
        (submit(client, talk, priority="urgent"), 422, "invalid", "priority", "'high', 'normal' or 'low'"),
        (submit(client, talk, encoder="0" * 64, generator="1" * 64), 422, "invalid", "encoder", "POST /v1/models"),
        (submit(client, talk, encoder="0" * 64), 422, "invalid", "generator", "both"),
        (client.post("/v1/jobs", data={"avatar": "demo"}, files={"other": ("x", b"x")}), 422, "invalid", "audio",
         "no audio file"),
        (client.post("/v1/jobs", content=b'{"avatar": "demo", "audio_key": ',
                     headers={"Content-Type": "application/json"}), 422, "invalid", "body", "not valid JSON"),
        (client.post("/v1/jobs", json={"avatar": "demo"}), 422, "invalid", "audio_key", "required"),
        (client.post("/v1/jobs", json={"avatar": "demo", "audio_key": "../secrets.wav"}), 422, "invalid",
         "audio_key", "without '..'"),
        (client.post("/v1/jobs", json={"avatar": "demo", "audio_key": "/etc/passwd"}), 422, "invalid",
         "audio_key", "leading '/'"),
        (client.post("/v1/jobs", json={"avatar": "demo", "audio_key": "uploads/none.wav"}), 404, "not_found",
         "audio_key", "no object 'uploads/none.wav'"),
        (client.post("/v1/jobs", json=["a", "list"]), 422, "invalid", None, "valid dictionary"),
        (client.post("/v1/jobs", content=b"avatar=demo", headers={"Content-Type": "text/plain"}), 415,
         "unsupported_media_type", "Content-Type", "multipart/form-data"),
    ]
    for response, status, code, field, words in cases:
        message = error_of(response, status, code, field)
        assert words in message, (message, words)
        assert "lipfarm-upload-" not in message and "lipfarm-audio-" not in message, message  # no temporary paths


def test_unknown_and_hostile_job_ids(client, untouched):
    assert "unknown job 'nope'" in error_of(client.get("/v1/jobs/nope"), 404, "not_found")
    error_of(client.delete("/v1/jobs/nope"), 404, "not_found")
    error_of(client.post("/v1/jobs/nope/resume"), 404, "not_found")
    error_of(client.get("/v1/jobs/a..b"), 422, "invalid", "job_id")
    error_of(client.get("/v1/jobs/.hidden"), 422, "invalid", "job_id")
    error_of(client.get("/v1/nowhere"), 404, "not_found")
    error_of(client.put("/v1/jobs"), 405, "method_not_allowed")


# ---------------------------------------------------------------------------------------------
# Avatars and models

def _dataset_archive(tmp_path: Path, kind: str = "tar.gz", frames: int = 4) -> Path:
    dataset = demo_avatar.write_dataset(tmp_path / "May", frames=frames)
    archive = tmp_path / f"may.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(dataset.rglob("*")):
                zf.write(path, path.relative_to(tmp_path).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(dataset, arcname="May")
    return archive


def _upload_avatar(client: httpx.Client, archive: Path | tuple, name: str, **fields) -> httpx.Response:
    upload = archive if isinstance(archive, tuple) else (archive.name, archive.read_bytes())
    return client.post("/v1/avatars", data={"name": name, **fields}, files={"archive": upload})


def test_import_an_avatar_from_an_archive_and_list_it(client, api_home, tmp_path):
    made = _upload_avatar(client, _dataset_archive(tmp_path), "may")
    assert made.status_code == 201, made.text
    avatar = made.json()
    assert avatar["name"] == "may" and avatar["frames"] == 4 and avatar["size"] == "1280x720"
    assert avatar["layout"] == "synctalk_dataset" and "landmarks/{k}.lms" in avatar["pairing"]
    listed = {a["name"]: a for a in client.get("/v1/avatars").json()["avatars"]}
    assert listed["may"]["hash"] == avatar["hash"] and "demo" in listed
    error_of(_upload_avatar(client, _dataset_archive(tmp_path / "again", "zip"), "may"), 409, "conflict", "name")
    replaced = _upload_avatar(client, _dataset_archive(tmp_path / "zip", "zip", frames=5), "may", replace="true")
    assert replaced.status_code == 201 and replaced.json()["frames"] == 5
    package = io.BytesIO()  # a lipfarm package (avatar.json + frames/), as copied from another machine
    with tarfile.open(fileobj=package, mode="w") as tar:
        tar.add(api_home / "avatars" / "may", arcname="may")
    copied = _upload_avatar(client, ("may.tar", package.getvalue()), "may-copy")
    assert copied.status_code == 201, copied.text
    assert copied.json()["layout"] == "lipfarm package" and copied.json()["hash"] == replaced.json()["hash"]
    for name in ("may", "may-copy"):
        shutil.rmtree(api_home / "avatars" / name)


def _hostile_archive(kind: str) -> tuple[str, bytes]:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        if kind == "link":
            info = tarfile.TarInfo("May/full_body_img")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc"
            tar.addfile(info)
        else:
            info = tarfile.TarInfo("../../escaped.txt")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    return f"{kind}.tar", data.getvalue()


def test_bad_avatar_uploads_are_refused_naming_the_problem(client, tmp_path, untouched):
    message = error_of(_upload_avatar(client, _hostile_archive("slip"), "evil"), 422, "invalid")
    assert "slip.tar: member '../../escaped.txt': path escapes the archive" in message
    message = error_of(_upload_avatar(client, _hostile_archive("link"), "evil"), 422, "invalid")
    assert "link.tar: member 'May/full_body_img': is a symbolic link (to '/etc')" in message
    message = error_of(_upload_avatar(client, ("notes.tar", b"plain text, not an archive"), "evil"), 422)
    assert "notes.tar: unknown archive format" in message
    message = error_of(_upload_avatar(client, ("empty.zip", _empty_zip()), "evil"), 422)
    assert "the archive holds no avatar" in message
    error_of(_upload_avatar(client, _dataset_archive(tmp_path), "../evil"), 422, "invalid", "name")
    error_of(_upload_avatar(client, _dataset_archive(tmp_path / "b"), "demo"), 409, "conflict", "name")
    error_of(client.post("/v1/avatars", data={"name": "evil"}), 415, "unsupported_media_type")
    error_of(client.post("/v1/avatars", files={"name": (None, "evil")}), 422, field="archive")
    assert not list(Path("/").glob("escaped.txt"))


def _empty_zip() -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr("readme.txt", "no avatar here")
    return data.getvalue()


def test_upload_models_and_submit_with_them(client, demo, talk):
    kinds = {}
    for path in (demo.encoder, demo.generator):
        with open(path, "rb") as handle:
            made = client.post("/v1/models", files={"model": (path.name, handle)})
        assert made.status_code == 201, made.text
        kinds[made.json()["kind"]] = made.json()["sha256"]
    assert set(kinds) == {"encoder", "generator"}
    listed = {m["sha256"]: m["kind"] for m in client.get("/v1/models").json()["models"]}
    assert listed == {sha: kind for kind, sha in kinds.items()}
    job = submit(client, talk, encoder=kinds["encoder"], generator=kinds["generator"])
    assert job.status_code == 201, job.text
    client.delete(f"/v1/jobs/{job.json()['id']}")
    swapped = submit(client, talk, encoder=kinds["generator"], generator=kinds["encoder"])
    assert "input" in error_of(swapped, 422, "bad_model")


def test_a_file_that_is_not_a_model_is_refused(client, untouched):
    message = error_of(client.post("/v1/models", files={"model": ("poem.onnx", b"roses are red")}), 422, "bad_model")
    assert "not an ONNX model" in message
    error_of(client.post("/v1/models", files={"model": ("m.onnx", b"x")}, data={"kind": "encoder"}), 422,
             field="kind")


# ---------------------------------------------------------------------------------------------
# The OpenAPI document and a fuzz of the live API

def test_the_committed_openapi_document_is_the_served_one(api):
    served = httpx.get(f"{api}/openapi.json").json()
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == committed, ("docs/openapi.json differs from what the API serves: regenerate it with "
                                 "`lipfarm api --print-openapi > docs/openapi.json`")


def _fuzz_cases() -> list:
    """(operation, mode) for every operation of the committed document (which the test above keeps
    equal to the served one): valid requests, and invalid ones where it takes any input to spoil."""
    import schemathesis

    schema = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.json")
    cases = []
    for result in schema.get_all_operations():
        operation = result.ok()
        takes_input = any(part in operation.definition.raw for part in ("parameters", "requestBody", "security"))
        cases += [pytest.param(operation, mode, id=f"{operation.label} {mode}")
                  for mode in ("positive", "negative") if mode == "positive" or takes_input]
    return cases


@pytest.mark.parametrize("operation, mode", _fuzz_cases())
def test_the_api_never_answers_a_5xx(api, token, operation, mode):
    """Requests generated from the OpenAPI document, valid ones and invalid ones, sent to the live API
    with a valid token (bounded: FUZZ_EXAMPLES each): no 5xx, and every answer as documented."""
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    @hypothesis.given(operation.as_strategy(generation_mode=GenerationMode(mode)))
    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=FUZZ_DEADLINE_MS, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def requests(case):
        # A request the schema allows may still be refused (422) for what a schema cannot say: a chunk
        # size that is not a multiple of the GOP, a file that is not audio, a cursor this API never gave.
        case.call_and_validate(base_url=api, headers=bearer(token), timeout=60,
                               excluded_checks=[positive_data_acceptance])

    requests()
