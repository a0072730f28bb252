"""Starting a refresh for the API: a flow run of the deployment when a Prefect API is
configured, else the flow in a detached background process (flows.orchestration.detached_run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

from flows.core.settings import PROJECT_ROOT
from flows.orchestration.run_params import RunParams


class DeploymentMissing(Exception):
    """The configured Prefect API does not know the deployment a trigger starts."""


def prefect_configured(local_prefect_api: str) -> bool:
    """A Prefect API that serves the deployment: one the user configured. The embedded stack's
    server (`local_prefect_api`) shows the runs, but a trigger starts its run as a process there,
    as without a Prefect API (that process reports to it)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return bool(url) and url != local_prefect_api


def flow_parameters(params: RunParams) -> dict[str, Any]:
    """The flow's parameters as JSON values (dates as ISO strings)."""
    return {
        "tables": params.tables,
        "start_date": params.start_date.isoformat() if params.start_date else None,
        "end_date": params.end_date.isoformat() if params.end_date else None,
        "dry_run": params.dry_run,
        "force": params.force,
        "trigger": params.trigger,
    }


def start_flow_run(deployment: str, params: RunParams, idempotency_key: str | None) -> UUID:
    """A flow run of the deployment, scheduled now; returns at once (timeout=0). Prefect hands
    back the same flow run for the same idempotency key."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    try:
        run = run_deployment(
            name=deployment,
            parameters=flow_parameters(params),
            timeout=0,
            idempotency_key=idempotency_key,
            tags=["api"],
        )
    except ObjectNotFound:
        raise DeploymentMissing(
            f"the Prefect API at {get_current_settings().api.url} has no deployment {deployment!r}: "
            "start `refresh serve` (it registers and serves it), or set REFRESH_API_DEPLOYMENT"
        ) from None
    assert isinstance(run, FlowRun)  # called from a worker thread: synchronous
    return run.id


def start_process(params: RunParams, log_dir: Path) -> subprocess.Popen[bytes]:
    """The flow in its own session (it outlives the API), its output in log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "api-runs.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.orchestration.detached_run", json.dumps(flow_parameters(params))],
            cwd=PROJECT_ROOT,
            env=os.environ.copy(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
