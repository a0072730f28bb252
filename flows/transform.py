"""Running dbt (through prefect-dbt's PrefectDbtRunner) and auditing every node.

Node results are read from dbt's run_results.json after the invocation and written to the
audit tables in one batch, linked to the refresh run and the Prefect flow run: no per-node
on-run-end hook, so thousands of nodes cost one executemany.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from flows.settings import Settings


@dataclass
class DbtOutcome:
    invocation_id: str | None
    success: bool
    command: str
    args: list[str]
    nodes: list[dict[str, Any]] = field(default_factory=list)
    message: str | None = None

    @property
    def failed_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes if n["status"] in ("error", "fail", "runtime error")]

    @property
    def models_built(self) -> int:
        return sum(
            1
            for n in self.nodes
            if n["resource_type"] in ("model", "snapshot", "seed") and n["status"] == "success"
        )


def profiles_dir(settings: Settings) -> Path:
    """The configured profiles dir, or the checked-in example rendered under the state dir."""
    if settings.dbt_profiles_dir is not None:
        return settings.dbt_profiles_dir
    target = settings.state_dir / "dbt"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(settings.dbt_project_dir / "profiles.example.yml", target / "profiles.yml")
    return target


def dbt_env(settings: Settings) -> dict[str, str]:
    """Connection details for profiles.example.yml, taken from the Postgres DSN."""
    info = conninfo_to_dict(settings.dsn())
    env = {
        "DBT_TARGET": settings.dbt_target,
        "DBT_PG_HOST": str(info.get("host") or "127.0.0.1"),
        "DBT_PG_PORT": str(info.get("port") or 5432),
        "DBT_PG_USER": str(info.get("user") or "postgres"),
        "DBT_PG_DBNAME": str(info.get("dbname") or "postgres"),
        "DBT_ENV_SECRET_PG_PASSWORD": str(info.get("password") or ""),
        "DBT_THREADS": str(settings.dbt_threads),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    return env


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    # dbt reads env_var() from the process environment.
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _parse_ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def read_run_results(path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    doc = json.loads(path.read_text())
    invocation_id = doc.get("metadata", {}).get("invocation_id")
    nodes = []
    for r in doc.get("results", []):
        timing = {t["name"]: t for t in r.get("timing", [])}
        execute = timing.get("execute") or {}
        compile_ = timing.get("compile") or {}
        unique_id = r["unique_id"]
        rows = (r.get("adapter_response") or {}).get("rows_affected")
        nodes.append(
            {
                "unique_id": unique_id,
                "resource_type": unique_id.split(".", 1)[0],
                "name": unique_id.rsplit(".", 1)[-1],
                "relation": r.get("relation_name"),
                "status": str(r.get("status")),
                "started_at": _parse_ts(compile_.get("started_at") or execute.get("started_at")),
                "finished_at": _parse_ts(execute.get("completed_at")),
                "execution_time_s": r.get("execution_time"),
                "rows_affected": rows if isinstance(rows, int) and rows >= 0 else None,
                "message": r.get("message"),
                "failures": r.get("failures"),
            }
        )
    return invocation_id, nodes


def run_dbt(settings: Settings, args: list[str]) -> DbtOutcome:
    """Invoke dbt through PrefectDbtRunner: inside a flow, one Prefect task per dbt node."""
    from dbt_common.events.base_types import EventLevel
    from prefect_dbt import PrefectDbtRunner, PrefectDbtSettings

    project = settings.dbt_project_dir
    target_path = Path("target")
    results = project / target_path / "run_results.json"
    results.unlink(missing_ok=True)
    with _environ(dbt_env(settings)):
        runner = PrefectDbtRunner(
            settings=PrefectDbtSettings(
                project_dir=project,
                profiles_dir=profiles_dir(settings),
                target_path=target_path,
                log_level=EventLevel.INFO,
            ),
            raise_on_failure=False,
        )
        res = runner.invoke(args)
    message = None
    if getattr(res, "exception", None) is not None:
        message = f"dbt failed: {res.exception}"
    if not results.exists():
        return DbtOutcome(None, False, args[0], args, message=message or "dbt wrote no run_results.json")
    invocation_id, nodes = read_run_results(results)
    outcome = DbtOutcome(invocation_id, bool(res.success), args[0], args, nodes, message)
    if not outcome.success and outcome.message is None:
        outcome.message = (
            "; ".join(
                f"{n['name']}: {n['status']} ({(n['message'] or '').strip()[:200]})"
                for n in outcome.failed_nodes[:5]
            )
            or "dbt reported failure"
        )
    return outcome


def record_dbt(
    conn: psycopg.Connection,
    schema: str,
    outcome: DbtOutcome,
    run_id: UUID | None,
    flow_run_id: UUID | None,
    started_at: datetime,
    finished_at: datetime,
) -> None:
    """One invocation row and all node rows, in one transaction and one batch."""
    if outcome.invocation_id is None:
        return
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "insert into {t} (invocation_id, run_id, flow_run_id, command, args, success, "
                "started_at, finished_at, nodes_total, nodes_failed, message) values "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) on conflict (invocation_id) do nothing"
            ).format(t=sql.Identifier(schema, "dbt_invocations")),
            (
                outcome.invocation_id,
                run_id,
                flow_run_id,
                outcome.command,
                json.dumps(outcome.args),
                outcome.success,
                started_at,
                finished_at,
                len(outcome.nodes),
                len(outcome.failed_nodes),
                outcome.message,
            ),
        )
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL(
                    "insert into {t} (invocation_id, unique_id, resource_type, name, relation, "
                    "status, started_at, finished_at, execution_time_s, rows_affected, message, "
                    "failures) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "on conflict do nothing"
                ).format(t=sql.Identifier(schema, "dbt_node_runs")),
                [
                    (
                        outcome.invocation_id,
                        n["unique_id"],
                        n["resource_type"],
                        n["name"],
                        n["relation"],
                        n["status"],
                        n["started_at"],
                        n["finished_at"],
                        n["execution_time_s"],
                        n["rows_affected"],
                        n["message"],
                        n["failures"],
                    )
                    for n in outcome.nodes
                ],
            )
