"""A public API, safe for several teams, against a real ``lipfarm api`` on loopback and real Redis.

- Tenants: each sees, steers and downloads only its own jobs (404 for others'), an admin sees all;
  tokens and job records from before tenants belong to ``default``.
- Quotas: jobs not yet ended, requests per second: 429 with ``Retry-After`` and the ``RateLimit``
  headers. The token bucket itself is driven with explicit times.
- Hygiene: no server path or storage URL in an answer; a body declared and never sent is cut off
  (408, connection closed) after ``LIPFARM_API_BODY_TIMEOUT_S``.
"""

from __future__ import annotations

import hashlib
import socket
import time

import httpx
import pytest

from lipfarm.common import defaults
from lipfarm.common.config import load_settings
from lipfarm.common.state import TenantStore
from lipfarm.api.params import JobFields, fingerprint, validated
from lipfarm.api.redact import Redactor
from tests.farm import farm_env, prefixed_store, redis_client, REDIS_DB, redis_url
from tests.test_api import bearer, error_of, lipfarm, make_token, start_api, submit

DB = REDIS_DB["tenants"]
PREFIX = "lipfarm-tenanttest"
BODY_TIMEOUT_S = 1.5


# ---------------------------------------------------------------------------------------------
# The bucket, with explicit times

def test_the_request_bucket_refills_at_its_rate():
    with prefixed_store(DB, PREFIX + "-bucket") as store:
        tenants = TenantStore.of(store)
        tenant = tenants.set("acme", rps=2)
        assert [tenants.take(tenant, now=100.0).allowed for _ in range(3)] == [True, True, False]
        refused = tenants.take(tenant, now=100.0)
        assert not refused.allowed and refused.retry_after_s == 1
        assert tenants.take(tenant, now=100.5).allowed  # half a second: one more
        assert not tenants.take(tenant, now=100.5).allowed
        assert [tenants.take(tenant, now=200.0).allowed for _ in range(3)] == [True, True, False]  # burst: 1 s worth
        unlimited = tenants.get("other")
        assert all(tenants.take(unlimited, now=100.0).allowed for _ in range(50))


def test_tenant_settings_are_kept_merged_and_checked():
    with prefixed_store(DB, PREFIX + "-settings") as store:
        tenants = TenantStore.of(store)
        tenants.set("acme", max_queued=3, weight=2)
        assert tenants.set("acme", rps=5).__dict__ == {"name": "acme", "max_queued": 3, "rps": 5.0, "weight": 2.0}
        assert [t.name for t in tenants.list()] == ["acme", "default"]
        assert tenants.weights() == {"acme": 2.0, "default": 1.0}
        for kwargs, field in [({"max_queued": -1}, "max_queued"), ({"weight": 0}, "weight"),
                              ({"rps": float("nan")}, "rps")]:
            with pytest.raises(Exception) as caught:
                tenants.set("acme", **kwargs)
            assert getattr(caught.value, "field", None) == field
        with pytest.raises(Exception) as caught:
            tenants.set("Not A Name", rps=1)
        assert caught.value.field == "tenant"


def test_records_from_before_tenants_belong_to_default():
    import json

    from lipfarm.common.options import RenderOptions
    from lipfarm.common.plan import AssetRef, Submission
    from lipfarm.common.state import JobRecord

    ref = AssetRef("0" * 64, "models/x.onnx")
    made = Submission("j1", "demo", ref, ref, ref, "jobs/j1/input/a.wav", "a.wav", RenderOptions(), "normal", 1.0,
                      tenant="acme")
    assert JobRecord.queued(Submission.from_json(made.to_json()), "file:///s").tenant == "acme"  # kept in job.json
    old = json.loads(made.to_json())
    del old["tenant"]
    assert Submission.from_json(json.dumps(old)).tenant == "default"
    record = JobRecord.queued(made, "file:///s").to_hash()
    assert record["tenant"] == "acme"
    del record["tenant"]
    assert JobRecord.from_hash(record).tenant == "default"


# ---------------------------------------------------------------------------------------------
# The API

@pytest.fixture(scope="module")
def tenant_home(tmp_path_factory, demo):
    from lipfarm.demo.assets import ensure_demo_assets

    home = tmp_path_factory.mktemp("tenant-home")
    ensure_demo_assets(load_settings({"LIPFARM_HOME": str(home)}))
    return home


