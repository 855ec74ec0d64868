"""Submitting jobs to the farm, and following them: ``submit_job`` and ``JobHandle``.

Everything is checked before anything is written or queued: the avatar, the audio (readable, long
enough), the models (the contract), the broker and state Redis (reachable, named in the error), the
storage (bucket exists, credentials accepted). Then avatars and models are uploaded once each, by
content hash, the audio is uploaded under the job, the submission is recorded in storage
(``jobs/<id>/job.json``) and Redis, and planning is queued on the ``jobs`` queue.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lipfarm.common import defaults
from lipfarm.common.audio import check_audio
from lipfarm.common.avatar import Avatar, AvatarStore, pack_avatar
from lipfarm.common.config import Settings
from lipfarm.common.errors import CancelledError, InputError, JobFailedError
from lipfarm.job.endings import close_job
from lipfarm.common.farm import farm_id
from lipfarm.common.identity import new_job_id
from lipfarm.job.jobfiles import JobFiles
from lipfarm.job.playlist import reopen_playlist
from lipfarm.common.models import inspect_encoder, inspect_generator
from lipfarm.common.options import RenderOptions
from lipfarm.common.plan import AssetRef, Submission
from lipfarm.common.services import connect_state
from lipfarm.common.state import JobRecord, JobState, JobStatus, StateStore, Verdict
from lipfarm.common.storage import Storage, open_storage
from lipfarm.common.storage.layout import avatar_key, model_key


def connect_farm(settings: Settings) -> StateStore:
    """The state store, after checking the broker and state Redis answer and keep every key
    (``ServiceError`` if not)."""
    store = connect_state(settings)
    if settings.broker_url != settings.redis_url:
        connect_state(settings, settings.broker_url)
    storage = functools.cache(lambda: open_storage(settings.storage_url, settings))
    # an ended job that left Redis (LIPFARM_JOB_RETENTION_S) comes back from the farm's storage when asked for
    return store.recall_ended_from(lambda job_id: JobFiles(storage(), job_id).ended())


@dataclass(frozen=True)
class _CheckedInputs:
    avatar: Avatar
    encoder: AssetRef
    generator: AssetRef


def _check_inputs(settings: Settings, *, avatar: str, audio: Path, encoder: Path, generator: Path,
                  priority: str) -> _CheckedInputs:
    if priority not in defaults.PRIORITIES:
        raise InputError("unknown priority", field="priority", expected=" | ".join(defaults.PRIORITIES),
                         found=priority)
    package = AvatarStore(settings.avatars_dir).get(avatar)
    check_audio(audio, max_s=settings.max_audio_s)
    enc, gen = inspect_encoder(encoder), inspect_generator(generator)
    return _CheckedInputs(package, AssetRef(enc.sha256, model_key(enc.sha256), str(encoder)),
                          AssetRef(gen.sha256, model_key(gen.sha256), str(generator)))


def _upload_once(storage: Storage, inputs: _CheckedInputs) -> AssetRef:
    """Upload the avatar and the models unless storage has them (by content); returns the avatar's ref."""
    avatar = AssetRef(inputs.avatar.content_hash, avatar_key(inputs.avatar.content_hash))
    if not storage.exists(avatar.key):
        with tempfile.TemporaryDirectory(prefix="lipfarm-submit-") as temp:
            storage.put_file(avatar.key, pack_avatar(inputs.avatar, Path(temp) / "avatar.tar"))
    for model in (inputs.encoder, inputs.generator):
        if not storage.exists(model.key):
            storage.put_file(model.key, Path(model.path))
    return avatar


