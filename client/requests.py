"""What both clients send: the submission's body, built once (the sync and async clients only send it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

AudioPath = str | os.PathLike


def submission(audio: AudioPath | None, audio_url: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    """httpx keyword arguments of ``POST /v1/jobs``: a multipart upload of ``audio`` (a path), or a JSON
    body naming ``audio_url`` (https://... or storage:KEY). The file is opened by the caller (``opened``)."""
    given = {name: value for name, value in fields.items() if value is not None}
    if (audio is None) == (audio_url is None):
        raise ValueError("give audio (a path) or audio_url, one of them")
    if audio_url is not None:
        return {"json": {**given, "audio_url": audio_url}}
    form = {name: (str(value).lower() if isinstance(value, bool) else str(value)) for name, value in given.items()}
    return {"data": form}


def opened(audio: AudioPath) -> tuple[str, BinaryIO]:
    path = Path(audio)
    return path.name, open(path, "rb")
