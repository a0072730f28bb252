"""BigQuery connection: credentials, REST and Storage Read clients, error classification.

Credentials, in order: a service-account key file, inline service-account JSON in an env var
(a private key pasted with literal ``\\n`` sequences works), application default credentials.
An endpoint override points both clients at a local emulator, with anonymous credentials.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import bigquery

from flows.core.errors import ConfigError, SourceError, TransientError
from flows.core.retry import bump
from flows.core.settings import Settings

_TRANSIENT = (
    gexc.TooManyRequests,
    gexc.InternalServerError,
    gexc.BadGateway,
    gexc.ServiceUnavailable,
    gexc.GatewayTimeout,
    gexc.DeadlineExceeded,
    gexc.RetryError,
    ConnectionError,
    TimeoutError,
)


def classify(exc: BaseException, what: str) -> Exception:
    """Turn a client exception into TransientError (retry) or SourceError (say what to fix)."""
    if isinstance(exc, TransientError | SourceError | ConfigError):
        return exc
    if isinstance(exc, _TRANSIENT):
        return TransientError(f"{what}: transient BigQuery error, will retry: {exc}")
    if isinstance(exc, gexc.Forbidden):
        return SourceError(
            f"{what}: permission denied: grant the service account roles/bigquery.dataViewer on "
            f"the dataset and roles/bigquery.readSessionUser + jobUser on the project ({exc})"
        )
    if isinstance(exc, gexc.NotFound):
        return SourceError(f"{what}: not found: check project, dataset and table names ({exc})")
    if isinstance(exc, gexc.BadRequest):
        return SourceError(f"{what}: BigQuery rejected the request: {exc}")
    if isinstance(exc, gexc.Unauthorized):
        return SourceError(f"{what}: credentials rejected: check the key or run gcloud auth ({exc})")
    # grpc errors from the Storage API carry a code
    code = getattr(exc, "code", None)
    if callable(code):
        name = getattr(code(), "name", "")
        if name in {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL", "ABORTED"}:
            return TransientError(f"{what}: transient Storage API error ({name}): {exc}")
    return SourceError(f"{what}: {type(exc).__name__}: {exc}")


def load_service_account_info(raw: str) -> dict[str, Any]:
    """Parse inline service-account JSON; repair a private key pasted with literal \\n."""
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"REFRESH_BQ_CREDENTIALS_JSON is not valid JSON ({exc.msg} at char {exc.pos}): paste "
            "the whole service-account key file content"
        ) from exc
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ConfigError("REFRESH_BQ_CREDENTIALS_JSON must be a service-account key (type=service_account)")
    missing = [k for k in ("client_email", "private_key", "token_uri") if not info.get(k)]
    if missing:
        raise ConfigError(f"REFRESH_BQ_CREDENTIALS_JSON lacks {', '.join(missing)}")
    key = info["private_key"]
    if "\\n" in key:
        info["private_key"] = key.replace("\\n", "\n")
    return info


def make_credentials(settings: Settings) -> Any:
    """google.auth credentials from settings (anonymous for the emulator)."""
    if settings.uses_emulator:
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    from google.oauth2 import service_account

    scopes = ["https://www.googleapis.com/auth/bigquery"]
    if settings.bq_credentials_file is not None:
        path = settings.bq_credentials_file
        if not path.is_file():
            raise ConfigError(f"REFRESH_BQ_CREDENTIALS_FILE {path} does not exist")
        try:
            info = load_service_account_info(path.read_text())
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("REFRESH_BQ_CREDENTIALS_JSON", str(path))) from exc
        return service_account.Credentials.from_service_account_info(info, scopes=scopes)
    if settings.bq_credentials_json is not None:
        info = load_service_account_info(settings.bq_credentials_json.get_secret_value())
        try:
            return service_account.Credentials.from_service_account_info(info, scopes=scopes)
        except ValueError as exc:
            raise ConfigError(f"REFRESH_BQ_CREDENTIALS_JSON: unusable private key ({exc})") from exc
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        creds, _ = google.auth.default(scopes=scopes)
    except DefaultCredentialsError as exc:
        raise ConfigError(
            "no BigQuery credentials: set REFRESH_BQ_CREDENTIALS_FILE, REFRESH_BQ_CREDENTIALS_JSON "
            "or run `gcloud auth application-default login`"
        ) from exc
    return creds


@dataclass
class BigQueryClients:
    settings: Settings
    rest: bigquery.Client
    _storage: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def project(self) -> str:
        return self.settings.project

    @property
    def dataset(self) -> str:
        return self.settings.bq_dataset

    def storage(self) -> Any:
        """The Storage Read client, built lazily (over an insecure channel for the emulator)."""
        with self._lock:
            return self._storage_locked()

    def _storage_locked(self) -> Any:
        if self._storage is None:
            from google.cloud import bigquery_storage_v1

            endpoint = self.settings.storage_endpoint
            if endpoint is not None:
                import grpc
                from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
                    BigQueryReadGrpcTransport,
                )

                # No BDP probing on this local link: with it, gRPC lets the server run far ahead
                # of a slower consumer (COPY) and buffers hundreds of MB of read-ahead.
                channel = grpc.insecure_channel(
                    endpoint,
                    options=[
                        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                        ("grpc.http2.bdp_probe", 0),
                    ],
                )
                self._storage = bigquery_storage_v1.BigQueryReadClient(
                    transport=BigQueryReadGrpcTransport(channel=channel)
                )
            else:
                self._storage = bigquery_storage_v1.BigQueryReadClient(credentials=self.rest._credentials)
        return self._storage

    @property
    def rest_where(self) -> str:
        """Where REST calls go, for error messages: endpoint and project."""
        endpoint = self.settings.rest_endpoint or "bigquery.googleapis.com"
        return f"BigQuery at {endpoint} (project {self.project})"

    @property
    def storage_where(self) -> str:
        endpoint = self.settings.storage_endpoint or "bigquerystorage.googleapis.com"
        return f"BigQuery Storage Read API at {endpoint} (project {self.project})"

    def call_options(self) -> dict[str, Any]:
        """`retry` and `timeout` for every REST call: each request and its client retries end
        within REFRESH_BQ_TIMEOUT_S (the library default retries for 600 s)."""
        from google.api_core.retry import Retry

        t = self.settings.bq_timeout_s
        base = bigquery.DEFAULT_RETRY
        assert isinstance(base, Retry)
        # The library's predicate (which errors it retries), plus a count of each retry for the
        # table's audit row; Retry has no public way to add on_error to a copy.
        retry = Retry(predicate=base._predicate, timeout=t, on_error=bump)
        return {"retry": retry, "timeout": t}

    def storage_retry(self) -> Any:
        """Retry of Storage Read calls (session creation, stream reconnects), bounded likewise."""
        from google.api_core import retry as gretry

        return gretry.Retry(
            predicate=gretry.if_exception_type(gexc.ServiceUnavailable, gexc.DeadlineExceeded),
            timeout=self.settings.bq_timeout_s,
            on_error=bump,
        )

    def query_config(self, **kwargs: Any) -> bigquery.QueryJobConfig:
        """Every query carries the maximum_bytes_billed guard."""
        return bigquery.QueryJobConfig(maximum_bytes_billed=self.settings.bq_maximum_bytes_billed, **kwargs)

    def dry_run_bytes(self, query: str, what: str) -> int:
        """BigQuery's dry-run estimate of the bytes `query` (a SELECT) processes, which it bills.

        The emulator (bqemulator 1.4) runs a SELECT's dry run in full to learn its result
        schema, then reports 0 bytes: a dry run cost as much as the query itself. BigQuery
        plans it without reading anything. Against the emulator alone the dry run is of
        `select * from (<query>) limit 0`, which keeps its check of the query (names, types,
        syntax) and skips the execution; on BigQuery a LIMIT would not change the estimate.
        """
        if self.settings.uses_emulator:
            # `query` is one this package built (flows.engine.extract, fingerprinting, validation), not input.
            query = "select * from (\n" + query.strip().rstrip(";") + "\n) limit 0"  # noqa: S608
        try:
            job = self.rest.query(
                query,
                job_config=self.query_config(dry_run=True, use_query_cache=False),
                **self.call_options(),
            )
        except Exception as exc:
            raise classify(exc, f"{what} at {self.rest_where}") from exc
        return int(job.total_bytes_processed or 0)

    def close(self) -> None:
        self.rest.close()
        if self._storage is not None:
            self._storage.transport.close()


def make_clients(settings: Settings) -> BigQueryClients:
    from google.api_core.client_options import ClientOptions

    options = ClientOptions(api_endpoint=settings.rest_endpoint) if settings.rest_endpoint else None
    client = bigquery.Client(
        project=settings.project,
        credentials=make_credentials(settings),
        location=settings.bq_location,
        client_options=options,
    )
    return BigQueryClients(settings=settings, rest=client)
