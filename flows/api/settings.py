"""The API's own settings (REFRESH_API_*); the database and the rest come from flows.settings."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFRESH_API_", env_file=".env", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Reads (status, history, metrics, config, the dashboard) without a token. Off unless the
    # operator turns it on; the local demo does, bound to 127.0.0.1. Changes always need one.
    anonymous_read: bool = False
    # Postgres connections the API keeps open (one per concurrent request at most).
    pool_size: int = Field(default=8, ge=1, le=64)
    # How long a computed status answer is served again (Age header); 0 = computed every time.
    status_cache_seconds: float = Field(default=2.0, ge=0, le=60)
    # Deployment a trigger starts when a Prefect API is configured (PREFECT_API_URL).
    deployment: str = "daily-refresh/daily"
