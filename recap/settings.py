"""The one typed settings object: `RECAP_*` environment variables over `config/recap.toml`.

Read once per process (`get_settings()`), then passed down.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from recap.resources import resource_path

PAPER_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
DEFAULT_MODEL = "xtuner/llava-llama-3-8b-v1_1-transformers"


def config_files() -> list[Path]:
    """Bundled defaults, then the file named by RECAP_CONFIG (later files win)."""
    files = [resource_path("config") / "recap.toml"]
    extra = os.environ.get("RECAP_CONFIG")
    if extra:
        path = Path(extra).expanduser()
        if not path.is_file():  # a typo must not silently run with the defaults
            raise ValueError(f"RECAP_CONFIG={extra}: no such file")
        files.append(path)
    return [f for f in files if f.exists()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECAP_", extra="ignore")

    # Where things live
    database_url: str | None = None
    broker_url: str = "redis://localhost:6379/0"
    cache_dir: Path = Path("~/.cache/recap").expanduser()

    # What to caption with
    model: str = DEFAULT_MODEL
    model_revision: str | None = None
    prompt: str = PAPER_PROMPT
    max_new_tokens: int = Field(128, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    image_mode: Literal["pad", "crop"] = "pad"
    batch_size: int | None = Field(None, ge=1)  # None: the model's default
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    compile: bool = False  # static KV cache + torch.compile of the decoding step (CUDA)
    # The caption engine: a worker's choice, not a job's (no part of generation()); each
    # caption's provenance names it. Default "auto": vLLM where it is installed (the vllm
    # extra, on GPU hosts) and captions the model's family (LLaVA-1.5, LLaVA-NeXT), else
    # transformers, so a plain install never fails and a vLLM install gets its throughput.
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # share of the GPU vLLM takes
    vllm_max_num_seqs: int = Field(256, ge=1)  # sequences vLLM keeps in flight

    # Work units and the fleet
    chunk_size: int = Field(256, ge=1)
    max_queued_chunks: int = Field(64, ge=1)
    lease_s: float = Field(600.0, gt=0)
    chunk_max_attempts: int = Field(3, ge=1)
    visibility_timeout_s: int = Field(7200, ge=1)
    feed_interval_s: float = Field(30.0, gt=0)  # how often an idle worker tops up the queue
    db_retry_s: float = Field(300.0, ge=0)  # how long a worker waits out a database outage
    straggler_grace_s: float = Field(2.0, gt=0)  # idle engine time before stragglers are left behind
    straggler_share: float = Field(0.1, ge=0, le=1)  # at most this share of a chunk is left behind

    # Fetching
    fetch_timeout_s: float = Field(20.0, gt=0)
    fetch_connect_timeout_s: float = Field(5.0, gt=0)
    fetch_max_bytes: int = Field(32 * 1024 * 1024, ge=1)
    fetch_retries: int = Field(2, ge=0)
    fetch_backoff_s: float = Field(0.5, ge=0)
    fetch_max_retry_after_s: float = Field(30.0, ge=0)
    fetch_max_redirects: int = Field(5, ge=0)
    fetch_concurrency: int = Field(64, ge=1)
    fetch_per_host: int = Field(16, ge=1)
    fetch_allow_cidrs: Annotated[list[str], NoDecode] = []
    user_agent: str = (
        "recap/0.1 (image re-captioning for ML research; "
        "+https://github.com/recap-fleet/recap; opt out with X-Robots-Tag: recap: noai)"
    )

    # Image checks
    min_side: int = Field(32, ge=1)
    max_aspect: float = Field(10.0, ge=1)
    max_pixels: int = Field(100_000_000, ge=1)

    # Operations
    metrics_port: int = Field(0, ge=0)
    flower_user: str | None = None
    flower_password: SecretStr | None = None
    log_level: str = "INFO"

    @field_validator("fetch_allow_cidrs", mode="before")
    @classmethod
    def _split_cidrs(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_files())
        return (init_settings, env_settings, toml)

    def generation(self) -> dict:
        """The generation settings recorded with a job (and with every caption)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature if self.do_sample else None,
            "top_p": self.top_p if self.do_sample else None,
            "repetition_penalty": self.repetition_penalty,
            "image_mode": self.image_mode,
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