def submit_job(settings: Settings, *, avatar: str, audio: Path, encoder: Path, generator: Path,
               options: RenderOptions, priority: str = defaults.PRIORITY,
               job_id: str | None = None, webhook_url: str = "", tenant: str = "default",
               api_url: str = "", max_unfinished: int = 0) -> "JobHandle":
    """Validate, upload and queue a job; returns its handle. Nothing is queued on bad input. With
    ``max_unfinished``, the tenant may have at most that many jobs not yet ended, counted and
    recorded in one step (``QuotaError``, nothing left behind, when it is at its limit)."""
    from lipfarm.common.celery_app import enqueue_plan

    audio = Path(audio)
    webhook_url = check_webhook_url(webhook_url, settings.outbound_allow) if webhook_url else ""
    inputs = _check_inputs(settings, avatar=avatar, audio=audio, encoder=Path(encoder),
                           generator=Path(generator), priority=priority)
    store = connect_farm(settings)
    storage = open_storage(settings.storage_url, settings)
    storage.check()

    files = JobFiles(storage, job_id or new_job_id())
    farm = farm_id(store, settings)
    avatar_ref = _upload_once(storage, inputs)  # by content, shared by jobs: kept whatever follows
    try:  # all or nothing: a job Redis or the broker refused leaves nothing for a rebuild to find and render
        submission = Submission(files.job_id, inputs.avatar.name, avatar_ref,
                                AssetRef(inputs.encoder.sha256, inputs.encoder.key),
                                AssetRef(inputs.generator.sha256, inputs.generator.key),
                                files.put_input(audio, audio.name), audio.name, options, priority, store.now(),
                                webhook_url=webhook_url, farm_id=farm, tenant=tenant, api_url=api_url,
                                template_frames=inputs.avatar.frame_count)
        files.put_submission(submission)
        store.create_job(JobRecord.queued(submission, storage.url), max_unfinished=max_unfinished)
        enqueue_plan(files.job_id, priority)
    except BaseException:
        _withdraw(store, files)
        raise
    return JobHandle(files.job_id, store, storage)


def _withdraw(store: StateStore, files: JobFiles) -> None:
    """Take back a submission that failed half-way: its record (if made) and its files. A failure
    here is logged, not raised: the error to report is the one that stopped the submission."""
    for what, undo in (("record", lambda: store.withdraw(files.job_id)), ("files", files.discard)):
        try:
            undo()
        except Exception as exc:  # noqa: BLE001 - the caller re-raises the error that matters
            logging.getLogger(__name__).warning("job %s: could not remove its %s after a failed submission: %s",
                                                files.job_id, what, exc)


class JobHandle:
    """A submitted job: its status, a wait with progress, cancel, and where the output is."""

    def __init__(self, job_id: str, store: StateStore, storage: Storage) -> None:
        self.job_id, self.store, self.storage = job_id, store, storage

    def status(self) -> JobStatus:
        return self.store.status(self.job_id)

    def cancel(self) -> bool:
        """Cancel the job (False if it had ended); its end is recorded in storage at once."""
        cancelled = self.store.cancel(self.job_id)
        if cancelled:
            close_job(self.store, self.storage, self.job_id)
        return cancelled

    def resume(self) -> int:
        """Go on with a failed or cancelled job: its unfinished chunks are queued again, each with a
        fresh attempt count (the committed ones are kept). Returns the chunks queued."""
        from lipfarm.common.celery_app import enqueue_finalize, enqueue_plan, enqueue_render

        job = self.store.job(self.job_id)
        if job.state == JobState.DONE:
            raise InputError(f"job {self.job_id} is done: there is nothing to resume", field="job")
        resumed = self.store.resume(self.job_id)
        if resumed.verdict == Verdict.REFUSED:
            raise InputError(f"job {self.job_id} is {resumed.detail}: only a failed or cancelled job can be resumed",
                             field="job")
        files = JobFiles(self.storage, self.job_id)
        files.delete_ended()
        reopen_playlist(files)  # its playlist's end ("job failed") is taken back with ended.json
        if resumed.replan:
            enqueue_plan(self.job_id, job.priority)
            return 0
        for chunk in self.store.chunks(self.job_id):
            if chunk.index in resumed.queued:
                enqueue_render(self.job_id, chunk.index, job.priority, chunk.frames_label)
        if not resumed.queued:
            self.store.mark_finalizer_enqueued(self.job_id)
            enqueue_finalize(self.job_id, job.priority)
        return len(resumed.queued)

    def wait(self, *, timeout_s: float | None = None, show_progress: bool = False,
             poll_s: float = 1.0) -> JobStatus:
        """Block until the job ends; returns its status, or raises ``JobFailedError``/``CancelledError``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = _ProgressBar(self.job_id) if show_progress else None
        try:
            while True:
                status = self.status()
                if bar is not None:
                    bar.show(status)
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


class _ProgressBar:
    """A tqdm bar over a job's frames, made on the first status that knows the total."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.bar = None

    def show(self, status: JobStatus) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=status.frames_total or None, unit="frame", desc=self.job_id, dynamic_ncols=True)
        self.bar.total = status.frames_total or self.bar.total
        self.bar.n = status.frames_done
        self.bar.set_postfix_str(status.state.value)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def submit(*, avatar: str, audio: str | Path, encoder: str | Path | None = None,
           generator: str | Path | None = None, options: RenderOptions | None = None,
           priority: str = defaults.PRIORITY, settings: Settings | None = None) -> JobHandle:
    """The Python API: ``submit(avatar="may", audio="talk.wav").wait()`` (demo models by default)."""
    from lipfarm.common.config import load_settings
    from lipfarm.demo.assets import ensure_demo_assets

    settings = settings or load_settings()
    if encoder is None or generator is None:
        demo = ensure_demo_assets(settings)
        encoder, generator = encoder or demo.encoder, generator or demo.generator
    return submit_job(settings, avatar=avatar, audio=Path(audio), encoder=Path(encoder),
                      generator=Path(generator), options=options or RenderOptions(), priority=priority)


