"""Check that the dbt models parse and compile for BigQuery (CI; under a minute).

1. `dbt parse --target bigquery`: profiles.example.yml's real BigQuery target; no network.
2. `dbt compile --target bigquery_emulator`: against a throwaway BigQuery emulator (free ports,
   in-memory), through dbt-bigquery's `api_endpoint`. Compiling runs the introspective queries
   (is the model there yet? which columns?) through the BigQuery API, so every model, test and
   macro is rendered with the BigQuery adapter's SQL. The emulator gets a raw dataset shaped
   like the Postgres raw schema the models read (snake_case columns + lineage columns).
3. With --run, also `dbt run` there (the first, full build of every model executes in the
   emulator), then compile again with refresh_start_date: the incremental branches and the
   window-scoped tests render in BigQuery SQL. An incremental *run* does not work there:
   dbt-bigquery's insert_overwrite statement uses `array_agg(distinct ... ignore nulls)`,
   which the emulator's SQL translation rejects.

Artifacts go to a temporary target directory, so this never disturbs another dbt run in the
same checkout. Exit code 0 when both steps pass.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from flows.core.settings import EMULATOR_PROJECT, PROJECT_ROOT
from flows.core.type_mapping import pg_column_name
from flows.demo.local_stack import BigQueryEmulator, free_port
from flows.demo.sample_data import (
    DAILY_TABLE,
    PRODUCTS_TABLE,
    SQP_TABLE,
    daily_schema,
    products_schema,
    sqp_schema,
)
from flows.engine.transform import invoke_dbt

RAW_DATASET = "raw"

# The lineage columns the extractor adds to every raw table, as BigQuery types.
LINEAGE = [
    bigquery.SchemaField("_loaded_at", "TIMESTAMP"),
    bigquery.SchemaField("_run_id", "STRING"),
    bigquery.SchemaField("_slice_start", "TIMESTAMP"),
]


def raw_schema(fields: list[bigquery.SchemaField]) -> list[bigquery.SchemaField]:
    """A source table's schema as the extractor lands it: snake_case names, plus lineage."""
    return [bigquery.SchemaField(pg_column_name(f.name), f.field_type, f.mode) for f in fields] + LINEAGE


def create_raw_tables(endpoint: str) -> None:
    client = bigquery.Client(
        project=EMULATOR_PROJECT,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=ClientOptions(api_endpoint=endpoint),
    )
    try:
        client.create_dataset(f"{EMULATOR_PROJECT}.{RAW_DATASET}", exists_ok=True)
        for table, fields in (
            (SQP_TABLE, sqp_schema()),
            (PRODUCTS_TABLE, products_schema()),
            (DAILY_TABLE, daily_schema()),
        ):
            t = bigquery.Table(f"{EMULATOR_PROJECT}.{RAW_DATASET}.{table}", schema=raw_schema(fields))
            client.create_table(t, exists_ok=True)
    finally:
        client.close()


def dbt(
    args: list[str], target: str, workdir: Path, env: dict[str, str], dbt_vars: dict[str, Any] | None = None
) -> bool:
    started = time.perf_counter()
    all_vars = {"raw_schema": RAW_DATASET, **(dbt_vars or {})}
    res = invoke_dbt(
        PROJECT_ROOT,
        [*args, "--target", target, "--vars", json.dumps(all_vars)],
        profiles_dir=workdir,
        target_path=workdir / "target",
        env=env,
    )
    status = "ok" if res.success else f"FAILED: {res.exception or 'see the output above'}"
    print(f"dbt {' '.join(args)} --target {target}: {status} ({time.perf_counter() - started:.1f}s)")
    return bool(res.success)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", action="store_true", help="also build every model in the emulator")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sqp-bq-check-"))
    # profiles.example.yml is the profile under test; it lives at the project root.
    shutil.copyfile(PROJECT_ROOT / "profiles.example.yml", workdir / "profiles.yml")
    rest_port, grpc_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{rest_port}"
    env = {
        "DBT_BQ_PROJECT": EMULATOR_PROJECT,
        "DBT_BQ_DATASET": "analytics",
        "DBT_BQ_API_ENDPOINT": endpoint,
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    emulator = BigQueryEmulator(rest_port, grpc_port, data_dir=None, log_file=workdir / "bqemulator.log")
    try:
        if not dbt(["parse"], "bigquery", workdir, env):
            return 1
        emulator.start()
        create_raw_tables(endpoint)
        if not dbt(["compile"], "bigquery_emulator", workdir, env):
            return 1
        compiled = sorted((workdir / "target" / "compiled").rglob("*.sql"))
        print(f"{len(compiled)} nodes compiled for BigQuery")
        if args.run:
            if not dbt(["run"], "bigquery_emulator", workdir, env):
                return 1
            # The models exist now: compile their incremental branches and window-scoped tests,
            # both for a backfill (refresh_start_date) and for a daily run's changed weeks.
            for dbt_vars in (
                {"refresh_start_date": "2026-11-01"},
                {"refresh_weeks": ["2026-03-09", "2026-11-16"]},
            ):
                if not dbt(["compile"], "bigquery_emulator", workdir, env, dbt_vars):
                    return 1
        return 0
    finally:
        emulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
