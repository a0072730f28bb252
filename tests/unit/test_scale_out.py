"""flows.engine.scale_out: which runner the settings ask for, what a worker receives, in-process order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import SecretStr

from flows.core import retry
from flows.core.errors import ConfigError
from flows.core.settings import Settings
from flows.engine import scale_out
from flows.engine.bigquery import BigQueryClients


def test_off_by_default_and_a_local_cluster_or_an_address_when_set() -> None:
    assert scale_out.task_runner(Settings()) is None
    local = scale_out.task_runner(Settings(slice_workers=3))
    assert local.address is None
    assert local.cluster_kwargs == {
        "n_workers": 3,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
    }
    remote = scale_out.task_runner(Settings(dask_address="tcp://scheduler:8786"))
    assert remote.address == "tcp://scheduler:8786" and not remote.cluster_kwargs


def test_both_an_address_and_a_worker_count_are_refused() -> None:
    with pytest.raises(ConfigError, match="REFRESH_DASK_ADDRESS and REFRESH_SLICE_WORKERS are both set"):
        scale_out.task_runner(Settings(slice_workers=2, dask_address="tcp://scheduler:8786"))


@dataclass
class Job:
    settings: Settings
    clients: BigQueryClients | None
    name: str
    ran: list[str] = field(default_factory=list)
    attempts: int = 0

    def run(self, deadline: float) -> Any:
        self.ran.append(self.name)
        return self.name


def test_a_job_goes_to_a_worker_without_clients_or_secrets() -> None:
    settings = Settings(
        pg_dsn=SecretStr("postgresql://u:hunter2@db/x"),
        bq_credentials_json=SecretStr('{"private_key": "k"}'),
        raw_schema="raw_x",
    )
    sent = scale_out.portable(Job(settings, object(), "a"))  # type: ignore[arg-type]
    assert sent.clients is None
    assert sent.settings.pg_dsn is None and sent.settings.bq_credentials_json is None
    assert sent.settings.raw_schema == "raw_x"
    assert settings.pg_dsn is not None  # the flow's own settings keep them


def test_without_dask_each_slice_runs_in_order_when_its_result_is_asked_for() -> None:
    ran: list[str] = []
    jobs = [Job(Settings(), None, n, ran) for n in ("a", "b", "c")]
    results = scale_out.run_slices(jobs, deadline=0.0)
    job, result = next(results)
    assert job.name == "a" and ran == []
    assert result() == "a" and ran == ["a"]
    results.close()  # a consumer stopping after a failure: nothing else runs
    assert ran == ["a"]


class _Finished:
    """A Dask future whose task has ended."""

    def __init__(self, done: Any) -> None:
        self.done = done

    def result(self) -> Any:
        return self.done


def test_a_workers_attempts_and_retries_reach_the_job_and_the_tables_count() -> None:
    """The retry counter is the table thread's: a worker's retries come back with its result,
    and with its error."""
    count = retry.start_counting()
    ok, bad = Job(Settings(), None, "ok"), Job(Settings(), None, "bad")
    assert scale_out._result(_Finished(scale_out._Done("rows", None, 3, 5)), ok) == "rows"
    assert (ok.attempts, count.n) == (3, 5)
    with pytest.raises(ValueError, match="bad data"):
        scale_out._result(_Finished(scale_out._Done(None, ValueError("bad data"), 1, 2)), bad)
    assert (bad.attempts, count.n) == (1, 7)
