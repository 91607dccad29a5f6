"""Settings stay in step with their documentation: config/recap.toml and the README table."""

from __future__ import annotations

import tomllib

from recap.resources import resource_path
from recap.settings import Settings
from tests.support.fleet import REPO


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"RECAP_{name.upper()}" not in readme]
    assert not missing, f"settings missing from the README table: {missing}"


def test_config_defaults_name_real_settings_and_agree_with_the_code():
    config = tomllib.loads((resource_path("config") / "recap.toml").read_text())
    unknown = sorted(set(config) - set(Settings.model_fields))
    assert not unknown, unknown
    for name, value in config.items():
        default = Settings.model_fields[name].default
        if name == "cache_dir":
            continue  # "~" is expanded in the code
        assert value == default, (name, value, default)


def test_environment_overrides_the_config_file(monkeypatch, tmp_path):
    extra = tmp_path / "mine.toml"
    extra.write_text("chunk_size = 100\nmax_queued_chunks = 7\n")
    monkeypatch.setenv("RECAP_CONFIG", str(extra))
    monkeypatch.setenv("RECAP_CHUNK_SIZE", "50")
    settings = Settings()
    assert (settings.chunk_size, settings.max_queued_chunks) == (50, 7)
