"""Scale-out: the slices of one table on a Dask cluster (prefect-dask's DaskTaskRunner).

(Not named `distributed`: Prefect puts flows/ on sys.path when it loads a flow by file path,
and such a module would hide the `distributed` package.)

Off by default: slices then run one after the other in the table's own thread, as always.
`REFRESH_DASK_ADDRESS` sends them to an existing Dask scheduler; `REFRESH_SLICE_WORKERS=N`
starts a `distributed.LocalCluster` of N worker processes for the run. One cluster serves
every table of a run (`slice_runner`, entered by the flow around extraction).

What stays as without Dask (docs/scaling.md):
- a slice is one Postgres transaction, opened by the worker that reads it: read, delete,
  COPY, checkpoint, slice audit and the fence (flows.control.runs.check_lock), then commit;
- the refresh lock stays on the flow's connection. The fence needs no lock of its own: it
  checks, from any session, that the run's named lock session still holds the lock;
- a table fails as without Dask: a slice failing for good lets the slices already running end
  (each commits or rolls back), starts no new one, and the table's outcome is final only then.

No secret travels through Dask: a worker takes the Postgres DSN and the BigQuery key from its
own environment (REFRESH_PG_DSN, REFRESH_BQ_CREDENTIALS_*), the rest from the flow's settings.

Slices run as plain Dask tasks, not Prefect task runs: a worker needs no Prefect API (the
flow's ephemeral API is not reachable from it), and thousands of slices cost no API calls.
Each slice is in the slice audit, and the Dask dashboard shows them while they run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from flows.core import retry
from flows.core.errors import ConfigError, TransientError
from flows.core.settings import Settings, get_settings
from flows.engine.bigquery import BigQueryClients, make_clients

log = logging.getLogger(__name__)


class SliceJob(Protocol):
    """One slice's work (a dataclass): `run` does all its attempts until `deadline`
    (time.monotonic() of the process it runs in), counting them in `attempts`."""

    settings: Settings
    clients: BigQueryClients | None
    attempts: int

    def run(self, deadline: float) -> Any: ...


J = TypeVar("J", bound=SliceJob)

# The runner of the run in progress in this process (one refresh at a time: the refresh lock).
_active: Any = None
_active_lock = threading.Lock()

# Fields that never go to a worker: it reads them from its own environment.
SECRET_FIELDS = ("pg_dsn", "bq_credentials_json")


def task_runner(settings: Settings) -> Any:
    """The DaskTaskRunner the settings ask for, or None (slices run in the table's thread)."""
    if settings.dask_address is None and settings.slice_workers == 0:
        return None
    if settings.dask_address is not None and settings.slice_workers:
        raise ConfigError(
            "REFRESH_DASK_ADDRESS and REFRESH_SLICE_WORKERS are both set: set the address to use "
            "an existing Dask cluster, or the number of workers of a local one, not both"
        )
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError(
            "REFRESH_DASK_ADDRESS / REFRESH_SLICE_WORKERS need the `dask` extra: "
            f"pip install 'sqp-refresh[dask]' (prefect-dask and distributed) ({exc})"
        ) from exc
    if settings.dask_address is not None:
        return DaskTaskRunner(address=settings.dask_address)
    # One thread per worker process: a slice is mostly Arrow encoding and COPY, which hold
    # the GIL in parts, so processes, not threads, are what scales on one machine.
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": settings.slice_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",  # a free port: never :8787 of another cluster
        }
    )


@contextlib.contextmanager
def slice_runner(settings: Settings) -> Iterator[Any]:
    """Slices of every table refreshed in this block go to the configured Dask cluster.

    A LocalCluster lives exactly as long as the block; an existing cluster is only connected
    to. Yields the runner (None when Dask is off).
    """
    global _active
    runner = task_runner(settings)
    if runner is None:
        yield None
        return
    with runner:
        client = runner.client  # connects (or starts the LocalCluster) now, not in a table's thread
        _logger().info("slices run on Dask: %s", client)
        with _active_lock:
            _active = runner
        try:
            yield runner
        finally:
            with _active_lock:
                _active = None


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger (its lines reach the Prefect UI) inside a run, else the module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def portable(job: J) -> J:
    """The job as sent to a worker: no client objects, no secrets."""
    blank = dict.fromkeys(SECRET_FIELDS)
    return replace(job, clients=None, settings=job.settings.model_copy(update=blank))  # type: ignore[type-var]


