"""Running dbt in the flow's process and auditing every node.

Node results are read from dbt's run_results.json after the invocation and written to the
audit tables in one batch, linked to the refresh run and the Prefect flow run: no per-node
on-run-end hook, so thousands of nodes cost one COPY.

dbt's artifacts (run_results.json, manifest, partial-parse cache) and logs go under the state
directory, so two processes sharing one checkout (a test session beside the demo) never read
each other's results or rotate each other's log.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from flows.control.dbt_audit import DbtOutcome, NodeRun
from flows.core.db import SESSION_TIME_ZONE, relation_columns
from flows.core.settings import Settings

# Resource types whose adapter_response counts rows written. A test's response counts the
# rows of its `select count(*)` (always 1): its result is `failures`, not rows affected.
_WRITING_RESOURCE_TYPES = ("model", "seed", "snapshot")
log = logging.getLogger(__name__)


def profiles_dir(settings: Settings) -> Path:
    """The configured profiles dir, or the checked-in example rendered under the state dir."""
    if settings.dbt_profiles_dir is not None:
        return settings.dbt_profiles_dir
    target = settings.state_dir / "dbt"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(settings.dbt_project_dir / "profiles.example.yml", target / "profiles.yml")
    return target


def target_dir(settings: Settings) -> Path:
    """Where this installation's dbt invocations write their artifacts (logs beside it)."""
    return settings.state_dir / "dbt" / "target"


def with_project_vars(settings: Settings, args: list[str]) -> list[str]:
    """`args` with the vars every run needs (the raw schema the extractor loads) merged into
    its --vars; vars already given win."""
    out = list(args)
    project_vars: dict[str, Any] = {
        "raw_schema": settings.raw_schema,
        "control_schema": settings.control_schema,
    }
    if "--vars" in out:
        i = out.index("--vars")
        given = json.loads(out[i + 1]) if i + 1 < len(out) and out[i + 1].strip() else {}
        out[i + 1] = json.dumps({**project_vars, **given})
    else:
        out += ["--vars", json.dumps(project_vars)]
    return out


# The changed days (or weeks) reach the models through these environment variables rather
# than --vars: dbt re-parses the whole project whenever its vars change ("Unable to do partial
# parsing because config vars ... have changed"), and every daily run changes days. The macros
# refresh_days() and refresh_weeks() read the var first, then these, and only while executing,
# so dbt never records them as parse inputs (macros/incremental/refresh_vars.sql).
REFRESH_WEEKS_ENV = "SQP_REFRESH_WEEKS"
REFRESH_DAYS_ENV = "SQP_REFRESH_DAYS"
_RUN_VARS_VIA_ENV = {"refresh_weeks": REFRESH_WEEKS_ENV, "refresh_days": REFRESH_DAYS_ENV}


def vars_to_env(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """`args` without the per-run vars that change every day (refresh_days, refresh_weeks), and those vars
    as the environment variables the macros read instead, so the vars dbt sees stay the same
    from run to run and partial parsing holds."""
    if "--vars" not in args:
        return list(args), {}
    out = list(args)
    i = out.index("--vars")
    given = json.loads(out[i + 1]) if i + 1 < len(out) and out[i + 1].strip() else {}
    env = {name: json.dumps(given.pop(var)) for var, name in _RUN_VARS_VIA_ENV.items() if var in given}
    out[i + 1] = json.dumps(given, sort_keys=True)
    return out, env


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
        # libpq (under dbt-postgres) reads the embedded Postgres's password from its passfile.
        **({"PGPASSFILE": str(info["passfile"])} if info.get("passfile") else {}),
        "DBT_THREADS": str(settings.dbt_threads),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        # dbt's sessions (libpq) in UTC like every other session of the product (flows.core.db):
        # the models' date_trunc/::date of timestamptz columns depend on the session's zone.
        "PGTZ": SESSION_TIME_ZONE,
    }
    return env


@contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """`values` set in the process environment (dbt reads env_var() there) for the block."""
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


def _node_name(unique_id: str, resource_type: str) -> str:
    # model.pkg.name, source.pkg.source_name.table, test.pkg.test_name.hash
    parts = unique_id.split(".")
    if resource_type == "test" and len(parts) >= 4:
        return parts[-2]
    if resource_type == "source" and len(parts) >= 4:
        return f"{parts[-2]}.{parts[-1]}"
    return parts[-1]


