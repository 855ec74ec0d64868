"""Settings: parsing, defaults, and the table of docs/configuration.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipfarm.common.config import SETTINGS, load_settings, settings_markdown
from lipfarm.common.errors import InputError

CONFIGURATION_DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_defaults_and_derived_paths():
    settings = load_settings({"LIPFARM_HOME": "/srv/lipfarm"})
    assert settings.home == Path("/srv/lipfarm")
    assert settings.storage_url == "/srv/lipfarm/storage"
    assert settings.cache_dir == Path("/srv/lipfarm/cache")
    assert settings.redis_url == settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.avatars_dir == Path("/srv/lipfarm/avatars")


def test_environment_overrides_and_bad_values():
    settings = load_settings({"LIPFARM_BROKER_URL": "redis://h:1/3", "LIPFARM_MAX_ATTEMPTS": "5"})
    assert settings.redis_url == "redis://h:1/3" and settings.max_attempts == 5
    with pytest.raises(InputError, match="LIPFARM_MAX_ATTEMPTS: not a valid int"):
        load_settings({"LIPFARM_MAX_ATTEMPTS": "many"})


def test_threads_are_a_share_of_the_cores():
    settings = load_settings({"LIPFARM_INFERENCE_THREADS": "3"})
    assert settings.threads_per_process(4) == 3
    auto = load_settings({})
    assert auto.threads_per_process(10_000) == 1


def test_the_configuration_doc_lists_every_setting_as_configured():
    text = CONFIGURATION_DOC.read_text()
    start = text.index("<!-- settings-table")
    table = text[text.index("\n", start) + 1:text.index("<!-- end settings-table -->")].strip()
    assert table == settings_markdown()
    assert len(SETTINGS) == table.count("\n") - 1


def test_every_setting_is_a_field_of_settings_in_order():
    from dataclasses import fields

    from lipfarm.common.config import Settings

    assert [f.name for f in fields(Settings)] == [s.name for s in SETTINGS]
