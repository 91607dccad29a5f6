"""Settings stay in step with their documentation: config/recap.toml and the README table."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

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


# -- every value is checked when read: one line naming the setting, exit 2 (issue 14, item 10) --


def recap_cli(*args: str, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recap.cli", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: invalid settings: "), line
    for text in expected:
        assert text in line, (text, line)
    return line


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("RECAP_FETCH_TIMEOUT_S", "inf", "finite"),
        ("RECAP_FETCH_TIMEOUT_S", "1e308", "86400"),
        ("RECAP_LEASE_S", "nan", "finite"),
        ("RECAP_VISIBILITY_TIMEOUT_S", "100000", "86400"),
        ("RECAP_FETCH_CONCURRENCY", "1000000000", "4096"),
        ("RECAP_FETCH_ALLOW_CIDRS", "10.0.0.0/8,garbage", "'garbage' is not a network"),
        ("RECAP_DEVICE", "bogus", "cuda:N"),
        ("RECAP_BROKER_URL", "garbage://x", "garbage://"),
        ("RECAP_BROKER_URL", "redis://h:port/0", "port"),
        ("RECAP_DATABASE_URL", "garbage", "not a database URL"),
        ("RECAP_DATABASE_URL", "mysql://u@db.example/recap", "mysql://"),
        ("RECAP_METRICS_ADDRESS", "everywhere", "IP address"),
        ("RECAP_METRICS_PORT", "70000", "65535"),
        ("RECAP_TORCH_THREADS", "0", "greater than or equal to 1"),
        ("RECAP_LOG_LEVEL", "loud", "INFO"),
        ("RECAP_USER_AGENT", "recap\r\nX-Injected: 1", "control character"),
    ],
)
def test_an_unusable_setting_is_one_line_naming_it(tmp_path, variable, value, said):
    line = assert_one_line_error(recap_cli("status", env={variable: value}, cwd=tmp_path), variable, said)
    assert "Input should be" in line or said in line


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["export", "--job", "j", "--out", "o.jsonl"],
        ["run", "urls.txt", "--out", "o.jsonl"],
        ["submit", "urls.txt", "--job", "j"],
        ["worker", "--gpus", "none"],
        ["flower"],
        ["db", "upgrade"],
    ],
)
def test_every_command_checks_the_settings_first(tmp_path, args):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    result = recap_cli(*args, env={"RECAP_FETCH_TIMEOUT_S": "inf"}, cwd=tmp_path)
    assert_one_line_error(result, "RECAP_FETCH_TIMEOUT_S=inf")
    assert not (tmp_path / "recap.db").exists()  # nothing was started


def test_a_database_url_is_never_echoed_with_its_password(tmp_path):
    result = recap_cli(
        "status", env={"RECAP_DATABASE_URL": "mysql://u:hunter2-secret@db/recap"}, cwd=tmp_path
    )
    line = assert_one_line_error(result, "RECAP_DATABASE_URL", "mysql://")
    assert "hunter2" not in line


def test_a_mistyped_key_in_a_config_file_names_itself_and_the_file(tmp_path):
    config = tmp_path / "mine.toml"
    config.write_text("chunk_size = 100\nfetch_timeout = 30\n")
    result = recap_cli("status", env={"RECAP_CONFIG": str(config)}, cwd=tmp_path)
    assert_one_line_error(result, str(config), "'fetch_timeout'", "fetch_timeout_s")


def test_a_bad_value_from_a_config_file_names_the_setting_and_the_file(tmp_path):
    config = tmp_path / "mine.toml"
    config.write_text("lease_s = inf\n")  # TOML has inf: still no number of seconds
    result = recap_cli("status", env={"RECAP_CONFIG": str(config)}, cwd=tmp_path)
    assert_one_line_error(result, "RECAP_LEASE_S=inf", str(config), "finite")
    broken = tmp_path / "broken.toml"
    broken.write_text("chunk_size = \n")
    assert_one_line_error(recap_cli("status", env={"RECAP_CONFIG": str(broken)}, cwd=tmp_path), str(broken))


def test_the_environment_wins_over_a_bad_config_value(monkeypatch, tmp_path):
    config = tmp_path / "mine.toml"
    config.write_text("fetch_timeout_s = inf\n")
    monkeypatch.setenv("RECAP_CONFIG", str(config))
    monkeypatch.setenv("RECAP_FETCH_TIMEOUT_S", "7")
    assert Settings().fetch_timeout_s == 7


def test_usable_values_are_kept(monkeypatch):
    for variable, value in {
        "RECAP_DEVICE": "cuda:3",
        "RECAP_BROKER_URL": "rediss://:pw@redis.example:6380/2?ssl_cert_reqs=required",
        "RECAP_DATABASE_URL": "postgresql+psycopg://u:pw@db.example:5432/recap?sslmode=require",
        "RECAP_FETCH_ALLOW_CIDRS": "10.0.0.0/8, fd00::/8,192.168.1.5",
        "RECAP_FETCH_TIMEOUT_S": "86400",
        "RECAP_METRICS_ADDRESS": "::1",
        "RECAP_LOG_LEVEL": "debug",
    }.items():
        monkeypatch.setenv(variable, value)
    settings = Settings()
    assert settings.device == "cuda:3" and settings.fetch_timeout_s == 86400
    assert settings.fetch_allow_cidrs == ["10.0.0.0/8", "fd00::/8", "192.168.1.5"]
    assert settings.log_level == "DEBUG" and settings.metrics_address == "::1"
    monkeypatch.setenv("RECAP_DATABASE_URL", "sqlite:////tmp/x/recap.db")
    assert Settings().database_url == "sqlite:////tmp/x/recap.db"
    monkeypatch.setenv("RECAP_DATABASE_URL", "")
    assert Settings().database_url is None  # empty: unset


def test_a_bad_database_url_handed_to_the_database_layer_is_one_line():
    from recap.db import InvalidDatabaseUrl, normalise_url, require_postgres
    from recap.errors import RecapError

    for url in ("garbage", "mysql://u:pw@h/db", "postgresql://u@h:port/db"):
        with pytest.raises(InvalidDatabaseUrl) as caught:
            normalise_url(url)
        assert isinstance(caught.value, RecapError) and "pw" not in str(caught.value)
    with pytest.raises(RecapError, match="not a database URL"):
        require_postgres("garbage", "worker")


def test_top_k_enters_a_jobs_settings_only_when_set():
    greedy = Settings(max_new_tokens=128, image_mode="pad").generation().to_json()
    assert greedy == {
        "max_new_tokens": 128,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "repetition_penalty": 1.0,
        "image_mode": "pad",
    }  # the JSON jobs were made with before RECAP_TOP_K: their names and rows stay
    assert "top_k" not in Settings(top_k=5).generation().to_json()  # greedy ignores it
    assert Settings(do_sample=True, top_k=5).generation().to_json()["top_k"] == 5


def test_the_condition_preset_is_a_config_file_recap_reads(tmp_path, monkeypatch):
    """Its lines, copied into a RECAP_CONFIG file, are settings recap knows."""
    text = (REPO / "config" / "prompts.toml").read_text()
    table = text.split("[condition_diverse_topk]\n", 1)[1].split("\n[", 1)[0]
    config = tmp_path / "condition.toml"
    config.write_text(table)
    monkeypatch.setenv("RECAP_CONFIG", str(config))
    settings = Settings()
    generation = settings.generation()
    assert (generation.do_sample, generation.top_k, generation.temperature) == (True, 50, 1.0)
    assert "{org_caption}" in settings.prompt and generation.to_json()["top_k"] == 50


def test_a_config_file_that_is_not_text_is_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xff\xfe\n")
    result = subprocess.run(
        [sys.executable, "-m", "recap.cli", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RECAP_CONFIG": str(config)},
        cwd=REPO,
    )
    assert result.returncode == 2 and "not a readable TOML file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