@pytest.fixture(scope="module")
def env(tenant_home):
    return farm_env(tenant_home, str(tenant_home / "storage"), None, LIPFARM_BROKER_URL=redis_url(DB), LIPFARM_KEY_PREFIX=PREFIX,
                    LIPFARM_API_MAX_AUDIO_MB="1", LIPFARM_API_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S))


@pytest.fixture(scope="module")
def api(env, tmp_path_factory):
    redis_client(DB).flushdb()
    process, base = start_api(env, tmp_path_factory.mktemp("tenant-api") / "api.log")
    try:
        yield base
    finally:
        process.stop(timeout_s=20)
        redis_client(DB).flushdb()


@pytest.fixture(scope="module")
def tokens(env, api) -> dict[str, str]:
    made = {"alpha": make_token(env, "alpha", "--tenant", "alpha"),
            "beta": make_token(env, "beta", "--tenant", "beta"),
            "admin": make_token(env, "root", "--tenant", "ops", "--admin"),
            "legacy": make_token(env, "legacy")}
    # a token made before tenants existed: its record has neither field
    digest = hashlib.sha256(made["legacy"].encode()).hexdigest()
    redis_client(DB).hdel(f"{PREFIX}:api:token:{digest}", "tenant", "admin")
    return made


@pytest.fixture(scope="module")
def talk(tmp_path_factory, speech_16k):
    from lipfarm.demo.speech import write_wav

    path = tmp_path_factory.mktemp("tenant-talk") / "talk.wav"
    write_wav(path, speech_16k[:2 * 16000])
    return path


def _client(api: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=api, headers=bearer(token), timeout=60)


@pytest.mark.slow
def test_token_commands_name_the_tenant(env, tokens):
    listed = lipfarm(env, "token", "list").stdout
    assert [line.split()[2] for line in listed.splitlines()[1:]] == ["alpha", "beta", "ops", "default"]
    assert "admin, read-write" in listed
    tenants = [line.split()[0] for line in lipfarm(env, "tenant", "list").stdout.splitlines()[1:]]
    assert tenants == ["alpha", "beta", "default", "ops"]  # those with tokens, though never set
    made = lipfarm(env, "token", "create", "--name", "ro", "--tenant", "alpha", "--read-only")
    assert made.returncode == 0 and "of tenant 'alpha' (read-only)" in made.stdout
    assert made.stdout.split()[-1].startswith("lf_")  # still the last word
    bad = lipfarm(env, "token", "create", "--name", "x", "--tenant", "Not A Name")
    assert bad.returncode == 2 and "tenant" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_a_tenant_sees_steers_and_downloads_only_its_own_jobs(api, tokens, talk):
    with _client(api, tokens["alpha"]) as alpha, _client(api, tokens["beta"]) as beta, \
            _client(api, tokens["admin"]) as admin, _client(api, tokens["legacy"]) as legacy:
        mine = submit(alpha, talk).json()
        theirs = submit(beta, talk).json()
        old = submit(legacy, talk).json()
        assert (mine["tenant"], theirs["tenant"], old["tenant"]) == ("alpha", "beta", "default")
        unknown = error_of(alpha.get("/v1/jobs/20260101-000000-abcdef"), 404, "not_found")
        for response in (alpha.get(f"/v1/jobs/{theirs['id']}"), alpha.delete(f"/v1/jobs/{theirs['id']}"),
                         alpha.post(f"/v1/jobs/{theirs['id']}/resume"), alpha.get(f"/v1/jobs/{theirs['id']}/output")):
            message = error_of(response, 404, "not_found")
            assert message == unknown.replace("20260101-000000-abcdef", theirs["id"])  # not told it exists
        assert alpha.get(f"/v1/jobs/{mine['id']}").json()["id"] == mine["id"]
        assert [j["id"] for j in alpha.get("/v1/jobs").json()["jobs"]] == [mine["id"]]
        assert [j["id"] for j in beta.get("/v1/jobs?state=queued").json()["jobs"]] == [theirs["id"]]
        assert [j["id"] for j in legacy.get("/v1/jobs").json()["jobs"]] == [old["id"]]
        seen = [j["id"] for j in admin.get("/v1/jobs").json()["jobs"]]
        assert seen == [old["id"], theirs["id"], mine["id"]]  # an admin sees every tenant's, newest first
        assert beta.get(f"/v1/jobs/{theirs['id']}").json()["state"] == "queued"  # alpha's cancel did nothing
        assert admin.delete(f"/v1/jobs/{theirs['id']}").json()["state"] == "cancelled"
        # a record from before tenants (no tenant field) belongs to default
        redis_client(DB).hdel(f"{PREFIX}:job:{mine['id']}", "tenant")
        error_of(alpha.get(f"/v1/jobs/{mine['id']}"), 404, "not_found")
        assert legacy.get(f"/v1/jobs/{mine['id']}").json()["tenant"] == "default"
        for job in (mine, old):
            assert admin.delete(f"/v1/jobs/{job['id']}").status_code == 200


