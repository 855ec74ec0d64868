"""What a client of the API meets, against a real farm on loopback: ``lipfarm api`` processes and
``lipfarm worker`` processes, Redis DB 15, local storage, a real HTTP server serving audio by URL and a
real webhook receiver.

- Conventions: absolute URLs (``LIPFARM_PUBLIC_URL``, or the request's forwarded host), ISO 8601
  times beside the seconds, the webhook's ``output_url`` a signed API URL that downloads the video.
- Inputs by URL: ``audio_url`` (https from a server whose CA the API trusts, http from an allowed host,
  ``storage:KEY``), and each refusal a 4xx naming ``audio_url`` with nothing queued.
- ``lipfarm.client``: one job rendered by a real worker, submitted, waited on with progress and
  downloaded through ``Client``; ``AsyncClient`` the same; errors as ``ApiError``; webhooks verified.
"""

from __future__ import annotations

import ast
import asyncio
import datetime
import re
import shutil
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from lipfarm.client import ApiError, AsyncClient, Client, Job, WebhookSignatureError, verify_webhook
from lipfarm.common.config import load_settings
from lipfarm.demo.speech import write_wav
from tests.farm import REDIS_DB, Workers, farm_env, redis_client, redis_url, until
from tests.test_api import bearer, error_of, lipfarm, make_token, start_api
from tests.test_webhooks import Receiver

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DB = REDIS_DB["client"]
PREFIX = "lipfarm-clienttest"
SECRET = "whsec-client-0123456789"
PUBLIC_URL = "https://farm.example.com/lipfarm"
AUDIO_LIMIT_MB = 1


# ---------------------------------------------------------------------------------------------
# An audio server on loopback: files of a folder, and the answers a bad URL may meet

class AudioServer:
    """Files of ``folder`` over HTTP, or HTTPS with ``tls`` (an ``ssl.SSLContext``)."""

    def __init__(self, folder: Path, tls: ssl.SSLContext | None = None) -> None:
        self.folder = folder
        self.scheme = "https" if tls else "http"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = unquote(self.path.lstrip("/"))
                if name == "moved.wav":
                    return self._answer(302, b"", {"Location": f"{server.url}/talk.wav"})
                if name == "endless.wav":  # no Content-Length: only counting while it streams can stop it
                    self.send_response(200)
                    self.send_header("Content-Type", "audio/wav")
                    self.end_headers()
                    try:
                        for _ in range(4 * AUDIO_LIMIT_MB * 16):
                            self.wfile.write(b"\0" * 65536)
                    except OSError:  # the farm hung up, as it should
                        pass
                    self.close_connection = True
                    return
                path = server.folder / name
                if not name or not path.is_file():
                    return self._answer(404, b"not here", {})
                return self._answer(200, path.read_bytes(), {"Content-Type": "audio/wav"})

            def _answer(self, status, body, headers):
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# The farm

@pytest.fixture(scope="module")
def farm_home(tmp_path_factory, demo) -> Path:
    from lipfarm.demo.assets import ensure_demo_assets

    path = tmp_path_factory.mktemp("client-home")
    ensure_demo_assets(load_settings({"LIPFARM_HOME": str(path)}))
    return path


@pytest.fixture(scope="module")
def talk(tmp_path_factory, speech_16k) -> Path:
    """1.2 s of the demo speech: one chunk, a short render."""
    path = tmp_path_factory.mktemp("client-talk") / "talk.wav"
    write_wav(path, speech_16k[int(0.3 * 16000):int(1.5 * 16000)])
    return path


