"""``lipfarm cluster up|status|down`` as a user runs them: a whole farm on loopback from one command
(its own Redis, SeaweedFS as S3, a planning/finalizing worker, a render worker, Flower, the API), a
job submitted over HTTP with the token ``up`` printed, its video downloaded and checked frame for
frame against a local render, and nothing left running after ``down``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from lipfarm.common.avatar import AvatarStore
from lipfarm.common.config import load_settings
from lipfarm.common.options import RenderOptions
from lipfarm.demo.speech import write_wav
from lipfarm.scheduler.processes import free_ports
from lipfarm.scheduler.local import render_local
from tests.farm import until
from tests.media import video_frames, video_info

pytestmark = pytest.mark.slow


def lipfarm(env: dict[str, str], *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "lipfarm"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def cluster_home(tmp_path_factory, demo) -> Path:
    """A home of its own, with the demo avatar and models (what the API renders with by default)."""
    from lipfarm.demo.assets import ensure_demo_assets

    home = tmp_path_factory.mktemp("cluster-home")
    ensure_demo_assets(load_settings({"LIPFARM_HOME": str(home)}))
    return home


@pytest.fixture(scope="module")
def cluster(cluster_home):
    """``cluster up --workers 1 --s3``, naming no Redis (so it starts its own); ``cluster down``
    afterwards, and whatever its file names killed if that failed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPFARM_")}
    env.update({"LIPFARM_HOME": str(cluster_home)})
    up = lipfarm(env, "cluster", "up", "--workers", "1", "--s3", "--api-port", "0", "--flower-port", "0",
                 timeout_s=300)
    state = cluster_home / "cluster" / "cluster.json"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env, up.stdout, json.loads(state.read_text())
    finally:
        if state.exists():
            down = lipfarm(env, "cluster", "down", timeout_s=180)
            if down.returncode != 0:
                for process in json.loads(state.read_text())["processes"]:
                    try:
                        os.killpg(process["pid"], 9)
                    except OSError:
                        pass


