"""Submitting jobs to the farm, and following them: ``submit_job`` and ``JobHandle``.

Everything is checked before anything is written or queued: the avatar, the audio (readable, long
enough), the models (the contract), the broker and state Redis (reachable, named in the error), the
storage (bucket exists, credentials accepted). Then avatars and models are uploaded once each, by
content hash, the audio is uploaded under the job, the submission is recorded in storage
(``jobs/<id>/job.json``) and Redis, and planning is queued on the ``jobs`` queue.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.audio import MIN_SAMPLES_16K, probe_audio
from common.avatar import AvatarStore
from common.config import Settings
from common.errors import AudioError, CancelledError, InputError, JobFailedError, ServiceError
from common.jobstate import JobState, JobStatus, StateStore
from common.models import inspect_encoder, inspect_generator
from common.options import RenderOptions
from common.plan import AssetRef
from common.services import storage_for
from common.storage import Storage, avatar_key, input_key, model_key
from worker.assets import pack_avatar

PRIORITY_NAMES = ("high", "normal", "low")


def submission_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


@dataclass(frozen=True)
class Submission:
    """What a user asked for; the planner turns it into a ``Plan``."""

    job_id: str
    avatar_name: str
    avatar: AssetRef
    encoder: AssetRef
    generator: AssetRef
    audio_key: str
    audio_name: str
    options: RenderOptions
    priority: str
    submitted_at: float

    def to_json(self) -> str:
        data = asdict(self)
        data["options"] = self.options.to_dict()
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Submission":
        data = json.loads(text)
        return cls(**{**data, "avatar": AssetRef(**data["avatar"]), "encoder": AssetRef(**data["encoder"]),
                      "generator": AssetRef(**data["generator"]),
                      "options": RenderOptions.from_dict(data["options"])})


def check_broker(settings: Settings) -> StateStore:
    """The state store, after checking the broker and state Redis answer (ServiceError if not)."""
    store = StateStore.connect(settings.redis_url, settings.key_prefix)
    if settings.broker_url != settings.redis_url:
        StateStore.connect(settings.broker_url, settings.key_prefix)
    return store


def _check_audio(audio: Path) -> None:
    info = probe_audio(audio)
    if info.duration_s is not None and info.duration_s * 16_000 < MIN_SAMPLES_16K:
        raise AudioError("audio is too short for one encoder window", path=audio,
                         expected=f">= {MIN_SAMPLES_16K / 16_000:.4f} s", found=f"{info.duration_s:.4f} s")


def _upload_once(storage: Storage, key: str, path: Path) -> None:
    if not storage.exists(key):
        storage.put_file(key, path)


def submit_job(settings: Settings, *, avatar: str, audio: Path, encoder: Path, generator: Path,
               options: RenderOptions, priority: str = "normal", job_id: str | None = None) -> "JobHandle":
    """Validate, upload and queue a job; returns its handle. Nothing is queued on bad input."""
    from common.celery_app import enqueue_plan
    from scheduler.local import new_job_id

    if priority not in PRIORITY_NAMES:
        raise InputError("unknown priority", field="priority", expected=" | ".join(PRIORITY_NAMES),
                         found=priority)
    package = AvatarStore(settings.avatars_dir).get(avatar)
    audio = Path(audio)
    _check_audio(audio)
    enc, gen = inspect_encoder(encoder), inspect_generator(generator)
    store = check_broker(settings)
    storage = storage_for(settings)
    storage.check()

    job_id = job_id or new_job_id()
    with tempfile.TemporaryDirectory(prefix="lipfarm-submit-") as temp:
        avatar_ref = AssetRef(package.content_hash, avatar_key(package.content_hash))
        if not storage.exists(avatar_ref.key):
            storage.put_file(avatar_ref.key, pack_avatar(package, Path(temp) / "avatar.tar"))
    encoder_ref, generator_ref = AssetRef(enc.sha256, model_key(enc.sha256)), AssetRef(gen.sha256, model_key(gen.sha256))
    _upload_once(storage, encoder_ref.key, Path(encoder))
    _upload_once(storage, generator_ref.key, Path(generator))
    audio_ref = input_key(job_id, audio.name)
    storage.put_file(audio_ref, audio)
    submission = Submission(job_id, package.name, avatar_ref, encoder_ref, generator_ref, audio_ref,
                            audio.name, options, priority, time.time())
    storage.put_bytes(submission_key(job_id), submission.to_json().encode())
    store.create_job(job_id, {"priority": priority, "avatar": package.name, "audio": audio.name,
                              "storage_url": storage.url, "options": options.to_dict()}, now=time.time())
    try:
        enqueue_plan(job_id, priority)
    except Exception as exc:  # the broker went away between the check and now
        store.move_job(job_id, JobState.FAILED, now=time.time(), reason=f"could not be queued: {exc}")
        raise ServiceError(f"cannot queue job {job_id} on the broker at {settings.broker_url} ({exc})") from None
    return JobHandle(job_id, store, storage)


class JobHandle:
    """A submitted job: its status, a wait with progress, cancel, and where the output is."""

    def __init__(self, job_id: str, store: StateStore, storage: Storage) -> None:
        self.job_id, self.store, self.storage = job_id, store, storage

    def status(self) -> JobStatus:
        return self.store.status(self.job_id, now=time.time())

    def cancel(self) -> bool:
        from scheduler.finalize import record_terminal

        cancelled = self.store.cancel(self.job_id, now=time.time())
        if cancelled:
            record_terminal(self.storage, self.job_id, "cancelled", "cancelled by user")
        return cancelled

    def wait(self, *, timeout_s: float | None = None, show_progress: bool = False,
             poll_s: float = 1.0) -> JobStatus:
        """Block until the job ends; returns its status, or raises ``JobFailedError``/``CancelledError``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = None
        try:
            while True:
                status = self.status()
                if show_progress:
                    bar = bar or _progress_bar(status)
                    bar.total = status.frames_total or bar.total
                    bar.n = status.frames_done
                    bar.set_postfix_str(status.state.value)
                    bar.refresh()
                if status.state.terminal:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.job_id} still {status.state.value} after {timeout_s} s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()
        if status.state == JobState.FAILED:
            raise JobFailedError(f"job {self.job_id} failed: {status.reason}")
        if status.state == JobState.CANCELLED:
            raise CancelledError(f"job {self.job_id} was cancelled")
        return status


def _progress_bar(status: JobStatus):
    from tqdm import tqdm

    return tqdm(total=status.frames_total or None, unit="frame", desc=status.job_id, dynamic_ncols=True)


def submit(*, avatar: str, audio: str | Path, encoder: str | Path | None = None,
           generator: str | Path | None = None, options: RenderOptions | None = None,
           priority: str = "normal", settings: Settings | None = None) -> JobHandle:
    """The Python API: ``submit(avatar="may", audio="talk.wav").wait()`` (demo models by default)."""
    from common.config import load_settings
    from common.demo.assets import ensure_demo_assets

    settings = settings or load_settings()
    if encoder is None or generator is None:
        demo = ensure_demo_assets(settings)
        encoder, generator = encoder or demo.encoder, generator or demo.generator
    return submit_job(settings, avatar=avatar, audio=Path(audio), encoder=Path(encoder),
                      generator=Path(generator), options=options or RenderOptions(), priority=priority)
