"""sqp-refresh: daily BigQuery -> Postgres refresh, dbt marts, Prefect orchestration."""

__version__ = "0.1.0"
