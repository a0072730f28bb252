"""Webhooks against the real pieces: Postgres outbox, a real HTTP receiver on 127.0.0.1 that
verifies every delivery with `standardwebhooks`, the real dispatcher and CLI."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from typer.testing import CliRunner

from flows.cli import app
from flows.control import outbox, runs, tables
from flows.control.statuses import TableStatus
from flows.control.tables import TableOutcome
from flows.core.db import migrate
from flows.core.errors import ConfigError, SchemaDriftError
from flows.core.settings import PROJECT_ROOT, Settings
from flows.demo.local_stack import free_port
from flows.notify import endpoints, signing, webhook_delivery, webhook_events
from flows.notify.secrets import open_secrets
from flows.orchestration import run_record
from tests.integration.conftest import SPEC, pg_scalar
from tests.webhook_receiver import Receiver


@pytest.fixture
def wh(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The control schema migrated, private addresses allowed (the receiver is on 127.0.0.1);
    afterwards every endpoint is removed so other tests' runs deliver nothing."""
    # For the settings given to each call, and for the flows that load their own.
    monkeypatch.setenv("REFRESH_WEBHOOK_ALLOW_PRIVATE", "true")
    migrate(settings)
    yield settings.model_copy(update={"webhook_allow_private": True})
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        for ep in outbox.list_endpoints(conn, settings.control_schema):
            outbox.remove_endpoint(conn, settings.control_schema, ep["id"], "test")


def finish_a_run(
    settings: Settings, status: str = "success", tables: list[dict[str, Any]] | None = None
) -> UUID:
    """A run row started and finished through run_record.finish_run (which writes the event)."""
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        runs.mark_abandoned(conn, settings.control_schema)
        run = runs.start_run(conn, settings.control_schema, flow_run_id=None, trigger="test", params={})
        summary = runs.RunSummary(str(run.run_id), status, f"test run {status}", tables=tables or [])
        run_record.finish_run(conn, settings, run, summary)
    return run.run_id


def delivery_rows(pg: psycopg.Connection, endpoint_id: int) -> list[tuple[Any, ...]]:
    return pg.execute(
        "select d.id, d.status, d.attempts, d.next_attempt_at, e.event, e.event_id "
        "from refresh_control.webhook_deliveries d join refresh_control.events e on e.id = d.event_id "
        "where d.endpoint_id = %s order by d.id",
        (endpoint_id,),
    ).fetchall()


def attempts(pg: psycopg.Connection, delivery_id: int) -> list[tuple[Any, ...]]:
    return pg.execute(
        "select attempt, success, status_code, error from refresh_control.webhook_attempts "
        "where delivery_id = %s order by attempt",
        (delivery_id,),
    ).fetchall()


def test_500_500_200_succeeds_on_third_attempt_with_one_id(wh: Settings, pg: psycopg.Connection) -> None:
    with Receiver(script=[500, 500, 200]) as rx:
        ep = endpoints.add_endpoint(wh, rx.url, ["refresh.completed"], "retry test")
        rx.secrets = [ep.secret]
        run_id = finish_a_run(wh)
        t = datetime.now(UTC)
        assert webhook_delivery.dispatch(wh, deadline_s=10, clock=lambda: t).failed == 1
        [(delivery, status, n, nxt, _, event_id)] = delivery_rows(pg, ep.id)
        assert (status, n) == ("pending", 1)
        assert timedelta(seconds=4.4) <= nxt - t <= timedelta(seconds=5.6)  # 5 s with jitter
        # Not due yet: nothing is sent.
        assert webhook_delivery.dispatch(wh, deadline_s=10, clock=lambda: t).attempted == 0
        t += timedelta(seconds=6)
        assert webhook_delivery.dispatch(wh, deadline_s=10, clock=lambda: t).failed == 1
        [(_, _, _, nxt, _, _)] = delivery_rows(pg, ep.id)
        assert timedelta(minutes=4.4) <= nxt - t <= timedelta(minutes=5.6)
        t = nxt + timedelta(seconds=1)
        assert webhook_delivery.dispatch(wh, deadline_s=10, clock=lambda: t).succeeded == 1
    assert [(d[1], d[2]) for d in delivery_rows(pg, ep.id)] == [("succeeded", 3)]
    assert [(a[0], a[1], a[2]) for a in attempts(pg, delivery)] == [
        (1, False, 500),
        (2, False, 500),
        (3, True, 200),
    ]
    assert len(rx.received) == 3
    assert all(r.verified_with == [ep.secret] for r in rx.received), "every delivery verifies"
    assert {r.id for r in rx.received} == {event_id}, "same webhook-id on every attempt"
    assert len({r.body for r in rx.received}) == 1, "same body on every attempt"
    accepted = [r for r in rx.received if r.status == 200]
    assert len(accepted) == 1 and accepted[0].json["type"] == "refresh.completed"
    assert accepted[0].json["data"]["run_id"] == str(run_id)


KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    import psycopg
    from flows.orchestration import run_record
    from flows.control import runs
    from flows.core.settings import get_settings

    s = get_settings()
    with psycopg.connect(s.dsn(), autocommit=True) as conn:
        runs.mark_abandoned(conn, s.control_schema)
        run = runs.start_run(conn, s.control_schema, flow_run_id=None, trigger="kill-test", params={})
        summary = runs.RunSummary(str(run.run_id), "failed", "every table failed: test")
        run_record.finish_run(conn, s, run, summary)
        print(run.run_id, flush=True)
        time.sleep(120)  # killed here: audit committed, dispatch never ran
    """
)


def test_run_killed_after_audit_commit_is_delivered_by_next_dispatch(
    wh: Settings, pg: psycopg.Connection
) -> None:
    with Receiver() as rx:
        ep = endpoints.add_endpoint(wh, rx.url, ["refresh.failed"])
        rx.secrets = [ep.secret]
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN], stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT
        )
        try:
            assert proc.stdout is not None
            run_id = proc.stdout.readline().strip()
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert rx.received == []
        assert pg_scalar(pg, "select count(*) from refresh_control.events where run_id = %s", (run_id,)) == 1
        assert webhook_delivery.dispatch(wh, deadline_s=10).succeeded == 1
        assert webhook_delivery.dispatch(wh, deadline_s=10).attempted == 0
    assert len(rx.received) == 1 and rx.received[0].verified_with == [ep.secret]
    assert rx.received[0].json["type"] == "refresh.failed"
    assert rx.received[0].json["data"]["run_id"] == run_id


def test_receiver_down_for_the_horizon_ends_in_delivery_exhausted(
    wh: Settings, pg: psycopg.Connection
) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    with Receiver() as watcher:
        dead = endpoints.add_endpoint(wh, dead_url, ["refresh.warning"])
        ops = endpoints.add_endpoint(wh, watcher.url, ["delivery.exhausted"])
        watcher.secrets = [ops.secret]
        finish_a_run(wh, "warning")
        start = t = datetime.now(UTC)
        for _ in range(20):
            [(delivery, status, _, nxt, _, event_id)] = delivery_rows(pg, dead.id)
            if status != "pending":
                break
            t = max(t, nxt)
            webhook_delivery.dispatch(wh, deadline_s=10, clock=lambda at=t: at)
        assert status == "exhausted"
        tries = attempts(pg, delivery)
        # immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h: the next (10 h later) is past 24 h.
        assert len(tries) == 7 and not any(a[1] for a in tries)
        assert all("ConnectError" in a[3] for a in tries)
        assert timedelta(hours=15) < t - start < timedelta(hours=24)
        exhausted = pg.execute(
            "select payload from refresh_control.events where event = 'delivery.exhausted' "
            "and payload->>'event_id' = %s",
            (event_id,),
        ).fetchall()
        assert len(exhausted) == 1 and exhausted[0][0]["attempts"] == 7
        webhook_delivery.dispatch(wh, deadline_s=10, clock=lambda: t)
    [got] = watcher.received
    assert got.verified_with == [ops.secret] and got.json["type"] == "delivery.exhausted"
    assert got.json["data"]["event_id"] == event_id


def test_slow_or_dead_receiver_never_slows_a_run(wh: Settings, pg: psycopg.Connection) -> None:
    with Receiver() as slow, Receiver() as fast:
        slow.delay_s = 5.0
        s = endpoints.add_endpoint(wh, slow.url, ["refresh.completed"])
        f = endpoints.add_endpoint(wh, fast.url, ["refresh.completed"])
        endpoints.add_endpoint(wh, f"http://127.0.0.1:{free_port()}/dead", ["refresh.completed"])
        fast.secrets = [f.secret]
        finish_a_run(wh)
        t0 = time.monotonic()
        result = webhook_delivery.dispatch_after_run(wh)
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, elapsed
        assert result is not None and result.attempted == 3 and result.succeeded == 1
        [(_, status, n, _, _, _)] = delivery_rows(pg, s.id)
        assert (status, n) == ("pending", 1), "the slow one is retried later"
        assert len(fast.received) == 1 and fast.received[0].verified_with == [f.secret]


def test_410_disables_the_endpoint(wh: Settings, pg: psycopg.Connection) -> None:
    with Receiver(default=410) as rx:
        ep = endpoints.add_endpoint(wh, rx.url, ["refresh.completed"])
        finish_a_run(wh)
        finish_a_run(wh)  # two in one batch: both cancelled, the endpoint disabled once
        result = webhook_delivery.dispatch(wh, deadline_s=10)
        assert (result.attempted, result.disabled) == (2, 1)
        finish_a_run(wh)
        assert webhook_delivery.dispatch(wh, deadline_s=10).attempted == 0
    assert len(rx.received) == 2
    enabled, reason = pg.execute(
        "select enabled, disabled_reason from refresh_control.webhook_endpoints where id = %s", (ep.id,)
    ).fetchone()  # type: ignore[misc]
    assert not enabled and "410" in reason
    assert [d[1] for d in delivery_rows(pg, ep.id)] == ["cancelled", "cancelled"], "none for later events"


def test_rotation_sends_two_signatures_both_verifiable(wh: Settings) -> None:
    with Receiver() as rx:
        ep = endpoints.add_endpoint(wh, rx.url, ["refresh.completed"])
        new = endpoints.rotate_secret(wh, ep.id)
        rx.secrets = [ep.secret, new]
        finish_a_run(wh)
        webhook_delivery.dispatch(wh, deadline_s=10)
        newest = endpoints.rotate_secret(wh, ep.id, grace_hours=0)
        rx.secrets = [new, newest]
        finish_a_run(wh)
        webhook_delivery.dispatch(wh, deadline_s=10)
    during, after = rx.received
    sigs = during.headers["webhook-signature"].split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs)
    assert during.verified_with == [ep.secret, new], "old and new secret both verify"
    for sig in sigs:  # each signature on its own verifies with one of the secrets
        one = {**during.headers, "webhook-signature": sig}
        assert sum(_verifies(s, during.body, one) for s in (ep.secret, new)) == 1
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert after.verified_with == [newest], "no grace: the old secret no longer signs"


def _verifies(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(body, headers)
        return True
    except WebhookVerificationError:
        return False


def test_private_addresses_refused_by_default(
    wh: Settings, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Receiver() as rx:
        ep = endpoints.add_endpoint(wh, rx.url, ["refresh.completed"])  # allowed while the setting is on
        monkeypatch.delenv("REFRESH_WEBHOOK_ALLOW_PRIVATE")
        wh = wh.model_copy(update={"webhook_allow_private": False})
        before = pg_scalar(pg, "select count(*) from refresh_control.webhook_endpoints")
        for url in (
            "http://127.0.0.1:9/x",
            "http://localhost/x",
            "http://10.1.2.3/x",
            "http://169.254.169.254/",
        ):
            with pytest.raises(ConfigError, match="loopback, link-local or private"):
                endpoints.add_endpoint(wh, url, None)
        assert pg_scalar(pg, "select count(*) from refresh_control.webhook_endpoints") == before
        finish_a_run(wh)
        assert webhook_delivery.dispatch(wh, deadline_s=10).failed == 1
    assert rx.received == [], "refused at delivery time too"
    [(delivery, *_)] = delivery_rows(pg, ep.id)
    assert "REFRESH_WEBHOOK_ALLOW_PRIVATE" in attempts(pg, delivery)[0][3]


def test_concurrent_dispatchers_never_send_the_same_attempt(wh: Settings, pg: psycopg.Connection) -> None:
    with Receiver() as rx:
        rx.delay_s = 0.02
        ep = endpoints.add_endpoint(wh, rx.url, ["table.failed"])
        rx.secrets = [ep.secret]
        with psycopg.connect(wh.dsn(), autocommit=True) as conn:
            for i in range(60):
                outbox.emit(conn, wh.control_schema, "table.failed", {"i": i}, table_name="t")
        results: list[webhook_delivery.DispatchResult] = []

        def go() -> None:
            results.append(webhook_delivery.dispatch(wh, deadline_s=30, batch_size=8))

        threads = [threading.Thread(target=go) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    ids = [r.id for r in rx.received]
    assert len(ids) == 60 and len(set(ids)) == 60
    assert sum(r.succeeded for r in results) == 60
    assert sum(1 for r in results if r.succeeded) >= 2, "the work was actually shared"
    assert (
        pg_scalar(
            pg,
            "select count(*) from refresh_control.webhook_attempts a join refresh_control.webhook_deliveries d "
            "on d.id = a.delivery_id where d.endpoint_id = %s",
            (ep.id,),
        )
        == 60
    )


def test_events_commit_with_their_audit_row_or_not_at_all(wh: Settings, pg: psycopg.Connection) -> None:
    with psycopg.connect(wh.dsn(), autocommit=True) as conn:
        run = runs.start_run(conn, wh.control_schema, flow_run_id=None, trigger="test", params={})
        rec = TableOutcome(
            "drifty",
            TableStatus.FAILED,
            "live",
            run_id=run.run_id,
            write_strategy="slice_replace",
            error="column x changed",
        )
        with pytest.raises(RuntimeError), conn.transaction():
            tables.write_table_audit(conn, wh.control_schema, rec)
            webhook_events.table_finished(conn, wh, rec, SchemaDriftError("x"))
            raise RuntimeError("crash before commit")
        assert (
            pg_scalar(pg, "select count(*) from refresh_control.events where run_id = %s", (run.run_id,)) == 0
        )
        with conn.transaction():
            tables.write_table_audit(conn, wh.control_schema, rec)
            webhook_events.table_finished(conn, wh, rec, SchemaDriftError("x"))
        run_record.finish_run(conn, wh, run, runs.RunSummary(str(run.run_id), "failed", "x"))
    events = pg.execute(
        "select event, payload from refresh_control.events where run_id = %s order by id", (run.run_id,)
    ).fetchall()
    assert [e[0] for e in events] == ["table.failed", "schema.drift", "refresh.failed"]
    assert events[0][1]["table"] == "drifty" and events[0][1]["error"] == "column x changed"


def test_payload_stays_under_20_kb(wh: Settings, pg: psycopg.Connection) -> None:
    tables = [
        {
            "table": f"t{i}",
            "status": "failed",
            "mode": "live",
            "rows_read": 0,
            "rows_inserted": 0,
            "rows_deleted": 0,
            "slices": 0,
            "window": None,
            "error": "boom " * 2000,
        }
        for i in range(80)
    ]
    run_id = finish_a_run(wh, "failed", tables)
    payload, created, event = pg.execute(
        "select payload, created_at, event from refresh_control.events where run_id = %s", (run_id,)
    ).fetchone()  # type: ignore[misc]
    size = len(signing.body(event, created, payload).encode())
    assert size < 20_000, size
    assert payload["tables_omitted"] > 0 and all(len(t["error"]) <= 500 for t in payload["tables"])


def test_cli_manages_endpoints_and_rejects_bad_input(wh: Settings, pg: psycopg.Connection) -> None:
    runner = CliRunner(env={"COLUMNS": "250"})
    count = "select count(*), max(updated_at) from refresh_control.webhook_endpoints"
    before = pg.execute(count).fetchone()
    for args, needle in (
        (["add", "ftp://example.com/x"], "must start with http:// or https://"),
        (["add", "http://127.0.0.1:8/x", "-e", "refresh.bogus"], "unknown event type(s) refresh.bogus"),
        (["add", "http://user:pw@127.0.0.1:8/x"], "must not carry credentials"),
        (["add", "http://127.0.0.1:99999/x"], "malformed"),
        (["rotate-secret", "999999"], "no webhook endpoint 999999"),
        (["remove", "999999"], "no webhook endpoint 999999"),
        (["replay", "--since", "yesterday"], "is not a date or timestamp"),
        (["deliveries", "--status", "lost"], "unknown status"),
    ):
        res = runner.invoke(app, ["webhooks", *args])
        assert res.exit_code == 1, (args, res.output)
        assert needle in res.output, (args, res.output)
        assert "Traceback" not in res.output
    assert pg.execute(count).fetchone() == before, "bad input changed nothing"

    with Receiver() as rx:
        res = runner.invoke(
            app, ["webhooks", "add", rx.url, "-e", "refresh.completed,table.failed", "-d", "ops"]
        )
        assert res.exit_code == 0, res.output
        secret = res.output.split("shown once, keep it in the receiver): ")[1].split()[0]
        assert secret.startswith("whsec_") and len(secret) >= 6 + 32
        rx.secrets = [secret]
        ep_id = int(res.output.split("endpoint ")[1].split()[0])
        listed = runner.invoke(app, ["webhooks", "list"])
        assert str(rx.url) in listed.output and secret not in listed.output
        res = runner.invoke(app, ["webhooks", "test", str(ep_id)])
        assert res.exit_code == 0, res.output
        assert rx.received[-1].json["type"] == "webhook.test" and rx.received[-1].verified_with == [secret]
        finish_a_run(wh)
        since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        seen = len(rx.received)
        res = runner.invoke(app, ["webhooks", "replay", "--since", since, "--endpoint", str(ep_id)])
        assert res.exit_code == 0, res.output
        first = {r.id for r in rx.received[seen:]}
        assert first, "the replay sent the run's event"
        seen = len(rx.received)
        res = runner.invoke(app, ["webhooks", "replay", "--since", since, "--endpoint", str(ep_id)])
        assert res.exit_code == 0, res.output
        # Deliveries go out on several threads: compare the ids sent, not their order.
        assert {r.id for r in rx.received[seen:]} == first, "a replay re-sends the same webhook-ids"
        res = runner.invoke(app, ["webhooks", "deliveries", "--endpoint", str(ep_id)])
        assert res.exit_code == 0 and "succeeded" in res.output
        res = runner.invoke(app, ["webhooks", "rotate-secret", str(ep_id)])
        assert res.exit_code == 0 and "whsec_" in res.output
        res = runner.invoke(app, ["webhooks", "remove", str(ep_id)])
        assert res.exit_code == 0
    # No secret in clear anywhere in the control schema.
    dump = pg_scalar(
        pg,
        "select string_agg(t::text, ' ') from (select row_to_json(w) t from refresh_control.webhook_endpoints w "
        "union all select row_to_json(a) from refresh_control.webhook_attempts a "
        "union all select row_to_json(e) from refresh_control.events e) x",
    )
    assert secret not in dump and secret[6:] not in dump


def test_daily_refresh_delivers_refresh_completed_with_its_run_id(
    refreshed: dict[str, Any], wh: Settings, pg: psycopg.Connection
) -> None:
    from flows.control import registry
    from flows.core.table_config import TableConfig
    from flows.demo.sample_data import PRODUCTS_TABLE
    from flows.orchestration.daily_refresh import daily_refresh

    # A table of its own (no dbt model reads it), so the session's shared raw tables stay as
    # the `refreshed` run left them.
    table = "wh_products"
    cfg = TableConfig(
        table_name=table, source_table=PRODUCTS_TABLE, write_strategy="full_replace", origin="user"
    )
    with psycopg.connect(wh.dsn(), autocommit=True) as conn:
        registry.sync_from_file(conn, wh.control_schema, [cfg])
    try:
        with Receiver() as rx:
            ep = endpoints.add_endpoint(wh, rx.url, ["refresh.completed", "refresh.failed", "table.failed"])
            rx.secrets = [ep.secret]
            summary = daily_refresh(tables=[table], force=True, trigger="webhook-e2e")
            # Delivered by the flow's own bounded pass, before it returned: no dispatch here.
            received = list(rx.received)
    finally:
        pg.execute("delete from refresh_control.refresh_config where table_name = %s", (table,))
        pg.execute(f"drop table if exists raw.{table}")
    assert summary["status"] == "success", summary["message"]
    [got] = received
    assert got.verified_with == [ep.secret]
    assert got.json["type"] == "refresh.completed"
    data = got.json["data"]
    assert data["run_id"] == summary["run_id"] and data["flow_run_id"] == summary["flow_run_id"]
    assert [(t["table"], t["status"], t["rows_inserted"]) for t in data["tables"]] == [
        (table, "success", SPEC.asins)
    ]
    assert got.id == pg_scalar(
        pg, "select event_id from refresh_control.events where run_id = %s", (summary["run_id"],)
    )


def test_housekeeping_sends_leftovers_and_waits_for_a_retry_due_soon(
    wh: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.orchestration.housekeeping import dispatch_webhooks

    wh = wh.model_copy(update={"webhook_housekeeping_deadline_s": 15})
    with Receiver(script=[503]) as rx:
        rx.headers_out = {"Retry-After": "1"}
        ep = endpoints.add_endpoint(wh, rx.url, ["refresh.completed"])
        rx.secrets = [ep.secret]
        finish_a_run(wh)  # left in the outbox: no dispatch after this "run"
        t0 = time.monotonic()
        result = dispatch_webhooks(wh)
        elapsed = time.monotonic() - t0
    assert result["attempted"] == 2 and result["succeeded"] == 1
    assert 4 < elapsed < 12, "waited for the 5 s retry (longer than Retry-After: 1), not the whole deadline"
    assert [r.status for r in rx.received] == [503, 200] and len({r.id for r in rx.received}) == 1


def test_run_row_and_its_event_commit_together(wh: Settings, pg: psycopg.Connection) -> None:
    with psycopg.connect(wh.dsn(), autocommit=True) as conn:
        runs.mark_abandoned(conn, wh.control_schema)
        run = runs.start_run(conn, wh.control_schema, flow_run_id=None, trigger="test", params={})
        # No event type for this status: the event insert fails after the run row's update.
        with pytest.raises(KeyError):
            run_record.finish_run(conn, wh, run, runs.RunSummary(str(run.run_id), "abandoned", "x"))
        status = pg_scalar(
            pg, "select status from refresh_control.refresh_runs where run_id = %s", (run.run_id,)
        )
        assert status == "running", "the run row rolled back with its event"
        run_record.finish_run(conn, wh, run, runs.RunSummary(str(run.run_id), "success", "x"))


def test_failed_table_writes_table_failed_with_its_audit_row(
    wh: Settings, clients: Any, pg: psycopg.Connection
) -> None:
    from flows.core.table_config import TableConfig, WriteStrategy
    from flows.engine.table_refresh import RefreshOptions, refresh_table

    with Receiver() as rx:
        ep = endpoints.add_endpoint(wh, rx.url, ["table.failed"])
        rx.secrets = [ep.secret]
        with psycopg.connect(wh.dsn(), autocommit=True) as conn:
            runs.mark_abandoned(conn, wh.control_schema)
            run = runs.start_run(conn, wh.control_schema, flow_run_id=None, trigger="test", params={})
        cfg = TableConfig(table_name="ghost", source_table="ghost", write_strategy=WriteStrategy.FULL_REPLACE)
        outcome = refresh_table(wh, clients, cfg, run.run_id, RefreshOptions())
        with psycopg.connect(wh.dsn(), autocommit=True) as conn:
            run_record.finish_run(conn, wh, run, runs.RunSummary(str(run.run_id), "failed", "x"))
        webhook_delivery.dispatch(wh, deadline_s=10)
    assert outcome.status == "failed"
    [got] = rx.received
    assert got.verified_with == [ep.secret] and got.json["type"] == "table.failed"
    assert got.json["data"]["table"] == "ghost" and got.json["data"]["run_id"] == str(run.run_id)
    assert got.json["data"]["error"] == outcome.error[:500]


def test_redirect_is_a_failure_and_not_followed(wh: Settings, pg: psycopg.Connection) -> None:
    with Receiver(script=[302]) as rx, Receiver() as target:
        rx.headers_out = {"Location": target.url}
        ep = endpoints.add_endpoint(wh, rx.url, ["refresh.completed"])
        finish_a_run(wh)
        assert webhook_delivery.dispatch(wh, deadline_s=10).failed == 1
    assert target.received == [] and len(rx.received) == 1
    [(delivery, status, *_)] = delivery_rows(pg, ep.id)
    assert status == "pending" and attempts(pg, delivery)[0][1:3] == (False, 302)


def test_abandoned_run_is_reported_as_refresh_failed(wh: Settings, pg: psycopg.Connection) -> None:
    from flows.orchestration.housekeeping import mark_abandoned_runs

    with psycopg.connect(wh.dsn(), autocommit=True) as conn:
        runs.mark_abandoned(conn, wh.control_schema)
        run = runs.start_run(conn, wh.control_schema, flow_run_id=None, trigger="test", params={})
    # Nobody holds the refresh lock: the process that started this run is gone.
    assert mark_abandoned_runs(wh) == 1
    assert mark_abandoned_runs(wh) == 0
    rows = pg.execute(
        "select event, payload from refresh_control.events where run_id = %s", (run.run_id,)
    ).fetchall()
    assert [(e, p["status"]) for e, p in rows] == [("refresh.failed", "abandoned")]
    assert "process ended without finishing" in rows[0][1]["message"]


def test_dry_run_sends_nothing(wh: Settings, pg: psycopg.Connection) -> None:
    with psycopg.connect(wh.dsn(), autocommit=True) as conn:
        runs.mark_abandoned(conn, wh.control_schema)
        run = runs.start_run(conn, wh.control_schema, flow_run_id=None, trigger="test", params={})
        run_record.finish_run(conn, wh, run, runs.RunSummary(str(run.run_id), "success", "x", dry_run=True))
    assert pg_scalar(pg, "select count(*) from refresh_control.events where run_id = %s", (run.run_id,)) == 0


def test_cli_update_changes_an_endpoint_and_rejects_bad_input(wh: Settings, pg: psycopg.Connection) -> None:
    runner = CliRunner(env={"COLUMNS": "250"})
    ep = endpoints.add_endpoint(wh, "http://127.0.0.1:9/hook", ["refresh.failed"], "old")
    row = "select url, event_types, description, enabled, disabled_reason from refresh_control.webhook_endpoints"
    before = pg.execute(f"{row} where id = %s", (ep.id,)).fetchone()
    for args, needle in (
        (["--url", "gopher://x"], "must start with http:// or https://"),
        (["-e", "refresh.bogus"], "unknown event type(s) refresh.bogus"),
        (["-e", ","], "subscribe to at least one event type"),
        (["-d", "x" * 501], "longer than 500 characters"),
    ):
        res = runner.invoke(app, ["webhooks", "update", str(ep.id), *args])
        assert res.exit_code == 1 and needle in res.output, (args, res.output)
    res = runner.invoke(app, ["webhooks", "update", "999999", "--disable"])
    assert res.exit_code == 1 and "no webhook endpoint 999999" in res.output
    assert pg.execute(f"{row} where id = %s", (ep.id,)).fetchone() == before, "bad input changed nothing"

    res = runner.invoke(
        app,
        [
            "webhooks",
            "update",
            str(ep.id),
            "--url",
            "http://127.0.0.1:10/new",
            "-e",
            "validation.failed",
            "-d",
            "new",
            "--disable",
        ],
    )
    assert res.exit_code == 0, res.output
    url, types, desc, enabled, reason = pg.execute(f"{row} where id = %s", (ep.id,)).fetchone() or ()
    assert (url, types, desc, enabled) == ("http://127.0.0.1:10/new", ["validation.failed"], "new", False)
    assert reason.startswith("disabled by cli")
    res = runner.invoke(app, ["webhooks", "test", str(ep.id)])
    assert res.exit_code == 1 and "is disabled" in res.output
    assert runner.invoke(app, ["webhooks", "update", str(ep.id), "--enable"]).exit_code == 0
    assert pg.execute(f"{row} where id = %s", (ep.id,)).fetchone()[3:] == (True, None)  # type: ignore[index]


def test_cli_prints_receiver_text_as_plain_text(wh: Settings, pg: psycopg.Connection) -> None:
    """A receiver's answer and an endpoint's description are shown, not interpreted: Rich
    markup stays literal and terminal escape sequences never reach the operator's terminal."""
    hostile = "[/] [bold red]x\x1b[2J\x1b]0;pwned\x07\x9b31m"
    runner = CliRunner(env={"COLUMNS": "250"})
    with Receiver(default=500) as rx:
        rx.body_out = hostile.encode()
        ep = endpoints.add_endpoint(wh, rx.url, ["refresh.completed"], description=hostile)
        finish_a_run(wh)
        webhook_delivery.dispatch(wh, deadline_s=10)
    [(delivery, *_)] = delivery_rows(pg, ep.id)
    pg.execute(
        "update refresh_control.webhook_deliveries set last_error = %s where id = %s", (hostile, delivery)
    )
    for args in (["deliveries", "--id", str(delivery)], ["deliveries", "--endpoint", str(ep.id)], ["list"]):
        res = runner.invoke(app, ["webhooks", *args])
        assert res.exit_code == 0, (args, res.output, res.exception)
        assert "[/] [bold red]x" in res.output, (args, res.output)
        assert not any((ord(c) < 32 and c not in "\n") or 0x7F <= ord(c) <= 0x9F for c in res.output), args


