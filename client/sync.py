"""``Client``: the API from synchronous Python (``AsyncClient`` is the same, awaited)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from lipfarm.client.errors import ApiError, raise_for_error
from lipfarm.client.models import Job
from lipfarm.client.requests import AudioPath, opened, submission

Progress = Callable[[Job], None]


def job_id_of(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


class Client:
    """A farm's API at ``base_url`` with a bearer ``token`` (``lipfarm token create``)."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {token}"},
                                  timeout=timeout_s, transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return raise_for_error(self._http.request(method, path, **kwargs)).json()

    def submit(self, audio: AudioPath | None = None, *, audio_url: str | None = None, avatar: str = "demo",
               priority: str | None = None, webhook_url: str | None = None, idempotency_key: str | None = None,
               **options: Any) -> Job:
        """Submit a job: ``audio`` a path (uploaded), or ``audio_url`` (https://... or storage:KEY, fetched
        by the farm); ``options`` are render options by name (chunk_frames=25, video_qp=18...)."""
        fields = {"avatar": avatar, "priority": priority, "webhook_url": webhook_url,
                  "idempotency_key": idempotency_key, **options}
        body = submission(audio, audio_url, fields)
        if audio is None:
            return Job.of(self._call("POST", "/v1/jobs", **body))
        name, handle = opened(audio)
        with handle:
            return Job.of(self._call("POST", "/v1/jobs", files={"audio": (name, handle)}, **body))

    def job(self, job: Job | str) -> Job:
        return Job.of(self._call("GET", f"/v1/jobs/{job_id_of(job)}"))

    def jobs(self, state: str | None = None, *, page_size: int = 100) -> Iterator[Job]:
        """Every job the token sees, newest first, page after page."""
        params: dict[str, Any] = {"limit": page_size, **({"state": state} if state else {})}
        while True:
            page = self._call("GET", "/v1/jobs", params=params)
            yield from (Job.of(item) for item in page["jobs"])
            if not page["next_cursor"]:
                return
            params["cursor"] = page["next_cursor"]

    def cancel(self, job: Job | str) -> Job:
        return Job.of(self._call("DELETE", f"/v1/jobs/{job_id_of(job)}"))

    def resume(self, job: Job | str) -> Job:
        return Job.of(self._call("POST", f"/v1/jobs/{job_id_of(job)}/resume"))

    def wait(self, job: Job | str, *, progress: Progress | None = None, poll_s: float = 1.0,
             timeout_s: float | None = None) -> Job:
        """Poll until the job ends (done, failed or cancelled) and return it; ``progress`` is called with
        each new state of it. ``TimeoutError`` after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen = None
        while True:
            current = self.job(job)
            if progress is not None and (current.state, current.frames_done) != seen:
                seen = (current.state, current.frames_done)
                progress(current)
            if current.ended:
                return current
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {current.id} is still {current.state} after {timeout_s} s")
            time.sleep(poll_s)

    def download(self, job: Job | str, dest: str | os.PathLike) -> Path:
        """The done job's video into ``dest`` (streamed; S3 redirects followed); ``ApiError`` 409 if not done."""
        dest = Path(dest)
        with self._http.stream("GET", f"/v1/jobs/{job_id_of(job)}/output", follow_redirects=True) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError.of(response)
            with open(dest, "wb") as out:
                for block in response.iter_bytes():
                    out.write(block)
        return dest

    def playlist_url(self, job: Job | str) -> str | None:
        """The live HLS playlist's absolute signed URL (for a player) while the job renders, or None."""
        return self.job(job).playlist_url
