"""Models the API names by SHA-256: found in the farm's storage, read where they are.

``submit_job`` checks models from local files (their contract, their hash) before it queues
anything, like ``lipfarm submit``; the API is given hashes instead. A model in a local storage is
read in place; one in S3 is fetched once into ``<cache_dir>/api-models/<sha256>.onnx`` and checked
against its hash. Models are few and named by content, so the copies never go stale.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from lipfarm.common.config import Settings
from lipfarm.common.errors import InputError, ModelError, ServiceError
from lipfarm.common.fileio import file_sha256
from lipfarm.common.models import inspect_encoder, inspect_generator
from lipfarm.common.storage import Storage
from lipfarm.common.storage.layout import checked_part, model_key

MODELS_PREFIX = "models/"
Kind = Literal["encoder", "generator"]


def model_file(storage: Storage, settings: Settings, sha256: str, *, field: str) -> Path:
    """A local path of the model ``sha256`` of ``storage``; ``InputError`` naming ``field`` if it has none."""
    key = model_key(checked_part(sha256, field))
    local = storage.local_path(key)
    if local is not None and local.is_file():
        return local
    if local is not None or not storage.exists(key):
        raise InputError("no model with this SHA-256 in the farm's storage (upload it with POST /v1/models)",
                         field=field, found=sha256)
    cached = settings.cache_dir / "api-models" / f"{sha256}.onnx"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(key, cached)
        if file_sha256(cached) != sha256:
            cached.unlink(missing_ok=True)
            raise ServiceError(f"model '{key}' in {storage.url} does not match its name's SHA-256")
    return cached


@functools.lru_cache(maxsize=256)
def _kind(path: str, sha256: str) -> Kind:
    try:
        inspect_encoder(path)
        return "encoder"
    except ModelError as as_encoder:
        try:
            inspect_generator(path)
        except ModelError as as_generator:
            if as_encoder.problem == as_generator.problem:  # not a model at all
                raise as_encoder from None
            raise ModelError(f"neither an audio encoder ({as_encoder.problem}) nor a UNet generator "
                             f"({as_generator.problem})", path=path) from None
        return "generator"


def model_kind(path: Path, sha256: str) -> Kind:
    """Whether the model at ``path`` is an encoder or a generator (``ModelError`` if neither);
    remembered by hash, so a listing does not read every model again."""
    return _kind(str(path), sha256)


def stored_model_hashes(storage: Storage) -> list[str]:
    """The SHA-256 of every model in ``storage``."""
    return sorted(key[len(MODELS_PREFIX):-len(".onnx")] for key in storage.list(MODELS_PREFIX)
                  if key.endswith(".onnx") and key.count("/") == 1)