@pytest.mark.slow
def test_a_tenant_over_its_queued_jobs_gets_429(env, api, tokens, talk):
    assert lipfarm(env, "tenant", "set", "alpha", "--max-queued", "1", "--weight", "3").returncode == 0
    with _client(api, tokens["alpha"]) as alpha, _client(api, tokens["beta"]) as beta:
        first = submit(alpha, talk)
        assert first.status_code == 201, first.text
        jobs_before = redis_client(DB).zcard(f"{PREFIX}:jobs")
        refused = submit(alpha, talk)
        assert "limit" in error_of(refused, 429, "too_many_jobs", "tenant")
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.headers["RateLimit-Policy"] == '"queued";q=1' and refused.headers["RateLimit"].startswith('"queued";r=0')
        assert redis_client(DB).zcard(f"{PREFIX}:jobs") == jobs_before  # nothing made
        other = submit(beta, talk)  # another tenant is not held back
        assert other.status_code == 201
        alpha.delete(f"/v1/jobs/{first.json()['id']}")
        again = submit(alpha, talk)  # the first ended: room again
        assert again.status_code == 201, again.text
        for client, job in ((alpha, again.json()), (beta, other.json())):
            client.delete(f"/v1/jobs/{job['id']}")
    listed = lipfarm(env, "tenant", "list").stdout.splitlines()
    row = next(line.split() for line in listed if line.startswith("alpha"))
    assert row == ["alpha", "1", "no", "limit", "3", "0"]
    bad = lipfarm(env, "tenant", "set", "alpha", "--weight", "0")
    assert bad.returncode == 2 and "weight" in bad.stderr


@pytest.mark.slow
def test_a_tenant_over_its_request_rate_gets_429_with_ratelimit_headers(env, api, tokens):
    assert lipfarm(env, "tenant", "set", "beta", "--rps", "0.5").returncode == 0  # one request per 2 s
    try:
        with _client(api, tokens["beta"]) as beta, _client(api, tokens["alpha"]) as alpha:
            allowed = beta.get("/v1/jobs")
            assert allowed.status_code == 200 and allowed.headers["RateLimit-Policy"] == '"rps";q=1;w=1'
            refused = beta.get("/v1/jobs")
            error_of(refused, 429, "rate_limited")
            assert 1 <= int(refused.headers["Retry-After"]) <= 2
            assert refused.headers["RateLimit"].startswith('"rps";r=0;')
            assert all(alpha.get("/v1/jobs").status_code == 200 for _ in range(5))  # its own bucket, no limit
            assert "RateLimit" not in alpha.get("/v1/jobs").headers
    finally:
        lipfarm(env, "tenant", "set", "beta", "--rps", "0")


@pytest.mark.slow
def test_a_key_still_being_submitted_answers_409_with_retry_after(api, tokens, talk):
    """A claim made by a request that is still uploading: the retry is told when to come back."""
    params = validated(JobFields, {"avatar": "demo", "chunk_frames": "25"})
    prints = fingerprint(params, hashlib.sha256(talk.read_bytes()).hexdigest())
    token_id = hashlib.sha256(tokens["alpha"].encode()).hexdigest()[:12]
    key_digest = hashlib.sha256(b"pending-1").hexdigest()
    redis_client(DB).set(f"{PREFIX}:api:idempotency:{token_id}:{key_digest}",
                         f'{{"fingerprint": "{prints}", "job_id": "20260101-000000-pending", "done": false}}', ex=60)
    with _client(api, tokens["alpha"]) as alpha:
        busy = submit(alpha, talk, idempotency_key="pending-1")
        error_of(busy, 409, "idempotency_in_progress", "idempotency_key")
        assert int(busy.headers["Retry-After"]) > 0


# ---------------------------------------------------------------------------------------------
# Hygiene

