"""`python -m flows.api.runner '<json parameters>'`: one daily refresh started by the API
without a Prefect server (the process the API starts in the background)."""

from __future__ import annotations

import json
import sys
from datetime import date

from flows.daily_refresh import daily_refresh
from flows.errors import RefreshError


def main(argv: list[str]) -> int:
    params = json.loads(argv[1])
    for key in ("start_date", "end_date"):
        if params.get(key):
            params[key] = date.fromisoformat(params[key])
    try:
        daily_refresh(**params)
    except RefreshError:  # failed, or another refresh held the lock: the audit says which
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