@pytest.fixture(scope="module")
def receiver():
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def audio_server(tmp_path_factory, talk):
    folder = tmp_path_factory.mktemp("served")
    shutil.copyfile(talk, folder / "talk.wav")
    (folder / "notes.wav").write_text("these are my notes, not sound\n" * 20)
    server = AudioServer(folder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A CA (its file, for the API process to trust: SSL_CERT_FILE) and the audio server's TLS context."""
    trustme = pytest.importorskip("trustme", reason="trustme (test-only) makes the TLS certificates")
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return {"ca_file": ca_file, "context": context}


@pytest.fixture(scope="module")
def https_server(tmp_path_factory, talk, tls):
    folder = tmp_path_factory.mktemp("served-tls")
    shutil.copyfile(talk, folder / "secure talk.wav")
    server = AudioServer(folder, tls["context"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(farm_home, tls) -> dict[str, str]:
    # the receiver and the audio servers listen on loopback, which the farm refuses unless allowed;
    # the HTTPS one's certificate is of a CA the API trusts through SSL_CERT_FILE
    return farm_env(farm_home, str(farm_home / "storage"), None, LIPFARM_BROKER_URL=redis_url(DB),
                    LIPFARM_KEY_PREFIX=PREFIX, LIPFARM_OUTBOUND_ALLOW="127.0.0.1/32", LIPFARM_WEBHOOK_SECRET=SECRET,
                    LIPFARM_API_MAX_AUDIO_MB=str(AUDIO_LIMIT_MB), SSL_CERT_FILE=str(tls["ca_file"]))


@pytest.fixture(scope="module")
def apis(env, tmp_path_factory):
    """Two API processes of one farm: one as its request reaches it, one with LIPFARM_PUBLIC_URL."""
    redis_client(DB).flushdb()
    logs = tmp_path_factory.mktemp("client-logs")
    plain, base = start_api(env, logs / "api.log")
    public, public_base = start_api({**env, "LIPFARM_PUBLIC_URL": PUBLIC_URL + "/"}, logs / "public-api.log")
    try:
        yield {"base": base, "public": public_base, "logs": logs}
    finally:
        plain.stop(timeout_s=20)
        public.stop(timeout_s=20)
        redis_client(DB).flushdb()


@pytest.fixture(scope="module")
def token(env, apis) -> str:
    return make_token(env, "client-tests")


@pytest.fixture(scope="module")
def farm(apis, token):
    with Client(apis["base"], token) as client:
        yield client


@pytest.fixture(scope="module")
def rendered(env, apis, farm, talk, receiver):
    """One job rendered by a real worker: submitted, waited on and downloaded through ``Client``."""
    workers = Workers(env, apis["logs"], count=1).start()
    try:
        job = farm.submit(talk, chunk_frames=25, webhook_url=receiver.url)
        seen: list[Job] = []
        final = farm.wait(job, progress=seen.append, poll_s=0.2, timeout_s=300)
        until(lambda: receiver.received, timeout_s=60, what="the webhook event")
    finally:
        workers.stop()
    return {"submitted": job, "seen": seen, "final": final}


def _jobs_in_redis() -> int:
    return redis_client(DB).zcard(f"{PREFIX}:jobs")


# ---------------------------------------------------------------------------------------------
# The client, with a real render

def test_a_job_is_submitted_waited_on_and_downloaded(farm, rendered, tmp_path):
    submitted, seen, final = rendered["submitted"], rendered["seen"], rendered["final"]
    assert isinstance(submitted, Job) and submitted.state == "queued" and submitted.audio == "talk.wav"
    assert final.state == "done" and final.ended and final.frames_done == final.frames_total > 0
    assert seen[-1].state == "done" and seen[0].id == submitted.id
    assert [j.frames_done for j in seen] == sorted(j.frames_done for j in seen)  # progress only goes on
    video = farm.download(final, tmp_path / "out.mp4")
    data = video.read_bytes()
    assert data[4:8] == b"ftyp" and len(data) > 1000
    assert httpx.get(final.output_url).content == data  # the signed URL needs no token
    assert farm.playlist_url(final) in (None, final.playlist_url)


def test_the_async_client_does_the_same(apis, token, rendered, talk, farm_home, tmp_path):
    done = rendered["final"]
    (farm_home / "storage" / "uploads").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(talk, farm_home / "storage" / "uploads" / "async.wav")

    async def scenario():
        calls = []
        async with AsyncClient(apis["base"], token) as farm:
            job = await farm.submit(audio_url="storage:uploads/async.wav", chunk_frames=25)
            listed = [j.id async for j in farm.jobs(page_size=1)]
            cancelled = await farm.cancel(job)
            ended = await farm.wait(job, progress=calls.append)
            video = await farm.download(done.id, tmp_path / "async.mp4")
            with pytest.raises(ApiError) as refused:
                await farm.download(job, tmp_path / "none.mp4")
            return job, listed, cancelled, ended, calls, video, refused.value

    job, listed, cancelled, ended, calls, video, refused = asyncio.run(scenario())
    assert job.audio == "async.wav" and job.id in listed and done.id in listed  # every page followed
    assert cancelled.state == ended.state == "cancelled" and calls == [ended]
    assert video.read_bytes()[4:8] == b"ftyp"
    assert (refused.status, refused.code, refused.field) == (409, "conflict", "job_id")


def test_refusals_raise_one_error_class_with_the_api_code_and_field(farm, talk, apis):
    with pytest.raises(ApiError) as caught:
        farm.submit(talk, avatar="nobody")
    assert (caught.value.status, caught.value.code, caught.value.field) == (404, "not_found", "avatar")
    assert "unknown avatar 'nobody'" in caught.value.message
    job = farm.submit(talk, chunk_frames=25)
    farm.cancel(job)
    with pytest.raises(ApiError) as again:
        farm.cancel(job)
    assert (again.value.status, again.value.code, again.value.field) == (409, "conflict", "job_id")
    with pytest.raises(ApiError) as anonymous, Client(apis["base"], "lf_not-a-token") as stranger:
        stranger.job(job.id)
    assert (anonymous.value.status, anonymous.value.field) == (401, "Authorization")
    with pytest.raises(ValueError):
        farm.submit(talk, audio_url="https://example.com/a.wav")  # one or the other


def test_a_webhook_is_verified_with_the_farms_signature(rendered, receiver):
    request = receiver.received[0]
    event = verify_webhook(request.body, request.headers, SECRET)
    assert event["type"] == "job.done" and event["job"]["id"] == rendered["final"].id
    lower = {name.lower(): value for name, value in request.headers.items()}
    assert verify_webhook(request.body, lower, SECRET)["id"] == event["id"]  # header names in any case
    for body, headers, secret, now in [
        (request.body + b" ", request.headers, SECRET, None),  # altered
        (request.body, request.headers, "another secret", None),
        (request.body, {}, SECRET, None),  # unsigned
        (request.body, {"Lipfarm-Signature": "t=x,v1=y"}, SECRET, None),
        (request.body, request.headers, SECRET, time.time() + 3600),  # a replay, an hour later
    ]:
        with pytest.raises(WebhookSignatureError):
            verify_webhook(body, headers, secret, now=now)


def test_the_documented_examples_are_python_that_uses_only_what_the_client_has():
    import lipfarm.client

    page = (ROOT / "docs" / "api.md").read_text()
    section = page.split("## The Python client", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module == "lipfarm.client":
                assert all(hasattr(lipfarm.client, alias.name) for alias in node.names)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "farm":
                assert hasattr(Client, node.attr), node.attr


# ---------------------------------------------------------------------------------------------
# Conventions: absolute URLs, ISO times, the webhook's output URL

def test_urls_are_absolute_after_the_request_host_or_the_public_url(apis, token, rendered):
    job_id = rendered["final"].id
    path = f"/v1/jobs/{job_id}/output?expires="
    cases = [(apis["base"], {}, apis["base"]),
             (apis["base"], {"X-Forwarded-Host": "lipfarm.example.org", "X-Forwarded-Proto": "https"},
              "https://lipfarm.example.org"),
             (apis["base"], {"X-Forwarded-Host": "evil.example/x?y", "X-Forwarded-Proto": "gopher"}, apis["base"]),
             (apis["public"], {"X-Forwarded-Host": "lipfarm.example.org"}, PUBLIC_URL)]
    for base, headers, expected in cases:
        with httpx.Client(base_url=base, headers={**bearer(token), **headers}) as http:
            job = http.get(f"/v1/jobs/{job_id}").json()
            listed = next(j for j in http.get("/v1/jobs").json()["jobs"] if j["id"] == job_id)
        assert job["output_url"].startswith(expected + path), (headers, job["output_url"])
        assert listed["output_url"] == job["output_url"]
    # the public URL's signature is the farm's: the same path downloads from any API process
    public_url = httpx.get(f"{apis['public']}/v1/jobs/{job_id}", headers=bearer(token)).json()["output_url"]
    assert httpx.get(apis["base"] + public_url[len(PUBLIC_URL):]).status_code == 200


def test_times_have_iso_8601_twins(farm, rendered):
    job = farm.job(rendered["final"].id).raw
    for name in ("created_at", "finished_at"):
        iso = job[f"{name}_iso"]
        assert iso.endswith("Z")
        parsed = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
        assert parsed.tzinfo is not None and abs(parsed.timestamp() - job[name]) < 0.001
    assert job["webhook"]["delivered_at_iso"].endswith("Z")
    assert rendered["submitted"].raw["finished_at_iso"] is None  # not yet ended: null, as its seconds


def test_the_webhook_output_url_is_a_signed_api_url(apis, rendered, receiver, farm, tmp_path):
    event = receiver.received[0].event
    url = event["job"]["output_url"]
    assert url.startswith(f"{apis['base']}/v1/jobs/{event['job']['id']}/output?expires=")  # the submitter's base
    assert "storage" not in url and event["job"]["finished_at_iso"].endswith("Z") and event["created_at_iso"]
    video = httpx.get(url)  # no token: the signature is enough
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content == farm.download(event["job"]["id"], tmp_path / "w.mp4").read_bytes()


def test_a_malformed_public_url_is_refused_at_start(env):
    done = lipfarm({**env, "LIPFARM_PUBLIC_URL": "ftp://farm.example.com"}, "api", "--print-openapi")
    assert done.returncode == 2 and "LIPFARM_PUBLIC_URL" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# Inputs by URL

def test_audio_by_url_is_fetched_and_submitted(farm, audio_server, farm_home, talk):
    job = farm.submit(audio_url=f"{audio_server.url}/talk.wav", chunk_frames=25)
    assert job.state == "queued" and job.audio == "talk.wav"
    stored = farm_home / "storage" / "jobs" / job.id / "input" / "talk.wav"
    assert stored.read_bytes() == talk.read_bytes()
    farm.cancel(job)
    uploads = farm_home / "storage" / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(talk, uploads / "kept.wav")
    kept = farm.submit(audio_url="storage:uploads/kept.wav", chunk_frames=25)
    assert kept.audio == "kept.wav"
    farm.cancel(kept)


def test_audio_by_https_url_is_fetched_from_the_checked_address(farm, https_server, farm_home, talk):
    job = farm.submit(audio_url=f"{https_server.url}/secure%20talk.wav", chunk_frames=25)
    assert job.audio == "secure_talk.wav"
    assert (farm_home / "storage" / "jobs" / job.id / "input" / "secure_talk.wav").read_bytes() == talk.read_bytes()
    farm.cancel(job)


def test_bad_audio_urls_are_refused_naming_audio_url(apis, token, audio_server):
    served = audio_server.url
    cases = [
        ("ftp://example.com/a.wav", 422, "http(s)"),
        ("http://93.184.216.34/a.wav", 422, "https:// only"),  # a public host: plain http is not taken
        ("http://169.254.169.254/latest/meta-data/", 422, "metadata"),
        ("http://0x7f000002/a.wav", 422, "loopback"),  # 127.0.0.2: not in the allow-list (127.0.0.1/32)
        ("http://127.0.0.1:1/a.wav", 422, "no answer"),  # allowed, but nothing listens there
        (f"{served}/missing.wav", 404, "not found"),
        (f"{served}/moved.wav", 422, "redirect"),
        (f"{served}/endless.wav", 413, "at most"),
        (f"{served}/notes.wav", 422, "not a readable media file"),
        ("storage:uploads/none.wav", 404, "uploads/none.wav"),
        ("storage:../secrets.wav", 422, ".."),
    ]
    before = _jobs_in_redis()
    with httpx.Client(base_url=apis["base"], headers=bearer(token), timeout=60) as http:
        for url, status, words in cases:
            message = error_of(http.post("/v1/jobs", json={"avatar": "demo", "audio_url": url}), status,
                               field="audio_url")
            assert words in message, (url, message)
            assert "lipfarm-upload-" not in message, message  # no temporary paths
        both = http.post("/v1/jobs", json={"avatar": "demo", "audio_url": f"{served}/talk.wav",
                                           "audio_key": "uploads/kept.wav"})
        assert "not both" in error_of(both, 422, "invalid", "audio_url")
    assert _jobs_in_redis() == before  # nothing queued