def read_run_results(path: Path) -> tuple[str | None, list[NodeRun]]:
    """The invocation id and one NodeRun per result of a dbt run_results.json."""
    doc = json.loads(path.read_text())
    invocation_id = doc.get("metadata", {}).get("invocation_id")
    nodes: list[NodeRun] = []
    for r in doc.get("results", []):
        timing = {t["name"]: t for t in r.get("timing") or []}
        execute = timing.get("execute") or {}
        compile_ = timing.get("compile") or {}
        unique_id = r["unique_id"]
        resource_type = unique_id.split(".", 1)[0]
        rows = (r.get("adapter_response") or {}).get("rows_affected")
        # Postgres reports -1 for statements without a row count (CREATE VIEW).
        reports_rows = resource_type in _WRITING_RESOURCE_TYPES and isinstance(rows, int) and rows >= 0
        nodes.append(
            NodeRun(
                unique_id=unique_id,
                resource_type=resource_type,
                name=_node_name(unique_id, resource_type),
                relation=r.get("relation_name"),
                status=str(r.get("status")),
                started_at=_parse_ts(compile_.get("started_at") or execute.get("started_at")),
                finished_at=_parse_ts(execute.get("completed_at") or compile_.get("completed_at")),
                execution_time_s=r.get("execution_time"),
                rows_affected=rows if reports_rows else None,
                message=r.get("message"),
                failures=r.get("failures"),
            )
        )
    return invocation_id, nodes


def invoke_dbt(
    project_dir: Path, args: list[str], *, profiles_dir: Path, target_path: Path, env: dict[str, str]
) -> Any:
    """dbt in this process without Prefect (checks, benchmarks), with `env` for the profile;
    artifacts and logs under target_path. Returns dbt's dbtRunnerResult."""
    from dbt.cli.main import dbtRunner

    with scoped_environ(env):
        return dbtRunner().invoke(
            [
                *args,
                "--project-dir",
                str(project_dir),
                "--profiles-dir",
                str(profiles_dir),
                "--target-path",
                str(target_path),
                "--log-path",
                str(target_path / "logs"),
                "--quiet",
            ]
        )


# prefect-dbt (0.7) runs each dbt node's Prefect task in a daemon thread of its own
# (NodeTaskTracker.run_task_in_thread) and never joins it: `invoke` returns once its callback
# queue is drained, i.e. once every node's task has been *started*. A thread still creating its
# task run when the process exits fails ("Error emitting event ... can't register atexit after
# shutdown") and can abort the interpreter (exit 134). There is no public handle on these
# threads; Python names a thread after its target ("Thread-7 (run_task)"), which is how
# run_dbt finds them to wait for them (tests/unit/test_transform.py pins the name).
NODE_TASK_THREAD_SUFFIX = "(run_task)"
# A node task has only its events left to emit when invoke returns: seconds, even under load.
# One whose node never finished (dbt emitted no NodeFinished) would wait forever: give up then.
NODE_TASKS_TIMEOUT_S = 120.0


def node_task_threads() -> set[threading.Thread]:
    """The live threads running a dbt node's Prefect task."""
    return {t for t in threading.enumerate() if t.name.endswith(NODE_TASK_THREAD_SUFFIX)}


def wait_for_node_tasks(started_before: set[threading.Thread], timeout_s: float) -> int:
    """Join the node-task threads started since `started_before`, for at most `timeout_s` in
    all; returns how many are still running."""
    deadline = time.monotonic() + timeout_s
    pending = node_task_threads() - started_before
    for thread in pending:
        thread.join(max(deadline - time.monotonic(), 0.0))
    return sum(1 for t in pending if t.is_alive())