def test_answers_name_neither_server_paths_nor_the_storage_url(tmp_path):
    settings = load_settings({"LIPFARM_HOME": str(tmp_path / "home")})
    public = Redactor(settings).text
    storage = settings.storage_url
    assert public(f"no object 'uploads/a.wav' in file://{storage}") == "no object 'uploads/a.wav' in the farm's storage"
    assert public(f"cannot write '{storage}/jobs/x' (denied)") == "cannot write 'the farm's storage/jobs/x' (denied)"
    assert public(f"{settings.work_dir}/lipfarm-upload-1/part-1: not a readable media file") == \
        "part-1: not a readable media file"
    assert public("/tmp/lipfarm-audio-x: gone; see POST /v1/models") == "(a server path): gone; see POST /v1/models"
    s3 = Redactor(load_settings({"LIPFARM_STORAGE_URL": "s3://bucket/farm"})).text
    assert s3("no object 'k' in s3://bucket/farm") == "no object 'k' in the farm's storage"


@pytest.mark.slow
def test_a_missing_storage_object_is_named_by_its_key_only(api, tokens, tenant_home):
    with _client(api, tokens["alpha"]) as alpha:
        message = error_of(alpha.post("/v1/jobs", json={"avatar": "demo", "audio_key": "uploads/none.wav"}), 404,
                           "not_found", "audio_key")
    assert "uploads/none.wav" in message and "storage" in message
    assert str(tenant_home) not in message and "file://" not in message


def _declared_but_never_sent(api: str, token: str, content_type: str, method: str = "POST") -> tuple[bytes, float]:
    """Declare a 1000-byte body, send 10 bytes, wait: the answer and how long until the connection closed."""
    host, port = api.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall((f"{method} /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: {content_type}\r\nContent-Length: 1000\r\n\r\n").encode() + b"--x\r\nabcde")
        started = time.monotonic()
        answer = b""
        while data := sock.recv(65536):  # until the server closes the connection
            answer += data
        return answer, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; boundary=x"])
def test_a_body_declared_and_never_sent_is_cut_off(api, tokens, content_type):
    answer, waited = _declared_but_never_sent(api, tokens["alpha"], content_type)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"field":"body"' in answer
    assert BODY_TIMEOUT_S <= waited < BODY_TIMEOUT_S + 20  # then the connection was closed


@pytest.mark.slow
def test_a_declared_body_a_route_does_not_read_does_not_hold_the_connection(api, tokens):
    answer, waited = _declared_but_never_sent(api, tokens["alpha"], "application/json", method="GET")
    assert answer.startswith(b"HTTP/1.1 200 ")  # answered at once, then closed once idle
    assert waited < defaults.API_KEEP_ALIVE_S + 20


@pytest.mark.slow
def test_the_jobs_page_shows_a_tenant_only_its_own_jobs(api, tokens, talk, tmp_path):
    from tests.browser import chromium_page, collect_errors

    with _client(api, tokens["alpha"]) as alpha, _client(api, tokens["beta"]) as beta:
        mine, theirs = submit(alpha, talk).json()["id"], submit(beta, talk).json()["id"]
        try:
            with chromium_page(tmp_path, timeout_ms=60_000) as page:
                errors = collect_errors(page)
                page.goto(api + "/")
                page.fill('[data-role="token-input"]', tokens["alpha"])
                page.click('[data-role="connect"]')
                page.wait_for_selector(f'tbody.job[data-job-id="{mine}"]')
                shown = page.eval_on_selector_all("tbody.job", "rows => rows.map(r => r.dataset.jobId)")
                assert mine in shown and theirs not in shown
                assert not errors, errors
        finally:
            alpha.delete(f"/v1/jobs/{mine}")
            beta.delete(f"/v1/jobs/{theirs}")


def test_health_does_not_show_the_storage_url(tmp_path):
    from lipfarm.api.app import create_app
    from tests.browser import live_server

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the storage folder should be")
    settings = load_settings({"LIPFARM_HOME": str(tmp_path / "home"), "LIPFARM_STORAGE_URL": str(blocked),
                              "LIPFARM_BROKER_URL": redis_url(DB), "LIPFARM_KEY_PREFIX": PREFIX + "-health"})
    with live_server(create_app(settings)) as base:
        response = httpx.get(f"{base}/v1/health", timeout=30)
    assert response.status_code == 503 and response.json()["checks"]["storage"] != "ok"
    assert str(tmp_path) not in response.text, response.text
