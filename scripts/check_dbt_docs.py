"""Check that `dbt docs generate` works and that every source, model and column is described.

Starts a throwaway embedded Postgres (free port, temporary folder), creates the raw tables
empty exactly as the extractor would, builds every model (`dbt run`), runs
`dbt docs generate`, then compares target/manifest.json (what the YAML documents) with
target/catalog.json (what the database holds):

- every source, source table, model and exposure has a description;
- every column the database holds is documented with a description;
- every documented column exists (no stale docs).

Exit code 0 when nothing is missing. `undocumented()` is also used by the test suite on the
session's real build.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from flows.core.db import connect_dsn, migrate
from flows.core.settings import PROJECT_ROOT, get_settings
from flows.core.type_mapping import map_schema
from flows.demo.local_stack import EmbeddedPostgres, free_port
from flows.demo.sample_data import (
    DAILY_TABLE,
    PRODUCTS_TABLE,
    SQP_TABLE,
    daily_schema,
    products_schema,
    sqp_schema,
)
from flows.engine.load import ensure_raw_table
from flows.engine.transform import dbt_env, invoke_dbt

PROJECT = "sqp_refresh"


def _described(node: dict[str, Any]) -> bool:
    return bool((node.get("description") or "").strip())


def undocumented(manifest: dict[str, Any], catalog: dict[str, Any]) -> list[str]:
    """Everything of this project that lacks a description, or is documented but not built."""
    problems: list[str] = []
    sources = {k: v for k, v in manifest["sources"].items() if v["package_name"] == PROJECT}
    models = {
        k: v
        for k, v in manifest["nodes"].items()
        if v["resource_type"] == "model" and v["package_name"] == PROJECT
    }
    for uid, node in sources.items():
        if not (node.get("source_description") or "").strip():
            problems.append(f"{uid}: source {node['source_name']} has no description")
    for uid, node in {**sources, **models}.items():
        if not _described(node):
            problems.append(f"{uid}: no description")
        built = catalog["sources" if uid.startswith("source.") else "nodes"].get(uid)
        if built is None:
            problems.append(f"{uid}: not in catalog.json (not built?)")
            continue
        documented = {name.lower(): col for name, col in node["columns"].items()}
        in_database = {name.lower() for name in built["columns"]}
        for name in sorted(in_database - documented.keys()):
            problems.append(f"{uid}: column {name} is not documented")
        for name in sorted(documented.keys() - in_database):
            problems.append(f"{uid}: documented column {name} does not exist")
        for name in sorted(documented.keys() & in_database):
            if not _described(documented[name]):
                problems.append(f"{uid}: column {name} has no description")
    for uid, node in manifest["exposures"].items():
        if node["package_name"] == PROJECT and not _described(node):
            problems.append(f"{uid}: no description")
    return problems


def _create_empty_raw_tables(dsn: str, schema: str) -> None:
    with connect_dsn(dsn, autocommit=True) as conn:
        for table, fields, cursor in (
            (SQP_TABLE, sqp_schema(), "date"),
            (PRODUCTS_TABLE, products_schema(), None),
            (DAILY_TABLE, daily_schema(), "date"),
        ):
            columns = map_schema(
                [(f.name, f.field_type, f.mode, f.precision, f.scale) for f in fields], table
            )
            ensure_raw_table(conn, schema, table, columns, cursor)


def _dbt(args: list[str], workdir: Path, env: dict[str, str]) -> None:
    res = invoke_dbt(PROJECT_ROOT, args, profiles_dir=workdir, target_path=workdir / "target", env=env)
    if not res.success:
        raise SystemExit(f"dbt {' '.join(args)} failed: {res.exception or 'see the output above'}")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sqp-docs-check-"))
    shutil.copyfile(PROJECT_ROOT / "profiles.example.yml", workdir / "profiles.yml")
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    try:
        pg.start()
        env = dbt_env(get_settings(pg_dsn=pg.dsn, dbt_target="postgres"))
        # The monitoring views read the control schema: create it as the flow would.
        migrate(get_settings(pg_dsn=pg.dsn))
        _create_empty_raw_tables(pg.dsn, "raw")
        _dbt(["run"], workdir, env)
        _dbt(["docs", "generate"], workdir, env)
        target = workdir / "target"
        manifest = json.loads((target / "manifest.json").read_text())
        catalog = json.loads((target / "catalog.json").read_text())
        problems = undocumented(manifest, catalog)
        for p in problems:
            print(p)
        counted = sum(1 for n in manifest["nodes"].values() if n["resource_type"] == "model")
        print(
            f"dbt docs generate ok; {len(manifest['sources'])} sources, {counted} models: "
            f"{len(problems)} problem(s)"
        )
        return 1 if problems else 0
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
