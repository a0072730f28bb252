"""All configuration in one place: environment variables prefixed ``REFRESH_`` (or a .env file).

Unset Postgres DSN -> the embedded Postgres (pgserver) under the state directory.
Unset BigQuery project -> the local BigQuery emulator, filled with sample data by the demo.
"""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flows.core.errors import ConfigError
from flows.core.identifiers import validate_dataset, validate_pg_identifier, validate_project
from flows.core.redact import install_log_redaction, redact, register_dsn, register_secret

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EMULATOR_PROJECT = "sqp-demo"
# The embedded Postgres's password, in libpq's passfile format (0600, in the state directory).
PG_PASSFILE = "pgpass"


def embedded_dsn(port: int, passfile: Path) -> str:
    """The embedded Postgres's DSN: libpq reads the password from `passfile`, so the DSN (shown
    by `refresh stack up`, logged, copied into psql) carries none."""
    return f"postgresql://postgres@127.0.0.1:{port}/postgres?passfile={quote(str(passfile), safe='/')}"


def local_prefect_api_url(port: int) -> str:
    """The API of the stack's Prefect server on `port` (its UI is at the root)."""
    return f"http://127.0.0.1:{port}/api"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFRESH_", env_file=".env", extra="ignore", frozen=True)

    # --- Postgres -------------------------------------------------------------------------
    pg_dsn: SecretStr | None = Field(
        default=None, description="libpq DSN/URI of the target Postgres; unset = embedded"
    )
    raw_schema: str = "raw"
    control_schema: str = "refresh_control"

    # --- BigQuery -------------------------------------------------------------------------
    bq_project: str | None = Field(default=None, description="unset = local emulator")
    bq_dataset: str = "sqp"
    bq_location: str = "US"
    bq_endpoint: str | None = Field(
        default=None, description="REST endpoint override, e.g. http://127.0.0.1:9050"
    )
    bq_storage_endpoint: str | None = Field(
        default=None, description="Storage Read gRPC host:port override (emulator)"
    )
    bq_credentials_file: Path | None = None
    bq_credentials_json: SecretStr | None = None
    bq_maximum_bytes_billed: int = Field(default=200 * 1024**3, gt=0)
    bq_read_streams: int = Field(default=1, ge=1, le=64)
    bq_timeout_s: float = Field(
        default=60.0, gt=0, description="deadline of one BigQuery call, its client retries included"
    )
    bq_stall_timeout_s: float = Field(
        default=60.0, gt=0, description="a read stream that delivers nothing this long has stalled"
    )
    table_retry_budget_s: float = Field(
        default=300.0,
        gt=0,
        description="time one table may spend retrying transient failures before it fails",
    )
    pg_retry_budget_s: float = Field(
        default=60.0, gt=0, description="how long a run retries ending its audit row when Postgres is away"
    )

    # --- Local stack ----------------------------------------------------------------------
    state_dir: Path = PROJECT_ROOT / ".local"
    local_pg_port: int = Field(default=54329, ge=1, le=65535)
    local_bq_rest_port: int = Field(default=9050, ge=1, le=65535)
    local_bq_grpc_port: int = Field(default=9060, ge=1, le=65535)
    # The stack's Prefect server (UI and API), used when no PREFECT_API_URL is configured.
    local_prefect_port: int = Field(default=4200, ge=1, le=65535)
    # Its first start migrates its SQLite database: slower than the other parts on a busy machine.
    local_prefect_startup_timeout_s: float = Field(default=180.0, gt=0)
    local_startup_timeout_s: float = Field(default=60.0, gt=0)

    # --- Registry, dbt, orchestration -----------------------------------------------------
    tables_file: Path = PROJECT_ROOT / "config" / "tables.yml"
    dbt_project_dir: Path = PROJECT_ROOT
    dbt_profiles_dir: Path | None = Field(
        default=None, description="directory with profiles.yml; unset = rendered from the example"
    )
    dbt_target: Literal["postgres", "bigquery"] = "postgres"
    dbt_threads: int = Field(default=4, ge=1, le=64)
    # One Prefect task per dbt node (prefect-dbt's PrefectDbtRunner) instead of one task for
    # the dbt stage: every model and test in the UI, at ~0.15 s CPU per node (docs/benchmarks.md).
    dbt_node_tasks: bool = Field(
        default=False, description="one Prefect task per dbt node (slower) instead of one for the stage"
    )
    schedule_cron: str = "0 2 * * *"
    schedule_timezone: str = "UTC"

    # --- Webhooks -------------------------------------------------------------------------
    secret_key: SecretStr | None = Field(
        default=None, description="encrypts webhook secrets at rest; unset = a key file in the state dir"
    )
    webhook_allow_private: bool = Field(
        default=False, description="allow endpoints on loopback, link-local and private addresses"
    )
    webhook_horizon_hours: float = Field(default=24.0, gt=0, le=24 * 14)
    webhook_rotation_grace_hours: float = Field(default=24.0, ge=0, le=24 * 30)
    webhook_timeout_s: float = Field(default=15.0, gt=0, le=60)
    webhook_run_deadline_s: float = Field(default=0.8, gt=0, le=60)
    webhook_housekeeping_deadline_s: float = Field(default=300.0, gt=0, le=3000)
    dashboard_url: str | None = None

    # --- HTTP API (`refresh api`) ---------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    # Reads (status, history, metrics, config, the dashboard) without a token, for loopback
    # clients only (decided per request, flows/api/clients.py). Off unless the operator turns
    # it on; the local demo does. Changes always need a token.
    api_anonymous_read: bool = False
    # Host header values the API answers (any other is a 400, against DNS rebinding); `*.x`
    # matches subdomains. The address `refresh api` binds to is added. Comma-separated.
    # Tuples, not lists: Settings is frozen and hashed (cached clients per settings).
    api_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ("localhost", "127.0.0.1", "::1")
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the client; a
    # forwarded request from any other peer is never a loopback client. Comma-separated.
    api_trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()
    # Largest request body accepted (bytes), checked before the body is parsed: a 413 above it.
    api_max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=64 * 1024**2)
    # Postgres connections the API keeps open (one per concurrent request at most).
    api_pool_size: int = Field(default=8, ge=1, le=64)
    # Deployment a trigger starts when a Prefect API is configured (PREFECT_API_URL).
    api_deployment: str = "daily-refresh/daily"
    # How long a computed status answer is served again (Age header); 0 = computed every time.
    api_status_cache_seconds: float = Field(default=2.0, ge=0, le=60)
    # Most slices one trigger may ask for, over all its tables (a backfill's start_date to its
    # end_date, or today); above it the trigger is a 422. Larger backfills: `refresh run`.
    api_max_slices: int = Field(default=2000, ge=1, le=1_000_000)

    # --- Scale-out: slices on Dask (flows/engine/scale_out.py, docs/scaling.md) -----------------
    slice_workers: int = Field(
        default=0, ge=0, le=256, description="0 = in the table's thread; N = a local Dask cluster of N"
    )
    dask_address: str | None = Field(default=None, description="an existing Dask scheduler, tcp://host:8786")

    @field_validator("api_allowed_hosts", "api_trusted_proxies", mode="before")
    @classmethod
    def _comma_list(cls, v: object) -> object:
        return tuple(p.strip() for p in v.split(",") if p.strip()) if isinstance(v, str) else v

    @field_validator("api_allowed_hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower().removeprefix("[").removesuffix("]") for h in v)

    @field_validator("api_trusted_proxies")
    @classmethod
    def _proxies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ValueError(f"{p!r} is not an IP address or network") from None
        return v

    @field_validator("raw_schema", "control_schema")
    @classmethod
    def _pg_name(cls, v: str) -> str:
        return validate_pg_identifier(v, "schema name")

    @field_validator("bq_dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return validate_dataset(v)

    @field_validator("bq_project")
    @classmethod
    def _project(cls, v: str | None) -> str | None:
        return None if v is None else validate_project(v)

    @field_validator("pg_dsn")
    @classmethod
    def _dsn(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None else SecretStr(validate_dsn(v.get_secret_value()))

    @field_validator("bq_credentials_json", "secret_key")
    @classmethod
    def _credentials(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            register_secret(v.get_secret_value())
        return v

    @property
    def shadow_schema(self) -> str:
        """Where shadow-mode tables load, and what a cutover to live validates."""
        return f"{self.raw_schema}_shadow"

    @property
    def uses_embedded_postgres(self) -> bool:
        return self.pg_dsn is None

    @property
    def uses_emulator(self) -> bool:
        return self.bq_project is None or self.bq_endpoint is not None

    @property
    def starts_local_emulator(self) -> bool:
        return self.bq_project is None

    @cached_property
    def project(self) -> str:
        return self.bq_project or EMULATOR_PROJECT

    @property
    def local_prefect_api(self) -> str:
        return local_prefect_api_url(self.local_prefect_port)

    @property
    def pg_data_dir(self) -> Path:
        return self.state_dir / "pg"

    @property
    def pg_passfile(self) -> Path:
        return self.state_dir / PG_PASSFILE

    @property
    def bq_data_dir(self) -> Path:
        return self.state_dir / "bq"

    @property
    def rest_endpoint(self) -> str | None:
        if self.bq_endpoint:
            return self.bq_endpoint
        if self.starts_local_emulator:
            return f"http://127.0.0.1:{self.local_bq_rest_port}"
        return None

    @property
    def storage_endpoint(self) -> str | None:
        if self.bq_storage_endpoint:
            return self.bq_storage_endpoint
        if self.starts_local_emulator:
            return f"127.0.0.1:{self.local_bq_grpc_port}"
        return None

    def dsn(self) -> str:
        """The Postgres DSN: configured, or the embedded server's."""
        if self.pg_dsn is not None:
            return self.pg_dsn.get_secret_value()
        return embedded_dsn(self.local_pg_port, self.pg_passfile)


def validate_dsn(dsn: str) -> str:
    """The DSN if libpq can parse it; its password is registered for masking either way, and
    the error (which psycopg words with the offending token) is masked."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    register_dsn(dsn)
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise ValueError(f"not a valid libpq DSN/URI ({redact(str(exc).strip())}): {redact(dsn)}") from None
    register_secret(str(params.get("password") or "") or None)
    return dsn


def get_settings(**overrides: object) -> Settings:
    """The settings in use; loading them also turns on masking of their secrets in every log."""
    install_log_redaction()
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        # One line per bad setting, named as the user sets it; never the input value.
        problems = [
            f"REFRESH_{'_'.join(map(str, e['loc'])).upper()}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise ConfigError(redact("; ".join(problems))) from None
