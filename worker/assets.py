"""Turning a plan's references into local things a chunk render can use.

Avatars and models are fetched from storage once per machine into a content-addressed cache
(``<cache>/avatars/<hash>/``, ``<cache>/models/<sha256>.onnx``), checked against their hash, and
kept under a size bound (least recently used first out). Entries are immutable and appear by
atomic rename, so worker processes on one machine share them safely. Local renders point at the
files directly and skip the cache. Audio is read by range from the job's 16 kHz PCM object.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from lipfarm.common.audio import FilePcm, PcmSource, SilencePadded, StoragePcm
from lipfarm.common.avatar import MANIFEST, Avatar, load_avatar
from lipfarm.common.errors import AvatarError, ServiceError
from lipfarm.common.fileio import folder_replaced_atomically, replaced_atomically
from lipfarm.common.fileio import file_sha256
from lipfarm.common.models import inspect_encoder, inspect_generator
from lipfarm.common.plan import AssetRef, Chunk, Plan
from lipfarm.common.storage import Storage
from lipfarm.worker.render import ChunkWork

log = logging.getLogger(__name__)


class AssetCache:
    """Content-addressed local copies of avatars and models, bounded in total size.

    A copy on disk can be damaged after it was fetched (a full disk, a bad sector, a stray write),
    so each process checks every copy against its hashes the first time it uses it, and repairs a
    damaged one. A copy that fails while rendering is checked again (``repair_if_damaged``): a damaged
    copy is the worker's problem, to fix and retry, not the user's input to blame. Repairs replace
    only the damaged files, each by an atomic rename: other processes rendering from the same copy
    meanwhile see an old file or a good one, never a missing one.
    """

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._checked: set[Path] = set()  # copies this process has checked against their hashes

    def _model_path(self, sha256: str) -> Path:
        return self.root / "models" / f"{sha256}.onnx"

    def _avatar_path(self, sha256: str) -> Path:
        return self.root / "avatars" / sha256

    def model(self, ref: AssetRef, storage: Storage) -> Path:
        path = self._model_path(ref.sha256)
        if not path.is_file() or (path not in self._checked and file_sha256(path) != ref.sha256):
            self._fetch_model(ref, storage, path)
            self._evict(keep=path)
        self._checked.add(path)
        _touch(path)
        return path

    def _fetch_model(self, ref: AssetRef, storage: Storage, path: Path) -> None:
        with replaced_atomically(path) as temp:
            storage.get_file(ref.key, temp)
            if file_sha256(temp) != ref.sha256:
                raise ServiceError(f"model '{ref.key}' in {storage.url} does not match its hash")

    def avatar(self, ref: AssetRef, storage: Storage) -> Path:
        path = self._avatar_path(ref.sha256)
        if not (path / MANIFEST).is_file():
            with folder_replaced_atomically(path, replace=False) as staging:
                self._fetch_avatar(ref, storage, staging)
            self._evict(keep=path)
        elif path not in self._checked and not _intact(path):
            self._repair_avatar(ref, storage, path)
        self._checked.add(path)
        _touch(path)
        return path

    def _fetch_avatar(self, ref: AssetRef, storage: Storage, folder: Path) -> None:
        storage.get_file(ref.key, folder / "avatar.tar")
        with tarfile.open(folder / "avatar.tar") as tar:
            tar.extractall(folder, filter="data")
        (folder / "avatar.tar").unlink()
        avatar = load_avatar(folder, verify_frames=True)
        if avatar.content_hash != ref.sha256:
            raise ServiceError(f"avatar '{ref.key}' in {storage.url} does not match its hash")

    def _repair_avatar(self, ref: AssetRef, storage: Storage, path: Path) -> None:
        """Fetch the avatar again and put back, one atomic rename each, the files that differ."""
        log.warning("cached avatar %s is damaged; repairing it from %s", path, storage.url)
        with tempfile.TemporaryDirectory(prefix=".repair-", dir=self.root) as temp:
            fresh = Path(temp)
            self._fetch_avatar(ref, storage, fresh)
            for source in sorted(fresh.rglob("*")):
                target = path / source.relative_to(fresh)
                if source.is_file() and (not target.is_file() or file_sha256(target) != file_sha256(source)):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, target)

    def repair_if_damaged(self, plan: Plan, storage: Storage, error: BaseException) -> bool:
        """After ``error`` from a plan's avatar or model: if a cached copy it used no longer matches
        its hashes, repair the copy and say so (the attempt is then retried, not failed)."""
        damaged = False
        avatar = self._avatar_path(plan.avatar.sha256)
        if not _local(plan.avatar.path) and avatar.is_dir() and not _intact(avatar):
            self._repair_avatar(plan.avatar, storage, avatar)
            damaged = True
        for ref in (plan.encoder, plan.generator):
            model = self._model_path(ref.sha256)
            if not _local(ref.path) and model.is_file() and file_sha256(model) != ref.sha256:
                self._fetch_model(ref, storage, model)
                damaged = True
        if damaged:
            log.warning("a cached copy of job %s's inputs was damaged (%s): repaired", plan.job_id, error)
        return damaged

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for kind in ("models", "avatars"):
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith("."):
                    continue
                files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
                entries.append((entry.stat().st_mtime, sum(f.stat().st_size for f in files), entry))
        return entries

    def _evict(self, *, keep: Path) -> None:
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for _, size, entry in entries:
            if total <= self.max_bytes:
                break
            if entry == keep:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            total -= size


def _intact(avatar_dir: Path) -> bool:
    """Whether an avatar package's frames still match the hashes in its manifest."""
    try:
        load_avatar(avatar_dir, verify_frames=True)
    except AvatarError:
        return False
    return True


def _touch(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


@functools.lru_cache(maxsize=4)
def _avatar(path: str, manifest_mtime_ns: int) -> Avatar:
    return load_avatar(path)


def _local(ref_path: str | None) -> Path | None:
    return Path(ref_path) if ref_path and Path(ref_path).exists() else None


def resolve_chunk(plan: Plan, chunk: Chunk, *, storage: Storage, cache: AssetCache | None,
                  output: Path) -> ChunkWork:
    """A ``ChunkWork`` for ``chunk`` of ``plan``: local paths where the plan has them, else cached copies."""
    avatar_dir = _local(plan.avatar.path) or cache.avatar(plan.avatar, storage)
    encoder = _local(plan.encoder.path) or cache.model(plan.encoder, storage)
    generator = _local(plan.generator.path) or cache.model(plan.generator, storage)
    pcm_path = _local(plan.audio.pcm_path)
    pcm: PcmSource = (FilePcm(pcm_path) if pcm_path else
                      StoragePcm(storage, plan.audio.pcm_key, plan.audio.n_samples))
    if plan.audio.timeline_samples > pcm.n_samples:  # a sync mode pads the audio with silence
        pcm = SilencePadded(pcm, plan.audio.timeline_samples)
    avatar = _avatar(str(avatar_dir), (avatar_dir / MANIFEST).stat().st_mtime_ns)
    # inspect_* check each version of a model file once per process (common.models)
    return ChunkWork(avatar, inspect_encoder(encoder), inspect_generator(generator), pcm, chunk.start_frame,
                     chunk.stop_frame, plan.frame_count, plan.options, output)
