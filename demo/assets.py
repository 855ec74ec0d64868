"""Create the demo assets on first use: the 'demo' avatar, 10 s of speech, and the two models.

Everything is made by code, deterministically, under ``<home>/demo/v<N>/`` (the version changes
when the demo's design does, so stale files are never used). Nothing is downloaded. What makes them
(onnx, scipy's signal tools, the avatar importer) is imported only when something is missing: a
render of the demo models must not pay for their imports every time (most of a second).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lipfarm.common.avatar import AvatarStore
from lipfarm.common.config import Settings

DEMO_VERSION = 2
AVATAR_NAME = "demo"


@dataclass(frozen=True)
class DemoAssets:
    avatar_name: str
    audio: Path
    encoder: Path
    generator: Path


def _write_model(path: Path, build: str) -> None:
    if path.is_file():
        return
    import onnx

    from lipfarm.demo import models

    model, _ = getattr(models, build)()
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        onnx.save(model, temp)
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


def ensure_demo_assets(settings: Settings) -> DemoAssets:
    """The demo assets, created where missing."""
    root = settings.home / "demo" / f"v{DEMO_VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    audio = root / "speech.wav"
    if not audio.is_file():
        from lipfarm.demo import speech

        handle, temp = tempfile.mkstemp(prefix=".speech.", suffix=".wav", dir=root)
        os.close(handle)
        speech.write_wav(temp, speech.demo_speech())
        os.replace(temp, audio)
    encoder, generator = root / "audio_encoder.onnx", root / "unet_328.onnx"
    _write_model(encoder, "build_encoder")
    _write_model(generator, "build_generator")
    store = AvatarStore(settings.avatars_dir)
    marker = root / "avatar.imported"
    if AVATAR_NAME not in store.names() or not marker.is_file():
        from lipfarm.common.avatar_import import import_avatar
        from lipfarm.demo import avatar as demo_avatar

        with tempfile.TemporaryDirectory(prefix="lipfarm-demo-") as temp:
            dataset = demo_avatar.write_dataset(Path(temp) / "demo_dataset")
            import_avatar(dataset, store.path(AVATAR_NAME), name=AVATAR_NAME, replace=True)
        marker.write_text("demo avatar imported\n")
    return DemoAssets(AVATAR_NAME, audio, encoder, generator)
