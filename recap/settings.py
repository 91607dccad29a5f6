"""The one typed settings object: `RECAP_*` environment variables over `config/recap.toml`.

Read once per process (`get_settings()`), then passed down. Every value is checked when it
is read (docs/ARCHITECTURE.md, "Contracts"): numbers finite and bounded, networks, URLs and
devices parseable, TOML keys known; what is wrong comes back as one InvalidSettings line
naming the setting.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from recap.db import parse_database_url
from recap.errors import RecapError, one_line
from recap.generation import GenerationSettings
from recap.resources import resource_path

PAPER_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
DEFAULT_MODEL = "xtuner/llava-llama-3-8b-v1_1-transformers"
DAY_S = 86_400  # no wait, lease or timeout is longer: a bigger number is a typo or a unit mix-up
ENV_PREFIX = "RECAP_"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SECRET_INPUTS = {"database_url", "broker_url", "flower_password"}  # never echoed in an error


class InvalidSettings(RecapError):
    """A setting recap cannot use: one line naming it (RECAP_<NAME>, or the key and its file)."""


def config_files() -> list[Path]:
    """Bundled defaults, then the file named by RECAP_CONFIG (later files win)."""
    files = [resource_path("config") / "recap.toml"]
    extra = os.environ.get("RECAP_CONFIG")
    if extra:
        path = Path(extra).expanduser()
        if not path.is_file():  # a typo must not silently run with the defaults
            raise InvalidSettings(f"RECAP_CONFIG={extra}: no such file")
        files.append(path)
    return [f for f in files if f.exists()]


def read_toml(path: Path) -> dict:
    """One settings file, its keys checked: a mistyped key must not be silently ignored."""
    try:
        with path.open("rb") as f:
            table = tomllib.load(f)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidSettings(f"{path}: not a readable TOML file: {one_line(exc)}") from None
    for key in table:
        if key not in Settings.model_fields:
            close = difflib.get_close_matches(key, Settings.model_fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InvalidSettings(f"{path}: unknown setting {key!r}{hint}")
    return table


class Settings(BaseSettings):
    # allow_inf_nan: "inf" or "nan" is no number of seconds (a watchdog died of it).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", allow_inf_nan=False)

    # Where things live
    database_url: str | None = None  # postgresql:// (psycopg) or sqlite:///
    broker_url: str = "redis://localhost:6379/0"  # redis:// or rediss://
    cache_dir: Path = Path("~/.cache/recap").expanduser()

    # What to caption with
    model: str = Field(DEFAULT_MODEL, min_length=1)
    model_revision: str | None = None
    prompt: str = PAPER_PROMPT
    max_new_tokens: int = Field(128, ge=1, le=131_072)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=1_000_000)  # sampling only; None: the model's own
    image_mode: Literal["pad", "crop"] = "pad"
    batch_size: int | None = Field(None, ge=1, le=65_536)  # None: the model's default
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    compile: bool = False  # static KV cache + torch.compile of the decoding step (CUDA)
    # The caption engine: a worker's choice, not a job's (no part of generation()); each
    # caption's provenance names it. Default "auto": vLLM where it is installed (the vllm
    # extra, on GPU hosts) and captions the model's family (LLaVA-1.5, LLaVA-NeXT), else
    # transformers, so a plain install never fails and a vLLM install gets its throughput.
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # share of the GPU vLLM takes
    vllm_max_num_seqs: int = Field(256, ge=1, le=65_536)  # sequences vLLM keeps in flight
    # CLIP scoring after captioning (a worker's choice, like the engine; provenance names it):
    # a CLIP-family hub id, a folder, or "tiny-clip"; None or empty: off (null score columns).
    score_model: str | None = None
    # torch's CPU threads per engine process; None: this host's cores shared among the
    # engine processes running on it (workers/threads.py).
    torch_threads: int | None = Field(None, ge=1, le=1024)

    # Work units and the fleet
    chunk_size: int = Field(256, ge=1, le=1_000_000)
    max_queued_chunks: int = Field(64, ge=1, le=1_000_000)
    lease_s: float = Field(600.0, gt=0, le=DAY_S)
    chunk_max_attempts: int = Field(3, ge=1, le=1000)
    visibility_timeout_s: int = Field(7200, ge=1, le=DAY_S)
    feed_interval_s: float = Field(30.0, gt=0, le=DAY_S)  # how often an idle worker tops up the queue
    db_retry_s: float = Field(300.0, ge=0, le=DAY_S)  # how long a worker waits out a database outage
    straggler_grace_s: float = Field(
        2.0, gt=0, le=DAY_S
    )  # idle engine time before stragglers are left behind
    straggler_share: float = Field(0.1, ge=0, le=1)  # at most this share of a chunk is left behind
    # Price of one GPU-hour (any currency): `status` shows a job's cost so far and to finish.
    gpu_hour_cost: float | None = Field(None, ge=0, le=1_000_000)

    # Fetching
    fetch_timeout_s: float = Field(20.0, gt=0, le=DAY_S)
    fetch_connect_timeout_s: float = Field(5.0, gt=0, le=DAY_S)
    fetch_max_bytes: int = Field(32 * 1024 * 1024, ge=1, le=1 << 34)  # at most 16 GiB
    fetch_retries: int = Field(2, ge=0, le=100)
    fetch_backoff_s: float = Field(0.5, ge=0, le=DAY_S)
    fetch_max_retry_after_s: float = Field(30.0, ge=0, le=DAY_S)
    fetch_max_redirects: int = Field(5, ge=0, le=100)
    fetch_concurrency: int = Field(64, ge=1, le=4096)
    fetch_per_host: int = Field(16, ge=1, le=4096)
    fetch_allow_cidrs: Annotated[list[str], NoDecode] = []
    user_agent: str = Field(
        "recap/0.1 (image re-captioning for ML research; "
        "+https://github.com/recap-fleet/recap; opt out with X-Robots-Tag: recap: noai)",
        min_length=1,
    )

    # Image checks
    min_side: int = Field(32, ge=1, le=1_000_000)
    max_aspect: float = Field(10.0, ge=1, le=1_000_000)
    max_pixels: int = Field(100_000_000, ge=1, le=10**12)

    # Operations
    metrics_port: int = Field(0, ge=0, le=65_535)
    metrics_address: str = "127.0.0.1"  # where worker metrics listen: loopback unless opened up
    flower_user: str | None = None
    flower_password: SecretStr | None = None
    log_level: str = "INFO"

    @field_validator("fetch_allow_cidrs", mode="before")
    @classmethod
    def _split_cidrs(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("fetch_allow_cidrs", mode="after")
    @classmethod
    def _parseable_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"{network!r} is not a network (e.g. 10.0.0.0/8 or 192.168.1.5/32)"
                ) from None
        return value

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("database_url", mode="after")
    @classmethod
    def _usable_database(cls, value: str | None) -> str | None:
        if value:
            parse_database_url(value)  # an InvalidDatabaseUrl is a ValueError: reported per setting
        return value or None  # empty: unset (`recap run` takes ./recap.db)

    @field_validator("broker_url", mode="after")
    @classmethod
    def _redis_broker(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss"):
            shown = f"{parts.scheme}://" if parts.scheme else "a URL without a scheme"
            raise ValueError(f"the broker is Redis: use redis://host:6379/0 or rediss://..., not {shown}")
        try:
            parts.port  # noqa: B018  (parsing it is the check)
        except ValueError:
            raise ValueError("the port of the broker URL is not a number") from None
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ValueError("the broker URL's path must be a Redis database number, like /0")
        return value

    @field_validator("device", mode="after")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("metrics_address", mode="after")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                "use an IP address, e.g. 127.0.0.1 (this host only) or 0.0.0.0 (every interface)"
            ) from None
        return value

    @field_validator("log_level", mode="after")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in _LOG_LEVELS:
            raise ValueError(f"use one of {', '.join(_LOG_LEVELS)}")
        return value.upper()

    @field_validator("user_agent", "model", "score_model", mode="after")
    @classmethod
    def _no_control_characters(cls, value: str | None) -> str | None:
        if value and any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("contains a control character (a newline?)")
        return value

    @field_validator("score_model", mode="after")
    @classmethod
    def _empty_is_off(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML files, later ones winning, each read with its keys checked.
        files = {key: value for path in config_files() for key, value in read_toml(path).items()}
        return (init_settings, env_settings, InitSettingsSource(settings_cls, files))

    def generation(self) -> GenerationSettings:
        """The generation settings a job made now records (and captions with)."""
        sampling = self.do_sample
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            temperature=self.temperature if sampling else None,
            top_p=self.top_p if sampling else None,
            repetition_penalty=self.repetition_penalty,
            image_mode=self.image_mode,
            top_k=self.top_k if sampling else None,
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """This process's settings; InvalidSettings (one line) when one cannot be used."""
    try:
        return Settings()
    except ValidationError as exc:
        raise InvalidSettings("; ".join(_describe(error) for error in exc.errors())) from None


def _describe(error) -> str:
    """One pydantic error as `RECAP_NAME=value: what is wrong` (the value left out for
    secrets), with the TOML file it came from when no environment variable set it."""
    name = str(error["loc"][0]) if error["loc"] else "?"
    message = error["msg"].removeprefix("Value error, ")
    given = "" if name in _SECRET_INPUTS else f"={one_line(error['input'], 80)}"
    source = _source_file(name)
    return f"{ENV_PREFIX}{name.upper()}{given}{f' (from {source})' if source else ''}: {message}"


def _source_file(name: str) -> Path | None:
    """The TOML file a setting came from: None when its environment variable set it."""
    if ENV_PREFIX + name.upper() in {key.upper() for key in os.environ}:
        return None
    return next((path for path in reversed(config_files()) if name in read_toml(path)), None)