def _endpoint_at(settings: Settings, url: str, secret_enc: str | None = None) -> int:
    """An endpoint stored as `add` stores it, without `add`'s checks: for a host name only the
    test's resolver knows, or a secret encrypted as an earlier version did."""
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        return outbox.create_endpoint(
            conn,
            settings.control_schema,
            url=url,
            description="",
            event_types=["refresh.completed"],
            secret_enc=secret_enc or open_secrets(settings, conn).encrypt(signing.new_secret()),
            who="test",
        )


def test_delivery_goes_to_the_vetted_address_without_a_second_resolution(
    wh: Settings, pg: psycopg.Connection
) -> None:
    """`.invalid` never resolves in real DNS: the delivery arrives only if the client connects to
    the address the guard vetted instead of resolving the name again."""
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    with Receiver() as rx:
        port = rx.server.server_address[1]
        ep = _endpoint_at(wh, f"http://hooks.rebind.invalid:{port}/hook")
        finish_a_run(wh)
        result = webhook_delivery.dispatch(wh, deadline_s=10, resolver=resolver)
    assert result.succeeded == 1, (result, [attempts(pg, d) for d, *_ in delivery_rows(pg, ep)])
    assert asked == ["hooks.rebind.invalid"], "resolved once, by the guard"
    assert rx.received[0].headers["host"] == f"hooks.rebind.invalid:{port}"