def _printed(stdout: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """What ``up`` printed: the token (last word of its line), the export lines, the URLs."""
    lines = stdout.splitlines()
    token = next(line for line in lines if line.startswith("created token")).split()[-1]
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    urls = {line.split()[0]: line.split()[-1] for line in lines if line.split() and line.split()[-1].startswith("http")}
    return token, exports, urls


def test_a_cluster_renders_a_job_over_http_and_goes_away(cluster, cluster_home, speech_16k, tmp_path):
    env, stdout, state = cluster
    token, exports, urls = _printed(stdout)
    assert token.startswith("lf_")
    assert exports["LIPFARM_STORAGE_URL"].startswith("s3://") and exports["LIPFARM_S3_ENDPOINT_URL"].startswith(
        "http://127.0.0.1:") and exports["LIPFARM_BROKER_URL"] != "redis://127.0.0.1:6379/0"  # its own Redis
    assert {"redis", "s3", "api", "flower", "jobs-worker", "render-worker-1"} == {p["name"] for p in state["processes"]}
    assert all(url.startswith("http://127.0.0.1:") for url in urls.values())
    assert (cluster_home / "cluster" / "cluster.json").stat().st_mode & 0o077 == 0  # it holds the S3 secret
    status = lipfarm(env, "cluster", "status")
    assert status.returncode == 0 and status.stdout.count(" alive ") == 6, status.stdout
    pids = [p["pid"] for p in state["processes"]]
    family = pids + [c.pid for pid in pids for c in psutil.Process(pid).children(recursive=True)]
    assert len(family) > len(pids)  # the workers' render processes too

    clip = tmp_path / "clip.wav"
    write_wav(clip, speech_16k[int(0.3 * 16000):int(2.3 * 16000)])
    api = urls["api"]
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        with open(clip, "rb") as handle:
            created = client.post("/v1/jobs", data={"avatar": "demo", "chunk_frames": "25"},
                                  files={"audio": ("clip.wav", handle, "audio/wav")})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        job = until(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("done", "failed") and j,
                    timeout_s=300, what="the job to end")
        assert job["state"] == "done", job["reason"]
        video = httpx.get(job["output_url"], follow_redirects=True, timeout=60)  # absolute and signed: no token
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    output = tmp_path / "output.mp4"
    output.write_bytes(video.content)
    assert video_info(output)["frames"] == job["frames_total"] == job["frames_done"] > 0

    settings = load_settings({"LIPFARM_HOME": str(cluster_home)})
    from lipfarm.demo.assets import ensure_demo_assets

    demo = ensure_demo_assets(settings)
    local = render_local(avatar=AvatarStore(settings.avatars_dir).get("demo"), audio=clip, out=tmp_path / "local.mp4",
                         encoder=demo.encoder, generator=demo.generator, options=RenderOptions(), settings=settings,
                         show_progress=False)
    ours, theirs = video_frames(output, "yuv420p"), video_frames(local.output, "yuv420p")
    assert len(ours) == len(theirs) == job["frames_total"]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_array_equal(a, b, err_msg=f"frame {i}")

    down = lipfarm(env, "cluster", "down", timeout_s=180)
    assert down.returncode == 0, down.stderr
    assert [pid for pid in family if _running(pid)] == []
    gone = lipfarm(env, "cluster", "status")
    assert gone.returncode == 4 and "no cluster is up" in gone.stderr


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a parent that is not ours to reap it does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- Which Redis `up` uses ---------------------------------------------------------------------------


@pytest.mark.parametrize("named_by", ["--redis", "LIPFARM_BROKER_URL"])
def test_up_refuses_a_named_redis_that_does_not_answer(tmp_path, named_by):
    """Told to use a Redis that is not there: one line naming what named it, nothing started."""
    url = f"redis://127.0.0.1:{free_ports(1)[0]}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPFARM_")}
    env["LIPFARM_HOME"] = str(tmp_path)
    args = ["cluster", "up", "--api-port", "0", "--flower-port", "0"]
    if named_by == "--redis":
        args += ["--redis", url]
    else:
        env["LIPFARM_BROKER_URL"] = url
    up = lipfarm(env, *args, timeout_s=120)
    assert up.returncode == 5, up.stdout + up.stderr
    assert len(up.stderr.strip().splitlines()) == 1 and named_by in up.stderr and url in up.stderr, up.stderr
    assert "Traceback" not in up.stderr
    assert not (tmp_path / "cluster" / "cluster.json").exists()


def test_up_never_joins_a_redis_only_because_it_answers_at_the_configured_url(tmp_path):
    """A Redis answering where the (default) settings point is someone's: not named, not joined; the
    cluster starts its own on a free port and says so."""
    from lipfarm.scheduler.cluster import Cluster, ClusterSpec, LocalCluster, _stop
    from tests.farm import REDIS_DB, redis_client, redis_url

    answering = redis_url(REDIS_DB["cli"])
    redis_client(REDIS_DB["cli"]).ping()
    settings = load_settings({"LIPFARM_HOME": str(tmp_path), "LIPFARM_BROKER_URL": answering})
    local, started = LocalCluster(settings), []
    cluster = Cluster(local.folder, [], {}, {})
    local.logs.mkdir(parents=True)
    try:
        local._redis(cluster, started, ClusterSpec())
        own = cluster.settings["LIPFARM_BROKER_URL"]
        assert own != answering and cluster.urls["redis"] == own
        assert [d.name for d, _ in started] == ["redis"]
        assert any(own in note and "--redis" in note for note in cluster.notes), cluster.notes
        named = Cluster(local.folder, [], {}, {})
        local._redis(named, started, ClusterSpec(redis=answering))  # named: used, nothing more started
        assert named.settings["LIPFARM_BROKER_URL"] == answering and len(started) == 1
    finally:
        _stop([d for d, _ in started], popens=[p for _, p in started])
