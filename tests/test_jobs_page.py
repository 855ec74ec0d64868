"""The jobs page and the output endpoint, against a real farm: ``lipfarm api`` and ``lipfarm worker``
processes on loopback (Redis DB 10, local storage), driven through the API and a headless chromium.

Jobs are submitted through the API (multipart) before the workers start, with hold files placed from
the ids the API answers with, so a chunk is caught mid-render by its state, never by timing. The page
test ends with a screenshot of a done job with its player open, a failed one with its reason and a
cancelled one: out/jobs-page.png, and docs/jobs-page.png (shown in docs/api.md) with LIPFARM_UPDATE_DOCS=1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from lipfarm.demo.speech import write_wav
from tests.browser import chromium_page, collect_errors, screenshot
from tests.farm import Holds, Workers, until
from tests.test_api import api_env, bearer, flush_api_db, make_token, start_api
from tests.onnx_models import nan_generator

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# A test run leaves tracked files alone unless asked to refresh the picture in docs/api.md.
SCREENSHOT = ROOT / ("docs" if os.environ.get("LIPFARM_UPDATE_DOCS") == "1" else "out") / "jobs-page.png"
CLIP_S = 2.5
HELD_AFTER_FRAMES = 5


@pytest.fixture(scope="module")
def clip(tmp_path_factory, speech_16k) -> Path:
    path = tmp_path_factory.mktemp("clip") / "hello.wav"
    write_wav(path, speech_16k[int(0.3 * 16000):int((0.3 + CLIP_S) * 16000)])
    return path


@pytest.fixture(scope="module")
def farm(tmp_path_factory, demo):
    """The API and (once ``start_workers`` is called) the workers, with hold files; all stopped after."""
    from lipfarm.common.config import load_settings
    from lipfarm.demo.assets import ensure_demo_assets

    home = tmp_path_factory.mktemp("page-home")
    ensure_demo_assets(load_settings({"LIPFARM_HOME": str(home)}))
    holds = Holds(tmp_path_factory.mktemp("holds"))
    env = api_env(home, LIPFARM_HOLD_DIR=str(holds.folder))
    logs = tmp_path_factory.mktemp("logs")
    flush_api_db()
    api, base = start_api(env, logs / "api.log")
    workers = Workers(env, logs, count=2)
    try:
        yield {"base": base, "token": make_token(env, "page"), "holds": holds, "workers": workers}
    finally:
        holds.release()
        workers.stop()
        api.stop(timeout_s=20)
        flush_api_db()


@pytest.fixture(scope="module")
def jobs(farm, clip, demo, tmp_path_factory):
    """Three jobs, submitted through the API before any worker runs: ``held`` (chunk 0 pauses after
    a few frames), ``to_cancel`` (chunk 0 pauses at once; the page cancels it) and ``failing`` (its
    generator outputs NaN). Then the workers start."""
    client = httpx.Client(base_url=farm["base"], headers=bearer(farm["token"]), timeout=120)
    held = _submit(client, clip)
    farm["holds"].hold(held, 0, after_frames=HELD_AFTER_FRAMES)
    to_cancel = _submit(client, clip)
    farm["holds"].hold(to_cancel, 0)
    encoder = _upload_model(client, demo.encoder)
    generator = _upload_model(client, nan_generator(tmp_path_factory.mktemp("nan") / "nan.onnx"))
    failing = _submit(client, clip, encoder=encoder, generator=generator)
    farm["workers"].start()
    yield {"client": client, "held": held, "to_cancel": to_cancel, "failing": failing}
    client.close()


def _submit(client: httpx.Client, audio: Path, **fields) -> str:
    with open(audio, "rb") as handle:
        response = client.post("/v1/jobs", data={"avatar": "demo", "chunk_frames": "25", **fields},
                               files={"audio": (audio.name, handle, "audio/wav")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _upload_model(client: httpx.Client, path: Path) -> str:
    with open(path, "rb") as handle:
        response = client.post("/v1/models", files={"model": (path.name, handle)})
    assert response.status_code == 201, response.text
    return response.json()["sha256"]


def _job(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def _row(job_id: str) -> str:
    return f'tbody.job[data-job-id="{job_id}"]'


def test_the_page_follows_jobs_and_plays_the_output(farm, jobs, tmp_path):
    client, held = jobs["client"], jobs["held"]
    with chromium_page(tmp_path, viewport=(1280, 900), timeout_ms=60_000) as page:
        errors = collect_errors(page)
        page.goto(farm["base"] + "/")
        page.fill('[data-role="token-input"]', farm["token"])
        page.click('[data-role="connect"]')
        page.wait_for_selector(_row(held))

        # Held mid-render: the bar shows frames done, more than none and fewer than all.
        until(lambda: any(c["index"] == 0 and c["frames_done"] >= HELD_AFTER_FRAMES
                          for c in _job(client, held)["running"]), what="chunk 0 held mid-render")
        page.wait_for_function("""(sel) => { const p = document.querySelector(sel + ' progress');
                                   return p && p.hasAttribute('value') && p.value > 0 && p.value < p.max; }""",
                               arg=_row(held))
        value, maximum = page.eval_on_selector(_row(held) + " progress", "p => [p.value, p.max]")
        assert 0 < value < maximum == _job(client, held)["frames_total"]

        # Cancelled from the page; the failed job shows its reason.
        until(lambda: _job(client, jobs["to_cancel"])["state"] == "rendering", what="the job to cancel to render")
        page.wait_for_selector(_row(jobs["to_cancel"]) + ' [data-role="cancel"]:not([hidden])')
        page.click(_row(jobs["to_cancel"]) + ' [data-role="cancel"]')
        page.wait_for_selector(_row(jobs["to_cancel"]) + '[data-state="cancelled"]')
        assert _job(client, jobs["to_cancel"])["state"] == "cancelled"
        page.wait_for_selector(_row(jobs["failing"]) + '[data-state="failed"] [data-role="reason"]:not([hidden])')
        reason = page.inner_text(_row(jobs["failing"]) + ' [data-role="reason"]')
        assert "NaN" in reason and reason == _job(client, jobs["failing"])["reason"]

        # Released: done, and its video plays from the signed URL (no token in a <video>).
        farm["holds"].release(held)
        page.wait_for_selector(_row(held) + '[data-state="done"]', timeout=180_000)
        page.click(_row(held) + ' [data-role="play"]')
        page.wait_for_function("(sel) => { const v = document.querySelector(sel + ' video'); "
                               "return v && v.readyState >= 2; }", arg=_row(held))
        duration = page.eval_on_selector(_row(held) + " video", "v => v.duration")
        assert abs(duration - CLIP_S) < 0.25, duration
        page.eval_on_selector(_row(held) + " video", "v => { v.pause(); v.currentTime = 1.0; }")
        page.wait_for_function("(sel) => { const v = document.querySelector(sel + ' video'); "
                               "return !v.seeking && v.readyState >= 2 && Math.abs(v.currentTime - 1.0) < 0.05; }",
                               arg=_row(held))
        assert not errors, errors
        screenshot(page, SCREENSHOT)


def test_the_output_is_served_in_ranges_to_a_token_or_a_signed_url(farm, jobs):
    client, held = jobs["client"], jobs["held"]
    farm["holds"].release(held)
    job = until(lambda: (j := _job(client, held))["state"] == "done" and j, timeout_s=180, what="the job to finish")
    url = job["output_url"]
    assert url.startswith(f"{farm['base']}/v1/jobs/{held}/output?expires=") and "&signature=" in url
    with httpx.Client(base_url=farm["base"], timeout=60) as anonymous:
        whole = anonymous.get(url)
        assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
        assert whole.headers["accept-ranges"] == "bytes" and whole.content[4:8] == b"ftyp"
        part = anonymous.get(url, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == whole.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(whole.content)}"
        tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
        assert anonymous.get(tampered).json()["error"]["field"] == "signature"
        expires = int(url.split("expires=")[1].split("&")[0])
        assert expires > time.time() + 3600  # hours, for a player left open
        assert anonymous.get(url.replace(f"expires={expires}", f"expires={expires + 1}")).status_code == 401
        assert anonymous.get(f"/v1/jobs/{held}/output").status_code == 401
    assert client.get(f"/v1/jobs/{held}/output").content == whole.content  # a token works too
    cancelled = client.get(f"/v1/jobs/{jobs['to_cancel']}/output")
    assert cancelled.status_code == 409 and "cancelled: it has no output" in cancelled.json()["error"]["message"]