def test_link_local_answer_refused_even_when_private_targets_are_allowed(
    wh: Settings, pg: psycopg.Connection
) -> None:
    with Receiver() as rx:
        ep = _endpoint_at(wh, f"http://metadata.rebind.invalid:{rx.server.server_address[1]}/hook")
        finish_a_run(wh)
        result = webhook_delivery.dispatch(wh, deadline_s=10, resolver=lambda host, port: ["169.254.169.254"])
    assert wh.webhook_allow_private and result.failed == 1 and rx.received == []
    [(delivery, *_)] = delivery_rows(pg, ep)
    assert "169.254.169.254 (a cloud metadata service)" in attempts(pg, delivery)[0][3]


def test_a_receiver_dribbling_its_answer_is_cut_at_the_attempt_deadline(
    wh: Settings, pg: psycopg.Connection
) -> None:
    """Each byte arrives well within the per-read timeout; the attempt as a whole may not."""
    wh = wh.model_copy(update={"webhook_timeout_s": 2.0})
    with Receiver() as rx:
        rx.body_out, rx.dribble_s = b"x" * 30, 0.5
        ep = endpoints.add_endpoint(wh, rx.url, ["refresh.completed"])
        finish_a_run(wh)
        started = time.monotonic()
        result = webhook_delivery.dispatch(wh, deadline_s=60)
        took = time.monotonic() - started
    assert result.failed == 1 and took < 2.0 + 2.5, (result, took)
    [(delivery, *_)] = delivery_rows(pg, ep.id)
    assert "ReadTimeout" in attempts(pg, delivery)[0][3]


