"""dbt audit (`dbt_invocations`, `dbt_node_runs`): one row per dbt invocation, one per node.

Rows come from dbt's run_results.json (flows.engine.transform.read_run_results); statuses are dbt's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, TypedDict
from uuid import UUID

import psycopg
from psycopg import sql

from flows.core.db import qualified


class NodeStatus(StrEnum):
    """`dbt_node_runs.status`: dbt's result statuses (models, seeds and snapshots; tests)."""

    SUCCESS = "success"
    ERROR = "error"
    SKIPPED = "skipped"
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    RUNTIME_ERROR = "runtime error"


FAILED_NODE_STATUSES = (NodeStatus.ERROR, NodeStatus.FAIL, NodeStatus.RUNTIME_ERROR)


class NodeRun(TypedDict):
    """One node of a dbt invocation, as recorded in dbt_node_runs."""

    unique_id: str
    resource_type: str
    name: str
    relation: str | None
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    execution_time_s: float | None
    rows_affected: int | None
    message: str | None
    failures: int | None


@dataclass
class DbtOutcome:
    invocation_id: str | None
    success: bool
    command: str
    args: list[str]
    nodes: list[NodeRun] = field(default_factory=list)
    message: str | None = None

    @property
    def failed_nodes(self) -> list[NodeRun]:
        return [n for n in self.nodes if n["status"] in FAILED_NODE_STATUSES]

    def node_table(self) -> list[dict[str, Any]]:
        """One row per node, slowest first: the dbt stage's Prefect table artifact."""
        rows = [
            {
                "node": f"{n['resource_type']} {n['name']}",
                "status": n["status"],
                "seconds": round(n["execution_time_s"] or 0.0, 2),
                "rows": n["rows_affected"],
                "failures": n["failures"],
                "message": (n["message"] or "")[:200],
            }
            for n in self.nodes
        ]
        return sorted(rows, key=lambda r: -r["seconds"])

    @property
    def models_built(self) -> int:
        return sum(
            1
            for n in self.nodes
            if n["resource_type"] in ("model", "snapshot", "seed") and n["status"] == NodeStatus.SUCCESS
        )


NODE_RUN_COLUMNS: tuple[str, ...] = tuple(NodeRun.__annotations__)


def _text(value: str | None) -> str | None:
    # Postgres text cannot hold NUL; dbt messages may quote binary data.
    return value.replace("\x00", "") if value else value


def record_dbt(
    conn: psycopg.Connection,
    schema: str,
    outcome: DbtOutcome,
    run_id: UUID | None,
    flow_run_id: UUID | None,
    started_at: datetime,
    finished_at: datetime,
) -> None:
    """One invocation row and all its node rows (one COPY), in one transaction.

    An invocation already recorded is left as it is.
    """
    if outcome.invocation_id is None:
        return
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "insert into {t} (invocation_id, run_id, flow_run_id, command, args, success, "
                "started_at, finished_at, nodes_total, nodes_failed, message) values "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) on conflict (invocation_id) do nothing "
                "returning invocation_id"
            ).format(t=qualified(schema, "dbt_invocations")),
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
                _text(outcome.message),
            ),
        )
        if cur.fetchone() is None:
            return
        copy_sql = sql.SQL("copy {t} (invocation_id, {cols}) from stdin").format(
            t=qualified(schema, "dbt_node_runs"),
            cols=sql.SQL(", ").join(map(sql.Identifier, NODE_RUN_COLUMNS)),
        )
        with cur.copy(copy_sql) as copy:
            for n in outcome.nodes:
                copy.write_row(
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
                        _text(n["message"]),
                        n["failures"],
                    )
                )
