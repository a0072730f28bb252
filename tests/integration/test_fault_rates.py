"""A run through proxies that fail a share of the BigQuery calls completes exact.

The REST port sits behind tests/faults.py's HttpFaultProxy (429, 503, reset, stall: before the
request is forwarded) and the Storage Read (gRPC) port behind FaultProxy.fail_calls (a reset or
a stall then a reset of the connection, per call; see tests/faults.py for why not a gRPC status).
The real `refresh run` CLI refreshes the three sample tables and builds dbt; then Postgres
equals the source per period and the retries are in the audit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults import FaultProxy, HttpFaultProxy
from tests.integration.fault_support import FaultStack, assert_exact, fault_stack, runs_left_running

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def ft(stack: object) -> Iterator[FaultStack]:
    yield from fault_stack("ft_rates")


def test_rate_a_tenth_of_bigquery_calls_failing_the_run_completes_exact(ft: FaultStack) -> None:
    s = ft.settings
    assert s.rest_endpoint and s.storage_endpoint
    rest_port = int(s.rest_endpoint.rsplit(":", 1)[1])
    grpc_port = int(s.storage_endpoint.rsplit(":", 1)[1])
    with HttpFaultProxy(rest_port, rate=0.1, stall_s=2.0, seed=13) as rest, FaultProxy(grpc_port) as grpc:
        grpc.fail_calls(0.1, stall_s=3.0, seed=13)
        faults = {
            "REFRESH_BQ_ENDPOINT": rest.url,
            "REFRESH_BQ_STORAGE_ENDPOINT": f"127.0.0.1:{grpc.port}",
            "REFRESH_BQ_TIMEOUT_S": "20",
            "REFRESH_BQ_STALL_TIMEOUT_S": "2",
        }
        done = ft.run("run", "--no-stack", "--force", env=faults, timeout=600)
    print("REST calls", rest.calls, "faults", dict(rest.injected))
    print("gRPC calls", grpc.calls, "faults", dict(grpc.injected))
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    # The faults did happen, at about the rate asked.
    assert sum(rest.injected.values()) >= 1 and sum(grpc.injected.values()) >= 1
    assert sum(rest.injected.values()) <= 0.25 * rest.calls
    periods = assert_exact(ft)
    print("periods checked:", periods)
    assert runs_left_running(ft) == []
    with ft.pg() as conn:
        run_id, status = conn.execute(
            "select run_id, status from refresh_control.refresh_runs order by started_at desc limit 1"
        ).fetchone()  # type: ignore[misc]
        retries = dict(
            conn.execute(
                "select table_name, retries from refresh_control.table_refreshes where run_id = %s", (run_id,)
            ).fetchall()
        )
        slice_retries = conn.execute(
            "select coalesce(sum(attempts - 1), 0) from refresh_control.slice_refreshes where run_id = %s",
            (run_id,),
        ).fetchone()
    print("run", run_id, status, "retries per table", retries, "slice re-attempts", slice_retries)
    assert status == "success"
    assert sum(retries.values()) > 0, "the audit shows no retry"