# --- Submissions that do not start from a file on this machine (the HTTP API) ----------------------

def check_webhook_url(url: str, allow: str = "") -> str:
    """``url`` if it is an http(s) URL whose host is a public address, or one ``allow``
    (``LIPFARM_OUTBOUND_ALLOW``) lets through; else ``InputError`` naming ``webhook_url``."""
    from lipfarm.common.netguard import check_url

    return check_url(url, allow, field="webhook_url").url


def checked_storage_key(key: str, field: str = "audio_key") -> str:
    """``key`` if it names an object inside the storage (relative, no ``..``), else ``InputError``."""
    parts = key.split("/") if isinstance(key, str) else []
    if (not parts or key.startswith("/") or "\\" in key or not key.isprintable() or len(key) > 1024
            or any(part in ("", ".", "..") for part in parts)):
        raise InputError("not a storage key inside the storage", field=field,
                         expected="a relative key like uploads/talk.wav, without '..' or a leading '/'",
                         found=repr(key[:200]) if isinstance(key, str) else type(key).__name__)
    return key


def safe_file_name(name: str, default: str = "audio") -> str:
    """A file name fit to be part of a storage key: the base name, other characters as '_'."""
    import re

    base = re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("\\", "/").rsplit("/", 1)[-1])
    base = re.sub(r"\.{2,}", ".", base).lstrip("._-")[-100:]
    return base or default


def submit_from_storage(settings: Settings, *, audio_key: str, max_bytes: int, **job) -> "JobHandle":
    """``submit_job`` with audio that is already in the farm's storage under ``audio_key``.

    The key is checked, its size bounded by ``max_bytes``; the object is fetched to a temporary
    file and submitted as if uploaded (so it is probed, and copied under the job, like any audio).
    """
    from lipfarm.common.errors import NotFoundError

    checked_storage_key(audio_key)
    storage = open_storage(settings.storage_url, settings)
    if not storage.exists(audio_key):
        raise NotFoundError(f"no object '{audio_key}' in {storage.url}")
    size = storage.size(audio_key)
    if size > max_bytes:
        raise InputError("object is larger than an audio upload may be", field="audio_key",
                         expected=f"at most {max_bytes} bytes", found=f"{size} bytes")
    with tempfile.TemporaryDirectory(prefix="lipfarm-audio-") as temp:
        audio = Path(temp) / safe_file_name(audio_key)
        storage.get_file(audio_key, audio)
        try:
            return submit_job(settings, audio=audio, **job)
        except InputError as exc:  # named by its key, not by the temporary copy
            if exc.path != str(audio):
                raise
            raise type(exc)(exc.problem, path=audio_key, field=exc.field or "audio_key", expected=exc.expected,
                            found=exc.found) from None