def test_passphrase_secrets_of_the_sha256_era_still_sign_and_are_re_encrypted(
    wh: Settings, pg: psycopg.Connection
) -> None:
    passphrase = "an operator's passphrase"
    wh = wh.model_copy(update={"secret_key": SecretStr(passphrase)})
    legacy = Fernet(base64.urlsafe_b64encode(hashlib.sha256(passphrase.encode()).digest()))
    secret = signing.new_secret()
    with Receiver(secrets=[secret]) as rx:
        ep = _endpoint_at(wh, rx.url, secret_enc=legacy.encrypt(secret.encode()).decode())
        finish_a_run(wh)
        assert webhook_delivery.dispatch(wh, deadline_s=10).succeeded == 1
    assert rx.received[0].verified_with == [secret], "nothing lost: the old value still signs"
    stored = pg_scalar(pg, "select secret_enc from refresh_control.webhook_endpoints where id = %s", (ep,))
    assert stored.startswith("scrypt$") and open_secrets(wh, pg).decrypt(stored) == secret


def test_no_key_on_this_machine_is_one_clear_line_and_creates_none(
    wh: Settings, pg: psycopg.Connection
) -> None:
    """Endpoints exist, but neither REFRESH_SECRET_KEY nor the key file is here (another machine
    created them): refuse in one line instead of minting a key nobody else can read."""
    key = wh.state_dir / "webhook-secrets.key"
    ep = _endpoint_at(wh, "http://127.0.0.1:9/hook")
    moved = key.with_name("moved-away.key")
    key.rename(moved)
    try:
        with pytest.raises(ConfigError, match="no key for their secrets") as err:
            endpoints.add_endpoint(wh, "http://127.0.0.1:9/other", None)
        assert "\n" not in str(err.value) and "REFRESH_SECRET_KEY" in str(err.value)
        res = CliRunner().invoke(app, ["webhooks", "rotate-secret", str(ep)])
        assert res.exit_code == 1 and "no key for their secrets" in res.output, res.output
        assert not key.exists(), "no new key minted"
        assert (
            pg_scalar(pg, "select count(*) from refresh_control.webhook_endpoints where removed_at is null")
            == 1
        )
    finally:
        moved.rename(key)
