"""Flower shows what the farm does: checked through Flower's own HTTP API and task page, with Flower
started as a process on loopback (``lipfarm flower``) beside a farm of real workers.

A chunk rendering shows state RENDERING with its frames done, refreshed at the heartbeat; a chunk
whose job was cancelled ends in CANCELLED, never SUCCESS; a committed one ends in SUCCESS.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from lipfarm.common.identity import new_job_id
from lipfarm.common.options import RenderOptions
from lipfarm.common.state import JobState
from lipfarm.scheduler.processes import LipfarmProcess, free_ports
from lipfarm.scheduler.submit import submit_job
from tests.farm import farm_env, Holds, redis_client, REDIS_DB, redis_url, running_farm, until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / ("docs" if os.environ.get("LIPFARM_UPDATE_DOCS") == "1" else "out") / "flower-task.png"
DB = REDIS_DB["flower"]
CHUNK_FRAMES = 25


def _flush() -> None:
    redis_client(DB).flushdb()


@pytest.fixture(scope="module")
def holds(tmp_path_factory) -> Holds:
    return Holds(tmp_path_factory.mktemp("holds"))


@pytest.fixture(scope="module")
def farm(tmp_path_factory, home, demo, holds):
    _flush()
    storage = tmp_path_factory.mktemp("storage")
    env = farm_env(home, str(storage), None, LIPFARM_BROKER_URL=redis_url(DB), LIPFARM_HOLD_DIR=str(holds.folder),
                   LIPFARM_HEARTBEAT_INTERVAL_S="0.5", LIPFARM_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    with running_farm(env, tmp_path_factory.mktemp("workers"), holds, _flush) as running:
        yield (*running, env)


@pytest.fixture(scope="module")
def flower(farm, tmp_path_factory):
    """``lipfarm flower`` on a free loopback port, started before any job (it learns tasks from events)."""
    _settings, _workers, env = farm
    port = free_ports(1)[0]
    process = LipfarmProcess(["flower", "--port", str(port)], env=env,
                             log=tmp_path_factory.mktemp("flower") / "flower.log", ready_text=b"Visit me at")
    process.start().wait_ready(timeout_s=60)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        until(lambda: client.get("/api/workers", params={"refresh": "true"}).status_code == 200,
              timeout_s=60, what="Flower's API")
        yield client
    process.stop(timeout_s=20)


def _screenshot_task(flower, task_id: str, tmp_path) -> None:
    """Flower's task page in a real browser, the chunk shown RENDERING with its frames done:
    out/flower-task.png, and docs/flower-task.png (shown in docs/operations.md) with
    LIPFARM_UPDATE_DOCS=1. Where chromium is absent the picture is skipped, not the test."""
    from tests.browser import chromium_page, chromium_path, screenshot

    if chromium_path() is None:
        return
    with chromium_page(tmp_path, viewport=(1280, 720)) as page:
        page.goto(f"{flower.base_url}/task/{task_id}")
        page.wait_for_selector("text=RENDERING", timeout=30_000)
        screenshot(page, SCREENSHOT, full_page=False)


def _render_tasks(flower) -> list[dict]:
    return list(flower.get("/api/tasks", params={"taskname": "lipfarm.render_chunk"}).json().values())


def _rendering(flower, job_id: str, chunk: int) -> dict | None:
    """Flower's record of a render task showing chunk ``chunk`` of ``job_id`` rendering. A lane's
    slot names no chunk in its arguments: what it was bound to shows in its progress."""
    return next((t for t in _render_tasks(flower) if t["state"] == "RENDERING"
                 and f"of chunk {chunk} (" in (t["result"] or "") and job_id in (t["result"] or "")), None)


def test_flower_shows_a_chunk_rendering_then_cancelled_not_success(farm, flower, holds, demo, clip, tmp_path):
    settings, _workers, _env = farm
    job_id = new_job_id()
    holds.hold(job_id, 0, after_frames=10)
    handle = submit_job(settings, avatar="demo", audio=clip, encoder=demo.encoder, generator=demo.generator,
                        options=RenderOptions(chunk_frames=CHUNK_FRAMES), job_id=job_id)

    def rendering():
        task = _rendering(flower, job_id, 0)
        found = task and re.match(r"(\d+)/(\d+) frames", task["result"] or "")
        return found and int(found[1]) >= 10 and (task, found)

    task, found = until(rendering, timeout_s=120, what="Flower to show chunk 0 rendering")
    assert int(found[2]) == CHUNK_FRAMES and f"frames 0-{CHUNK_FRAMES - 1}" in task["result"], task["result"]
    info = flower.get(f"/api/task/info/{task['uuid']}").json()  # the task page's data
    assert info["state"] == "RENDERING" and info["result"] == task["result"]
    page = flower.get(f"/task/{task['uuid']}")
    assert page.status_code == 200 and "RENDERING" in page.text and task["result"] in page.text
    _screenshot_task(flower, task["uuid"], tmp_path)

    others = until(lambda: [t for t in _render_tasks(flower) if t["state"] == "SUCCESS"
                            and f"'job_id': '{job_id}'" in (t["result"] or "")],
                   timeout_s=180, what="a committed chunk in Flower")
    assert all("'outcome': 'committed'" in t["result"] for t in others), others

    assert handle.cancel()
    ended = until(lambda: (t := flower.get(f"/api/task/info/{task['uuid']}").json())["state"]
                  not in ("RENDERING", "STARTED") and t, timeout_s=60, what="chunk 0 to end in Flower")
    holds.release(job_id)
    assert ended["state"] == "CANCELLED", ended
    assert ended["result"] == f"cancelled: job {job_id} was cancelled: render stopped", ended["result"]
    assert handle.status().state == JobState.CANCELLED


def test_flowers_metrics_carry_no_lipfarm_series(flower):
    """Flower's /metrics is its own (flower_*): the workers' lipfarm_* series, all zero in Flower's
    process, would pull down a dashboard's averages where Flower is scraped."""
    text = flower.get("/metrics").text
    assert "flower_events_total" in text
    assert not [line for line in text.splitlines() if line.startswith("lipfarm_")]
