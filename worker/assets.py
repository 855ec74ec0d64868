"""Turning a plan's references into local things a chunk render can use.

Avatars and models are fetched from storage once per machine into a content-addressed cache
(``<cache>/avatars/<hash>/``, ``<cache>/models/<sha256>.onnx``), checked against their hash, and
kept under a size bound (least recently used first out). Entries are immutable and appear by
atomic rename, so worker processes on one machine share them safely. Local renders point at the
files directly and skip the cache. Audio is read by range from the job's 16 kHz PCM object.
"""

from __future__ import annotations

import functools
import os
import shutil
import tarfile
import time
from pathlib import Path

from common.audio import FilePcm, PcmSource, StoragePcm
from common.avatar import MANIFEST, Avatar, load_avatar
from common.errors import ServiceError
from common.fileio import folder_replaced_atomically, replaced_atomically
from common.models import EncoderSpec, GeneratorSpec, file_sha256, inspect_encoder, inspect_generator
from common.plan import AssetRef, Chunk, Plan
from common.storage import Storage
from worker.render import ChunkWork


class AssetCache:
    """Content-addressed local copies of avatars and models, bounded in total size."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def model(self, ref: AssetRef, storage: Storage) -> Path:
        path = self.root / "models" / f"{ref.sha256}.onnx"
        if not path.is_file():
            with replaced_atomically(path) as temp:
                storage.get_file(ref.key, temp)
                if file_sha256(temp) != ref.sha256:
                    raise ServiceError(f"model '{ref.key}' in {storage.url} does not match its hash")
            self._evict(keep=path)
        _touch(path)
        return path

    def avatar(self, ref: AssetRef, storage: Storage) -> Path:
        path = self.root / "avatars" / ref.sha256
        if not (path / MANIFEST).is_file():
            with folder_replaced_atomically(path, replace=False) as staging:
                storage.get_file(ref.key, staging / "avatar.tar")
                with tarfile.open(staging / "avatar.tar") as tar:
                    tar.extractall(staging, filter="data")
                (staging / "avatar.tar").unlink()
                avatar = load_avatar(staging, verify_frames=True)
                if avatar.content_hash != ref.sha256:
                    raise ServiceError(f"avatar '{ref.key}' in {storage.url} does not match its hash")
            self._evict(keep=path)
        _touch(path)
        return path

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


def _touch(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


@functools.lru_cache(maxsize=16)
def _encoder_spec(path: str, mtime_ns: int, size: int) -> EncoderSpec:
    return inspect_encoder(path)


@functools.lru_cache(maxsize=16)
def _generator_spec(path: str, mtime_ns: int, size: int) -> GeneratorSpec:
    return inspect_generator(path)


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


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
    avatar = _avatar(str(avatar_dir), (avatar_dir / MANIFEST).stat().st_mtime_ns)
    return ChunkWork(avatar, _encoder_spec(*_stat_key(encoder)), _generator_spec(*_stat_key(generator)),
                     pcm, chunk.start_frame, chunk.stop_frame, plan.options, output)
