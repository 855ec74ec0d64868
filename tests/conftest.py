"""Shared fixtures: an isolated lipfarm home, the demo assets, the real-data fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lipfarm.common.config import load_settings
from lipfarm.demo.speech import write_wav
from tests.farm import Holds

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """A LIPFARM_HOME for the whole session, so tests never touch the user's (restored afterwards)."""
    path = tmp_path_factory.mktemp("lipfarm-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIPFARM_HOME", str(path))
        yield path


@pytest.fixture(scope="session")
def settings(home):
    return load_settings({"LIPFARM_HOME": str(home)})


@pytest.fixture(scope="session")
def demo(settings):
    """The demo avatar, speech and models, made once per session."""
    from lipfarm.demo.assets import ensure_demo_assets

    return ensure_demo_assets(settings)


@pytest.fixture(scope="session")
def demo_avatar(settings, demo):
    from lipfarm.common.avatar import AvatarStore

    return AvatarStore(settings.avatars_dir).get(demo.avatar_name)


@pytest.fixture(scope="session")
def sanders() -> Path:
    """The real avatar and speech of ../shared/fixtures (absent in a user's fresh clone)."""
    path = SHARED_FIXTURES / "sanders"
    if not path.is_dir():
        pytest.skip(f"real-data fixtures not found at {path} (they live beside the project, not in it)")
    return path


@pytest.fixture(scope="session")
def speech_16k(demo) -> np.ndarray:
    from lipfarm.common.audio import load_16k

    return load_16k(demo.audio)


@pytest.fixture(scope="session")
def clip(tmp_path_factory, speech_16k) -> Path:
    """4.1 s of the demo speech: 101 frames, the farm tests' job (a module may define a shorter one)."""
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    write_wav(path, speech_16k[int(0.3 * 16000):int(4.4 * 16000)])
    return path


@pytest.fixture(scope="module")
def holds(tmp_path_factory) -> Holds:
    """Where a test holds chunks mid-render (tests/farm.py ``Holds``); one folder per module."""
    return Holds(tmp_path_factory.mktemp("holds"))
