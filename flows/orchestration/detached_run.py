"""`python -m flows.orchestration.detached_run '<json parameters>'`: one daily refresh started by the API
without a Prefect server (the process the API starts in the background)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from datetime import date

import psycopg

from flows.control import triggers
from flows.control.runs import RefreshBusyError
from flows.core.db import connect
from flows.core.errors import RefreshError
from flows.core.settings import get_settings
from flows.orchestration.daily_refresh import daily_refresh

log = logging.getLogger(__name__)


def record_refusal(reason: str) -> None:
    """Another refresh took the lock between the API's check and this process: the trigger
    says so (`GET /api/refresh/triggers/{id}`), instead of waiting for a run that never comes."""
    settings = get_settings()
    try:
        with connect(settings, autocommit=True) as conn:
            triggers.refuse_process(conn, settings.control_schema, os.getpid(), socket.gethostname(), reason)
    except psycopg.Error as exc:
        log.error("could not record that this trigger was refused (%s): %s", reason, exc)


def main(argv: list[str]) -> int:
    params = json.loads(argv[1])
    for key in ("start_date", "end_date"):
        if params.get(key):
            params[key] = date.fromisoformat(params[key])
    try:
        daily_refresh(**params)
    except RefreshBusyError as exc:
        record_refusal(str(exc))
        return 1
    except RefreshError:  # failed: the audit says why
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