@functools.lru_cache(maxsize=4)
def worker_clients(settings: Settings) -> BigQueryClients:
    """BigQuery clients of this worker process, made once per settings and reused."""
    return make_clients(settings)


def _own_secrets(settings: Settings) -> Settings:
    own = get_settings()
    return settings.model_copy(update={f: getattr(own, f) for f in SECRET_FIELDS})


@dataclass(frozen=True)
class _Done:
    """A slice's end on a worker: its result or its error, with the attempts it took and the
    retries it made. The retry counter (flows.core.retry) lives in the table's thread of
    the flow process, out of the worker's reach, so the worker counts its own and hands them
    back; `_result` adds them there."""

    value: Any
    error: Exception | None
    attempts: int
    retries: int


def _run_on_worker(job: SliceJob, deadline_epoch: float) -> _Done:
    """Runs in the Dask worker: secrets and clients from this process, the deadline in its clock."""
    settings = _own_secrets(job.settings)
    job = replace(job, settings=settings, clients=worker_clients(settings))  # type: ignore[type-var]
    count = retry.start_counting()
    try:
        value = job.run(time.monotonic() + (deadline_epoch - time.time()))
    except Exception as exc:
        return _Done(None, exc, job.attempts, count.n)
    return _Done(value, None, job.attempts, count.n)


def run_slices(jobs: Sequence[J], deadline: float) -> Generator[tuple[J, Callable[[], Any]], None, None]:
    """Each job with a callable that returns its result or raises its error, as they finish.

    Without Dask: in order, each run when its callable is called (a plain sequential loop).
    With Dask: at most two per cluster worker thread in flight, in completion order. Close
    the iterator when done (contextlib.closing): a consumer that stops early (a slice failed
    for good) starts no new slice, and closing waits for those already sent to the cluster.
    """
    with _active_lock:
        runner = _active
    if runner is None:
        for job in jobs:
            yield job, functools.partial(job.run, deadline)
        return
    from distributed import as_completed

    client = runner.client
    # Two per worker thread: one running, one waiting on the worker, so no worker idles for
    # the round trip to this process between two slices.
    slots = 2 * max(1, sum(client.nthreads().values()))
    deadline_epoch = time.time() + (deadline - time.monotonic())
    todo = deque(jobs)
    running: dict[Any, J] = {}
    finished = as_completed(loop=client.loop)

    def submit() -> None:
        job = todo.popleft()
        future = client.submit(_run_on_worker, portable(job), deadline_epoch, pure=False)
        running[future] = job
        finished.add(future)

    for _ in range(min(slots, len(todo))):
        submit()
    try:
        for future in finished:
            job = running.pop(future)
            yield job, functools.partial(_result, future, job)
            if todo:
                submit()
    finally:
        if running:
            # A running slice cannot be stopped from here: let it end (commit or roll back),
            # so the table's next attempt never loads the same slice alongside it.
            until = max(deadline, time.monotonic()) + job_grace_s(jobs)
            for future in running:
                with contextlib.suppress(Exception):
                    future.exception(timeout=max(0.0, until - time.monotonic()))
            client.cancel(list(running))


def _result(future: Any, job: SliceJob) -> Any:
    """The slice's result or its own error; losing the worker is a transient failure. Called
    in the table's thread: the worker's attempts go on `job`, its retries to the table's count.

    Dask runs the task of a worker that died again elsewhere by itself; KilledWorker comes
    only after several such deaths (a slice that kills its worker). Whatever the lost worker
    had not committed rolled back with its connection.
    """
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError

    try:
        done: _Done = future.result()
    except (KilledWorker, FutureCancelledError, CommClosedError) as exc:
        raise TransientError(f"the Dask worker of the slice was lost ({type(exc).__name__}: {exc})") from exc
    job.attempts = done.attempts
    retry.add(done.retries)
    if done.error is not None:
        raise done.error
    return done.value


def job_grace_s(jobs: Sequence[SliceJob]) -> float:
    """How long after the deadline a running slice may still take: one stalled read."""
    return (jobs[0].settings.bq_stall_timeout_s if jobs else 60.0) + 30.0