def _forward_warnings(logger: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> Any:
    """A dbt callback sending dbt's warnings and errors to `logger` (INFO stays in dbt's log
    file). It runs in dbt's threads: it only filters and logs."""
    from dbt_common.events.base_types import EventLevel

    levels = {EventLevel.WARN: logging.WARNING, EventLevel.ERROR: logging.ERROR}

    def callback(event: Any) -> None:
        level = levels.get(event.info.level)
        if level is not None:
            logger.log(level, "dbt: %s", event.info.msg)

    return callback


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger of the flow or task this runs in, else this module's."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def invoke_plain_dbt(settings: Settings, args: list[str], env: dict[str, str]) -> Any:
    """`args` through dbt's own runner in this process, as the flow's dbt stage runs it: no
    Prefect task per node; dbt's warnings and errors to the run's logger, INFO and above to
    dbt's log file under the state dir (the CLI's progress line reads it), nothing on stdout."""
    from dbt.cli.main import dbtRunner

    target_path = target_dir(settings)
    with scoped_environ({**dbt_env(settings), **env}):
        res = dbtRunner(callbacks=[_forward_warnings(_run_logger())]).invoke(
            [
                *args,
                "--project-dir",
                str(settings.dbt_project_dir),
                "--profiles-dir",
                str(profiles_dir(settings)),
                "--target-path",
                str(target_path),
                "--log-path",
                str(target_path.parent / "logs"),
                "--log-level",
                "none",
                "--log-level-file",
                "info",
            ]
        )
    # dbt could not run at all (a compilation error, no connection): no node result to record.
    if not res.success and res.exception is not None:
        raise ValueError(f"dbt {args[0]} could not run: {res.exception}")
    return res


def invoke_prefect_dbt(
    settings: Settings,
    args: list[str],
    *,
    log_level: str = "warn",
    env: dict[str, str] | None = None,
    **runner_options: Any,
) -> Any:
    """`args` through PrefectDbtRunner (inside a flow: one Prefect task per dbt node), returning
    dbt's result once every node's task has ended.

    dbt's events at `log_level` and above go to Prefect (the node's task log); INFO and above
    always go to dbt's log file under the state dir (the CLI's progress line reads it).
    """
    from dbt_common.events.base_types import EventLevel
    from prefect_dbt import PrefectDbtRunner, PrefectDbtSettings

    target_path = target_dir(settings)
    before = node_task_threads()
    with scoped_environ({**dbt_env(settings), **(env or {})}):
        runner = PrefectDbtRunner(
            settings=PrefectDbtSettings(
                project_dir=settings.dbt_project_dir,
                profiles_dir=profiles_dir(settings),
                target_path=target_path,
                log_level=EventLevel(log_level),
            ),
            raise_on_failure=False,
            **runner_options,
        )
        try:
            res = runner.invoke(
                [*args, "--log-path", str(target_path.parent / "logs")], log_level_file=EventLevel.INFO.value
            )
        except Exception:
            _wait_for_node_tasks(before)
            raise
    _wait_for_node_tasks(before)
    return res


def _wait_for_node_tasks(before: set[threading.Thread]) -> None:
    left = wait_for_node_tasks(before, NODE_TASKS_TIMEOUT_S)
    if left:
        log.warning(
            "%d dbt node task(s) still running %.0fs after dbt ended: their Prefect task runs may "
            "stay unfinished (each node's result is in the control schema)",
            left,
            NODE_TASKS_TIMEOUT_S,
        )


def run_dbt(settings: Settings, args: list[str]) -> DbtOutcome:
    """Invoke dbt in this process and read back every node's result.

    By default dbt's own runner (invoke_plain_dbt); with `dbt_node_tasks`, PrefectDbtRunner,
    which inside a flow makes one Prefect task per dbt node and returns once each has ended
    (invoke_prefect_dbt). Either way only dbt's warnings and errors go to Prefect; its INFO
    lines (a START and an OK per node, the periods each model rebuilds) stay in dbt's log file
    under the state dir, which the CLI's progress line reads. The caller records every node's
    result in the control schema (record_dbt).
    """
    target_path = target_dir(settings)
    target_path.mkdir(parents=True, exist_ok=True)
    results = target_path / "run_results.json"
    results.unlink(missing_ok=True)
    args = with_project_vars(settings, args)  # as audited; dbt gets the weeks by env
    dbt_args, env = vars_to_env(args)
    if settings.dbt_node_tasks:
        res = invoke_prefect_dbt(settings, dbt_args, env=env)
    else:
        res = invoke_plain_dbt(settings, dbt_args, env)
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


# The shadow build: every model downstream of the dbt sources (not the monitoring views), from
# the shadow raw schema, into `<schema>_shadow` schemas (macros/generate_schema_name.sql).
SHADOW_SUFFIX = "_shadow"


def shadow_build_args(settings: Settings, refresh_start_date: str | None) -> list[str]:
    dbt_vars = {"raw_schema": f"{settings.raw_schema}{SHADOW_SUFFIX}", "schema_suffix": SHADOW_SUFFIX}
    if refresh_start_date:
        dbt_vars["refresh_start_date"] = refresh_start_date
    return [
        "build",
        "--select",
        "source:sqp+",
        "--exclude",
        "source:refresh_control+",
        "--vars",
        json.dumps(dbt_vars),
    ]


@contextmanager
def live_stand_ins(conn: psycopg.Connection, settings: Settings, sources: set[str]) -> Iterator[list[str]]:
    """For the shadow build, a view in the shadow raw schema over each live raw table that has no
    shadow copy (the shadow tables' models also read the others); dropped afterwards with the
    shadow staging views over them (the next shadow build makes both again), so a table put
    into shadow mode later gets its own real table there."""
    shadow = f"{settings.raw_schema}{SHADOW_SUFFIX}"
    made: list[str] = []
    conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(shadow)))
    for name in sorted(sources):
        if relation_columns(conn, settings.raw_schema, name) and not relation_columns(conn, shadow, name):
            conn.execute(
                sql.SQL("create view {} as select * from {}").format(
                    sql.Identifier(shadow, name), sql.Identifier(settings.raw_schema, name)
                )
            )
            made.append(name)
    try:
        yield made
    finally:
        for name in made:
            conn.execute(sql.SQL("drop view if exists {} cascade").format(sql.Identifier(shadow, name)))
